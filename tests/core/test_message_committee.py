"""The batched message-passing committee (e2ip_plugins.message_committee, issue 26): equivariance, permutation,
member independence, training on a pair force, scalar-only input, bad input."""

import pytest
import torch

from e2ip_plugins._e3nn import o3
from e2ip_plugins.force_committee import committee_covariance, committee_loss
from e2ip_plugins.message_committee import MessageCommittee

IRREPS = o3.Irreps("5x0e+3x1o+2x1e")
R_MAX = 3.0
TOL = dict(atol=1e-6, rtol=1e-5)


def _graph(pos):
    d = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros on the diagonal
    center, neighbor = torch.nonzero((d < R_MAX) & (d > 0), as_tuple=True)
    return center, neighbor, pos[neighbor] - pos[center]


def _setup(n=14, irreps=IRREPS, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g, dtype=torch.float64) * 4.0
    h = torch.randn(n, irreps.dim, generator=g, dtype=torch.float64)
    com = MessageCommittee(irreps, R_MAX, num_members=kw.pop("num_members", 5), num_channels=3, force_rms=0.7,
                           seed=seed, **kw).double()
    return pos, h, com


@pytest.mark.parametrize("irreps", [IRREPS, o3.Irreps("6x0e")])
def test_members_rotate_invert_and_permute_with_the_structure(irreps):
    pos, h, com = _setup(irreps=irreps)
    f = com(h, *_graph(pos))
    assert f.shape == (14, 5, 3) and f.abs().max() > 1e-3
    rot = o3.rand_matrix(dtype=torch.float64)
    for mat in (rot, -rot):  # proper rotation and rotation-inversion: F → R F
        # e3nn's Wigner matrices carry float32 constants: compare to 1e-6
        torch.testing.assert_close(com(h @ irreps.D_from_matrix(mat).T, *_graph(pos @ mat.T)), f @ mat.T, **TOL)
    _, c = committee_covariance(f)
    _, c_rot = committee_covariance(com(h @ irreps.D_from_matrix(rot).T, *_graph(pos @ rot.T)))
    torch.testing.assert_close(c_rot, rot @ c @ rot.T, **TOL)
    assert torch.linalg.eigvalsh(c).min() > 0  # 5 members span 3D: SPD
    perm = torch.randperm(14)
    torch.testing.assert_close(com(h[perm], *_graph(pos[perm])), f[perm])
    torch.testing.assert_close(com(h, *_graph(pos + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))), f)


def test_members_are_independent_and_seeded():
    pos, h, com = _setup()
    f = com(h, *_graph(pos))
    torch.testing.assert_close(_setup()[2](h, *_graph(pos)), f)  # same seed, same members
    assert (_setup(seed=1)[2](h, *_graph(pos)) - f).abs().max() > 1e-3
    for k in range(1, 5):
        assert (f[:, k] - f[:, 0]).abs().max() > 1e-3
    with torch.no_grad():  # member 0's weights feed member 0 only
        com.radial2[0].zero_()
        com.vec_self[0].zero_()
    g = com(h, *_graph(pos))
    assert g[:, 0].abs().max() == 0 and torch.equal(g[:, 1:], f[:, 1:])


def test_loss_reaches_every_member():
    pos, h, com = _setup()
    committee_loss(com(h, *_graph(pos)), torch.randn(14, 3, dtype=torch.float64), 1.0).sum().backward()
    for name in ("radial1", "radial2", "gate_msg", "vec_msg", "vec_self", "readout"):
        grad = getattr(com, name).grad
        assert all(grad[k].abs().sum() > 0 for k in range(5)), name


def test_training_fits_a_pair_force_that_a_node_readout_cannot():
    """Target: a Morse-like pair force Σ_j φ(r_ij) r̂_ij on random clusters with plain invariant features —
    the features carry no direction, so only messages can fit it. The 12 clusters are one disjoint graph."""
    torch.manual_seed(0)
    pos = torch.cat([torch.rand(10, 3, dtype=torch.float64) * 4.0 + 100.0 * c for c in range(12)])
    center, neighbor, vec = _graph(pos)
    r = vec.norm(dim=-1)
    phi = torch.exp(-(r - 1.5)) - torch.exp(-2 * (r - 1.5))
    y = torch.zeros(120, 3, dtype=torch.float64).index_add(0, center, (phi / r).unsqueeze(-1) * vec)
    h = torch.ones(120, 4, dtype=torch.float64)
    com = MessageCommittee("4x0e", R_MAX, num_members=4, num_channels=6, force_rms=1.0, seed=0).double()
    opt = torch.optim.Adam(com.parameters(), lr=1e-2)
    with torch.no_grad():
        before = ((com(h, center, neighbor, vec).mean(1) - y) ** 2).mean().item()
    for _ in range(250):
        opt.zero_grad()
        committee_loss(com(h, center, neighbor, vec), y, 1.0, nll_weight=0.0).mean().backward()
        opt.step()
    with torch.no_grad():
        after = ((com(h, center, neighbor, vec).mean(1) - y) ** 2).mean().item()
    assert after < 0.1 * y.pow(2).mean().item() and after < 0.1 * before


def test_bad_input():
    with pytest.raises(ValueError, match="num_members >= 2"):
        MessageCommittee(IRREPS, R_MAX, num_members=1)
    with pytest.raises(ValueError, match="num_channels >= 1"):
        MessageCommittee(IRREPS, R_MAX, num_channels=0)


def test_batched_forward_equals_the_docstring_member_by_member(f64):
    """The batched kernels equal the module docstring computed member by member and edge by edge (float64)."""
    import math

    from e2ip_plugins.geometric_features import bessel_basis, polynomial_envelope

    pos, h, com = _setup(n=6, num_members=3)
    center, neighbor, vec = _graph(pos)
    got = com(h, center, neighbor, vec)
    m, k, n = 3, com.k, 6
    x = com.linear(h)
    want = torch.zeros(n, m, 3, dtype=torch.float64)
    for mem in range(m):
        s = x[:, mem * k:(mem + 1) * k]
        v = x[:, m * k:].reshape(n, m * k, 3)[:, mem * k:(mem + 1) * k]
        ms, mv = torch.zeros(n, k, dtype=torch.float64), torch.zeros(n, k, 3, dtype=torch.float64)
        for e in range(len(center)):
            i, j, r = int(center[e]), int(neighbor[e]), vec[e].norm()
            b = bessel_basis(r.reshape(1), com.freqs, R_MAX)[0]
            w = (torch.nn.functional.silu(b @ com.radial1[mem]) @ com.radial2[mem]).reshape(4, k)
            w = w * polynomial_envelope(r.reshape(1), R_MAX)[0] * com.norm
            rh = vec[e] / r
            ms[i] += w[0] * s[j] + w[1] * (v[j] @ rh)
            mv[i] += (w[2] * s[j])[:, None] * rh + w[3][:, None] * v[j]
        gate = torch.sigmoid(ms @ com.gate_msg[mem] + s @ com.gate_self[mem] + com.gate_bias[mem])
        u = gate[:, :, None] * (torch.einsum("nka,kj->nja", mv, com.vec_msg[mem])
                                + torch.einsum("nka,kj->nja", v, com.vec_self[mem]))
        want[:, mem] = 0.7 * torch.einsum("nka,k->na", u, com.readout[mem]) / math.sqrt(k)
    torch.testing.assert_close(got, want)
