"""Novelty-aware evidence (e2ip_plugins.novelty): fit, invariance, factor, effect on U_epi."""

import numpy as np
import pytest
import torch

from e2ip_plugins import EvidentialHead
from e2ip_plugins._e3nn import o3
from e2ip_plugins.head_covariance import covariance_uncertainty, niw_covariances
from e2ip_plugins.novelty import InvariantFeatures, NoveltyEvidence, NoveltyFitter, fit_novelty

IRREPS = "3x0e+2x1o+1x2e"


def _gaussian_species(n, d, seed):
    g = np.random.default_rng(seed)
    feats, species = [], []
    for z in range(2):
        a = g.normal(size=(d, d))
        cov = a @ a.T / d + 0.1 * np.eye(d)
        feats.append(g.multivariate_normal(g.normal(size=d) * (z + 1), cov, size=n))
        species.append(np.full(n, z))
    return torch.tensor(np.concatenate(feats)), torch.tensor(np.concatenate(species))


def test_fit_matches_direct_mahalanobis_and_quantile():
    d = 5
    x, sp = _gaussian_species(400, d, 0)
    xv, spv = _gaussian_species(150, d, 1)
    mod = NoveltyEvidence(d, 2, mode="power", power=2.0, quantile=0.8, jitter=0.0).double()
    fit_novelty(mod, [(x[:300], sp[:300]), (x[300:], sp[300:])], [(xv, spv)])
    xn, spn, xvn, spvn = x.numpy(), sp.numpy(), xv.numpy(), spv.numpy()
    for z in range(2):
        mu = xn[spn == z].mean(0)
        cov = np.cov(xn[spn == z].T)
        n_z = int((spn == z).sum())
        prec = np.linalg.inv(cov + (d / n_z) ** 6 * np.trace(cov) / d * np.eye(d))  # the documented ridge δ_z
        r = xvn[spvn == z] - mu
        s_direct = np.einsum("ni,ij,nj->n", r, prec, r)
        np.testing.assert_allclose(mod.score(xv[spv == z], spv[spv == z]).numpy(), s_direct, rtol=1e-8)
        assert float(mod.novelty_ref[z]) == pytest.approx(np.quantile(s_direct, 0.8), rel=1e-8)
    # power mode: κ·max(1, r)^-p, at evaluation only
    kappa = torch.rand(len(xv), dtype=torch.float64) + 0.1
    r, k_eff, c = mod(xv, spv, kappa)
    np.testing.assert_allclose((k_eff / kappa).numpy(), np.minimum(1.0, 1.0 / r.numpy()) ** 2.0, rtol=1e-12)
    assert float((r > 1).double().mean()) == pytest.approx(0.2, abs=0.02) and float(c) == 1.0
    r_train, k_train, _ = mod(xv, spv, kappa, True)
    assert torch.equal(k_train, kappa) and torch.all(r_train == 0.0)
    # linear mode (default): 1/κ_eff = 1/κ + β·min(r, r_cap), Σ₀ factor c from the stored calibration
    lin = NoveltyEvidence(d, 2, quantile=0.8, jitter=0.0).double()
    lin.load_state_dict(mod.state_dict())
    lin.novelty_calib.copy_(torch.tensor([1.7, 0.3]))
    r2, k2, c2 = lin(xv, spv, kappa)
    torch.testing.assert_close(r2, r)
    torch.testing.assert_close(1.0 / k2, 1.0 / kappa + 0.3 * r.clamp(max=lin.ratio_cap))
    assert float(c2) == pytest.approx(1.7)


def test_unfitted_module_is_neutral_and_options_are_checked():
    kappa = torch.rand(7) + 0.1
    for mode in ("linear", "power"):
        mod = NoveltyEvidence(4, 3, mode=mode).eval()
        r, k, c = mod(torch.randn(7, 4), torch.randint(0, 3, (7,)), kappa)
        assert torch.equal(k, kappa) and torch.all(r == 0.0) and float(c) == 1.0 and not mod.is_fitted
    with pytest.raises(ValueError, match="quantile"):
        NoveltyEvidence(4, 3, quantile=1.5)
    with pytest.raises(ValueError, match="power"):
        NoveltyEvidence(4, 3, power=-1.0)
    with pytest.raises(ValueError, match="mode"):
        NoveltyEvidence(4, 3, mode="cubic")


def test_factor_is_capped_and_stale_state_dict_loads_unfitted():
    x, sp = _gaussian_species(200, 3, 3)
    mod = NoveltyEvidence(3, 2, mode="power").float()  # p = 10: float32 κ must stay finite and positive
    fit_novelty(mod, [(x, sp)])
    far = torch.full((2, 3), 1e6)
    ones = torch.ones(2)
    r, f, _ = mod(far, torch.tensor([0, 1]), ones)
    assert torch.all(r > mod.ratio_cap)
    torch.testing.assert_close(f, torch.full((2,), mod.ratio_cap ** -mod.power))
    assert torch.all(f > 0) and torch.all(torch.isfinite(1.0 / f))
    # linear mode: the level is bounded by the cap, 1/κ_eff ≤ 1/κ + β·r_cap
    lin = NoveltyEvidence(3, 2).float()
    fit_novelty(lin, [(x, sp)])
    lin.novelty_calib.copy_(torch.tensor([1.0, 2.0]))
    _, k_lin, _ = lin(far, torch.tensor([0, 1]), ones)
    torch.testing.assert_close(1.0 / k_lin, 1.0 + 2.0 * torch.full((2,), lin.ratio_cap))
    # a checkpoint of another feature layout (or from before the buffers existed) loads as unfitted
    other = NoveltyEvidence(4, 2)
    fit_novelty(other, [(torch.randn(50, 4), torch.randint(0, 2, (50,)))])
    with pytest.warns(UserWarning, match="unfitted"):
        mod.load_state_dict(other.state_dict())
    assert not mod.is_fitted and mod.novelty_whiten.shape == (2, 3, 3)
    with pytest.warns(UserWarning, match="unfitted"):
        other.load_state_dict({})
    assert not other.is_fitted


def test_species_absent_from_training_stays_unfitted():
    x, sp = _gaussian_species(50, 3, 2)
    mod = NoveltyEvidence(3, 3).double()
    fit_novelty(mod, [(x, sp)])  # no validation data: the reference comes from the training atoms
    assert float(mod.novelty_ref[2]) == 0.0 and float(mod.novelty_ref[0]) > 0
    mod.eval()
    mod.novelty_calib.copy_(torch.tensor([1.0, 5.0]))
    kappa = torch.full((4,), 0.5, dtype=torch.float64)
    _, k, _ = mod(torch.randn(4, 3, dtype=torch.float64) * 100, torch.tensor([2, 2, 2, 2]), kappa)
    assert torch.equal(k, kappa)


def test_invariant_features_rotation_and_permutation():
    torch.manual_seed(0)
    irreps = o3.Irreps(IRREPS)
    inv = InvariantFeatures([IRREPS, "2x0e+1x1o"])
    x = torch.randn(6, irreps.dim + 5, dtype=torch.float64)
    rot = o3.rand_matrix(dtype=torch.float64)
    d1 = irreps.D_from_matrix(rot)
    d2 = o3.Irreps("2x0e+1x1o").D_from_matrix(rot)
    x_rot = torch.cat([x[:, : irreps.dim] @ d1.T, x[:, irreps.dim :] @ d2.T], dim=1)
    assert inv.num_features == 3 + 2 + 1 + 2 + 1
    torch.testing.assert_close(inv(x_rot), inv(x), rtol=1e-12, atol=1e-12)
    perm = torch.randperm(6)
    torch.testing.assert_close(inv(x[perm]), inv(x)[perm])
    # norms of l > 0 channels, scalars as they are
    torch.testing.assert_close(inv(x)[:, :3], x[:, :3])
    torch.testing.assert_close(inv(x)[:, 3], x[:, 3:6].norm(dim=1))


def test_novelty_raises_epistemic_covariance_of_a_far_atom_and_is_equivariant():
    """An atom far from the training features gets a larger U_epi than a training atom, and the
    modified covariance still rotates as R U Rᵀ (the factor is invariant)."""
    torch.manual_seed(1)
    irreps = o3.Irreps(IRREPS)
    inv = InvariantFeatures([IRREPS])
    head = EvidentialHead(IRREPS, num_channels=4, mlp_hidden=8).double()
    train = torch.randn(400, irreps.dim, dtype=torch.float64)
    species = torch.zeros(400, dtype=torch.long)
    mod = NoveltyEvidence(inv.num_features, 1).double()
    fit_novelty(mod, [(inv(train), species)], [(inv(train[:200]), species[:200])])
    mod.novelty_calib.copy_(torch.tensor([1.0, 1.0]))
    mod.eval()
    far = train[:1] * 8.0
    x = torch.cat([train[:1], far])
    sp = torch.zeros(2, dtype=torch.long)

    def u_epi(feats):
        out = head(feats)
        r, kappa, c = mod(inv(feats), sp, out["kappa"])
        _, epi, _ = niw_covariances(out["nu"], kappa, out["sigma0"] * c)
        return r, epi

    r, epi = u_epi(x)
    u = covariance_uncertainty(epi)
    assert r[1] > 1.0 and u[1] > 2.0 * u[0]
    rot = o3.rand_matrix(dtype=torch.float64)
    r_rot, epi_rot = u_epi(x @ irreps.D_from_matrix(rot).T)
    torch.testing.assert_close(r_rot, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(epi_rot, rot @ epi @ rot.T, rtol=1e-6, atol=1e-10)  # |U| ~ 1e3 on the far atom


def test_scripted_module_matches_eager():
    x, sp = _gaussian_species(60, 4, 3)
    mod = NoveltyEvidence(4, 2).double()
    NoveltyFitter(mod)  # constructing a fitter leaves the module untouched
    fit_novelty(mod, [(x, sp)])
    mod.eval()
    scripted = torch.jit.script(mod)
    mod.novelty_calib.copy_(torch.tensor([1.3, 0.2]))
    kappa = torch.rand(len(x), dtype=torch.float64) + 0.1
    for a, b in zip(scripted(x * 1.5, sp, kappa), mod(x * 1.5, sp, kappa)):
        torch.testing.assert_close(a, b)
    inv = InvariantFeatures([IRREPS])
    feats = torch.randn(5, o3.Irreps(IRREPS).dim)
    torch.testing.assert_close(torch.jit.script(inv)(feats), inv(feats))
