"""End-to-end: the shipped config through the real ``nequip-train`` CLI (subprocess)."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "e2ip_plugins" / "data"
REQUIRED = ("forces_nll", "forces_spearman", "forces_auroc", "forces_miscal_area", "forces_coverage_90")


def _last_values(metrics_csv: pathlib.Path) -> dict:
    vals = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            vals.update({k: v for k, v in row.items() if v not in ("", None)})
    return vals


@pytest.mark.parametrize("config", ["e2ip"])
def test_nequip_train_cli(tmp_path, config):
    nequip_train = pathlib.Path(sys.executable).parent / "nequip-train"
    test_files = f"[{DATA / 'iso7_test.xyz'},{DATA / 'iso7_ood_hot.xyz'}]"
    cmd = [
        str(nequip_train),
        "-cp",
        str(REPO / "configs" / "nequip"),  # Hydra resolves a relative -cp against nequip.scripts, so pass it absolute
        "-cn",
        config,
        f"hydra.run.dir={tmp_path}",
        "max_epochs=2",
        f"train_file={DATA / 'iso7_train.xyz'}",
        f"val_file={DATA / 'iso7_val.xyz'}",
        f"test_file={test_files}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert (tmp_path / "best.ckpt").is_file() and (tmp_path / "last.ckpt").is_file()
    metrics_csv = next(tmp_path.glob("csv/version_*/metrics.csv"))
    vals = _last_values(metrics_csv)
    for idx in (0, 1):  # one per test file
        for name in REQUIRED + ("forces_rmse",):
            key = f"test{idx}_epoch/{name}"
            assert key in vals, sorted(vals)
            v = float(vals[key])
            assert v == v, key  # finite (not NaN)
    for name in REQUIRED:
        assert f"val0_epoch/{name}" in vals
    cov90 = float(vals["test0_epoch/forces_coverage_90"])
    assert 0.0 <= cov90 <= 1.0
