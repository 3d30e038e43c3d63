"""Geometric l > 0 features for scalar backbones (e2ip_plugins.geometric_features, issue 28)."""

import torch

from e2ip_plugins import EvidentialHead
from e2ip_plugins._e3nn import o3
from e2ip_plugins.geometric_features import GeometricFeatures

R_MAX = 3.0


def _graph(pos):
    d = torch.cdist(pos, pos)
    center, neighbor = torch.nonzero((d < R_MAX) & (d > 0), as_tuple=True)
    return center, neighbor, pos[neighbor] - pos[center]


def _setup(n=12, f=5, seed=0):
    torch.manual_seed(seed)
    pos = torch.rand(n, 3, dtype=torch.float64) * 4.0
    h = torch.randn(n, f, dtype=torch.float64)  # invariant per-atom scalars
    geo = GeometricFeatures(f, R_MAX, num_channels=4).double()
    head = EvidentialHead(geo.irreps_out, force_rms=0.7, num_channels=4).double()
    return pos, h, geo, head


def _sigma0(pos, h, geo, head):
    return head(geo(h, *_graph(pos)))["sigma0"]


def test_sigma0_spd_rotates_and_permutes():
    pos, h, geo, head = _setup()
    s = _sigma0(pos, h, geo, head)
    assert torch.linalg.eigvalsh(s).min() > 0
    rot = o3.rand_matrix(dtype=torch.float64)
    assert torch.allclose(_sigma0(pos @ rot.T, h, geo, head), rot @ s @ rot.T, atol=1e-10)
    perm = torch.randperm(len(pos))
    assert torch.allclose(_sigma0(pos[perm], h[perm], geo, head), s[perm], atol=1e-12)


def test_features_are_anisotropic_and_depend_on_geometry():
    """The l > 0 part is not zero, and the covariance shape follows the neighbourhood (not only σ_F²·I)."""
    pos, h, geo, head = _setup(seed=1)
    feats = geo(h, *_graph(pos))
    assert feats[:, h.shape[1]:].abs().max() > 1e-3
    s = _sigma0(pos, h, geo, head)
    ev = torch.linalg.eigvalsh(s)
    assert (ev[:, -1] / ev[:, 0]).max() > 1.01


def test_continuous_when_a_neighbour_crosses_the_cutoff():
    pos, h, geo, head = _setup(n=2, seed=2)
    out = []
    for r in (R_MAX - 1e-4, R_MAX + 1e-4):
        p = torch.tensor([[0.0, 0.0, 0.0], [r, 0.0, 0.0]], dtype=torch.float64)
        out.append(geo(h, *_graph(p)))
    assert torch.allclose(out[0], out[1], atol=1e-8)


def test_scriptable():
    pos, h, geo, _ = _setup()
    scripted = torch.jit.script(geo)
    assert torch.allclose(scripted(h, *_graph(pos)), geo(h, *_graph(pos)))
