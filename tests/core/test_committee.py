"""``e2ip_plugins.committee.CommitteeCalculator``: the committee rule of docs/energy_uncertainty.md §5 over any
ASE calculators (members with e²IP covariances, plain members, mixtures refused), and its equivariance."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.lj import LennardJones
from scipy.spatial.transform import Rotation

from e2ip_plugins.committee import CommitteeCalculator


def _atoms(seed: int = 0, n: int = 5) -> Atoms:
    rng = np.random.default_rng(seed)
    return Atoms("H" * n, positions=rng.normal(0.0, 1.2, (n, 3)))


class _HeadMember(Calculator):
    """Member with e²IP outputs: fixed random SPD U_ale, U_epi and σ_E per seed, forces from LJ."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, seed: int, **kw):
        super().__init__(**kw)
        self.seed, self.lj = seed, LennardJones(sigma=1.0 + 0.05 * seed, epsilon=0.01, rc=6.0)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self.lj
        rng = np.random.default_rng(self.seed)
        spd = lambda: (lambda m: m @ m.transpose(0, 2, 1) + 0.1 * np.eye(3))(rng.normal(0, 0.3, (len(a), 3, 3)))  # noqa: E731
        ale, epi = spd(), spd()
        self.results = {"energy": a.get_potential_energy() + 0.1 * self.seed, "forces": a.get_forces(),
                        "forces_covariance_aleatoric": ale, "forces_covariance_epistemic": epi,
                        "forces_covariance": ale + epi, "energy_uncertainty": 0.2 + 0.05 * self.seed}


def test_head_members_combine_by_the_committee_rule():
    members = [_HeadMember(s) for s in range(3)]
    atoms = _atoms()
    atoms.calc = calc = CommitteeCalculator(members)
    f_mean = atoms.get_forces()
    outs = []
    for m in members:
        a = atoms.copy()
        a.calc = m
        a.get_forces()
        outs.append(dict(m.results))
    f = np.stack([o["forces"] for o in outs])
    e = np.array([o["energy"] for o in outs])
    r = calc.results
    np.testing.assert_allclose(f_mean, f.mean(0), atol=1e-12)
    assert r["energy"] == pytest.approx(e.mean())
    for i in range(len(atoms)):
        c_i = np.cov(f[:, i, :].T)  # numpy's 1/(K-1) sample covariance
        np.testing.assert_allclose(r["forces_covariance_committee"][i], c_i, atol=1e-12)
        ale = np.mean([o["forces_covariance_aleatoric"][i] for o in outs], axis=0)
        epi = np.mean([o["forces_covariance_epistemic"][i] for o in outs], axis=0) + c_i
        np.testing.assert_allclose(r["forces_covariance_aleatoric"][i], ale, atol=1e-12)
        np.testing.assert_allclose(r["forces_covariance_epistemic"][i], epi, atol=1e-12)
        np.testing.assert_allclose(r["forces_covariance"][i], ale + epi, atol=1e-12)
        assert np.linalg.eigvalsh(r["forces_covariance"][i]).min() > 0
    u = np.sqrt(np.trace(r["forces_covariance_epistemic"], axis1=1, axis2=2) / 3)
    np.testing.assert_allclose(r["forces_uncertainty"], u, atol=1e-12)
    assert r["forces_uncertainty_max"] == pytest.approx(u.max()) and r["forces_uncertainty_mean"] == pytest.approx(u.mean())
    sig = np.array([o["energy_uncertainty"] for o in outs])
    assert r["energy_uncertainty_committee"] == pytest.approx(np.std(e, ddof=1))
    assert r["energy_uncertainty"] == pytest.approx(np.sqrt(np.var(e, ddof=1) + np.mean(sig**2)))


def test_plain_members_and_rotation():
    members = [LennardJones(sigma=s, epsilon=e, rc=6.0) for s, e in ((1.0, 0.01), (1.1, 0.012), (0.95, 0.008))]
    atoms = _atoms(1)
    atoms.calc = calc = CommitteeCalculator(members)
    atoms.get_forces()
    r = {k: np.copy(v) for k, v in calc.results.items()}
    np.testing.assert_allclose(r["forces_covariance"], r["forces_covariance_committee"], atol=1e-14)
    np.testing.assert_allclose(r["forces_covariance_aleatoric"], 0.0)
    assert r["energy_uncertainty"] == pytest.approx(r["energy_uncertainty_committee"])
    rot = Rotation.random(random_state=3).as_matrix()
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    turned.calc = CommitteeCalculator(members)
    turned.get_forces()
    rr = turned.calc.results
    np.testing.assert_allclose(rr["forces_covariance"], rot @ r["forces_covariance"] @ rot.T, atol=1e-12)
    assert rr["energy_uncertainty"] == pytest.approx(r["energy_uncertainty"], rel=1e-9)


def test_mixed_or_single_members_are_refused():
    with pytest.raises(ValueError, match="at least two"):
        CommitteeCalculator([LennardJones()])
    atoms = _atoms()
    atoms.calc = CommitteeCalculator([_HeadMember(0), LennardJones(rc=6.0)])
    with pytest.raises(ValueError, match="1 of 2 committee members report e2ip covariances"):
        atoms.get_forces()
