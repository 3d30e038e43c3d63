"""``make demo`` end to end with tiny settings: ``python -m nequip_ext.demo`` (subprocess) trains with the
real ``nequip-train``, reloads the checkpoint with NequIP's loader and prints the UQ table."""

import json
import math
import os
import subprocess
import sys

import pytest

from ._cli_helpers import PLOT_NAMES, UQ_NAMES, csv_last_values

ATOMS = 19
FRAMES = {"val": 100, "test": 100, "ood_mol": 120, "ood_hot": 125}
SETS = ("id", "ood_mol", "ood_hot")


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "nequip_ext.demo", "--out", str(out), "--max-epochs", "1",
           "--num-features", "8", "--num-layers", "2", "--batch-size", "10"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    # the printed table: one row per test set, raw and recalibrated, with the promised columns
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("set "))
    for col in ("MAE", "RMSE", "NLL", "mean u", "median u", "u/u_ID", "Spearman", "AUROC", "cov90", "RMV/RMSE",
                "ENCE", "u-tail", "frame ρ", "frame AUC"):
        assert col in header
    for label in ("ID (test)", "OOD molecules", "OOD 1200 K"):
        rows = [line for line in lines if line.startswith(label)]
        assert len(rows) == 2 and "as deployed" in rows[0] and "+ recal (c=" in rows[1], rows
        for row in rows:
            assert all(math.isfinite(float(v)) for v in row.split()[-10:]), row
    assert "never on test" in res.stdout
    assert header in (out / "uq_table.txt").read_text()

    report = json.loads((out / "uq_metrics.json").read_text())
    assert report["n_atoms"] == {k: v * ATOMS for k, v in FRAMES.items()}
    c = report["scale"]
    assert c > 0 and math.isfinite(c)
    stored_c, stored_beta = report["stored_calibration"]  # fitted by nequip-train on val, applied by the model
    assert stored_c > 0 and stored_c != 1.0 and stored_beta >= 0.0
    results = report["results"]
    for key in SETS:
        for tag in ("", "_calibrated"):
            m = results[key + tag]
            for name in UQ_NAMES + ("forces_coverage_50", "forces_sharpness", "u_ratio", "rmv_rmse", "u_tail",
                                    "frame_spearman", "frame_auroc", "median_u"):
                assert math.isfinite(m[name]), (key + tag, name)
        raw, cal = results[key], results[key + "_calibrated"]
        # recalibration rescales the covariance only: same errors and ranking, u scaled by sqrt(c)
        assert cal["forces_rmse"] == pytest.approx(raw["forces_rmse"], rel=1e-12)
        assert cal["forces_spearman"] == pytest.approx(raw["forces_spearman"], rel=1e-9)
        assert cal["forces_sharpness"] == pytest.approx(raw["forces_sharpness"] * math.sqrt(c), rel=1e-6)
    assert results["id"]["u_ratio"] == pytest.approx(1.0)
    # the scale is the val-NLL minimiser: on val it cannot be worse than c = 1
    assert results["val_calibrated"]["forces_nll"] <= results["val"]["forces_nll"] + 1e-9

    # the eager re-evaluation of best.ckpt reproduces nequip-train's own test metrics (test0..2)
    logged = csv_last_values(out / "run")
    for idx, key in enumerate(SETS):
        for name in UQ_NAMES:
            assert results[key][name] == pytest.approx(logged[f"test{idx}_epoch/{name}"], rel=1e-5, abs=1e-8), (key, name)

    # plots: raw and recalibrated per set from the demo, plus the callback's test-time plots of the run
    for key in SETS:
        for tag in ("", "_calibrated"):
            for name in PLOT_NAMES:
                png = out / f"{key}{tag}_{name}.png"
                assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", png
    for idx in range(3):
        for name in PLOT_NAMES:
            assert (out / "run" / "uq_plots" / f"test{idx}_{name}.png").is_file()
