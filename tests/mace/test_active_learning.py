"""``e2ip-active-learning`` end to end with MACE (issue 14): real ``mace_run_train_e2ip`` / ``mace_run_train``,
real ASE Langevin MD, real GFN2-xTB labels (``tblite``), kill-and-resume, committee and random selectors,
bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests import al_checks as al

pytest.importorskip("tblite.ase", reason="the active-learning tests label with GFN2-xTB: needs tblite (pip install 'e2ip[xtb]')")

TINY = {
    "device": "cpu", "default_dtype": "float64", "energy_key": "REF_energy", "forces_key": "REF_forces", "E0s": "average",
    "model": "ScaleShiftMACE", "num_channels": 8, "max_L": 1, "num_interactions": 2, "correlation": 2, "r_max": 4.0,
    "MLP_irreps": "8x0e", "loss": "weighted", "energy_weight": 1.0, "forces_weight": 10.0, "batch_size": 5,
    "valid_batch_size": 5, "max_num_epochs": 1, "lr": 0.01, "ema": True, "ema_decay": 0.99, "eval_interval": 1,
    "save_cpu": True, "plot": False, "restart_latest": False,
}
E2IP = {"e2ip_head": "e2ip", "e2ip_novelty": True, "e2ip_novelty_mode": "linear"}


def _configs(tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "mace_e2ip.yaml").write_text(yaml.safe_dump({**TINY, **E2IP}))
    (tmp / "mace_plain.yaml").write_text(yaml.safe_dump(TINY))
    return str(tmp / "mace_e2ip.yaml"), str(tmp / "mace_plain.yaml")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted e2ip run (1 label iteration), with W&B offline."""
    tmp = tmp_path_factory.mktemp("al_ref")
    e2ip_cfg, _ = _configs(tmp)
    cfg = al.workspace(tmp, "mace", e2ip_cfg, [], wandb={"project": "e2ip-al-test"})
    res = al.run(cfg, tmp / "work")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, cfg, tmp / "work", res


def test_loop_end_to_end(reference):
    tmp, cfg, work, res = reference
    rep0 = al.check_finished_run(work, iterations=1, budget=3, selector="e2ip")
    assert rep0["selected"] == 3 and rep0["labelled"] == 3
    frames = al.labelled(work)
    assert len(frames) == 13 and [f.info["al_iteration"] for f in frames].count(-1) == 10
    # the selected frames are the explored frames of highest max u within the band, labelled by GFN2-xTB
    from tblite.ase import TBLite

    new = [f for f in frames if f.info["al_iteration"] == 0]
    scores = sorted((f.info["al_score"] for f in new), reverse=True)
    assert scores[-1] >= rep0["trust_lo"] and scores == [f.info["al_score"] for f in new]
    a = new[0].copy()
    a.calc = TBLite(method="GFN2-xTB", verbosity=0)
    np.testing.assert_allclose(a.get_forces(), new[0].arrays["REF_forces"], atol=1e-6)
    # iteration 1 trained on 13 frames
    rep1 = json.loads((work / "iter_1" / "report.json").read_text())
    assert rep1["train_frames"] == 13
    # W&B offline run files hold the per-iteration metrics
    blob = b"".join(p.read_bytes() for p in work.rglob("offline-run-*/*.wandb"))
    assert b"al/test/forces_mae" in blob and b"al/cpu_s/train" in blob


def test_resume_of_a_finished_run_does_nothing(reference):
    tmp, cfg, work, _ = reference
    before = (work / "labelled.extxyz").read_bytes()
    res = al.run(cfg, work)
    assert res.returncode == 0 and "training model" not in res.stdout
    assert (work / "labelled.extxyz").read_bytes() == before


def test_kill_and_resume_equals_uninterrupted(reference, tmp_path):
    """One work directory killed (SIGKILL of the process group) in training, then — after a resume — in
    exploration, then in labelling; the last resume ends with the uninterrupted run's labelled frames, and
    a training that had finished is never redone."""
    _, cfg, ref_work, _ = reference
    work = tmp_path / "work"
    marker = tmp_path / "kill_in_label"
    cfg = al.variant(cfg, "al_kill.yaml", final_train=False)  # the labelled set is complete without it

    def in_train():
        log = work / "iter_0" / "train" / "member_0" / "train.log"
        return log.is_file() and "Building model" in log.read_text()

    def in_explore():
        t = work / "iter_0" / "explore" / "run_0" / "trajectory.extxyz"
        return t.is_file() and t.stat().st_size > 0

    trained = work / "iter_0" / "train.done.json"
    stamp = None
    for where, when, extra in (("train", in_train, {}), ("explore", in_explore, {}),
                               ("label", lambda: False, {"E2IP_TEST_KILL_FILE": str(marker)})):
        if where == "label":
            marker.write_text("")  # KillingXTB kills its own process on its second structure
        status = al.run_and_kill(cfg, work, when, **extra)
        assert status != 0, f"not killed in {where}"
        assert not (work / "iter_0" / f"{where}.done.json").exists(), f"the kill came after {where} had finished"
        if where == "explore":
            assert trained.is_file()
            stamp = trained.stat().st_mtime_ns
    res = al.run(cfg, work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "iteration 0: training" not in res.stdout  # a finished training is never redone ...
    assert trained.stat().st_mtime_ns == stamp  # ... neither by this run nor by the one killed in labelling
    al.assert_same_frames(al.labelled(work), al.labelled(ref_work))


def test_committee_selector_scores_are_the_members_sample_covariance(tmp_path):
    from e2ip_plugins.active_learning import CommitteeCalculator
    from mace_ext.active_learning import TRAINER

    e2ip_cfg, plain_cfg = _configs(tmp_path)
    cfg = al.workspace(tmp_path, "mace", e2ip_cfg, [], selector="committee",
                       committee={"size": 2, "config": plain_cfg}, iterations=1, final_train=False,
                       label={"calculator": "tblite.ase:TBLite", "kwargs": {"method": "GFN2-xTB", "verbosity": 0}})
    work = tmp_path / "work"
    res = al.run(cfg, work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    al.check_finished_run(work, iterations=1, budget=3, selector="committee", final_train=False)
    log = (work / "iter_0" / "train" / "member_1" / "train.log").read_text().splitlines()[0]
    assert "/mace_run_train --config" in log and "--seed 1" in log  # plain MACE, member seed = seed + 1
    models = json.loads((work / "iter_0" / "train.done.json").read_text())["models"]
    committee = CommitteeCalculator([TRAINER.open(m, plain=True) for m in models])
    rep = json.loads((work / "iter_0" / "report.json").read_text())
    assert "committee_mean" in rep["held_out"]["test"]
    for frame in [f for f in al.labelled(work) if f.info["al_iteration"] == 0]:
        a = frame.copy()
        a.calc = committee
        a.get_forces()
        assert frame.info["al_score"] == pytest.approx(committee.results["forces_uncertainty_max"], rel=1e-5)


def test_random_selector_a_labeller_that_raises_and_finetuning(tmp_path):
    e2ip_cfg, _ = _configs(tmp_path)
    cfg = al.workspace(tmp_path, "mace", e2ip_cfg, [], selector="random", iterations=1,
                       train={"config": e2ip_cfg, "args": [], "mode": "finetune"},
                       label={"calculator": "tests.al_labellers:RaisingXTB", "kwargs": {}},
                       select={"budget": 6, "trust_lo": {"quantile": 0.5}, "min_distance": 0.0, "stratify": "start"})
    work = tmp_path / "work"
    res = al.run(cfg, work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # select.stratify start: the random draw alternates between the two MD starts (round-robin), 3 each
    import ase.io

    starts = [int(a.info["al_start"]) for a in ase.io.read(work / "iter_0" / "selected.extxyz", ":")]
    assert len(starts) == 6 and all(a != b for a, b in zip(starts, starts[1:])) and starts.count(0) == 3
    lab = json.loads((work / "iter_0" / "label.done.json").read_text())
    assert lab["failed"] >= 1 and lab["labelled"] >= 1 and lab["labelled"] + lab["failed"] == 6
    assert "SCF did not converge" in res.stdout and "skipped" in res.stdout
    assert len(al.labelled(work)) == 10 + lab["labelled"]
    # iteration 1 continues iteration 0's training (MACE restart from its epoch-0 checkpoint, one more epoch)
    log1 = (work / "iter_1" / "train" / "member_0" / "train.log").read_text()
    assert "--restart_latest --max_num_epochs 2" in log1.splitlines()[0]
    assert "model_run-0_epoch-0.pt" in log1 and "Loaded Stage one model from epoch 1" in log1


def test_empty_candidate_set_ends_the_iteration_with_a_message(tmp_path):
    e2ip_cfg, _ = _configs(tmp_path)
    cfg = al.workspace(tmp_path, "mace", e2ip_cfg, [], select={"budget": 3, "trust_lo": 1000.0, "min_distance": 0.0})
    work = tmp_path / "work"
    res = al.run(cfg, work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no candidate structures" in res.stdout and "reusing the models of iteration 0" in res.stdout
    assert len(al.labelled(work)) == 10


@pytest.mark.parametrize("framework, over, message", [
    ("mace", {"label": {"calculator": "no_such_module.ase:Calc", "kwargs": {}}}, "cannot import module 'no_such_module.ase'"),
    ("jax", {}, "framework must be mace or nequip"),
    ("mace", {"data": {"initial": "val.xyz", "valid": "val.xyz", "forces_key": "DFT_forces"}}, "lacks info['REF_energy'] or arrays['DFT_forces']"),
])
def test_bad_input_fails_at_start_up(tmp_path, framework, over, message):
    e2ip_cfg, _ = _configs(tmp_path)
    cfg = al.workspace(tmp_path, framework, e2ip_cfg, [], **over)
    res = al.run(cfg, tmp_path / "work", timeout=120)
    assert res.returncode == 2 and message in res.stderr
    assert not (tmp_path / "work" / "iter_0").exists()


def test_resume_with_another_config_is_refused(reference, tmp_path):
    _, cfg, work, _ = reference
    other = yaml.safe_load(cfg.read_text())
    other["select"]["budget"] = 4
    path = cfg.parent / "al_other.yaml"
    path.write_text(yaml.safe_dump(other))
    res = al.run(path, work, timeout=120)
    assert res.returncode == 2 and "different configuration" in res.stderr and "select" in res.stderr


def test_workdir_from_before_select_order_and_stratify_resumes_with_the_old_rule(reference, tmp_path):
    """A work directory whose stored config predates select.order / select.stratify ranked the whole pool by
    max u: the defaults (uncertainty, none) resume it, another rule is refused."""
    from e2ip_plugins.active_learning import ALConfigError, load_config
    from e2ip_plugins.active_learning.loop import ActiveLearningLoop

    _, cfg, work, _ = reference
    stored = json.loads((work / "config.json").read_text())
    assert stored["select"]["order"] == "uncertainty" and stored["select"]["stratify"] == "none"
    for key in ("order", "stratify"):
        del stored["select"][key]
    old = tmp_path / "old_work"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(stored))
    ActiveLearningLoop(load_config(cfg), old, log=lambda _: None)  # no error: same rule
    strat = yaml.safe_load(cfg.read_text())
    strat["select"]["stratify"] = "start"
    path = cfg.parent / "al_strat.yaml"
    path.write_text(yaml.safe_dump(strat))
    with pytest.raises(ALConfigError, match="different configuration"):
        ActiveLearningLoop(load_config(path), old, log=lambda _: None)
