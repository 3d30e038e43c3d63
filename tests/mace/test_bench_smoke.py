"""The benchmark's MACE part end to end on the shipped data (``--profile smoke``: 1 epoch, ~20 frames,
ensemble of 2, no sweep): every metric for every method and set, and the numbers match a recomputation
from the written predictions and a direct call of the calculator."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from .helpers import DATA, REPO


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_mace")
    cmd = [sys.executable, "-m", "benchmarks.run", "--backbone", "mace", "--profile", "smoke", "--out", str(out),
           "--id-file", str(DATA / "iso7_train.xyz"), "--ood-file", f"ood_mol={DATA / 'iso7_ood_mol.xyz'}",
           "--ood-file", f"ood_hot={DATA / 'iso7_ood_hot.xyz'}"]
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


def test_results_complete_and_consistent(bench):
    from benchmarks.check import check_results

    r = check_results(bench / "results_mace.json")
    assert r["data"]["eval_sets"] == ["val", "test", "ood_mol", "ood_hot"]
    assert r["cost"]["training"]["ensemble"]["members"] == 2
    report = (bench / "report.md").read_text()
    assert "### Targets" in report and "| e²IP | ood_hot |" in report
    assert (bench / "mace" / "plots" / "reliability_all_methods.png").is_file()


def test_predictions_match_the_calculator(bench):
    """Frame 0 of the test split through E2IPMACECalculator reproduces the written e2ip predictions."""
    import torch
    from e2ip_plugins.metrics import UQMetricState
    from mace_ext import E2IPMACECalculator

    r = json.loads((bench / "results_mace.json").read_text())
    model = r["runs"]["e2ip_s0"]["artifact"]
    calc = E2IPMACECalculator(model_paths=model, device="cpu", default_dtype=r["settings"]["dtype"])
    atoms = ase.io.read(r["data_files"]["test"], index=0)
    calc.calculate(atoms, ["energy", "forces"])
    npz = np.load(bench / r["methods"]["e2ip"]["sets"]["test"]["predictions"])
    n = len(atoms)
    np.testing.assert_allclose(npz["pred_forces"][:n], calc.results["forces"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(npz["ref_forces"][:n], atoms.arrays["REF_forces"])
    pred = calc.predictive()
    cols = UQMetricState().update(pred, torch.as_tensor(atoms.arrays["REF_forces"], dtype=pred.mean.dtype)).columns()
    np.testing.assert_allclose(npz["raw_u"][:n], cols["u"], rtol=1e-5)
    np.testing.assert_allclose(npz["raw_nll"][:n], cols["nll"], rtol=1e-5, atol=1e-5)
