"""Issue 28: ``benchmarks.cost --backbone allegro``. The train commands of both methods carry the profile's Allegro
sizes; one smoke run (the configs' tiny Allegro, a ~40-atom box, eager, through ``nequip-train``) gives a finite
plain/e²IP ratio and a module share that times the Allegro e²IP modules (``uq_geometric`` included)."""

import json
import math

from benchmarks import cost
from benchmarks.common import cost_probe


def test_allegro_train_cmd_carries_the_profile_sizes(tmp_path):
    settings = dict(cost.COST_PROFILES["realistic"]["backbones"]["allegro"], device="cpu", dtype="float64", epochs=1)
    files = {"train": "t.xyz", "val": "v.xyz", "test": "v.xyz"}
    for method, config in (("plain", "allegro_plain"), ("e2ip", "allegro_e2ip")):
        cmd = cost.cost_backend("allegro", settings).train_cmd(method, tmp_path, "x", 0, files, 1, cost.DATA)
        assert config in cmd and "cutoff_radius=5.0" in cmd and "training_module.model.model_dtype=float64" in cmd
        for key, value in settings["model"].items():
            assert f"training_module.model.{key}={value}" in cmd
    assert cost_probe.family("allegro") == "nequip" and cost_probe.family("mace") == "mace"


def test_allegro_cost_smoke(tmp_path):
    shipped = str(cost.REPO / "e2ip_plugins" / "data" / "iso7_train.xyz")  # the repo's own data, not ../shared
    cost.main(["--backbone", "allegro", "--profile", "smoke", "--dtype", "float32", "--paths", "eager", "--no-memory",
               "--dev-file", shipped,
               "--no-training", "--repeats", "1", "--warmup", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "cost_allegro.json").read_text())
    assert res["backbone"] == "allegro" and res["settings"]["model"] == {}
    (inf,), (mod,) = res["inference"], res["modules"]
    assert inf["path"] == "eager" and math.isfinite(inf["result"]["ratio"]) and inf["result"]["ratio"] > 0
    share = mod["result"]
    uq = sorted(k for k in share["modules_s"] if k.startswith("uq_"))
    assert uq == ["uq_energy", "uq_geometric", "uq_head", "uq_novelty"] and "allegro" in share["modules_s"]
    assert 0 < share["share"] < 1
