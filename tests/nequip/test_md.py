"""MD tools on NequIP (issue 13): UDD bias force = −∂E_bias/∂r through a real NequIP model (checkpoint and
``nequip-package`` file, float64), ``e2ip-md`` on a checkpoint (subprocess), compiled models refused for UDD.

One module-scoped artefact: ``nequip-train`` (1 epoch, float64, ``configs/nequip/e2ip.yaml``) and
``nequip-package build`` of its checkpoint (~30 s together on one CPU thread). No AOTInductor compile here
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
from ._cli_helpers import DATA, nequip_train

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("nequip_md")
    nequip_train(d / "train", "run=[train]", "max_epochs=1", f"train_file={DATA / 'iso7_val.xyz'}",
                 f"val_file={DATA / 'iso7_val.xyz'}", f"test_file={DATA / 'iso7_test.xyz'}",
                 "training_module.model.model_dtype=float64")
    ckpt = d / "train" / "best.ckpt"
    pkg = d / "model.nequip.zip"
    res = subprocess.run([str(BIN / "nequip-package"), "build", str(ckpt), str(pkg)], cwd=d, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
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
