"""The benchmark's MACE part end to end on the shipped data (``--profile smoke``: 1 epoch, ~20 frames,
ensemble of 2, no sweep): every metric for every method and set, and the numbers match a recomputation
from the written predictions and a direct call of the calculator."""

import json

import ase.io
import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from benchmarks.check import run_smoke

    return run_smoke("mace", tmp_path_factory.mktemp("bench_mace"))


def test_results_complete_and_consistent(bench):
    from benchmarks.check import check_smoke_run

    check_smoke_run(bench, "mace")


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
