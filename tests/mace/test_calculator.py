"""E2IPMACECalculator: covariances rotate as R Σ Rᵀ; committee covariance."""

import numpy as np
import pytest
import torch

from mace_ext import COMMITTEE_KEY, COVARIANCE_KEYS, E2IPMACECalculator, attach_e2ip_head

from .helpers import first_molecule, random_rotation, tiny_mace


def _saved_model(tmp_path, max_L, seed=0, name="m.model"):
    torch.manual_seed(seed)
    model = attach_e2ip_head(tiny_mace(max_L), num_channels=4, mlp_hidden=8, force_rms=1.1)
    with torch.no_grad():  # leave the zero-initialised last layer so the covariance is anisotropic
        for p in model.e2ip_head.parameters():
            p.add_(0.5 * torch.randn_like(p))
    path = tmp_path / name
    torch.save(model, path)
    return str(path)


@pytest.mark.parametrize("max_L", [1, 2])
def test_covariance_rotates(f64, tmp_path, max_L):
    calc = E2IPMACECalculator(model_paths=_saved_model(tmp_path, max_L), device="cpu", default_dtype="float64")
    for key in COVARIANCE_KEYS:
        assert key in calc.implemented_properties
    atoms = first_molecule()
    atoms.calc = calc
    f = atoms.get_forces()
    res = {k: calc.results[k].copy() for k in COVARIANCE_KEYS}
    cov = res["forces_covariance"]
    assert cov.shape == (19, 3, 3) and cov.dtype == np.float64
    evals = np.linalg.eigvalsh(cov)
    assert (evals > 0).all()
    assert np.max(evals[:, -1] / evals[:, 0]) > 1.001  # anisotropic (>> tolerance): a real equivariance test

    rot = random_rotation(max_L).numpy()
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rot.T
    rotated.calc = calc
    f_rot = rotated.get_forces()
    np.testing.assert_allclose(f_rot, f @ rot.T, atol=1e-10)
    for key in COVARIANCE_KEYS[:3]:
        np.testing.assert_allclose(calc.results[key], rot @ res[key] @ rot.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(calc.results["forces_uncertainty"], res["forces_uncertainty"], rtol=1e-9)


def test_committee_covariance(f64, tmp_path):
    paths = [_saved_model(tmp_path, 1, seed=s, name=f"m{s}.model") for s in (0, 1)]
    calc = E2IPMACECalculator(model_paths=paths, device="cpu", default_dtype="float64")
    assert COMMITTEE_KEY in calc.implemented_properties
    atoms = first_molecule()
    atoms.calc = calc
    atoms.get_forces()
    comm = calc.results["forces_comm"]
    dev = comm - comm.mean(0)
    expected = np.einsum("kni,knj->nij", dev, dev) / (len(paths) - 1)
    np.testing.assert_allclose(calc.results[COMMITTEE_KEY], expected, rtol=1e-10, atol=1e-14)
    assert calc.results["forces_covariance_epistemic"].shape == (19, 3, 3)
