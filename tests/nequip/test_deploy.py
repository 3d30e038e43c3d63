"""End-to-end NequIP deployment of the plugin model (DESIGN §3): train → package → compile → ASE.

One module-scoped pipeline through the real CLIs (subprocesses, no mocks):

1. ``nequip-train -cp configs/nequip -cn e2ip`` for one epoch with a ``float64`` model (so that
   equivariance and compiled-vs-eager checks can be held to float64 tolerances) and
2. ``nequip-package build`` on the best checkpoint (both from the session fixture ``trained_float64`` in
   ``conftest.py``, shared with ``test_md.py``);
3. ``nequip-compile <package> --mode aotinductor --device cpu --target e2ip_ase`` (the compile
   target registered by ``nequip_ext``; compiling the *package* also checks that a packaged plugin
   model loads and exports). AOTInductor on CPU takes 1-3 minutes; it runs once per module.

Then :class:`nequip_ext.E2IPNequIPCalculator` is built from the checkpoint, the package and the
compiled model and evaluated on a C7H10O2 molecule from ``e2ip_plugins/data/iso7_test.xyz``.

``--mode torchscript`` is not tested: NequIP 0.19.1 refuses it on torch >= 2.10 (the venv has 2.13).
The ``--target ase`` → clear-error test needs a second AOTInductor compile (2-3 min on one CPU thread
on today's machines): opt-in with ``E2IP_SLOW_TESTS=1``.
"""

import os
import pathlib
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch
import pytest

pytest.importorskip("nequip")

import ase.io  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

import nequip_ext._keys as K  # noqa: E402

from ._cli_helpers import SLOW  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "e2ip_plugins" / "data"
BIN = pathlib.Path(sys.executable).parent
ENV = {
    **os.environ,
    "WANDB_MODE": "offline",
    "OMP_NUM_THREADS": "1",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}

COV_KEYS = list(K.COVARIANCE_KEYS)
E2IP_KEYS = COV_KEYS + [K.FORCES_UNCERTAINTY_KEY, K.ENERGY_UNCERTAINTY_KEY]
# tolerance for a float64 model: NequIP's own float64 tolerance for eager-vs-compiled checks
# (nequip/utils/dtype.py: floating_point_tolerance, used by nequip-compile and its ASE integration tests)
TOL64 = 1e-12
# a rotated input is a different float64 input: positions are rounded (~1e-16 relative) and every edge
# sum is re-associated, so allow 1e-10 (relative to each quantity's scale) — 4 orders above float64
# round-off, and orders below the anisotropy that makes the covariance check non-trivial (asserted).
ROT_TOL = 1e-10


def _run(cmd, cwd, timeout=900, env=None):
    t0 = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def artefacts(trained_float64):
    d = trained_float64["dir"]
    ckpt, pkg = trained_float64["ckpt"], trained_float64["package"]
    timings = {}
    pt2 = d / "model.nequip.pt2"
    timings["compile"] = _run(
        [BIN / "nequip-compile", pkg, pt2, "--mode", "aotinductor", "--device", "cpu", "--target", "e2ip_ase"], cwd=d
    )
    print("deployment timings [s]:", {k: round(v, 1) for k, v in timings.items()})
    return {"dir": d, "ckpt": ckpt, "package": pkg, "compiled": pt2}


@pytest.fixture(scope="module")
def calcs(artefacts):
    from nequip_ext import E2IPNequIPCalculator

    kw = dict(device="cpu", chemical_species_to_atom_type_map=True)
    return {
        "checkpoint": E2IPNequIPCalculator.from_saved_model(artefacts["ckpt"], **kw),
        "package": E2IPNequIPCalculator.from_saved_model(artefacts["package"], **kw),
        "compiled": E2IPNequIPCalculator.from_compiled_model(artefacts["compiled"], **kw),
    }


@pytest.fixture(scope="module")
def molecule():
    atoms = ase.io.read(DATA / "iso7_test.xyz", 0)
    assert not atoms.pbc.any() and len(atoms) > 10
    return atoms


@pytest.fixture(scope="module")
def stretched(molecule):
    """The test molecule with one C–H bond stretched to 2.2 Å: an atom far from the training features."""
    from e2ip_plugins.demo_data import stretched_bond

    return stretched_bond(molecule, 2.2)


def _results(calc, atoms):
    a = atoms.copy()
    a.calc = calc
    a.get_potential_energy()
    for k in E2IP_KEYS:  # through ASE's property API, as a user would
        a.calc.get_property(k, a)
    return {k: np.array(v, dtype=np.float64) for k, v in calc.results.items()}


def _rotation(seed=7):
    R = Rotation.random(random_state=seed).as_matrix()
    assert np.isclose(np.linalg.det(R), 1.0) and np.allclose(R @ R.T, np.eye(3), atol=1e-15)
    return R


def test_compile_target_registered():
    """``import nequip`` (through the extension entry point) registers ``e2ip_ase`` = NequIP's ``ase`` target +
    the DESIGN §3 keys, with the same inputs."""
    from nequip.scripts._compile_utils import AOTI_ASE_TARGET, COMPILE_TARGET_DICT

    ase_t, e2ip_t = COMPILE_TARGET_DICT[AOTI_ASE_TARGET], COMPILE_TARGET_DICT["e2ip_ase"]
    assert list(e2ip_t["input"]) == list(ase_t["input"])
    assert list(e2ip_t["output"]) == list(ase_t["output"]) + E2IP_KEYS


def test_package_carries_core(artefacts):
    """The package interns the plugin code (``nequip_ext`` head modules and the ``e2ip_plugins`` core), does not
    extern it, and loads and runs in a process where ``e2ip_plugins`` cannot be imported."""
    with zipfile.ZipFile(artefacts["package"]) as zf:
        names = zf.namelist()
        extern = next(n for n in names if n.endswith(".data/extern_modules"))
        externs = zf.read(extern).decode().split()
    for mod in ("nequip_ext/nn.py", "e2ip_plugins/head.py", "e2ip_plugins/covariance.py", "e2ip_plugins/head_covariance.py"):  # noqa: E501
        assert any(n.endswith(mod) for n in names), mod
    assert not any(e.split(".")[0] in ("e2ip_plugins", "nequip_ext") for e in externs), externs
    code = f"""
import sys, importlib.abc
import torch
import nequip  # noqa: F401  (NequIP imports every `nequip.extension` entry point, so the host core loads here)
# from now on the host's e2ip_plugins is gone and cannot be imported again
for name in [m for m in sys.modules if m.split('.')[0] == 'e2ip_plugins']:
    del sys.modules[name]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'e2ip_plugins':
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
from nequip.utils.global_state import set_global_state
set_global_state()
from nequip.model.saved_models.load_utils import load_saved_model
model, data = load_saved_model({str(artefacts["package"])!r}, 'eager', 'sole_model', return_data_dict=True)
out = model(data)
cov = out['{K.FORCES_COVARIANCE_KEY}']
assert cov.shape == (data['pos'].shape[0], 3, 3) and bool(torch.isfinite(cov).all())
assert not any(m.split('.')[0] == 'e2ip_plugins' for m in sys.modules), 'host e2ip_plugins was imported'
heads = [type(m) for m in model.modules() if type(m).__name__ == 'EvidentialHead']
assert heads and all(t.__module__.startswith('<torch_package_') for t in heads), [t.__module__ for t in heads]
print('OK')
"""
    res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-4000:]


def test_implemented_properties(calcs, molecule):
    """(e) every DESIGN §3 key is in ``implemented_properties`` and filled with the documented shape."""
    n = len(molecule)
    for name, calc in calcs.items():
        for k in ["energy", "forces"] + E2IP_KEYS:
            assert k in calc.implemented_properties, (name, k)
        res = _results(calc, molecule)
        assert set(res) <= set(calc.implemented_properties), (name, sorted(set(res) - set(calc.implemented_properties)))
        assert res["forces"].shape == (n, 3)
        for k in COV_KEYS:
            assert res[k].shape == (n, 3, 3), (name, k)
        assert res[K.FORCES_UNCERTAINTY_KEY].shape == (n,)
        for k in ["energy", "forces"] + E2IP_KEYS:
            assert np.isfinite(res[k]).all(), (name, k)


@pytest.mark.parametrize("geometry", ["molecule", "stretched"])
def test_package_matches_checkpoint(calcs, geometry, request):
    """(c) the packaged model runs the same code on the same weights and novelty buffers: identical results."""
    atoms = request.getfixturevalue(geometry)
    a, b = _results(calcs["checkpoint"], atoms), _results(calcs["package"], atoms)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("geometry", ["molecule", "stretched"])
def test_compiled_matches_eager(calcs, geometry, request):
    """(b) AOTInductor (``--target e2ip_ase``) vs eager checkpoint model, float64: NequIP's float64 tolerance
    (on the stretched geometry, the novelty factor is < 1: the compiled model carries the fitted buffers)."""
    atoms = request.getfixturevalue(geometry)
    eager, comp = _results(calcs["checkpoint"], atoms), _results(calcs["compiled"], atoms)
    assert set(E2IP_KEYS) <= set(comp)
    for k in ["energy", "energies", "forces"] + E2IP_KEYS:
        np.testing.assert_allclose(comp[k], eager[k], rtol=TOL64, atol=TOL64 * np.abs(eager[k]).max(), err_msg=k)
    # a molecule has no cell: NequIP's stress is NaN in both (the e2ip_ase target only boxes the *tracing* example)
    assert np.isnan(eager["stress"]).all() and np.isnan(comp["stress"]).all()


def test_novelty_fitted_by_nequip_train(artefacts):
    """``nequip-train`` with the shipped config (NoveltyFitCallback) leaves fitted novelty buffers in best.ckpt."""
    sd = torch.load(artefacts["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    refs = [v for k, v in sd.items() if k.endswith("uq_novelty.novelty.novelty_ref")]
    whiten = [v for k, v in sd.items() if k.endswith("uq_novelty.novelty.novelty_whiten")]
    assert len(refs) == 1 and torch.all(refs[0] > 0), refs  # C, H, O all fitted
    assert torch.all(torch.diagonal(whiten[0], dim1=-2, dim2=-1) > 0)


def test_stretched_bond_raises_epistemic_uncertainty(calcs, molecule, stretched):
    """An H atom pulled to 2.2 Å from its carbon gets a larger U_epi than every atom of the training-like
    molecule, and the novelty score (s/s_ref > 1) is what raises it."""
    h = stretched.info["stretched_atom"]
    r0 = _results(calcs["checkpoint"], molecule)
    r1 = _results(calcs["checkpoint"], stretched)
    assert r1["forces_uncertainty"][h] > 2.0 * r0["forces_uncertainty"].max()
    assert r1[K.E2IP_NOVELTY_KEY][h] > 1.0 and r1[K.E2IP_NOVELTY_KEY][h] == r1[K.E2IP_NOVELTY_KEY].max()


def test_stored_calibration_applied_by_every_output_path(artefacts, calcs, molecule):
    """``nequip-train`` fitted the stored calibration [c, β] on the validation data; checkpoint, package and
    AOTI calculators all report c × the covariances of the same model with c = 1 (β kept), and the
    per-structure max / mean of u."""
    from nequip_ext.novelty import novelty_head

    sd = torch.load(artefacts["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    calib = [v for k, v in sd.items() if k.endswith("uq_novelty.novelty.novelty_calib")]
    assert len(calib) == 1
    c, beta = (float(v) for v in calib[0])
    assert c > 0 and c != 1.0 and beta >= 0.0, (c, beta)
    module = novelty_head(calcs["checkpoint"].model)
    assert module is not None and module.novelty.novelty_calib.tolist() == [c, beta]
    saved = module.novelty.novelty_calib.clone()
    try:
        module.novelty.novelty_calib.copy_(torch.tensor([1.0, beta], dtype=saved.dtype))
        calcs["checkpoint"].reset()  # ASE caches results for unchanged atoms
        raw = _results(calcs["checkpoint"], molecule)
    finally:
        module.novelty.novelty_calib.copy_(saved)
        calcs["checkpoint"].reset()
    for name, calc in calcs.items():
        calc.reset()
        res = _results(calc, molecule)
        for k in COV_KEYS:
            np.testing.assert_allclose(res[k], c * raw[k], rtol=1e-9, atol=1e-12 * np.abs(raw[k]).max(), err_msg=(name, k))
        np.testing.assert_allclose(res[K.FORCES_UNCERTAINTY_KEY], np.sqrt(c) * raw[K.FORCES_UNCERTAINTY_KEY], rtol=1e-9)
        u = res[K.FORCES_UNCERTAINTY_KEY]
        assert res["forces_uncertainty_max"] == pytest.approx(u.max()) and res["forces_uncertainty_mean"] == pytest.approx(u.mean())
        assert {"forces_uncertainty_max", "forces_uncertainty_mean"} <= set(calc.implemented_properties)


def test_energy_uncertainty_stored_length_every_path(artefacts, calcs, molecule):
    """(issue 15) ``nequip-train`` (NoveltyFitCallback) stored ℓ fitted on the validation energies; checkpoint,
    package and AOTI calculators all report σ_E = ℓ·sqrt(Σ_i tr U_tot,i/3), invariant under rotation."""
    sd = torch.load(artefacts["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    stored = [v for k, v in sd.items() if k.endswith("uq_energy.energy.energy_noise_length")]
    assert len(stored) == 1
    ell, n_fit = (float(v) for v in stored[0])
    n_val = len(ase.io.read(DATA / "iso7_val.xyz", ":"))
    assert n_fit == n_val and ell > 0 and ell != 0.1, (ell, n_fit)
    R = _rotation(3)
    rotated = molecule.copy()
    rotated.positions = molecule.positions @ R.T
    for name, calc in calcs.items():
        calc.reset()
        res = _results(calc, molecule)
        formula = ell * np.sqrt(np.trace(res[K.FORCES_COVARIANCE_KEY], axis1=-2, axis2=-1).sum() / 3.0)
        assert float(res[K.ENERGY_UNCERTAINTY_KEY]) == pytest.approx(formula, rel=1e-10), name
        rot = _results(calc, rotated)
        assert float(rot[K.ENERGY_UNCERTAINTY_KEY]) == pytest.approx(formula, rel=ROT_TOL * 100), name


@pytest.mark.parametrize("which", ["checkpoint", "compiled"])
def test_rotation_equivariance(calcs, molecule, which):
    """(a) F(R x) = R F(x), Σ(R x) = R Σ(x) Rᵀ for all three covariances, E and u invariant."""
    R = _rotation()
    rotated = molecule.copy()
    rotated.positions = molecule.positions @ R.T
    r0, r1 = _results(calcs[which], molecule), _results(calcs[which], rotated)

    np.testing.assert_allclose(r1["energy"], r0["energy"], rtol=ROT_TOL)
    fscale = np.abs(r0["forces"]).max()
    np.testing.assert_allclose(r1["forces"], r0["forces"] @ R.T, rtol=0, atol=ROT_TOL * fscale)
    for k in COV_KEYS:
        expected = R @ r0[k] @ R.T
        scale = np.abs(r0[k]).max()
        np.testing.assert_allclose(r1[k], expected, rtol=0, atol=ROT_TOL * scale, err_msg=k)
        # the check is not vacuous: the covariance is anisotropic, so rotating it changes it
        assert np.abs(expected - r0[k]).max() > 1e4 * ROT_TOL * scale, k
    u = r0[K.FORCES_UNCERTAINTY_KEY]
    np.testing.assert_allclose(r1[K.FORCES_UNCERTAINTY_KEY], u, rtol=0, atol=ROT_TOL * u.max())


@pytest.mark.parametrize("which", ["checkpoint", "package", "compiled"])
def test_covariance_spd_and_uncertainty(calcs, molecule, which):
    """(d) symmetric positive-definite covariances, U_tot = U_ale + U_epi, u = sqrt(tr U_epi / 3)."""
    res = _results(calcs[which], molecule)
    for k in COV_KEYS:
        c = res[k]
        np.testing.assert_allclose(c, np.swapaxes(c, -1, -2), rtol=0, atol=TOL64 * np.abs(c).max(), err_msg=k)
        assert np.linalg.eigvalsh(c).min() > 0, k
    tot, epi, ale = (res[k] for k in COV_KEYS)
    np.testing.assert_allclose(tot, epi + ale, rtol=TOL64, atol=TOL64 * np.abs(tot).max())
    u = np.sqrt(np.trace(epi, axis1=-2, axis2=-1) / 3.0)
    np.testing.assert_allclose(res[K.FORCES_UNCERTAINTY_KEY], u, rtol=TOL64, atol=0)


def test_exact_predictive(calcs, molecule):
    """Eager calculators give the exact Student-t predictive, consistent with the covariance keys and with scipy;
    compiled models (covariance outputs only) say how to get it."""
    import torch
    from scipy import stats

    calc = calcs["checkpoint"]
    res = _results(calc, molecule)
    pred = calc.predictive()
    np.testing.assert_allclose(pred.covariance.numpy(), res["forces_covariance"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(pred.mean.numpy(), res["forces"], rtol=1e-12, atol=1e-14)
    y = torch.as_tensor(molecule.arrays["REF_forces"], dtype=torch.float64)
    nll = pred.nll(y).numpy()
    i = 3
    lam = (pred.scale_factor[i] * pred.sigma0[i]).numpy()
    ref = -stats.multivariate_t(loc=pred.mean[i].numpy(), shape=lam, df=float(pred.df[i])).logpdf(y[i].numpy())
    np.testing.assert_allclose(nll[i], ref, rtol=1e-8)
    compiled = calcs["compiled"]
    _results(compiled, molecule)
    with pytest.raises(ValueError, match="from_saved_model"):
        compiled.predictive()


@pytest.mark.skipif(not SLOW, reason="a second AOTInductor compile (plain --target ase) takes 2-3 min on CPU; "
                                     "set E2IP_SLOW_TESTS=1")
def test_plain_ase_target_gives_clear_error(artefacts):
    """A model compiled with NequIP's plain ``--target ase`` has no covariance outputs: the calculator says which
    target to use. (The molecular example frame makes NequIP's own export check fail on NaN stress, so it is
    skipped for this compile with NequIP's ``NEQUIP_SKIP_AOTI_MODEL_CHECK``.)"""
    from nequip.integrations.ase import NequIPCalculator

    from nequip_ext import E2IPNequIPCalculator

    pt2 = artefacts["dir"] / "plain_ase.nequip.pt2"
    env = {**ENV, "NEQUIP_SKIP_AOTI_MODEL_CHECK": "1"}
    _run([BIN / "nequip-compile", artefacts["ckpt"], pt2, "--mode", "aotinductor", "--device", "cpu", "--target", "ase"],
         cwd=artefacts["dir"], env=env)
    NequIPCalculator.from_compiled_model(pt2, device="cpu", chemical_species_to_atom_type_map=True)  # valid artefact
    with pytest.raises(ValueError, match="--target e2ip_ase"):
        E2IPNequIPCalculator.from_compiled_model(pt2, device="cpu", chemical_species_to_atom_type_map=True)


def test_cost_module_share_times_the_uq_modules(artefacts, molecule, tmp_path):
    """benchmarks.common.cost_probe.module_share (issue 16) times exactly the e²IP modules of the energy network."""
    from benchmarks.common import cost_probe

    ase.io.write(tmp_path / "m.xyz", molecule)
    r = cost_probe.module_share({"backbone": "nequip", "device": "cpu", "dtype": "float64", "repeats": 2, "warmup": 1,
                                 "artifacts": {"e2ip": {"model": str(artefacts["ckpt"])}},
                                 "structure": str(tmp_path / "m.xyz")})
    uq = sorted(k for k in r["modules_s"] if k.startswith("uq_"))
    assert uq == ["uq_energy", "uq_head", "uq_novelty"] and 0 < r["share"] < 1
    assert r["e2ip_s"] == pytest.approx(sum(r["modules_s"][k] for k in uq))
    assert r["e2ip_s"] < sum(r["modules_s"].values()) <= r["calculate_s"]
