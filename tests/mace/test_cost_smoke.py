"""Issue 16: the cost benchmark's measurements (``benchmarks.common.cost_probe``) and table
(``benchmarks.common.cost_report``) on tiny MACE models in a ~40-atom periodic box, eager and TorchScript
paths: finite ratios, covariances produced."""

import json
import math

import ase.io
import pytest
import torch

from benchmarks import cost
from benchmarks.common import cost_probe, cost_report
from mace_ext.model import attach_e2ip_head

from .helpers import DATA, tiny_mace


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from e3nn.util import jit

    d = tmp_path_factory.mktemp("cost")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    arts = {}
    for method in ("plain", "e2ip"):
        torch.manual_seed(0)
        model = tiny_mace(channels=4, r_max=3.0)
        if method == "e2ip":
            model = attach_e2ip_head(model, num_channels=4, mlp_hidden=8)
        torch.save(model, d / f"{method}.model")
        jit.compile(model).save(str(d / f"{method}_compiled.model"))
        arts[method] = {"model": str(d / f"{method}.model"), "compiled": str(d / f"{method}_compiled.model")}
    frames = ase.io.read(DATA / "iso7_test.xyz", ":4")
    box = cost.liquid_box(frames, 40)
    assert len(box) == 38 and box.pbc.all() and box.info["min_intermolecular_distance"] > 0.5
    ase.io.write(d / "box.xyz", box, format="extxyz")
    yield {"backbone": "mace", "device": "cpu", "dtype": "float64", "threads": 1, "artifacts": arts,
            "structure": str(d / "box.xyz"), "repeats": 2, "warmup": 1, "batch": 2,
            "train_file": str(DATA / "iso7_test.xyz"), "type_names": ["H", "C", "O"]}
    torch.set_default_dtype(old)


def test_cost_table_has_finite_ratios(spec):
    inference = []
    for path in ("eager", "deployed"):
        r = cost_probe.time_inference({**spec, "path": path})
        assert r["atoms"] == 38 and math.isfinite(r["ratio"]) and r["ratio"] > 0
        inference.append({"dtype": "float64", "atoms_requested": 40, "path": path, "result": r})
    train = cost_probe.time_training({**spec, "repeats": 2})
    assert train["atoms"] > 0 and math.isfinite(train["ratio"]) and train["ratio"] > 0
    res = {"backbone": "mace", "inference": inference, "training": [{"dtype": "float64", "result": train}],
           "memory": [{"dtype": "float64", "atoms_requested": 40, "path": "eager", "plain": {"reason": "skipped"},
                       "e2ip": {"reason": "skipped"}}]}
    md = cost_report.table([json.loads(json.dumps(res))])
    rows = [r for r in md.splitlines()[2:]]
    assert len(rows) == 4
    for row in rows[:3]:
        assert math.isfinite(float(row.strip("| ").split("|")[-1]))
    assert "not measured (skipped)" in rows[3]


def test_module_share_times_the_e2ip_part_inside_the_call(spec):
    """The e²IP part (forward minus the backbone's) is a positive share of one calculate, below 1."""
    r = cost_probe.module_share({**spec, "path": "eager", "repeats": 2})
    assert r["atoms"] == 38 and 0 < r["e2ip_s"] < r["modules_s"]["forward"] <= r["calculate_s"]
    assert 0 < r["share"] < 1 and r["ratio"] == pytest.approx(1 / (1 - r["share"]))
