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


def _edges(n, g, p=0.4):
    """A random symmetric edge set without self loops: (center, neighbor)."""
    a = torch.rand(n, n, generator=g) < p
    a = (a | a.T) & ~torch.eye(n, dtype=torch.bool)
    center, neighbor = a.nonzero(as_tuple=True)
    return center, neighbor, a.numpy()


def test_scaled_head_level_is_the_head_times_the_local_spread_ratio(f64):
    """Scaled-head form: U_epi,i = c·(s̃_i/s_ref)·U_epi,head,i with s̃_i the mean of tr Ĉ/3 over i and its neighbours
    (numpy loop); U_tot SPD and R U Rᵀ; it needs the head's U_epi and the edges; an old pickle is the spread form."""
    import io

    from e2ip_plugins.committee_level import local_spread

    g = torch.Generator().manual_seed(2)
    n = 9
    members, ale, head = torch.randn(n, 4, 3, generator=g), _spd(n, g), _spd(n, g, scale=0.3)
    center, neighbor, adj = _edges(n, g)
    s = np.array([np.trace(np.cov(members[i].numpy().T)) / 3 for i in range(n)])
    want = np.array([(s[i] + s[adj[i]].sum()) / (1 + adj[i].sum()) for i in range(n)])
    np.testing.assert_allclose(local_spread(committee_variance(members), center, neighbor).numpy(), want, rtol=1e-12)
    level = CommitteeLevel(scale_head=True)
    level.set_scale(1.7, spread_ref=0.4)
    tot, epi = level(members, ale, head, center, neighbor)
    np.testing.assert_allclose(epi.numpy(), 1.7 * (want / 0.4)[:, None, None] * head.numpy(), rtol=1e-12)
    torch.testing.assert_close(tot, ale + epi)
    assert (torch.linalg.eigvalsh(tot) > 0).all()
    rot = o3.rand_matrix(dtype=torch.float64)
    tot_r, _ = level(members @ rot.T, rot @ ale @ rot.T, rot @ head @ rot.T, center, neighbor)
    torch.testing.assert_close(tot_r, rot @ tot @ rot.T)
    with pytest.raises(ValueError, match="head's U_epi and the edges"):
        level(members, ale)
    with pytest.raises(ValueError, match="spread reference must be finite"):
        level.set_scale(1.0, spread_ref=0.0)
    old = CommitteeLevel()  # a level pickled before the scaled-head form: no spread_ref, no scale_head
    del old._buffers["spread_ref"], old.__dict__["scale_head"]
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.scale_head is False and float(loaded.spread_ref) == 1.0
    torch.testing.assert_close(loaded(members, ale)[0], CommitteeLevel()(members, ale)[0])


def test_scaled_fit_recovers_the_scale_and_the_reference(f64):
    from e2ip_plugins.committee_level import fit_scaled_level

    g = torch.Generator().manual_seed(3)
    n, c_true = 4000, 2.0
    spread = 0.05 + torch.rand(n, generator=g, dtype=torch.float64)
    ale, head = _spd(n, g, scale=0.01), _spd(n, g, scale=0.05)
    cov = ale + c_true * (spread / spread.mean()).reshape(-1, 1, 1) * head
    gamma = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = gamma + (torch.linalg.cholesky(cov) @ torch.randn(n, 3, 1, generator=g, dtype=torch.float64))[..., 0]
    s_ref, c = fit_scaled_level(gamma, y, ale, head, spread)
    assert s_ref == pytest.approx(float(spread.mean()), rel=1e-12) and c == pytest.approx(c_true, rel=0.08)
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit_scaled_level(gamma, y, ale, head * float("nan"), spread)
