"""The benchmark's NequIP part end to end on the shipped data (``--profile smoke``: 1 epoch, ~20 frames,
ensemble of 2, no sweep): every metric for every method and set, and the numbers match a recomputation
from the written predictions and a direct call of the calculator."""

import json

import ase.io
import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from benchmarks.check import run_smoke

    return run_smoke("nequip", tmp_path_factory.mktemp("bench_nequip"))


def test_results_complete_and_consistent(bench):
    from benchmarks.check import check_smoke_run

    check_smoke_run(bench, "nequip")


def test_predictions_match_the_calculator(bench):
    """Frame 0 of the test split through E2IPNequIPCalculator reproduces the written e2ip forces and covariances."""
    import torch
    from e2ip_plugins.predictive import atom_uncertainty
    from nequip_ext import E2IPNequIPCalculator

    r = json.loads((bench / "results_nequip.json").read_text())
    calc = E2IPNequIPCalculator.from_saved_model(r["runs"]["e2ip_s0"]["artifact"], device="cpu",
                                                 chemical_species_to_atom_type_map=True)
    atoms = ase.io.read(r["data_files"]["test"], index=0)
    calc.calculate(atoms, ["energy", "forces"])
    npz = np.load(bench / r["methods"]["e2ip"]["sets"]["test"]["predictions"])
    n = len(atoms)
    np.testing.assert_allclose(npz["pred_forces"][:n], calc.results["forces"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npz["ref_forces"][:n], atoms.arrays["REF_forces"])
    # u and sigma of the written columns = the calculator's covariance keys (U_epi, U_tot)
    np.testing.assert_allclose(npz["raw_u"][:n], calc.results["forces_uncertainty"], rtol=1e-4)
    sigma = atom_uncertainty(torch.as_tensor(calc.results["forces_covariance"], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(npz["raw_sigma"][:n], sigma, rtol=1e-4)
