"""MD tools on NequIP (issue 13): UDD bias force = −∂E_bias/∂r through a real NequIP model (checkpoint and
``nequip-package`` file, float64), ``e2ip-md`` on a checkpoint (subprocess), compiled models refused for UDD.

One artefact, shared with ``test_deploy.py`` (session fixture ``trained_float64``): ``nequip-train``
(1 epoch, float64, ``configs/nequip/e2ip.yaml``) and ``nequip-package build`` of its checkpoint. No AOTInductor compile here
(``test_deploy.py`` covers compiled models); the UDD refusal is tested on NequIP's own compiled-model
wrapper (``DictInputOutputWrapper`` around an opaque runner, the structure ``load_compiled_model`` returns).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
import torch

from e2ip_plugins.md import UDDCalculator, UDDUnsupportedError, find_adapter

from ..udd_checks import check_udd_against_finite_differences
from ._cli_helpers import DATA

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def artefacts(trained_float64, tmp_path_factory):
    d = tmp_path_factory.mktemp("nequip_md")
    ckpt, pkg = trained_float64["ckpt"], trained_float64["package"]
    start = d / "start.xyz"
    ase.io.write(start, ase.io.read(DATA / "iso7_test.xyz", 0))
    return {"ckpt": ckpt, "package": pkg, "start": start}


def test_entry_points_select_nequip_adapter(artefacts):
    from nequip_ext.md import NequIPAdapter

    for name in ("a.ckpt", "a.nequip.zip", "a.nequip.pt2"):
        assert isinstance(find_adapter(name), NequIPAdapter)


@pytest.mark.parametrize("which", ["ckpt", "package"])
def test_udd_bias_force_matches_finite_differences(artefacts, which):
    adapter = find_adapter(artefacts[which])
    calc = adapter.open(artefacts[which])
    check_udd_against_finite_differences(calc, adapter.variance_function(calc), ase.io.read(artefacts["start"]),
                                         (0, 3, 10), min_force=1e-3, atol_rel=1e-8)


def test_cli_run_on_checkpoint(artefacts, tmp_path):
    out = tmp_path / "md"
    cmd = [str(BIN / "e2ip-md"), "--model", str(artefacts["ckpt"]), "--structure", str(artefacts["start"]),
           "--temperature", "300", "--steps", "6", "--timestep", "0.5", "--interval", "3", "--trust-lo", "0.0",
           "--udd", "0.5", "1.0", "--seed", "0", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    frames = ase.io.read(out / "trajectory.extxyz", ":")
    assert [int(f.info["md_step"]) for f in frames] == [0, 3, 6]
    for f in frames:
        assert f.arrays["forces_covariance"].shape == (19, 9) and f.arrays["forces_uncertainty"].shape == (19,)
        assert f.arrays["udd_bias_forces"].shape == (19, 3) and f.info["udd_bias_energy"] <= 0
    assert len(ase.io.read(out / "candidates.extxyz", ":")) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6


def test_compiled_model_refused_for_udd(artefacts):
    from nequip.nn.compile import DictInputOutputWrapper

    from nequip_ext import E2IPNequIPCalculator
    from nequip_ext.compile import e2ip_ase_target

    eager = E2IPNequIPCalculator.from_saved_model(artefacts["ckpt"], device="cpu", chemical_species_to_atom_type_map=True)
    target = e2ip_ase_target()
    graph_model = eager.model

    def runner(inputs):  # stands in for torch._inductor.aoti_load_package(...): a callable, not a Module
        with torch.inference_mode(False), torch.enable_grad():  # the wrapper calls it under inference_mode
            out = graph_model(dict(zip(target["input"], [x.clone() for x in inputs])))
            return [out[k].detach() for k in target["output"]]

    wrapper = DictInputOutputWrapper(runner, list(target["input"]), list(target["output"])).eval()
    compiled = E2IPNequIPCalculator(model=wrapper,
                                    device="cpu", transforms=eager.transforms)
    compiled.e2ip_source = "model.nequip.pt2"
    atoms = ase.io.read(artefacts["start"])
    atoms.calc = compiled
    assert atoms.get_forces().shape == (19, 3)  # the stand-in runs like a compiled model
    with pytest.raises(UDDUnsupportedError, match=r"compiled.*\.ckpt.*\.nequip\.zip"):
        UDDCalculator(compiled, 1.0, 1.0)


def test_cli_unreadable_compiled_model_writes_nothing(artefacts, tmp_path):
    fake = tmp_path / "broken.nequip.pt2"
    fake.write_bytes(b"not a model")
    out = tmp_path / "md"
    cmd = [str(BIN / "e2ip-md"), "--model", str(fake), "--structure", str(artefacts["start"]), "--steps", "2",
           "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "nequip adapter cannot open" in res.stderr
    assert not out.exists()


def test_committee_of_nequip_calculators(artefacts):
    """A NequIP committee is e2ip_plugins.committee.CommitteeCalculator over E2IPNequIPCalculator members
    (docs/energy_uncertainty.md §5): U_epi = mean U_epi,k + the members' force sample covariance,
    σ_E = sqrt(Var_k E_k + mean σ²_E,k), on a real nequip-train checkpoint and a perturbed copy."""
    import numpy as np

    from e2ip_plugins.committee import CommitteeCalculator
    from nequip_ext import E2IPNequIPCalculator

    members = [E2IPNequIPCalculator.from_saved_model(artefacts["ckpt"]) for _ in range(2)]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in members[1].model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    atoms = ase.io.read(artefacts["start"])
    singles = []
    for m in members:
        a = atoms.copy()
        a.calc = m
        a.get_forces()
        singles.append(dict(m.results))
    atoms.calc = CommitteeCalculator(members)
    atoms.get_forces()
    r = atoms.calc.results
    f = np.stack([s["forces"] for s in singles])
    assert np.abs(f[0] - f[1]).max() > 1e-6  # the members differ
    c = np.einsum("kia,kib->iab", f - f.mean(0), f - f.mean(0))  # K - 1 = 1
    np.testing.assert_allclose(r["forces_covariance_committee"], c, atol=1e-12)
    epi = np.mean([s["forces_covariance_epistemic"] for s in singles], axis=0) + c
    np.testing.assert_allclose(r["forces_covariance_epistemic"], epi, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(r["forces_uncertainty"], np.sqrt(np.trace(epi, axis1=1, axis2=2) / 3), rtol=1e-10)
    e = np.array([s["energy"] for s in singles])
    sig = np.array([s["energy_uncertainty"] for s in singles])
    assert r["energy_uncertainty"] == pytest.approx(np.sqrt(np.var(e, ddof=1) + np.mean(sig**2)), rel=1e-10)
