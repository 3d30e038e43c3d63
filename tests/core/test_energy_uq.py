"""Stored energy uncertainty of deployed models (issue 15, e2ip_plugins.energy_uq): the formula, rotation
invariance, the validation fit, old state dicts, committees, TorchScript."""

import math

import numpy as np
import pytest
import torch

from e2ip_plugins.energy_noise import DEFAULT_LENGTH_SCALE
from e2ip_plugins.energy_uq import (
    EnergyUncertainty,
    committee_energy_uncertainty,
    fit_energy_length,
    force_variance_sum,
)


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    return a @ a.transpose(-1, -2) + 0.1 * torch.eye(3, dtype=torch.float64)


def _rotation(seed=3):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_formula_batched_and_rotation_invariant():
    cov = _spd(7)
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    mod = EnergyUncertainty().double()
    mod.energy_noise_length[0] = 0.37
    sigma = mod(cov, batch, 3)
    tr = np.trace(cov.numpy(), axis1=1, axis2=2) / 3
    expected = [0.37 * math.sqrt(tr[b].sum()) for b in ([0, 1, 2], [3, 4], [5, 6])]
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-14)
    rot = _rotation()
    np.testing.assert_allclose(mod(rot @ cov @ rot.T, batch, 3).numpy(), sigma.numpy(), rtol=1e-13)
    scripted = torch.jit.script(mod)
    np.testing.assert_allclose(scripted(cov, batch, 3).numpy(), sigma.numpy(), rtol=1e-14)


def test_fit_uses_only_the_batches_given():
    """ℓ̂² = mean r²/v over exactly the structures passed, S stored; non-positive v (no energy) left out."""
    g = torch.Generator().manual_seed(1)
    r = 0.3 * torch.randn(50, generator=g, dtype=torch.float64)
    v = torch.rand(50, generator=g, dtype=torch.float64) + 0.5
    mod = EnergyUncertainty()
    assert not mod.is_fitted and mod.length == pytest.approx(DEFAULT_LENGTH_SCALE)
    batches = [{"energy_residual": r[:20], "force_var": v[:20]}, {"energy_residual": r[20:], "force_var": v[20:]},
               {"energy_residual": torch.tensor([5.0]), "force_var": torch.tensor([0.0])}]
    res = fit_energy_length(mod, iter(batches))
    ell = math.sqrt(float((r**2 / v).mean()))
    assert res["length"] == pytest.approx(ell, rel=1e-12) and res["structures"] == 50
    assert mod.is_fitted and mod.energy_noise_length.tolist() == pytest.approx([ell, 50.0])
    # the ML property: at the fitted length the val residuals have unit mean squared z-score
    z2 = r**2 / (ell**2 * v)
    assert float(z2.mean()) == pytest.approx(1.0, rel=1e-10)
    with pytest.raises(ValueError, match="no validation structures"):
        fit_energy_length(EnergyUncertainty(), [{"energy_residual": r[:2], "force_var": torch.zeros(2)}])


def test_old_state_dict_loads_with_warning_and_default():
    parent = torch.nn.Sequential(EnergyUncertainty())
    parent[0].energy_noise_length.copy_(torch.tensor([0.5, 10.0]))
    sd = {k: v for k, v in parent.state_dict().items() if not k.endswith("energy_noise_length")}
    with pytest.warns(UserWarning, match="no stored energy length scale"):
        parent.load_state_dict(sd, strict=True)
    assert parent[0].energy_noise_length.tolist() == pytest.approx([DEFAULT_LENGTH_SCALE, 0.0])


def test_committee_combination():
    e = torch.tensor([[1.0, 2.0], [1.5, 2.0], [0.5, 2.6]], dtype=torch.float64)
    s = torch.tensor([[0.1, 0.2], [0.3, 0.2], [0.2, 0.2]], dtype=torch.float64)
    got = committee_energy_uncertainty(e, s).numpy()
    ref = np.sqrt(e.numpy().var(0, ddof=1) + (s.numpy() ** 2).mean(0))
    np.testing.assert_allclose(got, ref, rtol=1e-14)
    np.testing.assert_allclose(committee_energy_uncertainty(e).numpy(), e.numpy().std(0, ddof=1), rtol=1e-14)


def test_force_variance_sum():
    cov = _spd(4, seed=2)
    v = force_variance_sum(cov, torch.tensor([0, 1, 1, 1]), 2).numpy()
    tr = np.trace(cov.numpy(), axis1=1, axis2=2) / 3
    np.testing.assert_allclose(v, [tr[0], tr[1:].sum()], rtol=1e-14)
