"""energy_uncertainty of E2IP MACE models (issue 15): every output path (eager .model, TorchScript
_compiled.model, committee), the stored length applied, rotation invariance, the validation fit, old models."""

import copy

import numpy as np
import pytest
import torch

from mace_ext import E2IPMACECalculator, attach_e2ip_head
from mace_ext.calculator import ENERGY_COMMITTEE_KEY

from .helpers import DATA, first_molecule, random_rotation, tiny_mace

KEY = "energy_uncertainty"


def _model(seed=0, head="e2ip"):
    torch.manual_seed(seed)
    model = attach_e2ip_head(tiny_mace(1), head=head, num_channels=4, mlp_hidden=8, force_rms=1.1)
    with torch.no_grad():
        for p in model.e2ip_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def _results(models, atoms=None):
    calc = E2IPMACECalculator(models=models, device="cpu", default_dtype="float64")
    a = (atoms or first_molecule()).copy()
    a.calc = calc
    a.get_potential_energy()
    return dict(calc.results), calc


def _formula(res, ell):
    return ell * np.sqrt(np.trace(res["forces_covariance"], axis1=-2, axis2=-1).sum() / 3.0)


@pytest.mark.parametrize("head", ["e2ip", "eip"])
def test_eager_and_compiled_report_stored_length(f64, head):
    from e3nn.util import jit

    model = _model(head=head)
    model.e2ip_energy_uq.energy_noise_length.copy_(torch.tensor([0.37, 5.0]))
    compiled = jit.compile(copy.deepcopy(model))
    for name, m in (("eager", model), ("compiled", compiled)):
        res, calc = _results([m])
        assert KEY in res and KEY in calc.implemented_properties, name
        assert res[KEY] == pytest.approx(_formula(res, 0.37), rel=1e-12), name
    # the stored value is what is applied: doubling it doubles σ_E
    model.e2ip_energy_uq.energy_noise_length[0] = 0.74
    assert _results([model])[0][KEY] == pytest.approx(_formula(res, 0.74), rel=1e-10)


def test_rotation_invariant(f64):
    model = _model()
    atoms = first_molecule()
    r0, _ = _results([model], atoms)
    rot = random_rotation(2).numpy()
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rot.T
    r1, _ = _results([model], rotated)
    assert r1[KEY] == pytest.approx(r0[KEY], rel=1e-10)


def test_committee_combines_members(f64):
    members = [_model(seed=s) for s in (0, 1, 2)]
    res, calc = _results(members)
    assert {KEY, ENERGY_COMMITTEE_KEY} <= set(calc.implemented_properties)
    sig = [_results([m])[0][KEY] for m in members]
    e = np.asarray(res["energy_comm"])
    assert res[ENERGY_COMMITTEE_KEY] == pytest.approx(e.std(ddof=1), rel=1e-10)
    assert res[KEY] == pytest.approx(np.sqrt(e.var(ddof=1) + np.mean(np.square(sig))), rel=1e-10)


def test_core_committee_calculator_equals_mace_committee(f64):
    """e2ip_plugins.committee.CommitteeCalculator over single-model calculators (the route NequIP users take)
    gives what E2IPMACECalculator computes with several models: one committee rule for both stacks."""
    from e2ip_plugins.committee import CommitteeCalculator

    members = [_model(seed=s) for s in (0, 1, 2)]
    ref, _ = _results(members)
    a = first_molecule().copy()
    a.calc = CommitteeCalculator([E2IPMACECalculator(models=[m], device="cpu", default_dtype="float64") for m in members])
    a.get_potential_energy()
    got = a.calc.results
    for key in ("energy", "forces", "forces_covariance", "forces_covariance_epistemic", "forces_covariance_aleatoric",
                "forces_covariance_committee", "forces_uncertainty", "forces_uncertainty_max", KEY, ENERGY_COMMITTEE_KEY):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_fit_on_validation_loader_only(f64, tmp_path):
    """fit_energy_noise stores ℓ̂ = sqrt(mean r_E²/v) over exactly the validation structures it is given."""
    from mace_ext.energy_uq import fit_energy_noise
    from mace_ext.fit_novelty import _loader
    import ase.io

    model = _model()
    path = str(tmp_path / "val6.xyz")
    ase.io.write(path, ase.io.read(DATA / "iso7_val.xyz", ":6"), format="extxyz")
    loader = _loader(path, model, 4)
    n = len(loader.dataset)
    res = fit_energy_noise(model, [loader])
    assert res["structures"] == n and model.e2ip_energy_uq.energy_noise_length[1] == n
    ell = float(model.e2ip_energy_uq.energy_noise_length[0])
    # closed form from the calculator at ℓ = 1 on the same frames
    probe = copy.deepcopy(model)
    probe.e2ip_energy_uq.energy_noise_length[0] = 1.0
    z2 = []
    for at in ase.io.read(path, ":"):
        r, _ = _results([probe], at)
        z2.append((at.info["REF_energy"] - r["energy"]) ** 2 / r[KEY] ** 2)
    assert ell == pytest.approx(np.sqrt(np.mean(z2)), rel=1e-8)


def test_old_model_loads_with_warning(f64, tmp_path):
    model = _model()
    old = copy.deepcopy(model)
    del old._modules["e2ip_energy_uq"]
    torch.save(old, tmp_path / "old.model")
    with pytest.warns(UserWarning, match="no stored energy length scale"):
        loaded = torch.load(tmp_path / "old.model", weights_only=False)
    assert float(loaded.e2ip_energy_uq.energy_noise_length[0]) == pytest.approx(0.1)
    res, _ = _results([loaded])
    assert res[KEY] == pytest.approx(_formula(res, 0.1), rel=1e-10)
    # a model whose forward lacks the output (an old _compiled.model): the calculator falls back to the
    # default length, with a warning
    stale = _model()
    forward = stale.forward
    stale.forward = lambda data, **kw: {k: v for k, v in forward(data, **kw).items() if k != KEY}
    with pytest.warns(UserWarning, match="no stored energy length scale"):
        res, _ = _results([stale])
    assert res[KEY] == pytest.approx(_formula(res, 0.1), rel=1e-10)
