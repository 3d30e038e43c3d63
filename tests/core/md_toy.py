"""A small pure-torch ASE calculator with a per-atom covariance, for the core MD tests (issue 13).

:class:`ToyUQCalculator` (pair springs; a position-dependent, anisotropic SPD covariance per atom) is a real
calculator, not a mock of a framework: the MACE and NequIP adapters are tested in ``tests/mace`` and
``tests/nequip``. :class:`ToyAdapter` opens a ``.toy`` file (JSON: the toy's parameters) for ``e2ip-md``
through the ``e2ip.calculators`` registry (fixture ``toy_registry``).
"""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

from e2ip_plugins.md import (
    TrustBandExceeded,
    UncertaintyMonitor,
)
from e2ip_plugins.md import registry

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


