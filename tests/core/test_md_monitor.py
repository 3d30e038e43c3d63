"""MD tools of the core (issue 13): trust-band monitor and UDD calculator.

Everything runs real ASE Langevin dynamics on :class:`tests.core.md_toy.ToyUQCalculator`; the command
``e2ip-md`` is tested in ``test_md_cli.py``.
"""

from __future__ import annotations

import json
import math

import ase.io
import numpy as np
import pytest
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from e2ip_plugins.md import (
    CANDIDATE,
    MDConfigError,
    STOP,
    TrustBandExceeded,
    UDDCalculator,
    UncertaintyMonitor,
    band_of,
    bias_energy,
)
from e2ip_plugins.md.udd import bias_forces, epistemic_variance_from_results

from .md_toy import run_langevin, toy_calc, toy_molecule


# --------------------------------------------------------------------------------------------------
# monitor
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A full run with no stop: the max-u trace that sets the bands of the real test run."""
    mon, stop = run_langevin(tmp_path_factory.mktemp("probe"), 0.0, math.inf)
    assert stop is None
    return mon


def test_bands_candidates_and_stop_match_recomputation(tmp_path, probe):
    trace = np.array([h["max_u"] for h in probe.history])
    steps = np.array([h["step"] for h in probe.history])
    assert trace.max() > 2 * trace.min(), "the toy run must explore a range of u for a meaningful test"
    trust_lo = float(np.quantile(trace, 0.4))
    trust_hi = float(trace.max())
    expected_stop = int(steps[np.argmax(trace >= trust_hi)])
    assert expected_stop > 0

    mon, stop = run_langevin(tmp_path, trust_lo, trust_hi)  # same seed: the same trajectory up to the stop
    assert stop is not None and stop.step == expected_stop

    frames = ase.io.read(tmp_path / "traj.extxyz", ":")
    cands = ase.io.read(tmp_path / "cand.extxyz", ":")
    summary = json.loads((tmp_path / "summary.json").read_text())
    # recompute everything from the stored per-atom arrays only
    max_u = np.array([f.arrays["forces_uncertainty"].max() for f in frames])
    bands = [band_of(m, trust_lo, trust_hi) for m in max_u]
    frame_steps = [int(f.info["md_step"]) for f in frames]
    assert frame_steps == list(range(0, expected_stop + 1, 4))
    assert bands == [f.info["trust_band"] for f in frames]
    # the monitor decides on the numbers as stored (8 decimals): the recomputation is exact
    np.testing.assert_array_equal(max_u, [f.info["forces_uncertainty_max"] for f in frames])
    np.testing.assert_allclose([f.arrays["forces_uncertainty"].mean() for f in frames],
                               [f.info["forces_uncertainty_mean"] for f in frames], rtol=1e-14)
    np.testing.assert_array_equal(max_u, trace[: len(frames)])  # same dynamics as the probe run
    assert bands[-1] == STOP and STOP not in bands[:-1]
    cand_steps = [s for s, b in zip(frame_steps, bands) if b == CANDIDATE]
    assert 0 < len(cand_steps) < len(frames) - 1  # all three bands occur
    assert [int(c.info["md_step"]) for c in cands] == cand_steps
    for c in cands:
        f = frames[frame_steps.index(int(c.info["md_step"]))]
        np.testing.assert_array_equal(c.positions, f.positions)
        np.testing.assert_array_equal(c.arrays["forces_covariance"], f.arrays["forces_covariance"])
    assert summary["status"] == "stopped" and summary["stopped"] and not summary["completed"]
    assert summary["stop_step"] == expected_stop
    assert summary["first_candidate_step"] == cand_steps[0]
    assert summary["counts"] == {b: bands.count(b) for b in ("accurate", "candidate", "stop")}
    assert summary["observations"] == len(frames)
    # the message names the step, the atoms at or above trust_hi and their u
    last_u = frames[-1].arrays["forces_uncertainty"]
    over = np.flatnonzero(last_u >= trust_hi)
    assert stop.atoms == over.tolist() and f"step {expected_stop}" in str(stop)
    for i in over:
        assert f"{i} (u = " in str(stop)
    np.testing.assert_array_equal(stop.values, last_u[over])


def test_extxyz_roundtrip_of_u_and_covariance(tmp_path):
    mon, stop = run_langevin(tmp_path, 0.0, math.inf, steps=20, interval=5)
    assert stop is None
    frames = ase.io.read(tmp_path / "traj.extxyz", ":")
    assert len(frames) == 5
    calc = toy_calc()
    for f in frames:
        cov9 = f.arrays["forces_covariance"]
        assert cov9.shape == (6, 9) and f.arrays["forces_uncertainty"].shape == (6,)
        cov = cov9.reshape(6, 3, 3)
        np.testing.assert_allclose(cov, cov.transpose(0, 2, 1), atol=1e-8)
        assert (np.linalg.eigvalsh(cov) > 0).all()
        epi = f.arrays["forces_covariance_epistemic"].reshape(6, 3, 3)
        np.testing.assert_allclose(f.arrays["forces_uncertainty"], np.sqrt(np.trace(epi, axis1=1, axis2=2) / 3), atol=1e-7)
        # the stored numbers are the calculator's at the stored positions (extxyz keeps 8 decimals)
        a = f.copy()
        a.calc = calc
        a.get_forces()
        np.testing.assert_allclose(cov, calc.results["forces_covariance"], atol=1e-6)
        np.testing.assert_allclose(f.arrays["forces_uncertainty"], calc.results["forces_uncertainty"], atol=1e-6)
        np.testing.assert_allclose(f.get_forces(), calc.results["forces"], atol=1e-5)
        np.testing.assert_allclose(f.get_potential_energy(), calc.results["energy"], atol=1e-5)


def test_relative_bands(tmp_path):
    probe_mon, _ = run_langevin(tmp_path / "p", 0.0, math.inf, steps=80, relative=True)
    rel = np.array([h["statistic"] for h in probe_mon.history])
    lo, hi = float(np.quantile(rel, 0.3)), float(np.quantile(rel, 0.9))
    mon, stop = run_langevin(tmp_path / "r", lo, hi, steps=80, relative=True)
    frames = ase.io.read(tmp_path / "r" / "traj.extxyz", ":")
    for f in frames:
        u, forces = f.arrays["forces_uncertainty"], f.get_forces()
        stat = u / (np.linalg.norm(forces, axis=1) + 0.2)  # MACE's relative form, eps = 0.2 eV/Å
        np.testing.assert_allclose(stat, f.arrays["forces_uncertainty_relative"], atol=1e-8)
        np.testing.assert_array_equal(stat.max(), f.info["forces_uncertainty_relative_max"])
        assert band_of(f.info["forces_uncertainty_relative_max"], lo, hi) == f.info["trust_band"]
    assert stop is not None and frames[-1].info["trust_band"] == STOP


def test_non_finite_uncertainty_stops(tmp_path):
    atoms = toy_molecule()
    atoms.calc = toy_calc()
    atoms.get_forces()
    atoms.calc.results["forces_uncertainty"][2] = np.nan
    mon = UncertaintyMonitor(atoms, 0.1, 100.0, trajectory_path=tmp_path / "t.extxyz", summary_path=tmp_path / "s.json")
    with pytest.raises(TrustBandExceeded) as stop:
        mon()
    assert stop.value.atoms == [2] and json.loads((tmp_path / "s.json").read_text())["stop_step"] == 0


def test_monitor_needs_covariance_outputs():
    atoms = toy_molecule()
    atoms.calc = toy_calc(covariance=False)
    atoms.get_forces()
    with pytest.raises(MDConfigError, match="forces_uncertainty"):
        UncertaintyMonitor(atoms, 0.1, 0.5)()


@pytest.mark.parametrize("lo,hi", [(0.5, 0.5), (0.6, 0.5), (-0.1, 0.5), (float("nan"), 1.0)])
def test_bad_trust_bands(tmp_path, lo, hi):
    atoms = toy_molecule()
    with pytest.raises(MDConfigError, match="trust_lo"):
        UncertaintyMonitor(atoms, lo, hi, trajectory_path=tmp_path / "t.extxyz")
    assert not (tmp_path / "t.extxyz").exists()


# --------------------------------------------------------------------------------------------------
# UDD
# --------------------------------------------------------------------------------------------------


def _displaced(seed=0):
    atoms = toy_molecule()
    atoms.positions += np.random.default_rng(seed).normal(scale=0.12, size=atoms.positions.shape)
    return atoms


def test_udd_bias_force_is_minus_gradient_of_bias_energy():
    base = toy_calc()
    atoms = _displaced()
    sigma2, _ = base.variance(atoms)
    A, B = 0.7, math.sqrt(sigma2 / len(atoms))  # σ²/(N B²) = 1: the bias is far from saturation
    udd = UDDCalculator(base, A, B, variance_fn=base.variance)
    atoms.calc = udd
    forces = atoms.get_forces()
    res = dict(udd.results)
    assert res["udd_sigma2"] == pytest.approx(epistemic_variance_from_results(res), rel=1e-12)
    assert res["udd_bias_energy"] == pytest.approx(A * (math.exp(-1.0) - 1.0), rel=1e-12)
    np.testing.assert_allclose(forces, res["model_forces"] + res["udd_bias_forces"], rtol=0, atol=1e-14)
    assert np.abs(res["udd_bias_forces"]).max() > 1e-2  # non-trivial

    h = 1e-5
    fd_bias = np.zeros((len(atoms), 3))
    fd_total = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for k in range(3):
            e = []
            for sgn in (1, -1):
                a = atoms.copy()
                a.positions[i, k] += sgn * h
                a.calc = UDDCalculator(toy_calc(), A, B, variance_fn=base.variance)
                e.append((a.get_potential_energy(), a.calc.results["udd_bias_energy"]))
            fd_total[i, k] = -(e[0][0] - e[1][0]) / (2 * h)
            fd_bias[i, k] = -(e[0][1] - e[1][1]) / (2 * h)
    scale = np.abs(res["udd_bias_forces"]).max()
    np.testing.assert_allclose(res["udd_bias_forces"], fd_bias, rtol=0, atol=1e-7 * scale)
    np.testing.assert_allclose(forces, fd_total, rtol=0, atol=1e-7 * np.abs(forces).max())


def test_udd_damping_follows_eq14_and_is_not_a_gradient():
    base = toy_calc()
    atoms = _displaced(1)
    sigma2, grad = base.variance(atoms)
    A, B, C, D = 0.7, math.sqrt(sigma2 / len(atoms)), 0.05, 0.08
    udd = UDDCalculator(base, A, B, damping=(C, D), variance_fn=base.variance)
    atoms.calc = udd
    atoms.get_forces()
    plain = bias_forces(sigma2, grad, len(atoms), A, B)
    norm2 = (plain**2).sum(1, keepdims=True)
    expected = plain * D / (math.sqrt(2 * math.pi) * C) * np.exp(-norm2 / (2 * C * C))
    np.testing.assert_allclose(udd.results["udd_bias_forces"], expected, rtol=1e-12)
    assert np.abs(expected - plain).max() > 0.1 * np.abs(plain).max()  # the damping changes the force
    assert udd.results["udd_bias_energy"] == pytest.approx(bias_energy(sigma2, len(atoms), A, B), rel=1e-12)


@pytest.mark.parametrize("A,B,damping,match", [(-0.1, 0.2, None, "A"), (0.5, 0.0, None, "B"), (0.5, -1.0, None, "B"),
                                               (0.5, 0.2, (0.0, 1.0), "C and D"), (0.5, 0.2, (1.0, -1.0), "C and D")])
def test_udd_rejects_bad_parameters(A, B, damping, match):
    base = toy_calc()
    with pytest.raises(MDConfigError, match=match):
        UDDCalculator(base, A, B, damping=damping, variance_fn=base.variance)


def test_udd_explores_higher_uncertainty():
    """Same seed, temperature and steps: the biased run visits structures with a higher max u."""
    def mean_max_u(calc):
        atoms = toy_molecule()
        rng = np.random.default_rng(11)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
        atoms.calc = calc
        dyn = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=300, friction=0.02 / units.fs, fixcm=False, rng=rng)
        vals = []
        dyn.attach(lambda: vals.append(float(atoms.calc.results["forces_uncertainty"].max())), interval=2)
        dyn.run(200)
        return float(np.mean(vals[25:]))

    base = toy_calc()
    plain = mean_max_u(toy_calc())
    biased = mean_max_u(UDDCalculator(base, A=1.0, B=0.1, variance_fn=base.variance))
    assert biased > 1.2 * plain, (plain, biased)


