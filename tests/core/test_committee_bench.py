"""benchmarks.committee: the block bootstrap of the frame figures and the default rule (docs/committee.md), which
reads the val rows only."""

import copy

import numpy as np
import pytest

from benchmarks.committee import bootstrap, rule


def test_bootstrap_intervals_and_within_trajectory_rank():
    rng = np.random.default_rng(0)
    traj = np.repeat(np.arange(4), 30)
    e = rng.gamma(2.0, 1.0, traj.size)
    perfect = bootstrap(2.0 * e, e, traj)  # u a monotone function of the error: every figure is 1
    assert perfect["frame_spearman"] == pytest.approx(1.0) and perfect["within_traj_spearman"] == pytest.approx(1.0)
    assert perfect["frame_spearman_ci"] == pytest.approx([1.0, 1.0]) and perfect["frame_auroc_ci"] == pytest.approx([1.0, 1.0])
    noise = bootstrap(rng.normal(size=traj.size), e, traj)  # u independent of the error
    lo, hi = noise["frame_spearman_ci"]
    assert lo < noise["frame_spearman"] < hi and lo < 0.0 < hi and hi - lo > 0.1
    u = rng.normal(size=traj.size)
    assert bootstrap(u, e, traj, seed=5) == bootstrap(u, e, traj, seed=5)  # seeded


def _results(**val):
    base = dict(forces_mae=0.10, forces_coverage_90=0.90, forces_ence=0.10, forces_spearman=0.70, frame_spearman=0.30,
                frame_auroc=0.70)
    shipped = {s: dict(base) for s in ("val", "test", "ood_chem")}
    committee = copy.deepcopy(shipped)
    committee["val"].update(val)
    return {"methods": {"e2ip": {"seed0": {"deployed": shipped}}, "committee": {"seed0": {"deployed": committee}}}}


@pytest.mark.parametrize("val,adopted", [
    ({}, True),
    ({"forces_mae": 0.104}, False),              # accuracy: > 1.03 × shipped
    ({"forces_coverage_90": 0.97}, False),       # level: cov90 outside [0.85, 0.95]
    ({"forces_ence": 0.3}, False),               # level: ENCE > 0.25
    ({"forces_spearman": 0.67}, False),          # ranking: below shipped − 0.02
    ({"frame_auroc": 0.685}, True),              # within the 0.02 slack
])
def test_rule_reads_val_only(val, adopted):
    res = _results(**val)
    verdict = rule(res)[-1]
    assert ("becomes the default" in verdict) is adopted
    for s in ("test", "ood_chem"):  # the reported sets choose nothing
        res["methods"]["committee"]["seed0"]["deployed"][s].update(forces_coverage_90=0.2, forces_spearman=-1.0)
    assert rule(res)[-1] == verdict
