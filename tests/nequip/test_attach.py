"""The e²IP head on a NequIP model the user already has (issue 27): ``nequip_ext.AttachedE2IPModel``.

One module-scoped pipeline through the real CLIs: a tiny PLAIN NequIP model
(``benchmarks/configs/nequip_plain.yaml``, float64, 1 epoch on ``iso7_val.xyz``) → ``nequip-package build`` →
``nequip-train -cn attach_e2ip`` (the shipped config, frozen backbone, 2 epochs) → ``nequip-package build`` of the
attach checkpoint; the rest runs in-process. ``nequip-compile --target e2ip_ase`` of the attach package (AOTInductor,
1.5-2.5 min) is opt-in: ``E2IP_SLOW_TESTS=1``.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import nequip_ext
import nequip_ext._keys as K
import nequip_ext.attach
from nequip.data import AtomicDataDict

from ._cli_helpers import DATA, REPO, SLOW, load_ckpt, nequip_train
from .test_energy_uq import CFG, _graphs, _rotated

BIN = pathlib.Path(sys.executable).parent
UQ = ("uq_head.", "uq_novelty.", "uq_energy.", "uq_committee.")
MODEL = "model.sole_model."  # prefix of the model's entries in a nequip-train checkpoint's state dict


def _package(ckpt: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([str(BIN / "nequip-package"), "build", str(ckpt), str(out)], cwd=out.parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"plain_ckpt", "plain_pkg", "ckpt" (attach best.ckpt), "pkg" (its package), "dir"}; not to be modified."""
    d = tmp_path_factory.mktemp("attach")
    val = str(DATA / "iso7_val.xyz")
    nequip_train(d / "plain", "run=[train]", "max_epochs=1", f"train_file={val}", f"val_file={val}",
                 "training_module.model.model_dtype=float64", config="nequip_plain",
                 config_dir=REPO / "benchmarks" / "configs")
    plain_pkg = _package(d / "plain" / "best.ckpt", d / "plain.nequip.zip")
    nequip_train(d / "attach", "run=[train]", "max_epochs=2", f"backbone_package={plain_pkg}", f"train_file={val}",
                 f"val_file={val}", config="attach_e2ip")
    ckpt = d / "attach" / "best.ckpt"
    return {"dir": d, "plain_ckpt": d / "plain" / "best.ckpt", "plain_pkg": plain_pkg, "ckpt": ckpt,
            "pkg": _package(ckpt, d / "attach.nequip.zip")}


def _load(path):
    from nequip.model.saved_models.load_utils import load_saved_model

    return load_saved_model(str(path))


def _batch(n=3):
    return AtomicDataDict.batched_from_list(_graphs(n))


def _split(model):
    params = dict(model.named_parameters())
    head = {k: v for k, v in params.items() if any(f".{u}" in f".{k}" for u in UQ)}
    return {k: v for k, v in params.items() if k not in head}, head


def test_nequip_api_pinned():
    """What the attach builder relies on from NequIP (fails loudly if a new version moves it)."""
    import inspect

    from nequip.model import ModelFromCheckpoint, ModelFromPackage, NequIPGNNModel
    from nequip.model.saved_models.package import _get_package_metadata, _get_shared_importer
    from nequip.nn import ForceStressOutput, GraphModel, SequentialGraphNetwork
    from nequip.train.lightning import _SOLE_MODEL_KEY, NequIPLightningModule
    from nequip.utils.resolvers import _DEFAULT_RESOLVERS

    assert list(inspect.signature(ModelFromPackage).parameters) == ["package_path", "compile_mode"]
    assert list(inspect.signature(ModelFromCheckpoint).parameters) == ["checkpoint_path", "compile_mode"]
    assert {"type_names_from_package", "cutoff_radius_from_package"} <= set(_DEFAULT_RESOLVERS)
    assert _SOLE_MODEL_KEY == "sole_model" and callable(_get_shared_importer) and callable(_get_package_metadata)
    assert {"before", "after"} <= set(inspect.signature(SequentialGraphNetwork.insert).parameters)
    assert "get_method" in inspect.getsource(NequIPLightningModule._build_model)  # builder called with the YAML kwargs
    m = NequIPGNNModel(**CFG)
    assert isinstance(m, GraphModel) and isinstance(m.model, ForceStressOutput)
    assert isinstance(m.model.func, SequentialGraphNetwork) and hasattr(m.model, "do_derivatives")
    assert list(inspect.signature(ForceStressOutput).parameters)[:2] == ["func", "do_derivatives"]
    assert m.type_names == CFG["type_names"] and m.model_dtype == torch.float64
    assert [n for n in m.model.func._modules if n.endswith("_convnet")] == ["layer0_convnet", "layer1_convnet"]
    assert "per_type_energy_scale_shift" in m.model.func._modules


@pytest.mark.parametrize("route", ["package", "checkpoint"])
def test_attached_equals_original_exactly(runs, route):
    """Float64 eager: energies and forces of the attached model are the plain model's to the last bit; frozen."""
    src = ({"package_path": str(runs["plain_pkg"])} if route == "package"
           else {"checkpoint_path": str(runs["plain_ckpt"])})
    model = nequip_ext.AttachedE2IPModel(**src, uq_head={"num_channels": 4, "mlp_hidden": 8}, seed=3,
                                         type_names=["C", "H", "O"])
    orig = _load(runs["plain_pkg"] if route == "package" else runs["plain_ckpt"])
    batch = _batch()
    out, ref = model(dict(batch)), orig(dict(batch))
    for key in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        assert (out[key] - ref[key]).abs().max().item() == 0.0, key
    assert out[K.FORCES_COVARIANCE_KEY].shape == (batch[AtomicDataDict.POSITIONS_KEY].shape[0], 3, 3)
    backbone, head = _split(model)
    assert backbone and head and not any(p.requires_grad for p in backbone.values())
    assert all(p.requires_grad for p in head.values())
    assert all(p.requires_grad for p in nequip_ext.AttachedE2IPModel(**src, freeze_backbone=False).parameters())


def test_attach_training_keeps_backbone_trains_head(runs):
    """``nequip-train -cn attach_e2ip``: every backbone parameter (raw and EMA) is bit-identical to the plain
    package's; the head's parameters moved away from their initialisation."""
    sd = load_ckpt(runs["ckpt"])
    hp = dict(sd["hyper_parameters"]["info_dict"]["training_module"]["model"])
    assert hp.pop("_target_") == "nequip_ext.AttachedE2IPModel"
    init = nequip_ext.AttachedE2IPModel(**hp)  # the run's own starting point (same seed)
    plain = dict(_load(runs["plain_pkg"]).named_parameters())
    ema = dict(_load(runs["ckpt"]).named_parameters())
    raw = {k[len(MODEL):]: v for k, v in sd["state_dict"].items() if k.startswith(MODEL)}
    backbone, head = _split(init)
    assert set(backbone) == set(plain)
    for name in plain:
        assert torch.equal(raw[name], plain[name]) and torch.equal(ema[name], plain[name]), name
    moved = [n for n in head if not torch.equal(raw[n], head[n].detach())]
    assert len(moved) == len(head), sorted(set(head) - set(moved))


def test_frozen_after_checkpoint_reload(runs):
    """NequIP rebuilds the model through the builder on every load: the backbone comes back frozen, and the head
    reads detached features in training (no backward pass through the frozen backbone)."""
    model = _load(runs["ckpt"])
    backbone, head = _split(model)
    assert not any(p.requires_grad for p in backbone.values()) and all(p.requires_grad for p in head.values())
    assert model.model.func.uq_head.detach_input and model.model.func.uq_novelty.detach_input
    model.train()
    batch = _batch(2)
    batch[AtomicDataDict.POSITIONS_KEY].requires_grad_(True)
    out = model(dict(batch))
    (out[K.E2IP_NU_KEY].sum() + out[K.E2IP_KAPPA_KEY].sum()).backward()
    assert all(p.grad is None for p in backbone.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.values())


def test_package_self_contained_and_calibrated(runs):
    """The attach package keeps the plugin classes and the fitted calibration, loads without the plain package
    (the checkpoint, like NequIP's own loaders, needs it and says so), and E2IPNequIPCalculator reads it: same
    energies and forces as NequIP's calculator on the plain package, finite covariances."""
    from nequip.integrations.ase import NequIPCalculator

    from nequip_ext import E2IPNequIPCalculator

    assert nequip_ext.attach.package_version_mismatch(str(runs["plain_pkg"])) == {}  # same nequip / e3nn here
    sd = load_ckpt(runs["ckpt"])["state_dict"]
    calib = [v for k, v in sd.items() if k.endswith("uq_novelty.novelty.novelty_calib")]
    ref = [v for k, v in sd.items() if k.endswith("uq_novelty.novelty.novelty_ref")]
    assert len(calib) == 1 and float(calib[0][0]) not in (0.0, 1.0) and torch.all(ref[0] > 0), (calib, ref)
    ckpt_out = _load(runs["ckpt"])(dict(_batch()))
    moved = runs["plain_pkg"].with_suffix(".moved")
    shutil.move(runs["plain_pkg"], moved)
    try:
        pkg = _load(runs["pkg"])
        with pytest.raises(ValueError, match="no file at"):
            _load(runs["ckpt"])
    finally:
        shutil.move(moved, runs["plain_pkg"])
    assert type(pkg.model.func.uq_head).__module__.endswith("nequip_ext.nn")
    assert type(pkg.model.func.uq_head).__module__.startswith("<torch_package_")
    assert torch.equal(pkg.model.func.uq_novelty.novelty.novelty_calib, calib[0])
    pkg_out = pkg(dict(_batch()))
    for key in (AtomicDataDict.FORCE_KEY, K.FORCES_COVARIANCE_KEY, K.ENERGY_UNCERTAINTY_KEY):
        assert torch.equal(pkg_out[key], ckpt_out[key]), key
    atoms = ase.io.read(DATA / "iso7_test.xyz", 0)
    kw = dict(device="cpu", chemical_species_to_atom_type_map=True)
    res = {}
    for name, calc in (("plain", NequIPCalculator._from_saved_model(str(runs["plain_pkg"]), **kw)),
                       ("e2ip", E2IPNequIPCalculator.from_saved_model(str(runs["pkg"]), **kw))):
        a = atoms.copy()
        a.calc = calc
        a.get_potential_energy()
        res[name] = dict(calc.results)
    assert res["e2ip"]["energy"] == res["plain"]["energy"]
    np.testing.assert_array_equal(res["e2ip"]["forces"], res["plain"]["forces"])
    assert np.isfinite(res["e2ip"][K.FORCES_COVARIANCE_KEY]).all() and res["e2ip"][K.ENERGY_UNCERTAINTY_KEY] > 0


def test_covariance_spd_and_rotates(runs):
    """U_tot of the packaged attach model is symmetric positive definite and rotates as R U Rᵀ."""
    model = _load(runs["pkg"])
    g = _graphs(1)[0]
    rot = torch.as_tensor(Rotation.random(random_state=5).as_matrix(), dtype=torch.float64)
    u = model(dict(g))[K.FORCES_COVARIANCE_KEY].detach()
    ur = model(_rotated(g, rot))[K.FORCES_COVARIANCE_KEY].detach()
    torch.testing.assert_close(u, u.transpose(-1, -2), rtol=0, atol=1e-14 * u.abs().max())
    assert torch.linalg.eigvalsh(u).min() > 0
    torch.testing.assert_close(ur, rot @ u @ rot.T, rtol=1e-8, atol=1e-10 * u.abs().max())
    assert (rot @ u @ rot.T - u).abs().max() > 1e-4 * u.abs().max()  # anisotropic: the check is not vacuous


def test_finetune_unfrozen_from_package(runs):
    """``freeze_backbone: false`` with all losses (the recipe in configs/nequip/attach_e2ip.yaml) runs end to end
    and moves the backbone."""
    val = str(DATA / "iso7_val.xyz")
    nequip_train(runs["dir"] / "ft", "run=[train]", "max_epochs=1", f"backbone_package={runs['plain_pkg']}",
                 f"train_file={val}", f"val_file={val}", "training_module.model.freeze_backbone=false",
                 "training_module.loss.coeffs.total_energy=1.0", "training_module.loss.coeffs.forces=1.0",
                 "training_module.loss.coeffs.evidential=0.1", "training_module.loss.detach_mean=false",
                 "training_module.val_metrics.coeffs.per_atom_energy_rmse=1.0",
                 "training_module.val_metrics.coeffs.forces_rmse=1.0", "training_module.val_metrics.coeffs.forces_nll=null",
                 config="attach_e2ip")
    model = _load(runs["dir"] / "ft" / "best.ckpt")
    backbone, head = _split(model)
    assert all(p.requires_grad for p in backbone.values()) and not model.model.func.uq_head.detach_input
    plain = dict(_load(runs["plain_pkg"]).named_parameters())
    assert sum(not torch.equal(p, plain[n]) for n, p in backbone.items()) > len(backbone) // 2


def _in_process(monkeypatch, graph_model):
    """Make the builder 'load' ``graph_model`` (a model built here) instead of a file."""
    monkeypatch.setattr(nequip_ext.attach, "_check_paths", lambda package, ckpt: package or ckpt)
    monkeypatch.setattr(nequip_ext.attach, "_check_model_file", lambda *a: None)
    monkeypatch.setattr(nequip_ext.attach, "_load", lambda *a: graph_model)


def test_bad_inputs(runs, tmp_path, monkeypatch):
    """Start-up errors that say what to change."""
    from nequip.model import NequIPGNNModel

    build = nequip_ext.AttachedE2IPModel
    with pytest.raises(ValueError, match="exactly one of `package_path`"):
        build()
    with pytest.raises(ValueError, match="exactly one of `package_path`"):
        build(package_path=str(runs["plain_pkg"]), checkpoint_path=str(runs["plain_ckpt"]))
    (tmp_path / "x.nequip.zip").write_text("not a model")
    with pytest.raises(ValueError, match="is not a NequIP package"):
        build(package_path=str(tmp_path / "x.nequip.zip"))
    with pytest.raises(ValueError, match="is not a NequIP package"):
        build(package_path=str(runs["plain_ckpt"]))
    (tmp_path / "x.ckpt").write_text("not a model")
    with pytest.raises(ValueError, match="is not a nequip-train checkpoint"):
        build(checkpoint_path=str(tmp_path / "x.ckpt"))
    with pytest.raises(ValueError, match=r"not in the model"):
        build(package_path=str(runs["plain_pkg"]), type_names=["C", "H", "N"])
    with pytest.raises(ValueError, match="other order"):
        build(package_path=str(runs["plain_pkg"]), type_names=["H", "C", "O"])
    with monkeypatch.context() as mp:
        _in_process(mp, NequIPGNNModel(**{**CFG, "l_max": 0}))  # scalar backbone: no longer an error (issue 28)
        assert "uq_geometric" in build(package_path="scalar.nequip.zip").model.func._modules
    with monkeypatch.context() as mp:
        _in_process(mp, nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"num_channels": 4}))
        with pytest.raises(ValueError, match="already has an e2ip head"):
            build(package_path="e2ip.nequip.zip")


def test_data_check_names_the_fix():
    """The config's first data transform stops on species without a model type and frames without forces."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "nequip" / "attach_e2ip.yaml").read_text())
    assert cfg["data"]["transforms"][0]["_target_"] == "nequip_ext.attach.AttachDataCheck"
    check = nequip_ext.attach.AttachDataCheck(["C", "H", "O"])
    g = _graphs(1)[0]
    assert check(dict(g)) is not None
    bad = dict(g)
    bad[AtomicDataDict.ATOMIC_NUMBERS_KEY] = g[AtomicDataDict.ATOMIC_NUMBERS_KEY].clone()
    bad[AtomicDataDict.ATOMIC_NUMBERS_KEY][0] = 7
    with pytest.raises(ValueError, match=r"\['N'\], which the backbone has no type for"):
        check(bad)
    with pytest.raises(ValueError, match="REF_forces: forces"):
        check({k: v for k, v in g.items() if k != AtomicDataDict.FORCE_KEY})


@pytest.mark.skipif(not SLOW, reason="AOTInductor compile takes 1.5-2.5 min on CPU; set E2IP_SLOW_TESTS=1")
def test_compiled_e2ip_ase(runs):
    """``nequip-compile --target e2ip_ase`` of the attach package; the compiled calculator matches the eager one."""
    from nequip_ext import E2IPNequIPCalculator

    pt2 = runs["dir"] / "attach.nequip.pt2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([str(BIN / "nequip-compile"), str(runs["pkg"]), str(pt2), "--mode", "aotinductor",
                          "--device", "cpu", "--target", "e2ip_ase"], cwd=runs["dir"], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kw = dict(device="cpu", chemical_species_to_atom_type_map=True)
    atoms = ase.io.read(DATA / "iso7_test.xyz", 0)
    out = []
    for calc in (E2IPNequIPCalculator.from_saved_model(str(runs["pkg"]), **kw),
                 E2IPNequIPCalculator.from_compiled_model(str(pt2), **kw)):
        a = atoms.copy()
        a.calc = calc
        a.get_potential_energy()
        out.append(dict(calc.results))
    for key in ("energy", "forces", K.FORCES_COVARIANCE_KEY, K.ENERGY_UNCERTAINTY_KEY):
        np.testing.assert_allclose(out[1][key], out[0][key], rtol=1e-10, atol=1e-12 * np.abs(out[0][key]).max())
