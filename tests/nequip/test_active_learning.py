"""``e2ip-active-learning`` end to end with NequIP (issue 14): real ``nequip-train`` on the shipped
``configs/nequip/e2ip.yaml``, real MD, GFN2-xTB labels, fine-tuning from the previous iteration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import al_checks as al

pytest.importorskip("tblite.ase", reason="the active-learning tests label with GFN2-xTB: needs tblite (pip install 'e2ip[xtb]')")

ARGS = ["run=[train]", "max_epochs=1", "batch_size=5"]


def _finetuning_loop(tmp_path, config_name: str):
    """Two iterations of the loop on ``configs/nequip/<config_name>.yaml``: budget 3, GFN2-xTB labels, fine-tuning."""
    c = str(al.REPO / "configs" / "nequip" / f"{config_name}.yaml")
    cfg = al.workspace(tmp_path, "nequip", c, ARGS, train={"config": c, "args": ARGS, "mode": "finetune"},
                       label={"calculator": "tblite.ase:TBLite", "kwargs": {"method": "GFN2-xTB", "verbosity": 0}},
                       select={"budget": 3, "trust_lo": {"quantile": 0.5}, "min_distance": 0.0, "order": "diverse"})
    work = tmp_path / "work"
    res = al.run(cfg, work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cfg, work


def test_loop_end_to_end_with_finetuning(tmp_path):
    cfg, work = _finetuning_loop(tmp_path, "e2ip")
    rep0 = al.check_finished_run(work, iterations=1, budget=3, selector="e2ip")
    assert rep0["labelled"] == rep0["selected"] == 3
    assert rep0["models"][0].endswith("best.ckpt")
    # iteration 1 fine-tunes from iteration 0's checkpoint through NequIP's ModelFromCheckpoint
    cmd0 = (work / "iter_0" / "train" / "member_0" / "train.log").read_text().splitlines()[0]
    cmd1 = (work / "iter_1" / "train" / "member_0" / "train.log").read_text().splitlines()[0]
    assert "ModelFromCheckpoint" not in cmd0
    assert "nequip.model.ModelFromCheckpoint" in cmd1 and rep0["models"][0] in cmd1
    rep1 = json.loads((work / "iter_1" / "report.json").read_text())
    assert rep1["train_frames"] == 13 and np.isfinite(rep1["held_out"]["test"]["model"]["forces_mae"])
    # the selected frames carry the e2ip model's max u, in the band
    new = [f for f in al.labelled(work) if f.info["al_iteration"] == 0]
    scores = [f.info["al_score"] for f in new]
    assert len(scores) == 3 and min(scores) >= rep0["trust_lo"]
    # order "diverse": iteration 0 took exactly greedy max u x distance to the initial labelled frames
    from e2ip_plugins.active_learning import load_config, select_frames
    from e2ip_plugins.active_learning.loop import ActiveLearningLoop
    from e2ip_plugins.active_learning.select import frame_scores

    loop = ActiveLearningLoop(load_config(cfg), work, log=lambda _: None)
    pool = loop._pool(json.loads((work / "iter_0" / "explore.done.json").read_text())["runs"])
    bands = json.loads((work / "iter_0" / "bands.done.json").read_text())
    reference = loop._labelled_frames(-1)
    assert len(reference) == 10
    expect = select_frames(pool, frame_scores(pool), 3, 0.0, bands["trust_lo"], bands["trust_hi"],
                           band_order="diverse", reference=reference)
    assert len(new) == len(expect)
    for f, i in zip(new, expect):
        np.testing.assert_allclose(f.positions, pool[i].positions, atol=1e-6)


def test_config_without_seed_is_refused(tmp_path):
    bad = tmp_path / "noseed.yaml"
    text = (al.REPO / "configs" / "nequip" / "e2ip.yaml").read_text().replace("seed: 123\n", "")
    bad.write_text(text)
    cfg = al.workspace(tmp_path, "nequip", str(bad), ARGS)
    res = al.run(cfg, tmp_path / "work", timeout=120)
    assert res.returncode == 2 and "top-level `seed:`" in res.stderr


def test_loop_with_the_allegro_config(tmp_path):
    """Issue 28: the loop on ``configs/nequip/allegro_e2ip.yaml`` (Allegro + geometric e²IP head): trains, selects
    by the Allegro model's max u, labels with GFN2-xTB and fine-tunes through ModelFromCheckpoint."""
    _, work = _finetuning_loop(tmp_path, "allegro_e2ip")
    rep0 = al.check_finished_run(work, iterations=1, budget=3, selector="e2ip")
    assert rep0["labelled"] == rep0["selected"] == 3
    cmd1 = (work / "iter_1" / "train" / "member_0" / "train.log").read_text().splitlines()[0]
    assert "allegro_e2ip" in cmd1 and "nequip.model.ModelFromCheckpoint" in cmd1
    rep1 = json.loads((work / "iter_1" / "report.json").read_text())
    assert np.isfinite(rep1["held_out"]["test"]["model"]["forces_mae"])
