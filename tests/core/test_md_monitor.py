"""MD tools of the core (issue 13): trust-band monitor, UDD calculator, ``e2ip-md`` input checks.

Everything runs real ASE Langevin dynamics on :class:`ToyUQCalculator`, a small pure-torch ASE
calculator (pair springs; a position-dependent, anisotropic SPD covariance per atom). It is a real
calculator, not a mock of a framework: the MACE and NequIP adapters are tested in ``tests/mace`` and
``tests/nequip``. The command is exercised in-process with a toy adapter added to the
``e2ip.calculators`` registry (suffix ``.toy``: a JSON file holding the toy's parameters).
"""

from __future__ import annotations

import importlib.metadata
import json
import math

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

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
from e2ip_plugins.md import cli, registry
from e2ip_plugins.md.udd import bias_forces, epistemic_variance_from_results

# --------------------------------------------------------------------------------------------------
# toy model
# --------------------------------------------------------------------------------------------------


def toy_molecule() -> Atoms:
    """Six atoms on a distorted octahedron (masses of C/H/O), ~1.3 Å apart."""
    pos = np.array([[1.3, 0, 0], [-1.3, 0.1, 0], [0, 1.3, 0], [0.1, -1.3, 0], [0, 0, 1.3], [0, 0.1, -1.3]])
    return Atoms("CCHHOH", positions=pos)


class ToyUQCalculator(Calculator):
    """E = k/2 Σ_{i<j} (r_ij − r0_ij)²; per atom s_i² = s0² (1 + Σ_j (r_ij − r0_ij)²/δ²),
    U_epi,i = s_i² · 3 M_i / tr M_i with M_i = I + b c_i c_iᵀ/(|c_i|² + 1) (c_i: position from the
    centroid), U_ale = a² I, U_tot = U_epi + U_ale, u_i = s_i. float64 torch, autograd forces."""

    implemented_properties = ["energy", "free_energy", "forces", "forces_covariance", "forces_covariance_epistemic",
                              "forces_covariance_aleatoric", "forces_uncertainty"]

    def __init__(self, r0: np.ndarray, k=4.0, s0=0.05, delta=0.15, b=2.0, a=0.02, covariance=True, **kw):
        super().__init__(**kw)
        self.r0 = torch.as_tensor(np.asarray(r0), dtype=torch.float64)
        self.k, self.s0, self.delta, self.b, self.a = k, s0, delta, b, a
        self.covariance = covariance

    def torch_outputs(self, pos: torch.Tensor):
        n = pos.shape[0]
        d = pos[:, None, :] - pos[None, :, :]
        r = torch.sqrt((d * d).sum(-1) + torch.eye(n, dtype=pos.dtype))  # eye: no sqrt(0) on the diagonal
        strain = (r - self.r0) * (1 - torch.eye(n, dtype=pos.dtype))
        energy = 0.25 * self.k * (strain**2).sum()  # each pair twice
        s2 = self.s0**2 * (1 + (strain**2).sum(1) / self.delta**2)
        c = pos - pos.mean(0)
        m = torch.eye(3, dtype=pos.dtype) + self.b * c[:, :, None] * c[:, None, :] / ((c * c).sum(1) + 1)[:, None, None]
        m = 3 * m / torch.diagonal(m, dim1=1, dim2=2).sum(1)[:, None, None]
        epi = s2[:, None, None] * m
        return energy, epi

    def variance(self, atoms):
        """UDD hook: σ² = Σ tr U_epi/3 and ∂σ²/∂r by autograd."""
        pos = torch.tensor(atoms.positions, dtype=torch.float64, requires_grad=True)
        _, epi = self.torch_outputs(pos)
        sigma2 = torch.diagonal(epi, dim1=1, dim2=2).sum() / 3
        (g,) = torch.autograd.grad(sigma2, pos)
        return float(sigma2.detach()), g.numpy()

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        pos = torch.tensor(self.atoms.positions, dtype=torch.float64, requires_grad=True)
        energy, epi = self.torch_outputs(pos)
        (g,) = torch.autograd.grad(energy, pos)
        e = float(energy.detach())
        self.results = {"energy": e, "free_energy": e, "forces": -g.numpy()}
        if self.covariance:
            epi = epi.detach().numpy()
            ale = np.broadcast_to(self.a**2 * np.eye(3), epi.shape).copy()
            self.results.update(forces_covariance=epi + ale, forces_covariance_epistemic=epi,
                                forces_covariance_aleatoric=ale,
                                forces_uncertainty=np.sqrt(np.trace(epi, axis1=1, axis2=2) / 3))


def toy_calc(**kw) -> ToyUQCalculator:
    return ToyUQCalculator(toy_molecule().get_all_distances(), **kw)


class ToyAdapter:
    """``e2ip.calculators`` adapter for ``*.toy`` files (JSON with ToyUQCalculator keyword arguments)."""

    name = "toy"

    def open(self, path, device="cpu"):
        with open(path) as fh:
            return toy_calc(**json.load(fh))

    def variance_function(self, calc):
        return calc.variance if isinstance(calc, ToyUQCalculator) else None


TOY_ADAPTER = ToyAdapter()


@pytest.fixture
def toy_registry(monkeypatch):
    """The installed adapters plus ``.toy`` → this module's TOY_ADAPTER."""
    orig = registry.claimed_suffixes
    ep = importlib.metadata.EntryPoint(name=".toy", value=f"{__name__}:TOY_ADAPTER", group=registry.GROUP)
    monkeypatch.setattr(registry, "claimed_suffixes", lambda: {**orig(), ".toy": ep})


def run_langevin(tmp_path, trust_lo, trust_hi, steps=240, interval=4, seed=3, relative=False, calc=None, T=900.0):
    """Real ASE Langevin on the toy; returns (monitor, stop exception or None)."""
    atoms = toy_molecule()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=T, rng=rng)
    Stationary(atoms)
    atoms.calc = calc or toy_calc()
    dyn = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=T, friction=0.02 / units.fs, fixcm=False, rng=rng)
    tmp_path.mkdir(parents=True, exist_ok=True)
    mon = UncertaintyMonitor(atoms, trust_lo, trust_hi, relative=relative, trajectory_path=tmp_path / "traj.extxyz",
                             candidates_path=tmp_path / "cand.extxyz", summary_path=tmp_path / "summary.json")
    mon.attach(dyn, interval=interval)
    try:
        dyn.run(steps)
    except TrustBandExceeded as stop:
        return mon, stop
    mon.finish()
    return mon, None


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


# --------------------------------------------------------------------------------------------------
# e2ip-md (in-process, toy adapter)
# --------------------------------------------------------------------------------------------------


def _files(tmp_path, **toy):
    model = tmp_path / "m.toy"
    model.write_text(json.dumps(toy))
    start = tmp_path / "start.xyz"
    ase.io.write(start, toy_molecule())
    return str(model), str(start)


def _argv(model, start, out, *extra):
    return ["--model", model, "--structure", start, "--temperature", "900", "--steps", "40", "--timestep", "1",
            "--interval", "5", "--trust-lo", "0.05", "--seed", "1", "--out", str(out), "--no-progress", *extra]


def test_cli_runs_and_writes(tmp_path, toy_registry):
    model, start = _files(tmp_path)
    out = tmp_path / "run"
    assert cli.main(_argv(model, start, out, "--udd", "0.5", "0.1")) == 0
    frames = ase.io.read(out / "trajectory.extxyz", ":")
    assert [int(f.info["md_step"]) for f in frames] == list(range(0, 41, 5))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["completed"] and summary["steps"] == 40
    assert summary["udd"] == {"A": 0.5, "B": 0.1, "damping": None} and summary["trust_hi"] is None
    assert sum(summary["counts"].values()) == len(frames)
    n_cand = summary["counts"]["candidate"]
    assert n_cand > 0
    assert len(ase.io.read(out / "candidates.extxyz", ":")) == n_cand
    calc = toy_calc()
    for f in frames:  # the trajectory holds the model's forces, the bias separately
        a = f.copy()
        a.calc = calc
        np.testing.assert_allclose(f.get_forces(), a.get_forces(), atol=1e-5)
        assert f.arrays["udd_bias_forces"].shape == (6, 3) and f.info["udd_bias_energy"] <= 0


def test_cli_stop_at_trust_hi_exits_zero(tmp_path, toy_registry):
    model, start = _files(tmp_path)
    out = tmp_path / "run"
    assert cli.main(_argv(model, start, out, "--trust-hi", "0.06", "--steps", "400")) == 0
    summary = json.loads((out / "summary.json").read_text())
    frames = ase.io.read(out / "trajectory.extxyz", ":")
    assert summary["status"] == "stopped" and summary["stop_step"] == int(frames[-1].info["md_step"]) < 400
    assert frames[-1].arrays["forces_uncertainty"].max() >= 0.06
    assert all(f.arrays["forces_uncertainty"].max() < 0.06 for f in frames[:-1])


@pytest.mark.parametrize("extra,match", [
    (("--trust-lo", "0.5", "--trust-hi", "0.5"), "trust_lo"),
    (("--udd", "-1", "0.1"), "A"),
    (("--udd", "1", "0"), "B"),
    (("--udd-damping", "1", "1"), "--udd"),
    (("--interval", "0"), "interval"),
])
def test_cli_bad_input_writes_nothing(tmp_path, toy_registry, capsys, extra, match):
    model, start = _files(tmp_path)
    out = tmp_path / "run"
    assert cli.main(_argv(model, start, out, *extra)) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_cli_unknown_model_type_and_missing_covariance(tmp_path, toy_registry, capsys):
    model, start = _files(tmp_path, covariance=False)
    out = tmp_path / "run"
    weird = tmp_path / "model.xyz"
    weird.write_text("x")
    assert cli.main(_argv(str(weird), start, out)) == 2
    err = capsys.readouterr().err
    assert "unknown model file type" in err and ".toy" in err
    assert not out.exists()
    assert cli.main(_argv(model, start, out)) == 2  # a model without the covariance outputs
    assert "forces_uncertainty" in capsys.readouterr().err
    assert not out.exists()
