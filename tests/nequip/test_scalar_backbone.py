"""The e²IP head on scalar backbones (issue 28): NequIP ``l_max: 0`` and Allegro (``nequip-allegro``), through the
geometric l = 1 / l = 2 features of :mod:`nequip_ext.geometric`.

NequIP's own model test suite (``BaseEnergyModelTests``, as in ``test_model_suite.py``) on both, small; Σ SPD and
R U Rᵀ under rotations; permutation equivariance; the attach route on a plain ``l_max: 0`` model; TorchScript and
``torch.export`` of the graph module; one ``nequip-train -cn allegro_e2ip`` run (1 epoch, float64) read back by
:class:`nequip_ext.E2IPNequIPCalculator`. What the construction relies on from NequIP / Allegro is pinned first.
"""

import copy
import inspect

import ase.io
import pytest
import torch
from scipy.spatial.transform import Rotation

import nequip_ext
import nequip_ext._keys as K
import nequip_ext.attach
from nequip.data import AtomicDataDict, compute_neighborlist_
from nequip.nn import with_edge_vectors_
from nequip_ext.geometric import E2IPGeometricModule

from ._cli_helpers import DATA, nequip_train
from .test_energy_uq import CFG, _graphs, _rotated
from .test_model_suite import BASE_CONFIG, _PluginModelTests

ALLEGRO_VERSION = "0.8.3"
GEO = {"num_channels": 4, "num_basis": 6, "mlp_hidden": 16}
ALLEGRO = dict(
    l_max=1, num_layers=1, num_scalar_features=8, num_tensor_features=4,
    radial_chemical_embed={"_target_": "allegro.nn.TwoBodyBesselScalarEmbed", "num_bessels": 4},
    scalar_embed_mlp_hidden_layers_width=8, allegro_mlp_hidden_layers_width=8, readout_mlp_hidden_layers_width=8,
)
NEQUIP_ONLY = ("l_max", "num_layers", "num_features", "radial_mlp_width", "radial_mlp_depth", "parity")


def _allegro_cfg(base):
    return {**{k: v for k, v in base.items() if k not in NEQUIP_ONLY}, **ALLEGRO}


def _build(backbone, **uq):
    head = {"num_channels": 4, "mlp_hidden": 8, **uq}
    if backbone == "nequip_l0":
        return nequip_ext.EvidentialNequIPGNNModel(**{**CFG, "l_max": 0}, uq_head={"geometric": GEO, **head})
    if backbone == "nequip_l1_forced":
        return nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"geometric": GEO, **head})
    return nequip_ext.EvidentialAllegroModel(**_allegro_cfg(CFG), uq_head={"geometric": GEO, **head})


def test_nequip_and_allegro_pinned():
    """What nequip_ext.geometric relies on (fails loudly if a new NequIP / Allegro version moves it)."""
    import allegro
    from allegro.model import AllegroModel
    from allegro.nn import EdgewiseReduce
    from nequip.model import NequIPGNNModel

    assert allegro.__version__ == ALLEGRO_VERSION
    # edge vectors: r[edge_index[1]] − r[edge_index[0]] + shift·cell (centre = edge_index[0])
    g = dict(_graphs(1)[0])
    g.pop(AtomicDataDict.EDGE_VECTORS_KEY, None)
    ei, pos = g[AtomicDataDict.EDGE_INDEX_KEY], g[AtomicDataDict.POSITIONS_KEY]
    torch.testing.assert_close(with_edge_vectors_(g, with_lengths=False)[AtomicDataDict.EDGE_VECTORS_KEY],
                               pos[ei[1]] - pos[ei[0]])
    # NequIP l_max 0: scalar node features into the last convnet
    seq = NequIPGNNModel(**{**CFG, "l_max": 0}).model.func
    assert [n for n in seq._modules if n.endswith("_convnet")] == ["layer0_convnet", "layer1_convnet"]
    assert str(seq.layer1_convnet.irreps_in[AtomicDataDict.NODE_FEATURES_KEY]) == "8x0e"
    # Allegro: final per-edge scalars in edge_features → edge_readout → edge_eng_sum (scatter over edge_index[0])
    seq = AllegroModel(**_allegro_cfg(CFG)).model.func
    names = list(seq._modules)
    assert names[names.index("allegro"):] == ["allegro", "edge_readout", "edge_eng_sum", "per_type_energy_scale_shift",
                                              "total_energy_sum"]
    assert seq.allegro.irreps_out[AtomicDataDict.EDGE_FEATURES_KEY].lmax == 0
    assert seq.edge_readout.field == AtomicDataDict.EDGE_FEATURES_KEY
    assert (seq.edge_eng_sum.field, seq.edge_eng_sum.out_field) == (AtomicDataDict.EDGE_ENERGY_KEY,
                                                                    AtomicDataDict.PER_ATOM_ENERGY_KEY)
    assert "edge_dst = data[AtomicDataDict.EDGE_INDEX_KEY][0]" in inspect.getsource(EdgewiseReduce.forward)
    assert type(seq.edge_eng_sum.norm_module).__name__ == "AvgNumNeighborsNorm"  # read by model.backbone_neighbors
    assert hasattr(seq.edge_eng_sum.norm_module, "norm_const")


def test_edges_match_ase_on_a_small_periodic_cell():
    """NequIP's edges as the module reads them (centre edge_index[0], r_j − r_i + shift·cell) are ASE's
    ``neighbor_list("ijD")`` edges on a triclinic cell smaller than r_max (self-images included), and the
    module's features equal GeometricFeatures on ASE's edges; the opposite sign gives other features."""
    from ase.build import bulk
    from ase.neighborlist import neighbor_list
    from nequip.data import from_ase

    atoms = bulk("NaCl", "rocksalt", a=4.1)
    atoms.rattle(0.1, seed=1)
    g = with_edge_vectors_(compute_neighborlist_(from_ase(atoms), r_max=4.0), with_lengths=False)
    ei, vec = g[AtomicDataDict.EDGE_INDEX_KEY], g[AtomicDataDict.EDGE_VECTORS_KEY]
    i, j, d = neighbor_list("ijD", atoms, 4.0)
    assert len(i) == ei.shape[1] > 12 and (i == j).any()  # self-images present

    def canon(a, b, v):
        return sorted(zip(a.tolist(), b.tolist(), [tuple(round(x, 8) for x in r) for r in v.tolist()]))

    assert canon(ei[0], ei[1], vec) == canon(torch.as_tensor(i), torch.as_tensor(j), torch.as_tensor(d))
    mod = E2IPGeometricModule(irreps_in={"node_features": "3x0e"}, r_max=4.0, avg_num_neighbors=6.0, **GEO)
    h = torch.randn(len(atoms), 3, generator=torch.Generator().manual_seed(2))
    out = mod({**g, "node_features": h})[K.E2IP_GEOMETRIC_FEATURES_KEY]
    ii, jj, dd = (torch.as_tensor(x) for x in (i, j, d))
    torch.testing.assert_close(out, mod.geometric(h, ii, jj, dd))
    assert not torch.allclose(out, mod.geometric(h, ii, jj, -dd))


def test_module_layout_and_options():
    """Where the modules go; l ≥ 1 keeps the plain head unless ``geometric: true``; bad options name the fix."""
    for backbone, before, after in (("nequip_l0", "layer1_convnet", "layer1_convnet"),
                                    ("allegro", "edge_readout", "edge_eng_sum")):
        order = list(_build(backbone).model.func._modules)
        assert order.index("uq_geometric") + 1 == order.index("uq_head") == order.index(before) - 1
        assert order.index("uq_novelty") == order.index(after) + 1 and order[-1] == "uq_energy"
    m = _build("nequip_l1_forced")
    assert m.model.func.uq_head.field == K.E2IP_GEOMETRIC_FEATURES_KEY and m.model.func.uq_geometric.select
    plain = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"num_channels": 4})
    assert "uq_geometric" not in plain.model.func._modules
    with pytest.raises(ValueError, match="geometric: false on a scalar backbone"):
        nequip_ext.EvidentialAllegroModel(**_allegro_cfg(CFG), uq_head={"geometric": False})
    with pytest.raises(ValueError, match="unknown options"):
        _build("nequip_l0", geometric={"channels": 4})


@pytest.mark.parametrize("backbone", ["nequip_l0", "allegro", "nequip_l1_forced"])
def test_covariance_spd_rotates_and_permutes(backbone):
    """U SPD; U(R x) = R U(x) Rᵀ (and anisotropic: not vacuous); U(P x) = P U(x); eIP head and extras build too."""
    model = _build(backbone, committee={"enabled": True, "num_members": 2})
    g = _graphs(2)[1]
    u = model(dict(g))[K.FORCES_COVARIANCE_KEY].detach()
    assert torch.linalg.eigvalsh(u).min() > 0
    rot = torch.as_tensor(Rotation.random(random_state=3).as_matrix(), dtype=torch.float64)
    ur = model(_rotated(g, rot))[K.FORCES_COVARIANCE_KEY].detach()
    torch.testing.assert_close(ur, rot @ u @ rot.T, rtol=1e-8, atol=1e-10 * u.abs().max())
    assert (rot @ u @ rot.T - u).abs().max() > 1e-4 * u.abs().max()
    perm = torch.randperm(u.shape[0], generator=torch.Generator().manual_seed(0))
    nodes = (AtomicDataDict.POSITIONS_KEY, AtomicDataDict.ATOM_TYPE_KEY, AtomicDataDict.ATOMIC_NUMBERS_KEY,
             AtomicDataDict.FORCE_KEY)
    gp = {k: (v[perm] if k in nodes else v) for k, v in g.items() if not k.startswith("edge_")}
    up = model(compute_neighborlist_(gp, r_max=4.0))[K.FORCES_COVARIANCE_KEY].detach()
    torch.testing.assert_close(up, u[perm], rtol=1e-8, atol=1e-12 * u.abs().max())
    eip = _build(backbone, kind="eip")(dict(g))[K.FORCES_COVARIANCE_KEY]
    assert torch.linalg.eigvalsh(eip.detach()).min() > 0


def test_energy_noise_head_on_allegro():
    """The energy-noise head reads the summed edge scalars h_i on Allegro (the NequIP site's node_features)."""
    model = _build("allegro", energy_noise={"enabled": True, "mlp_hidden": 8})
    assert model.model.func.uq_energy.field == K.E2IP_NODE_SCALARS_KEY
    out = model(AtomicDataDict.batched_from_list(_graphs(2)))
    assert out[K.ENERGY_UNCERTAINTY_KEY].shape == (2, 1) and (out[K.ENERGY_UNCERTAINTY_KEY] > 0).all()


@pytest.mark.parametrize("edges", [False, True])
def test_geometric_module_script_and_export(edges):
    """TorchScript and torch.export (dynamic atoms / edges: the e2ip_ase AOTI path) reproduce the eager module."""
    f = 6
    field = AtomicDataDict.EDGE_FEATURES_KEY if edges else AtomicDataDict.NODE_FEATURES_KEY
    kw = {"edge_field": field} if edges else {"field": field}
    mod = E2IPGeometricModule(irreps_in={field: f"{f}x0e"}, r_max=4.0, avg_num_neighbors=5.0, **GEO, **kw).eval()
    graphs = _graphs(2)

    def inputs(g):
        n = g[AtomicDataDict.EDGE_INDEX_KEY].shape[1] if edges else g[AtomicDataDict.POSITIONS_KEY].shape[0]
        return {AtomicDataDict.POSITIONS_KEY: g[AtomicDataDict.POSITIONS_KEY],
                AtomicDataDict.EDGE_INDEX_KEY: g[AtomicDataDict.EDGE_INDEX_KEY],
                field: torch.randn(n, f, generator=torch.Generator().manual_seed(n))}

    out_key = K.E2IP_GEOMETRIC_FEATURES_KEY
    ref = [mod(inputs(g))[out_key] for g in graphs]
    scripted = torch.jit.script(mod)
    nodes, edges_dim = torch.export.Dim("nodes", min=2), torch.export.Dim("edges", min=2)
    dyn = {AtomicDataDict.POSITIONS_KEY: {0: nodes}, AtomicDataDict.EDGE_INDEX_KEY: {1: edges_dim},
           field: {0: edges_dim if edges else nodes}}
    exported = torch.export.export(mod, (inputs(graphs[0]),), dynamic_shapes=({k: dyn[k] for k in dyn},), strict=False)
    for g, r in zip(graphs, ref):
        assert r.shape[1] == f + 8 * GEO["num_channels"]
        torch.testing.assert_close(scripted(inputs(g))[out_key], r)
        torch.testing.assert_close(exported.module()(inputs(g))[out_key], r)


@pytest.mark.parametrize("backbone", ["nequip_l0", "allegro"])
def test_attach_to_plain_scalar_backbone(monkeypatch, backbone):
    """AttachedE2IPModel on a plain l_max 0 NequIP / Allegro model: uq_geometric + head, backbone frozen and
    bit-identical."""
    from allegro.model import AllegroModel
    from nequip.model import NequIPGNNModel

    from .test_attach import _in_process

    plain = NequIPGNNModel(**{**CFG, "l_max": 0}) if backbone == "nequip_l0" else AllegroModel(**_allegro_cfg(CFG))
    ref = plain(AtomicDataDict.batched_from_list(_graphs(2)))
    _in_process(monkeypatch, copy.deepcopy(plain))
    model = nequip_ext.AttachedE2IPModel(package_path="scalar.nequip.zip",
                                         uq_head={"num_channels": 4, "geometric": GEO})
    seq = model.model.func
    assert seq.uq_head.field == K.E2IP_GEOMETRIC_FEATURES_KEY and seq.uq_geometric.detach_input
    assert seq.uq_geometric.geometric.norm == pytest.approx(1 / 2.0)  # n̄ = 4 read from the backbone
    head = nequip_ext.attach.head_parameters(model)
    assert any(k.startswith("uq_geometric.") for k in head) and all(p.requires_grad for p in head.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.split(".")[2] not in
                   nequip_ext.attach.UQ_MODULE_NAMES)
    out = model(AtomicDataDict.batched_from_list(_graphs(2)))
    for k in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)
    assert torch.linalg.eigvalsh(out[K.FORCES_COVARIANCE_KEY].detach()).min() > 0


class TestScalarNequIPE2IP(_PluginModelTests):
    """NequIP's model suite on an ``l_max: 0`` e²IP model (head on the geometric features)."""

    @pytest.fixture(scope="class")
    def config(self):
        return {**copy.deepcopy(BASE_CONFIG), "l_max": 0, "uq_head": {"num_channels": 4, "mlp_hidden": 8,
                                                                      "geometric": GEO}}


class TestAllegroE2IP(_PluginModelTests):
    """NequIP's model suite on the Allegro e²IP model."""

    @pytest.fixture(scope="class")
    def config(self):
        cfg = _allegro_cfg(copy.deepcopy(BASE_CONFIG))
        cfg.update(_target_="nequip_ext.EvidentialAllegroModel",
                   uq_head={"num_channels": 4, "mlp_hidden": 8, "geometric": GEO})
        return cfg


def test_allegro_train_cli_to_calculator(tmp_path):
    """``nequip-train -cn allegro_e2ip`` (shipped config, 1 epoch, float64, val frames) → ASE calculator."""
    from nequip_ext import E2IPNequIPCalculator

    val = str(DATA / "iso7_val.xyz")
    nequip_train(tmp_path / "run", "run=[train]", "max_epochs=1", f"train_file={val}", f"val_file={val}",
                 "training_module.model.model_dtype=float64", config="allegro_e2ip")
    calc = E2IPNequIPCalculator.from_saved_model(str(tmp_path / "run" / "best.ckpt"), device="cpu",
                                                 chemical_species_to_atom_type_map=True)
    atoms = ase.io.read(DATA / "iso7_test.xyz", 0)
    atoms.calc = calc
    atoms.get_potential_energy()
    cov = calc.results[K.FORCES_COVARIANCE_KEY]
    assert cov.shape == (len(atoms), 3, 3)
    assert torch.linalg.eigvalsh(torch.as_tensor(cov)).min() > 0
    assert calc.results[K.ENERGY_UNCERTAINTY_KEY] > 0


@pytest.mark.parametrize("detach", [False, True])
def test_detach_features_keeps_the_head_loss_off_the_backbone(detach):
    """uq_head.detach_features (the Allegro config's setting): in training, a loss on the covariance gives the
    backbone no gradient, and still trains the UQ modules; without it the backbone gets one."""
    model = _build("allegro", detach_features=detach)
    model.train()
    out = model(dict(_graphs(1)[0]))
    torch.diagonal(out[K.FORCES_COVARIANCE_KEY], dim1=-2, dim2=-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    uq = [g for n, g in grads.items() if ".uq_" in n and g is not None and g.abs().sum() > 0]
    backbone = [n for n, g in grads.items() if ".uq_" not in n and g is not None and g.abs().sum() > 0]
    assert uq, "the UQ modules get no gradient"
    assert bool(backbone) != detach, backbone[:3]
