"""MD tools on MACE (issue 13): UDD bias force = −∂E_bias/∂r through a real MACE model, and ``e2ip-md``
on a saved ``.model`` file (subprocess), in float64. Tiny freshly built models (seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from e2ip_plugins.md import UDDCalculator, UDDUnsupportedError, find_adapter
from mace_ext import E2IPMACECalculator, attach_e2ip_head
from mace_ext.md import ADAPTER, MACEAdapter

from ..udd_checks import check_udd_against_finite_differences
from .helpers import first_molecule, tiny_mace

E2IP_MD = Path(sys.executable).parent / "e2ip-md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mace_md")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = attach_e2ip_head(tiny_mace(1), num_channels=4, mlp_hidden=8, force_rms=1.1)
        with torch.no_grad():  # leave the zero-initialised last layer: σ² then depends on the geometry
            for p in model.e2ip_head.parameters():
                p.add_(0.5 * torch.randn_like(p))
        torch.save(model, d / "e2ip.model")
        torch.save(tiny_mace(1), d / "plain.model")
    finally:
        torch.set_default_dtype(old)
    start = d / "start.xyz"
    ase.io.write(start, first_molecule())
    return {"dir": d, "e2ip": d / "e2ip.model", "plain": d / "plain.model", "start": start}


def test_entry_point_selects_mace_adapter(model_files):
    adapter = find_adapter(model_files["e2ip"])
    assert isinstance(adapter, MACEAdapter)
    assert isinstance(adapter.open(model_files["e2ip"]), E2IPMACECalculator)


def test_udd_bias_force_matches_finite_differences(model_files):
    calc = ADAPTER.open(model_files["e2ip"])
    check_udd_against_finite_differences(calc, ADAPTER.variance_function(calc), first_molecule(), (0, 5, 12),
                                         min_force=1e-4, atol_rel=1e-9)


def test_cli_run_on_model_file(model_files, tmp_path):
    out = tmp_path / "md"
    cmd = [str(E2IP_MD), "--model", str(model_files["e2ip"]), "--structure", str(model_files["start"]),
           "--temperature", "300", "--steps", "6", "--timestep", "0.5", "--interval", "2", "--trust-lo", "0.0",
           "--udd", "0.5", "2.0", "--seed", "0", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    frames = ase.io.read(out / "trajectory.extxyz", ":")
    assert [int(f.info["md_step"]) for f in frames] == [0, 2, 4, 6]
    for f in frames:
        assert f.arrays["forces_covariance"].shape == (19, 9) and f.arrays["forces_uncertainty"].shape == (19,)
        assert f.get_forces().shape == (19, 3) and np.isfinite(f.get_potential_energy())
        assert f.info["trust_band"] == "candidate"  # trust_lo = 0, trust_hi = inf
    assert len(ase.io.read(out / "candidates.extxyz", ":")) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["counts"]["candidate"] == 4 and summary["steps"] == 6


def test_cli_rejects_model_without_head(model_files, tmp_path):
    out = tmp_path / "md"
    cmd = [str(E2IP_MD), "--model", str(model_files["plain"]), "--structure", str(model_files["start"]),
           "--steps", "2", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "no e2ip head" in res.stderr
    assert not out.exists()


def test_udd_refuses_committee(model_files):
    calc = E2IPMACECalculator(model_paths=[str(model_files["e2ip"])] * 2, device="cpu", default_dtype="float64")
    with pytest.raises(UDDUnsupportedError, match="exactly one"):
        UDDCalculator(calc, 1.0, 1.0)


def test_torchscript_model_monitors_but_refuses_udd(model_files):
    """MACE's `_compiled.model` (TorchScript, as mace_run_train_e2ip writes it) opens for monitoring; UDD
    is refused at construction with a message naming the eager `.model`."""
    from e3nn.util import jit

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.load(model_files["e2ip"], weights_only=False)
        path = model_files["dir"] / "e2ip_compiled.model"
        torch.jit.save(jit.compile(model), path)
    finally:
        torch.set_default_dtype(old)
    calc = find_adapter(path).open(path)
    atoms = first_molecule()
    atoms.calc = calc
    atoms.get_forces()
    assert calc.results["forces_covariance"].shape == (19, 3, 3)
    with pytest.raises(UDDUnsupportedError, match=r"compiled MACE model.*eager `<name>\.model`"):
        UDDCalculator(calc, 1.0, 1.0)
