"""Shared helpers of the active-learning end-to-end tests (tests/mace, tests/nequip): a tiny workspace on
the shipped iso7 data, running the real ``e2ip-active-learning`` command, killing it, reading results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "e2ip_plugins" / "data"


def workspace(tmp: Path, framework: str, train_config: str, train_args: List[str], **over) -> Path:
    """Data files (10 initial, 5 validation, 6 held-out frames, 2 MD starts) and ``al.yaml`` in ``tmp``."""
    import ase.io

    tmp.mkdir(parents=True, exist_ok=True)
    train = ase.io.read(DATA / "iso7_train.xyz", ":")
    ase.io.write(tmp / "initial.xyz", train[:10])
    ase.io.write(tmp / "val.xyz", ase.io.read(DATA / "iso7_val.xyz", ":5"))
    ase.io.write(tmp / "test.xyz", ase.io.read(DATA / "iso7_test.xyz", ":6"))
    seen, starts = set(), []
    for a in train:
        if a.info["smiles"] not in seen:
            seen.add(a.info["smiles"])
            starts.append(a)
    ase.io.write(tmp / "starts.xyz", starts[:2])
    cfg = {"framework": framework, "seed": 0, "iterations": 1,
           "data": {"initial": "initial.xyz", "valid": "val.xyz", "held_out": {"test": "test.xyz"}},
           "train": {"config": train_config, "args": train_args},
           "selector": "e2ip",
           "explore": {"structures": "starts.xyz", "temperatures": [500.0], "steps": 60, "interval": 10},
           "select": {"budget": 3, "trust_lo": {"quantile": 0.5}, "min_distance": 0.0},
           "label": {"calculator": "tests.al_labellers:KillingXTB", "kwargs": {}}}
    for key, value in over.items():
        section, _, sub = key.partition(".")
        if sub:
            cfg[section][sub] = value
        else:
            cfg[section] = value
    (tmp / "al.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "al.yaml"


def env(**extra) -> Dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def command(config: Path, workdir: Path) -> List[str]:
    return [str(Path(sys.executable).parent / "e2ip-active-learning"), "--config", str(config), "--workdir", str(workdir)]


def run(config: Path, workdir: Path, timeout: float = 900, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, workdir), cwd=REPO, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def variant(config: Path, name: str, **top) -> Path:
    """A copy of ``config`` next to it with top-level keys replaced."""
    cfg = yaml.safe_load(config.read_text())
    cfg.update(top)
    path = config.parent / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_and_kill(config: Path, workdir: Path, when: Callable[[], bool], timeout: float = 600, **extra_env) -> int:
    """Start the command in its own process group, SIGKILL the group as soon as ``when()`` holds (or let a
    self-killing labeller do it); returns the exit status."""
    proc = subprocess.Popen(command(config, workdir), cwd=REPO, env=env(**extra_env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if when():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait(timeout=60)


def labelled(workdir: Path):
    import ase.io

    return ase.io.read(workdir / "labelled.extxyz", ":")


def assert_same_frames(a, b, keys=("REF_forces",)) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.positions, y.positions, atol=1e-7)
        assert x.info.get("al_iteration") == y.info.get("al_iteration")
        assert abs(x.info["REF_energy"] - y.info["REF_energy"]) < 1e-6
        for k in keys:
            np.testing.assert_allclose(x.arrays[k], y.arrays[k], atol=1e-6)


def check_finished_run(workdir: Path, iterations: int, budget: int, selector: str, final_train: bool = True) -> Dict:
    """What every finished run must hold; returns iteration 0's report."""
    import json

    frames = labelled(workdir)
    rep0 = json.loads((workdir / "iter_0" / "report.json").read_text())
    new = [f for f in frames if f.info["al_iteration"] >= 0]
    assert {f.info["al_selector"] for f in new} <= {selector}
    assert len(new) == sum(json.loads((workdir / f"iter_{k}" / "label.done.json").read_text())["labelled"]
                           for k in range(iterations))
    assert rep0["selected"] <= budget
    assert set(rep0["cpu_s"]) >= {"train", "explore", "select", "label"}
    assert all(v >= 0 for v in rep0["cpu_s"].values()) and rep0["cpu_s"]["train"] > 0
    assert (workdir / "iter_0" / "report.md").is_file()
    assert (workdir / f"iter_{iterations}" / "report.json").is_file() == final_train
    for frame in new:  # labels are GFN2-xTB's, not the model's
        assert np.isfinite(frame.arrays["REF_forces"]).all()
    return rep0

