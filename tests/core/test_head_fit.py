"""The head fit on cached backbone outputs (e2ip_plugins.head_fit): it learns a per-atom noise level, keeps the
best validation epoch, and a resumed fit ends with the head of an uninterrupted one."""

import pytest
import torch

from e2ip_plugins import EvidentialHead
from e2ip_plugins.head_fit import CachedAtoms, HeadFit

IRREPS = "4x0e+4x1o"


def _atoms(num_structures, seed):
    """Structures of 3-6 atoms; the force error of atom i has std 0.05 + 0.5·|x_i0| (x_i0 its first scalar)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(3, 7, (num_structures,), generator=g)
    n = int(counts.sum())
    x = torch.randn(n, 16, dtype=torch.float64, generator=g)
    gamma = torch.randn(n, 3, dtype=torch.float64, generator=g)
    std = 0.05 + 0.5 * x[:, :1].abs()
    y = gamma + std * torch.randn(n, 3, dtype=torch.float64, generator=g)
    return CachedAtoms(x, gamma, y, torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]))


def _fit(epochs, checkpoint=None, resume=False):
    torch.manual_seed(0)
    head = EvidentialHead(IRREPS, force_rms=0.4, num_channels=4, mlp_hidden=8).double()
    fit = HeadFit(head, _atoms(40, 1), _atoms(15, 2), sigma_f=0.4, lr=0.05, batch_size=8, seed=5)
    if resume:
        fit.load(checkpoint)
    return fit, fit.run(epochs, checkpoint=checkpoint)


def test_fit_lowers_validation_nll_and_keeps_best(tmp_path):
    fit, res = _fit(30)
    nll = [r["valid_nll"] for r in res["history"]]
    assert min(nll[1:]) < nll[0] - 1.0  # epoch -1 is the initial head
    assert res["best_valid_nll"] == min(nll[1:]) == pytest.approx(fit.evaluate(fit.valid)["nll"], abs=1e-12)
    # the learned level follows the noise: atoms with large |x_0| get a larger predicted covariance
    from e2ip_plugins import evidential_predictive

    v = fit.valid
    u = evidential_predictive(v.forces, fit.head(v.features)).covariance.diagonal(dim1=-2, dim2=-1).sum(-1)
    big = v.features[:, 0].abs() > 1.0
    assert u[big].mean() > 2 * u[~big].mean()


def test_resume_equals_uninterrupted(tmp_path):
    ckpt = str(tmp_path / "fit.pt")
    full, _ = _fit(6)
    _fit(2, checkpoint=ckpt)
    resumed, res = _fit(6, checkpoint=ckpt, resume=True)
    assert [r["epoch"] for r in res["history"]] == [-1, 0, 1, 2, 3, 4, 5]
    for k, v in full.head.state_dict().items():
        assert torch.equal(v, resumed.head.state_dict()[k]), k
    with pytest.raises(ValueError, match="other settings"):
        HeadFit(full.head, full.train, lr=0.5, batch_size=8, seed=5, sigma_f=0.4).load(ckpt)


def test_structures_and_cat():
    a = _atoms(5, 3)
    parts = [a.structures(torch.tensor([i])) for i in range(5)]
    back = CachedAtoms.cat(parts)
    assert torch.equal(back.ptr, a.ptr) and torch.equal(back.features, a.features)
