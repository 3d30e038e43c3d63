"""The real ``mace_run_train_e2ip`` console script (subprocess) on the shipped data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from .helpers import DATA, REPO

SCRIPT = Path(sys.executable).parent / "mace_run_train_e2ip"


def _subset(tmp_path, name, n):
    path = tmp_path / f"{name}.xyz"
    ase.io.write(path, ase.io.read(DATA / f"iso7_{name}.xyz", index=f":{n}"), format="extxyz")
    return str(path)


def _train(tmp_path, *extra, config="configs/mace/e2ip.yaml", epochs=1):
    work = tmp_path / "work"
    cmd = [
        str(SCRIPT), "--config", config,
        "--train_file", _subset(tmp_path, "train", 16), "--valid_file", _subset(tmp_path, "val", 8),
        "--test_file", _subset(tmp_path, "test", 4), "--work_dir", str(work),
        "--max_num_epochs", str(epochs), "--batch_size", "8", "--valid_batch_size", "8", *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return proc, work


def _results(work):
    rows = []
    for f in (work / "results").glob("*_train.txt"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


@pytest.mark.parametrize("config,head", [("configs/mace/e2ip.yaml", "e2ip"), ("configs/mace/eip.yaml", "eip")])
def test_cli_trains_and_saves(tmp_path, config, head):
    proc, work = _train(tmp_path, config=config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "optimizer group 'e2ip_head'" in log
    models = list(work.glob("*.model"))
    assert models, log[-3000:]
    model = torch.load([m for m in models if "compiled" not in m.name][0], weights_only=False)
    assert model.e2ip_head_type == head
    # the head's last layer starts at exactly zero; training must have moved it
    last = model.e2ip_head.mlp.net[-1].weight
    assert last.abs().max() > 0
    # UQ metrics reached MACE's results file next to its own errors
    evals = [r for r in _results(work) if r.get("mode") == "eval"]
    assert evals and "rmse_f" in evals[-1] and np.isfinite(evals[-1]["forces_nll"])
    assert "forces_spearman" in evals[-1] and "forces_coverage_90" in evals[-1]


def test_cli_rejects_one_interaction(tmp_path):
    cmd = [str(SCRIPT), "--config", "configs/mace/e2ip.yaml", "--num_interactions", "1", "--work_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "num_interactions >= 2" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_rejects_scalar_backbone(tmp_path):
    cmd = [str(SCRIPT), "--config", "configs/mace/e2ip.yaml", "--max_L", "0", "--work_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "l > 0" in proc.stderr


def test_cli_stage_two_restart_and_wandb_offline(tmp_path):
    """Stage two keeps the evidential loss; --restart_latest resumes; UQ metrics reach W&B (offline)."""
    wandb = pytest.importorskip("wandb")
    extra = ["--swa", "--start_swa", "1", "--wandb", "--wandb_project", "e2ip-test", "--wandb_dir", str(tmp_path)]
    proc, work = _train(tmp_path, *extra, epochs=2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "e2ip: stage-two loss: E2IPLoss" in log
    assert list(work.glob("*_stagetwo.model"))
    # W&B offline run files hold the UQ metrics next to MACE's valid_rmse_f
    history = list(tmp_path.rglob("offline-run-*/files/wandb-summary.json")) + list(tmp_path.rglob("offline-run-*/*.wandb"))
    assert history, "no offline W&B run written"
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("offline-run-*/*.wandb"))
    assert b"valid_forces_nll" in blob and b"valid_rmse_f" in blob

    proc2, _ = _train(tmp_path, "--restart_latest", epochs=3)
    log2 = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, log2[-4000:]
    assert "Loading checkpoint" in log2 and "Epoch 2:" in log2 and "Epoch 0:" not in log2
