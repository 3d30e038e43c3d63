"""Random predictives for core tests."""

import torch

from e2ip_plugins import EvidentialHead, GaussianPredictive, evidential_predictive
from e2ip_plugins._e3nn import o3


def random_spd(n, scale=1.0, generator=None):
    a = torch.randn(n, 3, 3, dtype=torch.float64, generator=generator)
    return scale * (a @ a.transpose(-1, -2) + 0.3 * torch.eye(3, dtype=torch.float64))


def random_student_t(n, seed=0):
    """An NIW predictive from a randomised e²IP head on random features."""
    torch.manual_seed(seed)
    head = EvidentialHead("8x0e+8x1o", force_rms=0.9, num_channels=8).double()
    torch.nn.init.normal_(head.mlp.net[-1].weight, std=0.5)
    x = torch.randn(n, o3.Irreps("8x0e+8x1o").dim, dtype=torch.float64)
    with torch.no_grad():
        out = head(x)
    mean = torch.randn(n, 3, dtype=torch.float64)
    return evidential_predictive(mean, out)


def random_gaussian(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 3, dtype=torch.float64, generator=g)
    return GaussianPredictive(mean=mean, cov_epistemic=random_spd(n, 0.2, g), cov_aleatoric=random_spd(n, 0.1, g))


def multivariate_t_samples(loc, shape, df, rng):
    """One draw per row of t_df(loc_i, shape_i): y = loc + L z / sqrt(w / df), L Lᵀ = shape, z ~ N(0, I),
    w ~ χ²_df (the construction scipy's ``multivariate_t.rvs`` samples; vectorised over rows)."""
    import numpy as np

    loc, shape, df = np.asarray(loc), np.asarray(shape), np.asarray(df, dtype=np.float64)
    z = rng.standard_normal(loc.shape)
    w = rng.chisquare(df)
    return loc + np.einsum("nij,nj->ni", np.linalg.cholesky(shape), z) / np.sqrt(w / df)[:, None]
