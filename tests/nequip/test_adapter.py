"""Field registration, build-time validation, scriptability and loss/metric terms of nequip_ext."""

import pytest
import torch

import nequip  # noqa: F401  (loads nequip_ext through the entry point)
from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data._key_registry import _CARTESIAN_TENSOR_FIELDS, _NODE_FIELDS, get_field_type
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.utils.test import override_irreps_debug

import e2ip_plugins
import nequip_ext
import nequip_ext._keys as K
from e2ip_plugins.head_covariance import eip_covariances, niw_covariances

CFG = dict(
    seed=1,
    model_dtype="float64",
    type_names=["C", "H", "O"],
    r_max=4.0,
    num_layers=2,
    l_max=1,
    num_features=8,
    radial_mlp_width=8,
    avg_num_neighbors=4.0,
    per_type_energy_shifts={"C": -1.0, "H": -0.5, "O": -2.0},
    per_type_energy_scales=0.5,
)


def _batch():
    from ase.build import molecule

    tm = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=["C", "H", "O"], chemical_species_to_atom_type_map={"C": "C", "H": "H", "O": "O"}
    )
    frames = []
    for name in ("CH3CHO", "CH3OH"):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=0)
        d = compute_neighborlist_(tm(from_ase(atoms)), r_max=4.0)
        g = torch.Generator().manual_seed(len(atoms))
        d[AtomicDataDict.FORCE_KEY] = torch.randn(len(atoms), 3, generator=g, dtype=torch.float64)
        d[AtomicDataDict.TOTAL_ENERGY_KEY] = torch.randn(1, 1, generator=g, dtype=torch.float64)
        frames.append(d)
    return AtomicDataDict.batched_from_list(frames)


def test_import_light():
    import subprocess
    import sys

    code = "import sys, nequip, nequip_ext; print('lightning' in sys.modules, 'wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_fields_registered():
    for k in K.COVARIANCE_KEYS + [K.E2IP_SIGMA0_KEY, K.E2IP_SIGMA0_INV_KEY]:
        assert _CARTESIAN_TENSOR_FIELDS[k] == "ij=ji"
    for k in K.NODE_KEYS:
        assert k in _NODE_FIELDS and get_field_type(k) == "node"
    assert K.FORCES_UNCERTAINTY_KEY == "forces_uncertainty"


@pytest.mark.parametrize("bad", [{"num_layers": 1}, {"l_max": 0, "uq_head": {"geometric": False}},
                                 {"uq_head": {"kind": "nope"}}, {"uq_head": {"geometric": {"num_chanels": 4}}}])
def test_build_time_errors(bad):
    cfg = {**CFG, **bad}
    with pytest.raises(ValueError):
        nequip_ext.EvidentialNequIPGNNModel(**cfg)


@pytest.mark.parametrize("kind", ["e2ip", "eip"])
@override_irreps_debug(False)  # the debug hooks read Python attributes a ScriptModule does not keep
def test_head_module_scriptable_and_names(kind):
    m = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"kind": kind, "num_channels": 4, "mlp_hidden": 8})
    names = [n for n, _ in m.named_parameters() if "uq_head" in n] + [n for n, _ in m.named_buffers() if "uq_head" in n]
    assert names and not any(("scale" in n or "shift" in n) for n in names)
    order = list(m.model.func._modules)
    # the head reads the last convnet's input; the (parameter-free) novelty module runs after that convnet
    assert order.index("uq_head") + 1 == order.index("layer1_convnet")
    if kind == "e2ip":
        assert order.index("uq_novelty") == order.index("layer1_convnet") + 1
        assert not list(m.model.func.uq_novelty.parameters())
    head = m.model.func.uq_head
    mods = [head] + ([m.model.func.uq_novelty] if kind == "e2ip" else [])
    data = _batch()
    n = data[AtomicDataDict.POSITIONS_KEY].shape[0]
    feats = torch.randn(n, head.irreps_in[AtomicDataDict.NODE_FEATURES_KEY].dim)
    last = torch.randn(n, m.model.func.layer1_convnet.irreps_out[AtomicDataDict.NODE_FEATURES_KEY].dim)
    outs = []
    for run in (lambda mod: mod, torch.jit.script):
        d = {AtomicDataDict.NODE_FEATURES_KEY: feats, AtomicDataDict.ATOM_TYPE_KEY: data[AtomicDataDict.ATOM_TYPE_KEY]}
        d = run(head)(d)
        d[AtomicDataDict.NODE_FEATURES_KEY] = last  # what the last convnet would write
        for mod in mods[1:]:
            d = run(mod)(d)
        outs.append(d)
    keys = K.COVARIANCE_KEYS + [K.FORCES_UNCERTAINTY_KEY] + ([K.E2IP_NOVELTY_KEY] if kind == "e2ip" else [])
    for k in keys:
        torch.testing.assert_close(outs[0][k], outs[1][k])


def test_checkpoint_layout_before_novelty_module_loads_unfitted():
    """State dicts of the earlier layout (novelty buffers inside uq_head, or none) load strictly, unfitted."""
    m = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"num_channels": 4, "mlp_hidden": 8})
    nov = m.model.func.uq_novelty.novelty
    nov.novelty_ref.fill_(1.0)
    old = {k.replace("uq_novelty.novelty.", "uq_head.novelty."): v for k, v in m.state_dict().items()}
    old = {k: (v[:, :4] if k.endswith("uq_head.novelty.novelty_mean") else v) for k, v in old.items()}  # other D
    with pytest.warns(UserWarning, match="unfitted"):
        m.load_state_dict(old, strict=True)
    assert not nov.is_fitted


def test_default_force_rms_from_energy_scales():
    m = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"num_channels": 4, "mlp_hidden": 8})
    assert float(m.model.func.uq_head.head.sym_exp.sigma_f) == pytest.approx(0.5)
    m = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"num_channels": 4, "mlp_hidden": 8, "force_rms": 2.0})
    assert float(m.model.func.uq_head.head.sym_exp.sigma_f) == pytest.approx(2.0)


def test_head_covariance_matches_predictives():
    """The scriptable covariance maps used inside the model equal the core predictive classes."""
    g = torch.Generator().manual_seed(0)
    n = 6
    head = e2ip_plugins.EvidentialHead("4x0e+4x1o", num_channels=4, mlp_hidden=8)
    out = head(torch.randn(n, 16, generator=g))
    pred = e2ip_plugins.evidential_predictive(torch.zeros(n, 3), out)
    tot, epi, ale = niw_covariances(out["nu"], out["kappa"], out["sigma0"])
    torch.testing.assert_close(tot, pred.covariance)
    torch.testing.assert_close(epi, pred.covariance_epistemic)
    torch.testing.assert_close(ale, pred.covariance_aleatoric)
    eh = e2ip_plugins.EIPHead("4x0e+4x1o", num_channels=4, mlp_hidden=8)
    eo = eh(torch.randn(n, 16, generator=g))
    for q in (0.5, 0.3):
        pred = e2ip_plugins.eip_predictive(torch.zeros(n, 3), eo, q=q)
        tot, epi, ale = eip_covariances(eo["eip_nu"], eo["eip_alpha"], eo["eip_beta"], q)
        torch.testing.assert_close(tot, pred.covariance)
        torch.testing.assert_close(epi, pred.covariance_epistemic)
        torch.testing.assert_close(ale, pred.covariance_aleatoric)


@pytest.mark.parametrize("kind", ["e2ip", "eip"])
@pytest.mark.parametrize("model_dtype", ["float32", "float64"])
def test_loss_and_metrics(kind, model_dtype):
    m = nequip_ext.EvidentialNequIPGNNModel(
        **{**CFG, "model_dtype": model_dtype}, uq_head={"kind": kind, "num_channels": 4, "mlp_hidden": 8}
    )
    data = _batch()
    m.train()
    out = m(dict(data))
    loss = nequip_ext.EvidentialEnergyForceLoss(force_rms=0.5)
    ld = loss(out, data)
    assert set(ld) == {"per_atom_energy_mse", "forces_mse", "evidential", "weighted_sum"}
    # the evidential term equals the core per-atom loss, averaged over atoms
    head_out = nequip_ext.train.head_out(out, torch.float64)
    f64 = out[AtomicDataDict.FORCE_KEY].double()
    if kind == "e2ip":
        ref = e2ip_plugins.evidential_force_loss(f64, head_out, data[AtomicDataDict.FORCE_KEY], 0.5)
    else:
        ref = e2ip_plugins.eip_loss(data[AtomicDataDict.FORCE_KEY], f64, head_out)
    torch.testing.assert_close(ld["evidential"].double(), ref.mean())
    ld["weighted_sum"].backward()
    head_grads = [p.grad for n, p in m.named_parameters() if "uq_head" in n]
    assert all(g is not None for g in head_grads) and sum(g.abs().sum() for g in head_grads) > 0

    # UQ metrics over two batches == compute_metrics over the concatenated columns
    metrics = nequip_ext.UQMetrics()
    m.eval()
    o1 = m(dict(data))
    metrics(o1, data)
    metrics(o1, data)
    res = metrics.compute()
    pred = nequip_ext.train.predictive(o1, dtype=torch.float64)
    y = data[AtomicDataDict.FORCE_KEY]
    expect = e2ip_plugins.uq_metrics(type(pred).cat([pred, pred]), torch.cat([y, y]))
    for name in nequip_ext.train.UQ_METRIC_NAMES:
        assert name in res
        if expect[name] == expect[name]:  # not NaN
            assert float(res[name]) == pytest.approx(expect[name], rel=1e-6, abs=1e-9)
    assert "forces_rmse" in res and "total_energy_rmse" in res
