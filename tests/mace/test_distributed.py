"""``mace_run_train_e2ip --distributed`` with 2 CPU processes (torchrun, gloo).

MACE 0.3.16 opens a process group only for cuda/xpu and gives DDP ``device_ids``;
``mace_ext.cli`` wraps ``init_distributed`` and ``DDP`` for CPU (listed in
``mace_ext.hooks``). The run trains for real under DDP (which fails on any parameter
without a gradient, the head's included), and its final VALID metrics, gathered over
the two ranks (each evaluates half of the validation set), must equal a one-process
evaluation of the saved model on the whole validation set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from mace_ext.eval_configs import main as eval_main

from .helpers import DATA, REPO

BIN = Path(sys.executable).parent
METRICS = ("forces_mae", "forces_rmse", "forces_nll", "forces_spearman", "forces_auroc", "forces_coverage_50",
           "forces_coverage_90", "forces_miscal_area", "forces_ence", "forces_sharpness")


def _subset(tmp_path, name, n):
    path = tmp_path / f"{name}.xyz"
    ase.io.write(path, ase.io.read(DATA / f"iso7_{name}.xyz", index=f":{n}"), format="extxyz")
    return str(path)


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun not installed")
def test_two_process_cpu_run_matches_one_process_evaluation(tmp_path, f64):
    work = tmp_path / "work"
    valid = _subset(tmp_path, "val", 8)  # 8 = 2 ranks x 4: DistributedSampler(drop_last=True) drops nothing
    cmd = [
        str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(BIN / "mace_run_train_e2ip"),
        "--config", "configs/mace/e2ip.yaml", "--distributed", "--launcher", "torchrun", "--device", "cpu",
        "--train_file", _subset(tmp_path, "train", 16), "--valid_file", valid, "--test_file", _subset(tmp_path, "test", 2),
        "--work_dir", str(work), "--max_num_epochs", "2", "--batch_size", "4", "--valid_batch_size", "4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Process group initialized: True" in log and "Processes: 2" in log
    assert "(rank 0's value, broadcast)" in log  # sigma_F identical on both ranks
    assert "Epoch 1:" in log

    final = [json.loads(line) for f in (work / "results").glob("*_e2ip_final.txt") for line in f.read_text().splitlines()]
    ddp = [r for r in final if r["set"] == "valid_Default"]
    assert len(ddp) == 1, final  # written by rank 0 only

    out, metrics_json = tmp_path / "eval.xyz", tmp_path / "metrics.json"
    eval_main(["--configs", valid, "--model", str(work / "iso7_e2ip.model"), "--output", str(out), "--device", "cpu",
               "--default_dtype", "float64", "--ref_forces_key", "REF_forces", "--metrics_json", str(metrics_json)])
    single = json.loads(metrics_json.read_text())
    assert single["predictive"] == "GaussianPredictive"  # the shipped config's committee level: N(γ, U_tot)
    for key in METRICS:
        assert np.isfinite(single[key]), key
        assert ddp[0][key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), key
    assert ddp[0]["rmse_f"] == pytest.approx(single["forces_rmse"], rel=1e-9)  # MACE's own metric, same set
