"""The in-model force committee (e2ip_plugins.force_committee, issue 26): equivariance, the sample
covariance and the 3×3 NLL against numpy / scipy, member independence, training, bad input."""

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip_plugins._e3nn import o3
from e2ip_plugins.force_committee import ForceCommittee, committee_covariance, committee_loss

IRREPS = o3.Irreps("6x0e+4x1o+2x2e")


def _rotation(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_members_rotate_with_the_structure_and_the_covariance_as_R_C_Rt(f64):
    com = ForceCommittee(IRREPS, num_members=5, num_channels=3, force_rms=0.7)
    x = IRREPS.randn(11, -1)
    rot = _rotation(3)
    f, f_rot = com(x), com(x @ IRREPS.D_from_matrix(rot).T)
    torch.testing.assert_close(f_rot, f @ rot.T)
    _, c = committee_covariance(f)
    _, c_rot = committee_covariance(f_rot)
    torch.testing.assert_close(c_rot, rot @ c @ rot.T)
    assert torch.linalg.eigvalsh(c).min() > 0  # 5 members span 3D: SPD


def test_committee_covariance_is_numpys_unbiased_sample_covariance(f64):
    f = torch.randn(7, 4, 3)
    mean, cov = committee_covariance(f)
    for i in range(7):
        np.testing.assert_allclose(cov[i].numpy(), np.cov(f[i].numpy().T), rtol=1e-12)
        np.testing.assert_allclose(mean[i].numpy(), f[i].numpy().mean(0), rtol=1e-12)


def test_committee_loss_is_member_mse_plus_the_committee_nll_of_scipy(f64):
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(6, 4, 3, generator=g), torch.randn(6, 3, generator=g)
    rms, w, floor = 0.8, 0.7, 0.05
    got = committee_loss(f, y, rms, nll_weight=w, floor=floor).numpy()
    for i in range(6):
        fi = f[i].numpy()
        mse = ((fi - y[i].numpy()) ** 2).sum(-1).mean() / (3 * rms**2)
        cov = np.cov(fi.T) + (floor * rms) ** 2 * np.eye(3)
        nll = -stats.multivariate_normal(mean=fi.mean(0), cov=cov).logpdf(y[i].numpy())
        assert got[i] == pytest.approx(mse + w * nll, rel=1e-10)


def test_members_are_independent_and_seeded(f64):
    x = IRREPS.randn(9, -1)
    a, b = ForceCommittee(IRREPS, num_members=4, seed=0), ForceCommittee(IRREPS, num_members=4, seed=0)
    torch.testing.assert_close(a(x), b(x))  # same seed, same members
    f = a(x)
    for k in range(1, 4):  # members differ from each other at initialisation
        assert (f[:, k] - f[:, 0]).abs().max() > 1e-3
    assert (ForceCommittee(IRREPS, num_members=4, seed=1)(x) - f).abs().max() > 1e-3
    # member k's output depends on member k's parameters only: zeroing member 0's gates leaves the others
    with torch.no_grad():
        a.w2[0].zero_()
        a.b2[0].zero_()
    g = a(x)
    assert g[:, 0].abs().max() == 0 and torch.equal(g[:, 1:], f[:, 1:])


def test_training_fits_an_equivariant_target_and_spread_covers_the_error(f64):
    torch.manual_seed(0)
    x = IRREPS.randn(200, -1)
    vec = x[:, 6:18].reshape(200, 4, 3)
    y = 0.5 * vec[:, 0] - 0.3 * vec[:, 2] * (x[:, :1] ** 2)  # equivariant, nonlinear in the scalars
    com = ForceCommittee(IRREPS, num_members=6, num_channels=4, force_rms=0.5)
    opt = torch.optim.Adam(com.parameters(), lr=1e-2)
    before = committee_loss(com(x), y, 0.5).mean().item()
    mse0 = ((com(x).mean(1) - y) ** 2).mean().item()
    for _ in range(300):
        opt.zero_grad()
        loss = committee_loss(com(x), y, 0.5).mean()
        loss.backward()
        opt.step()
    f = com(x)
    mse = ((f.mean(1) - y) ** 2).mean().item()
    assert committee_loss(f, y, 0.5).mean().item() < before and mse < 0.2 * mse0
    # the NLL term keeps a spread of the order of the committee's own error (not collapsed to the floor)
    mean, cov = committee_covariance(f)
    spread = torch.diagonal(cov, dim1=-2, dim2=-1).mean().item()
    assert 0.05 * mse < spread < 20 * mse


def test_loss_reaches_every_member():
    com = ForceCommittee(IRREPS, num_members=3)
    x = IRREPS.randn(5, -1)
    committee_loss(com(x), torch.randn(5, 3), 1.0).sum().backward()
    for name in ("w1", "w2", "b2"):
        grad = getattr(com, name).grad
        assert all(grad[k].abs().sum() > 0 for k in range(3)), name


def test_bad_input():
    with pytest.raises(ValueError, match="1o node features"):
        ForceCommittee("4x0e+2x2e")
    with pytest.raises(ValueError, match="num_members >= 2"):
        ForceCommittee(IRREPS, num_members=1)
