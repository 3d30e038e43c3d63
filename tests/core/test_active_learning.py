"""Active-learning core (issue 14): config checks, selection, committee covariance, labelling (no framework)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.calculators.lj import LennardJones

from e2ip_plugins.active_learning import ALConfigError, CommitteeCalculator, descriptor_distance, load_config, select_frames
from e2ip_plugins.active_learning.label import failures, label_frames, load_labeller
from e2ip_plugins.active_learning.select import band_counts, round_robin


def _molecule(seed: int, n: int = 6, jitter: float = 0.05) -> Atoms:
    rng = np.random.default_rng(seed)
    base = np.array([[0, 0, 0], [1.2, 0, 0], [0, 1.3, 0], [0, 0, 1.4], [1.1, 1.1, 0], [0.9, 0, 1.2]], float)[:n]
    return Atoms("C2H2O2"[: 2 * n] if n == 6 else "H" * n, positions=base * 1.5 + rng.normal(0, jitter, (n, 3)))


def _write_min_config(tmp_path, **over):
    import ase.io

    frames = [_molecule(i) for i in range(3)]
    for a in frames:
        a.info["REF_energy"] = 0.0
        a.arrays["REF_forces"] = np.zeros((len(a), 3))
    ase.io.write(tmp_path / "d.xyz", frames)
    (tmp_path / "train.yaml").write_text("seed: 1\n")
    cfg = {"data": {"initial": "d.xyz", "valid": "d.xyz"}, "train": {"config": "train.yaml"},
           "explore": {"structures": "d.xyz"}, "label": {"calculator": "ase.calculators.lj:LennardJones"}}
    for key, value in over.items():
        section, _, sub = key.partition(".")
        if sub:
            cfg.setdefault(section, {})[sub] = value
        else:
            cfg[section] = value
    path = tmp_path / "al.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_defaults_and_paths(tmp_path):
    cfg = load_config(_write_min_config(tmp_path))
    assert cfg["selector"] == "e2ip" and cfg["select"]["trust_lo"] == {"quantile": 0.9}
    assert cfg["select"]["trust_hi"] == math.inf
    assert cfg["data"]["initial"] == str((tmp_path / "d.xyz").resolve())
    assert cfg["committee"]["config"] == cfg["train"]["config"]  # the committee defaults to the user's config


@pytest.mark.parametrize("over, message", [
    ({"selectr": "e2ip"}, "unknown key 'selectr'"),
    ({"selector": "ensemble"}, "selector must be one of"),
    ({"data.initial": "missing.xyz"}, "data.initial: no such file"),
    ({"selector": "committee", "committee": {"size": 1}}, "committee.size must be >= 2"),
    ({"selector": "committee", "explore.udd": {"A": 1.0, "B": 0.1}}, "explore.udd needs"),
    ({"select.trust_lo": 0.5, "select.trust_hi": 0.2}, "must be below"),
    ({"select.trust_lo": {"quantile": 1.5}}, "quantile must be in (0, 1)"),
    ({"label.calculator": "tblite"}, "import path 'module:Class'"),
    ({"train.mode": "resume"}, "train.mode must be scratch or finetune"),
    ({"explore.steps": 0}, "explore.steps must be"),
    ({"select.order": "best"}, "select.order must be uncertainty, random or diverse"),
    ({"select.stratify": "isomer"}, "select.stratify must be none, start or run"),
    ({"select.order": "diverse", "select.stratify": "start"}, "set select.stratify: none"),
])
def test_config_errors_say_what_to_change(tmp_path, over, message):
    with pytest.raises(ALConfigError, match=None) as err:
        load_config(_write_min_config(tmp_path, **over))
    assert message in str(err.value)


def test_labeller_import_errors():
    with pytest.raises(ALConfigError, match="cannot import module 'no_such_package.ase'"):
        load_labeller("no_such_package.ase:Calc", {})
    with pytest.raises(ALConfigError, match="has no attribute 'NoSuchCalc'"):
        load_labeller("ase.calculators.lj:NoSuchCalc", {})
    calc = load_labeller("ase.calculators.lj:LennardJones", {"sigma": 2.0})()
    assert isinstance(calc, LennardJones) and calc.parameters.sigma == 2.0


def test_descriptor_is_invariant_and_separates():
    a = _molecule(0)
    b = a.copy()
    b.rotate(37, "z", center="COM")
    b.rotate(71, "x")
    b.translate([3.0, -1.0, 2.0])
    assert descriptor_distance(a, b) < 1e-10
    c = a.copy()
    c.positions[0] += [0.5, 0.0, 0.0]
    assert descriptor_distance(a, c) > 0.02
    assert descriptor_distance(a, Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])) == math.inf


def test_select_band_budget_order_and_duplicates():
    frames = [_molecule(i, jitter=0.2) for i in range(8)]
    dup = frames[5].copy()
    dup.rotate(90, "y")
    frames.append(dup)  # same structure as frame 5, rotated: a duplicate
    scores = np.array([0.1, 0.5, 0.9, 2.0, 0.3, 0.8, 0.05, 0.7, 0.85])
    chosen = select_frames(frames, scores, budget=3, min_distance=0.02, trust_lo=0.25, trust_hi=1.5)
    assert chosen == [2, 8, 7]  # 3 (score 2.0) is above trust_hi; 5 is the duplicate of 8 (score 0.85 > 0.8)
    assert select_frames(frames, scores, budget=10, min_distance=0.0, trust_lo=5.0, trust_hi=6.0) == []
    r1 = select_frames(frames, scores, budget=4, min_distance=0.02, trust_lo=0, trust_hi=1, random_seed=3)
    r2 = select_frames(frames, scores, budget=4, min_distance=0.02, trust_lo=0, trust_hi=1, random_seed=3)
    assert r1 == r2 and len(r1) == 4 and not {5, 8} <= set(r1)
    assert band_counts(scores, 0.25, 1.5) == {"accurate": 2, "candidate": 6, "stop": 1}
    # DP-GEN order: a seeded uniform draw among the band's candidates, duplicates still excluded
    b1 = select_frames(frames, scores, budget=4, min_distance=0.02, trust_lo=0.25, trust_hi=1.5, band_order="random", band_seed=1)
    b2 = select_frames(frames, scores, budget=4, min_distance=0.02, trust_lo=0.25, trust_hi=1.5, band_order="random", band_seed=1)
    assert b1 == b2 and len(b1) == 4 and set(b1) <= {1, 2, 4, 5, 7, 8} and not {5, 8} <= set(b1)
    draws = {tuple(select_frames(frames, scores, 4, 0.02, 0.25, 1.5, band_order="random", band_seed=s)) for s in range(10)}
    assert len(draws) > 1


def test_select_stratified_round_robin_over_starts():
    frames = [_molecule(i, jitter=0.2) for i in range(9)]
    # start A holds the three most uncertain frames; unstratified, it takes the whole budget
    starts = ["A", "A", "A", "B", "B", "C", "C", "C", "C"]
    scores = np.array([0.9, 0.95, 0.85, 0.5, 0.6, 0.4, 0.45, 0.3, 3.0])
    assert select_frames(frames, scores, 3, 0.0, 0.1, 2.0) == [1, 0, 2]
    # round-robin: the best of A, then of B, then of C (frame 8 is above trust_hi), then A's second, ...
    chosen = select_frames(frames, scores, 5, 0.0, 0.1, 2.0, groups=starts)
    assert chosen == [1, 4, 6, 0, 3]
    # an exhausted start leaves its share to the others: the budget is still spent
    assert len(select_frames(frames, scores, 8, 0.0, 0.1, 2.0, groups=starts)) == 8
    # the DP-GEN order and the random selector are stratified the same way (within-start order kept)
    b = select_frames(frames, scores, 3, 0.0, 0.1, 2.0, band_order="random", band_seed=4, groups=starts)
    assert sorted(starts[i] for i in b) == ["A", "B", "C"]
    r = select_frames(frames, scores, 3, 0.0, 0.1, 2.0, random_seed=5, groups=starts)
    assert sorted(starts[i] for i in r) == ["A", "B", "C"]
    # groups by their first member in the order, each keeping its own order
    assert round_robin([3, 1, 0, 2], ["x", "y", "x", "y"]).tolist() == [3, 0, 1, 2]
    assert round_robin([0, 2, 1, 3], ["x", "y", "x", "y"]).tolist() == [0, 1, 2, 3]


def test_select_stratify_config(tmp_path):
    assert load_config(_write_min_config(tmp_path))["select"]["stratify"] == "none"
    assert load_config(_write_min_config(tmp_path, **{"select.stratify": "run"}))["select"]["stratify"] == "run"


def test_select_diverse_is_score_times_distance_to_labelled_and_taken():
    base = _molecule(0)

    def moved(dx: float) -> Atoms:
        a = base.copy()
        a.positions[0] += [dx, 0.0, 0.0]
        return a

    labelled = [moved(0.0)]
    # three near-copies far from the labelled frame (high score), one mid-distance frame (lower score)
    frames = [moved(0.90), moved(0.91), moved(0.92), moved(0.45), moved(0.01)]
    scores = np.array([1.0, 0.99, 0.98, 0.9, 5.0])
    d = [descriptor_distance(f, labelled[0]) for f in frames]
    chosen = select_frames(frames, scores, budget=2, min_distance=0.02, trust_lo=0.5, trust_hi=10.0,
                           band_order="diverse", reference=labelled)
    # first: max s·m over the candidates; then m shrinks around it and the mid-distance frame wins
    assert chosen[0] == int(np.argmax(scores[:4] * np.array(d[:4])))
    assert chosen[1] == 3
    # frame 4 (score 5) sits on the labelled frame: a duplicate, never taken
    assert 4 not in select_frames(frames, scores, 5, 0.02, 0.5, 10.0, band_order="diverse", reference=labelled)
    # plain uncertainty order spends the budget on the near-copies
    assert select_frames(frames, scores, 2, 0.0, 0.5, 4.0) == [0, 1]
    # the choice does not depend on the units of the score
    assert select_frames(frames, scores * 7.0, 2, 0.02, 3.5, 70.0, band_order="diverse", reference=labelled) == chosen
    # a composition absent from the labelled set is infinitely far: taken first
    h2 = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    assert select_frames(frames + [h2], np.append(scores, 0.6), 1, 0.02, 0.5, 10.0, band_order="diverse",
                         reference=labelled) == [5]


def test_committee_calculator_is_the_sample_covariance():
    atoms = _molecule(1, jitter=0.1)
    members = [LennardJones(sigma=s, epsilon=e, rc=6.0) for s, e in ((1.0, 0.01), (1.1, 0.012), (0.95, 0.008))]
    calc = CommitteeCalculator(members)
    atoms.calc = calc
    f_mean = atoms.get_forces()
    forces = []
    for m in members:
        a = atoms.copy()
        a.calc = m
        forces.append(a.get_forces())
    forces = np.stack(forces)
    np.testing.assert_allclose(f_mean, forces.mean(0), atol=1e-12)
    cov = calc.results["forces_covariance"]
    for i in range(len(atoms)):
        np.testing.assert_allclose(cov[i], np.cov(forces[:, i, :].T), atol=1e-12)  # numpy's 1/(K-1) covariance
        assert np.linalg.eigvalsh(cov[i]).min() > -1e-12
    u = np.sqrt(np.trace(cov, axis1=1, axis2=2) / 3)
    np.testing.assert_allclose(calc.results["forces_uncertainty"], u, atol=1e-12)
    assert calc.results["forces_uncertainty_max"] == pytest.approx(u.max())


class _CountingLJ(LennardJones):
    calls = 0

    def calculate(self, atoms=None, properties=None, system_changes=None):
        _CountingLJ.calls += 1
        if atoms is not None and len(atoms) == 5:
            raise RuntimeError("cannot converge five atoms")
        super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])


def test_label_skips_failures_and_resumes(tmp_path):
    frames = [_molecule(i) for i in range(3)] + [Atoms("H5", positions=np.eye(5, 3) * 2.0)] + [_molecule(7)]
    info = [{"al_iteration": 0, "al_score": float(i)} for i in range(len(frames))]
    logged = []
    done = label_frames(frames, tmp_path / "lab", lambda: _CountingLJ(), "REF_energy", "REF_forces", info, log=logged.append)
    assert len(done) == 4 and "structure 3 skipped" in logged[0] and "cannot converge" in logged[0]
    assert [f["index"] for f in failures(tmp_path / "lab")] == [3]
    ref = LennardJones()
    for a, src in zip(done, [f for i, f in enumerate(frames) if i != 3]):
        b = src.copy()
        b.calc = ref
        np.testing.assert_allclose(a.arrays["REF_forces"], b.get_forces(), atol=1e-6)
        assert a.info["REF_energy"] == pytest.approx(b.get_potential_energy(), abs=1e-6)
    assert [a.info["al_score"] for a in done] == [0.0, 1.0, 2.0, 4.0]
    calls = _CountingLJ.calls
    again = label_frames(frames, tmp_path / "lab", lambda: _CountingLJ(), "REF_energy", "REF_forces", info)
    assert _CountingLJ.calls == calls  # resumed: nothing recomputed, failures not retried
    assert [a.info["al_score"] for a in again] == [0.0, 1.0, 2.0, 4.0]


def test_label_rejects_non_finite(tmp_path):
    class NaNLJ(LennardJones):
        def calculate(self, *a, **k):
            super().calculate(*a, **k)
            self.results["forces"] = self.results["forces"] * np.nan

    done = label_frames([_molecule(0)], tmp_path / "lab", NaNLJ, "REF_energy", "REF_forces", [{}], log=lambda m: None)
    assert done == [] and "non-finite" in failures(tmp_path / "lab")[0]["error"]


@pytest.mark.parametrize("name", ["iso7_xtb.yaml", "iso7_xtb_nequip.yaml"])
def test_shipped_example_configs_load(name):
    """The example configs of the README are valid as shipped (files present, keys known, band well formed)."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "active_learning" / name)
    assert cfg["select"]["trust_hi"] == {"factor": 3.0} and cfg["select"]["order"] == "random"
