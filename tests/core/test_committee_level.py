"""The deployed level of the in-model committee (e2ip_plugins.committee_level, issue 26): U_epi = c·(tr Ĉ/3)·I
against numpy, SPD and R U Rᵀ of U_tot, the scale fit recovers a known scale, bad input is named."""

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip_plugins._e3nn import o3
from e2ip_plugins.committee_level import CommitteeLevel, committee_variance, fit_committee_scale


def _spd(n, g, scale=0.1):
    a = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    return scale * (a @ a.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64))


def test_level_is_the_scaled_isotropic_sample_covariance_plus_u_ale(f64):
    g = torch.Generator().manual_seed(0)
    members, ale = torch.randn(6, 4, 3, generator=g), _spd(6, g)
    level = CommitteeLevel()
    level.set_scale(2.5)
    tot, epi = level(members, ale)
    for i in range(6):
        var = np.trace(np.cov(members[i].numpy().T)) / 3
        np.testing.assert_allclose(epi[i].numpy(), 2.5 * var * np.eye(3), rtol=1e-12)
    torch.testing.assert_close(tot, ale + epi)
    assert (torch.linalg.eigvalsh(tot) > 0).all() and bool(level.committee_scale_fitted)
    rot = o3.rand_matrix(dtype=torch.float64)  # members rotate as R F, U_ale as R U Rᵀ: so does U_tot
    tot_r, _ = level(members @ rot.T, rot @ ale @ rot.T)
    torch.testing.assert_close(tot_r, rot @ tot @ rot.T)
    with pytest.raises(ValueError, match="finite and > 0"):
        level.set_scale(float("nan"))


def test_fit_recovers_the_scale_and_matches_scipys_nll(f64):
    g = torch.Generator().manual_seed(1)
    n, c_true = 4000, 3.0
    members = torch.randn(n, 5, 3, generator=g) * torch.rand(n, 1, 1, generator=g)
    ale = _spd(n, g, scale=0.01)
    iso = committee_variance(members).reshape(-1, 1, 1) * torch.eye(3, dtype=torch.float64)
    cov = ale + c_true * iso
    gamma = torch.randn(n, 3, generator=g)
    y = gamma + (torch.linalg.cholesky(cov) @ torch.randn(n, 3, 1, generator=g, dtype=torch.float64))[..., 0]
    c = fit_committee_scale(gamma, y, ale, members)
    assert c == pytest.approx(c_true, rel=0.08)
    # the objective is scipy's multivariate-normal NLL: the fitted c beats its neighbours there
    def nll(scale):
        return -np.mean([stats.multivariate_normal(gamma[i].numpy(), (ale[i] + scale * iso[i]).numpy()).logpdf(y[i].numpy())
                         for i in range(300)])
    assert nll(c) <= min(nll(0.7 * c), nll(1.4 * c))
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit_committee_scale(gamma * float("nan"), y, ale, members)
