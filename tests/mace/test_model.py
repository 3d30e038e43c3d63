"""E2IP MACE model: outputs, SPD covariances, save/load, start-up errors."""

import pytest
import torch

from mace import data
from mace.tools import torch_geometric, utils
from mace_ext.model import COVARIANCE_KEYS, E2IPConfigError, attach_e2ip_head

from .helpers import Z, first_molecule, tiny_mace


def _batch(atoms, r_max=4.0):
    cfg = data.config_from_atoms(atoms)
    ad = data.AtomicData.from_config(cfg, z_table=utils.AtomicNumberTable(Z), cutoff=r_max)
    return torch_geometric.Batch.from_data_list([ad]).to_dict()


@pytest.mark.parametrize("max_L", [1, 2])
@pytest.mark.parametrize("head", ["e2ip", "eip"])
def test_outputs_and_save_load(f64, tmp_path, max_L, head):
    torch.manual_seed(0)
    model = attach_e2ip_head(tiny_mace(max_L), head=head, force_rms=1.2, num_channels=4, mlp_hidden=8)
    assert type(model).__name__ == "E2IPScaleShiftMACE"
    assert model.e2ip_feature_block == 0  # penultimate of 2 blocks
    for name, _ in model.e2ip_head.named_parameters():
        assert not any(s in name for s in ("scale", "shift", "readouts", "atomic_energies"))
    out = model(_batch(first_molecule()), training=False)
    n = 19
    assert out["forces"].shape == (n, 3)
    for key in COVARIANCE_KEYS[:3]:
        cov = out[key]
        assert cov.shape == (n, 3, 3)
        assert torch.allclose(cov, cov.transpose(1, 2))
        assert (torch.linalg.eigvalsh(cov) > 0).all()
    assert out["forces_uncertainty"].shape == (n,)
    raw = ["e2ip_nu", "e2ip_kappa", "e2ip_sigma0"] if head == "e2ip" else ["eip_nu", "eip_alpha", "eip_beta"]
    assert all(k in out for k in raw)
    path = tmp_path / "m.model"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    out2 = loaded(_batch(first_molecule()), training=False)
    assert torch.allclose(out2["forces_covariance"], out["forces_covariance"])


def test_plain_mace_supported(f64):
    model = attach_e2ip_head(tiny_mace(1, scale_shift=False), num_channels=4, mlp_hidden=8)
    assert type(model).__name__ == "E2IPMACE"
    out = model(_batch(first_molecule()))
    assert out["forces_covariance"].shape == (19, 3, 3)


@pytest.mark.parametrize("max_L, num_interactions", [(1, 1), (0, 2)], ids=["one_interaction", "scalar"])
def test_no_l_gt_0_block_uses_geometric_features(f64, max_L, num_interactions):
    """No product block with l > 0 (issue 28): the head reads the geometric construction on the last block."""
    model = attach_e2ip_head(tiny_mace(max_L, num_interactions=num_interactions), num_channels=4, mlp_hidden=8)
    assert model.e2ip_config()["geometric"] and model.e2ip_feature_block == num_interactions - 1
    assert model(_batch(first_molecule()))["forces_covariance"].shape == (19, 3, 3)


def test_unknown_head_is_rejected(f64):
    with pytest.raises(E2IPConfigError, match="must be one of"):
        attach_e2ip_head(tiny_mace(1), head="nope")
