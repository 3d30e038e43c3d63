"""Consistency checks of a ``results_<backbone>.json`` (used by the smoke tests; runnable by users).

    python -m benchmarks.check bench_out/results_nequip.json

- every method has every metric on every evaluation set, before and after recalibration;
- the JSON's metrics equal a recomputation from the written prediction files
  (``predictions/<method>_<set>.npz``): force MAE/RMSE from the reference and predicted forces, the
  UQ metrics from the per-atom columns through ``e2ip_plugins.metrics.compute_metrics``;
- cost entries exist for every method, with ratios 1 for the plain backbone.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

from .common import REPO
from .common.backends import METHODS, SCORED

ACCURACY = ("forces_mae", "forces_rmse")
UQ = ("forces_nll", "forces_spearman", "forces_auroc", "forces_coverage_50", "forces_coverage_90",
      "forces_miscal_area", "forces_ence", "forces_sharpness")
COLUMNS = ("err_abs", "err_sq", "e", "u", "sigma", "nll", "pit")


def check_results(path, rtol: float = 1e-9) -> Dict:
    """Raise AssertionError on the first inconsistency; returns the loaded results."""
    from e2ip_plugins.metrics import compute_metrics

    path = Path(path)
    r = json.loads(path.read_text())
    sets: List[str] = r["data"]["eval_sets"]
    for m in SCORED:
        assert m in r["methods"], f"method {m} missing"
        res = r["methods"][m]
        keys = ACCURACY + (UQ if m != "plain" else ())
        for s in sets:
            entry = res["sets"][s]
            for kind in ("raw", "recal"):
                for k in keys:
                    v = entry[kind].get(k)
                    assert isinstance(v, float) and math.isfinite(v), f"{m}/{s}/{kind}/{k} = {v!r}"
            npz = np.load(path.parent / entry["predictions"])
            y, f = npz["ref_forces"], npz["pred_forces"]
            assert y.shape == f.shape == (entry["n_atoms"], 3)
            mae, rmse = float(np.mean(np.abs(y - f))), float(np.sqrt(np.mean((y - f) ** 2)))
            assert math.isclose(mae, entry["raw"]["forces_mae"], rel_tol=rtol), (m, s, mae, entry["raw"]["forces_mae"])
            assert math.isclose(rmse, entry["raw"]["forces_rmse"], rel_tol=rtol), (m, s, rmse)
            if m == "plain":
                continue
            for kind in ("raw", "recal"):
                cols = {c: npz[f"{kind}_{c}"] for c in COLUMNS}
                again = compute_metrics(cols)
                for k in UQ:
                    assert math.isclose(again[k], entry[kind][k], rel_tol=rtol, abs_tol=1e-12), (m, s, kind, k)
        if m != "plain":
            assert res["recal_scale"] > 0
            assert set(res["u_ratio_ood_id"]) == set(r["data"]["ood_sets"])
    timing = r["cost"]["inference"]["timing"]
    for label in ("small", "large"):
        for m in METHODS:
            assert timing[label]["median_s"][m] > 0, (label, m)
        assert timing[label]["ratio_to_plain"]["plain"] == 1.0
    for m in METHODS:
        t = r["cost"]["training"][m]
        assert t["epoch_s"] and t["epoch_s"] > 0 and t["peak_rss_mb"] > 0, (m, t)
    assert r["cost"]["training"]["plain"]["epoch_s_ratio"] == 1.0
    return r


def run_smoke(backbone: str, out: Path) -> Path:
    """Run one backbone's part with ``--profile smoke`` on the shipped data into ``out`` (the smoke tests)."""
    import os
    import subprocess

    from e2ip_plugins.demo_data import demo_file

    cmd = [sys.executable, "-m", "benchmarks.run", "--backbone", backbone, "--profile", "smoke", "--out", str(out),
           "--id-file", str(demo_file("train")), "--ood-file", f"ood_mol={demo_file('ood_mol')}",
           "--ood-file", f"ood_hot={demo_file('ood_hot')}"]
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


def check_smoke_run(out: Path, backbone: str) -> Dict:
    """:func:`check_results` of a smoke run, plus its evaluation sets, ensemble size, report and plot."""
    r = check_results(out / f"results_{backbone}.json")
    assert r["data"]["eval_sets"] == ["val", "test", "ood_mol", "ood_hot"]
    assert r["cost"]["training"]["ensemble"]["members"] == 2
    report = (out / "report.md").read_text()
    assert "### Targets" in report and "| e²IP | ood_hot |" in report
    assert (out / backbone / "plots" / "reliability_all_methods.png").is_file()
    return r


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results_<backbone>.json files written by benchmarks.run")
    for p in ap.parse_args(argv).results:
        check_results(p)
        print(f"{p}: ok")


if __name__ == "__main__":
    main()
