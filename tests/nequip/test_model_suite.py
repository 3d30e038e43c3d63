"""NequIP's reusable model test-suite run on the plugin model (DESIGN §3).

``EnergyModelTestsMixin`` covers init, forward, equivariance (incl. the registered Cartesian
covariance fields, R Σ Rᵀ), batching, periodic images, large separation, cross-frame gradients,
numeric gradients, partial forces, force smoothness at the cutoff and isolated-atom energies, for
``float32`` and ``float64`` models. The compile / LAMMPS mixins are not included here: their
``fake_model_training_session`` trains on the sGDML aspirin set, which must be downloaded (no
network on test machines), and LAMMPS with ML-IAP is not installed; compile is tested separately.
"""

import copy

import pytest
import torch

from nequip.data import AtomicDataDict
from nequip.utils.test import assert_AtomicData_equivariant
from nequip.utils.unittests.model_tests_basic import EnergyModelTestsMixin

import nequip_ext._keys as K

BASE_CONFIG = {
    "_target_": "nequip_ext.EvidentialNequIPGNNModel",
    "seed": 123,
    "type_names": ["H", "C", "O"],
    "r_max": 4.0,
    "num_layers": 2,
    "l_max": 1,
    "parity": True,
    "num_features": 8,
    "radial_mlp_depth": 1,
    "radial_mlp_width": 8,
    "avg_num_neighbors": 3.0,
    "per_type_energy_shifts": {"H": -1.0, "C": -2.0, "O": -3.0},
    "per_type_energy_scales": 0.7,
}


class TestE2IPNequIPModel(EnergyModelTestsMixin):
    @pytest.fixture(scope="class")
    def config(self):
        cfg = copy.deepcopy(BASE_CONFIG)
        cfg["uq_head"] = {"kind": "e2ip", "num_channels": 8, "mlp_hidden": 16}
        return cfg

    @pytest.fixture
    def strict_locality(self):
        return False

    def test_covariance_outputs(self, model, model_test_data):
        """The DESIGN §3 fields are present, SPD, and consistent (U_tot = U_ale + U_epi, u = sqrt(tr U_epi/3))."""
        instance, _, out_fields = model
        for k in K.COVARIANCE_KEYS + [K.FORCES_UNCERTAINTY_KEY]:
            assert k in out_fields
        out = instance(model_test_data)
        n = out[AtomicDataDict.POSITIONS_KEY].shape[0]
        tot = out[K.FORCES_COVARIANCE_KEY]
        assert tot.shape == (n, 3, 3)
        assert out[K.FORCES_UNCERTAINTY_KEY].shape == (n,)
        torch.testing.assert_close(tot, tot.transpose(-1, -2))
        assert torch.linalg.eigvalsh(tot.double()).min() > 0
        torch.testing.assert_close(tot, out[K.FORCES_COVARIANCE_EPISTEMIC_KEY] + out[K.FORCES_COVARIANCE_ALEATORIC_KEY])
        u = torch.sqrt(torch.diagonal(out[K.FORCES_COVARIANCE_EPISTEMIC_KEY], dim1=-2, dim2=-1).sum(-1) / 3)
        torch.testing.assert_close(out[K.FORCES_UNCERTAINTY_KEY], u)


def _hide_fields(model, drop):
    """Shallow copy of a GraphModel whose ``irreps_out`` omit ``drop`` (NequIP's equivariance test
    only checks fields listed in ``irreps_out``); parameters are shared."""
    view = copy.copy(model)
    view.irreps_out = {k: v for k, v in model.irreps_out.items() if k not in drop}
    return view


EIP_NONEQUIVARIANT = K.COVARIANCE_KEYS + [K.FORCES_UNCERTAINTY_KEY, K.EIP_NU_KEY, K.EIP_ALPHA_KEY, K.EIP_BETA_KEY]


class TestEIPNequIPModel(EnergyModelTestsMixin):
    @pytest.fixture(scope="class")
    def config(self):
        cfg = copy.deepcopy(BASE_CONFIG)
        cfg["uq_head"] = {"kind": "eip", "num_channels": 8, "mlp_hidden": 16}
        return cfg

    @pytest.fixture
    def strict_locality(self):
        return False

    def test_equivariance(self, model, model_test_data, device, equivariance_tol, irrep_format):
        """eIP is not rotation-equivariant by construction (DESIGN §2.2): its covariance is diagonal in
        the lab frame. Energy, forces and every other field must still pass NequIP's equivariance test;
        the eIP fields must visibly fail it (if they ever pass, the baseline is not what the paper did)."""
        instance, _, _ = model
        assert_AtomicData_equivariant(
            func=_hide_fields(instance, EIP_NONEQUIVARIANT),
            data_in=model_test_data,
            e3_tolerance=equivariance_tol,
            irrep_format=irrep_format,
        )
        # the covariance is diagonal in every frame -> R Σ Rᵀ != Σ(R x) for a generic rotation
        data = {k: v.clone() for k, v in model_test_data.items()}
        cov = instance(dict(data))[K.FORCES_COVARIANCE_KEY]
        off = cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
        assert off.abs().max() == 0
        if cov.shape[0] > 0 and (torch.diagonal(cov, dim1=-2, dim2=-1).std(-1) > 1e-6).any():
            from e3nn import o3

            R = o3.rand_matrix(dtype=cov.dtype, device=cov.device)
            data[AtomicDataDict.POSITIONS_KEY] = data[AtomicDataDict.POSITIONS_KEY] @ R.T.to(
                data[AtomicDataDict.POSITIONS_KEY].dtype
            )
            if AtomicDataDict.CELL_KEY in data:
                data[AtomicDataDict.CELL_KEY] = data[AtomicDataDict.CELL_KEY] @ R.T.to(data[AtomicDataDict.CELL_KEY].dtype)
            cov_rot = instance(dict(data))[K.FORCES_COVARIANCE_KEY]
            assert not torch.allclose(cov_rot, R @ cov @ R.T, atol=1e-6)
