"""energy_uncertainty of NequIP e2ip models (issue 15), without training: the per-frame field, batching,
the validation fit (fit_model_novelty, also for eIP heads), old checkpoints."""

import ase.io
import numpy as np
import pytest
import torch

import nequip_ext
import nequip_ext._keys as K
from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

from ._cli_helpers import DATA

CFG = dict(seed=1, model_dtype="float64", type_names=["C", "H", "O"], r_max=4.0, num_layers=2, l_max=1,
           num_features=8, radial_mlp_width=8, avg_num_neighbors=4.0,
           per_type_energy_shifts={"C": -1.0, "H": -0.5, "O": -2.0}, per_type_energy_scales=0.5)


def _graphs(n=3, energy=True):
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=CFG["type_names"])
    mapping = {"REF_forces": "forces", **({"REF_energy": "total_energy"} if energy else {})}
    return [compute_neighborlist_(mapper(from_ase(a, key_mapping=mapping, include_keys=list(mapping))), r_max=4.0)
            for a in ase.io.read(DATA / "iso7_val.xyz", f":{n}")]


def _rotated(g, rot):
    """The graph ``g`` with positions rotated by ``rot`` (3, 3) and its neighbour list rebuilt."""
    gr = dict(g)
    gr[AtomicDataDict.POSITIONS_KEY] = g[AtomicDataDict.POSITIONS_KEY] @ rot.T
    return compute_neighborlist_(gr, r_max=4.0)


def _model(kind="e2ip"):
    return nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"kind": kind, "num_channels": 4, "mlp_hidden": 8})


@pytest.mark.parametrize("kind", ["e2ip", "eip"])
def test_field_formula_and_batching(kind):
    m = _model(kind)
    m.model.func.uq_energy.energy.energy_noise_length[0] = 0.3
    graphs = _graphs(3)
    out = m(AtomicDataDict.batched_from_list(graphs))
    sig = out[K.ENERGY_UNCERTAINTY_KEY]
    assert sig.shape == (3, 1)
    for i, g in enumerate(graphs):
        single = m(dict(g))
        tr = torch.diagonal(single[K.FORCES_COVARIANCE_KEY], dim1=-2, dim2=-1).sum() / 3.0
        torch.testing.assert_close(single[K.ENERGY_UNCERTAINTY_KEY].reshape(()), 0.3 * tr.sqrt())
        torch.testing.assert_close(sig[i], single[K.ENERGY_UNCERTAINTY_KEY][0])


@pytest.mark.parametrize("kind", ["e2ip", "eip"])
def test_fit_uses_only_the_validation_batches(kind):
    """fit_model_novelty stores ℓ̂ = sqrt(mean r_E²/v) of the validation batches passed (after the level)."""
    from nequip_ext.novelty import energy_head, fit_model_novelty

    m = _model(kind)
    train, val = _graphs(4), _graphs(3)
    fit_model_novelty(m, [AtomicDataDict.batched_from_list(train)], iter([AtomicDataDict.batched_from_list(val)]))
    ell, n_fit = energy_head(m).energy.energy_noise_length.tolist()
    assert n_fit == 3
    m.eval()
    z2 = []
    for g in val:
        out = m(dict(g))
        v = float(torch.diagonal(out[K.FORCES_COVARIANCE_KEY], dim1=-2, dim2=-1).sum() / 3.0)
        r = float(g[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(())) - float(out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(()))
        z2.append(r * r / v)
    assert ell == pytest.approx(float(np.sqrt(np.mean(z2))), rel=1e-8)


def test_old_checkpoint_state_dict_loads_with_warning():
    m = _model()
    sd = {k: v for k, v in m.state_dict().items() if "uq_energy" not in k}
    with pytest.warns(UserWarning, match="no stored energy length scale"):
        m.load_state_dict(sd, strict=True)
    assert m.model.func.uq_energy.energy.energy_noise_length[0].item() == pytest.approx(0.1)


def test_registered_as_graph_field():
    from nequip.data._key_registry import _GRAPH_FIELDS

    assert K.ENERGY_UNCERTAINTY_KEY in _GRAPH_FIELDS
