"""Shared check of the UDD bias force against finite differences of E_bias (tests/mace, tests/nequip)."""

import math

import numpy as np
import pytest

from e2ip_plugins.md import UDDCalculator, bias_energy


def check_udd_against_finite_differences(calc, variance, atoms, atom_indices, min_force, atol_rel, h=1e-5):
    """σ² of the hook equals the calculator's Σ tr U_epi/3; with A = 1 eV and B = sqrt(σ²/N) the bias force of
    :class:`UDDCalculator` equals −∂E_bias/∂r by central differences (rel 1e-6); forces = model + bias."""
    n = len(atoms)
    sigma2, _ = variance(atoms)
    atoms.calc = calc
    atoms.get_forces()
    epi = calc.results["forces_covariance_epistemic"]
    assert sigma2 == pytest.approx(np.trace(epi, axis1=1, axis2=2).sum() / 3, rel=1e-12)  # same σ² as the calculator
    A, B = 1.0, math.sqrt(sigma2 / n)  # σ²/(N B²) = 1
    udd = UDDCalculator(calc, A, B)  # hook found through the e2ip.calculators adapters
    biased = atoms.copy()
    biased.calc = udd
    biased.get_forces()
    f_bias = udd.results["udd_bias_forces"]
    assert np.abs(f_bias).max() > min_force
    for i in atom_indices:
        for k in range(3):
            e = []
            for sgn in (1, -1):
                a = atoms.copy()
                a.positions[i, k] += sgn * h
                e.append(bias_energy(variance(a)[0], n, A, B))
            fd = -(e[0] - e[1]) / (2 * h)
            assert fd == pytest.approx(f_bias[i, k], rel=1e-6, abs=atol_rel * np.abs(f_bias).max())
    np.testing.assert_allclose(udd.results["forces"], udd.results["model_forces"] + f_bias, atol=1e-14)
    return udd
