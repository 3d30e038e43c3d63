"""Training runs of ``benchmarks.run``: which runs one backbone needs (:func:`plan_runs`), which runs make
each method (:func:`method_runs`), running them through the public CLIs (:func:`train_all`, reusing finished
runs of the same command) and their training cost (:func:`training_cost`)."""

from __future__ import annotations

import concurrent.futures
import json
import shlex
from pathlib import Path
from typing import Any, Dict, List

from .runtime import loadavg, log, run_logged, thread_env


def plan_runs(prof: Dict[str, Any], manifest: Dict[str, Any], backbone: str) -> List[Dict[str, Any]]:
    """Every training run of one backbone: main set, then each smaller sweep training set."""
    seed, k = prof["seed"], prof["ensemble_size"]
    n_main = manifest["frames"]["train"]
    sizes = [("main", n_main, manifest["files"]["train"])]
    if backbone in prof["sweep_backbones"]:
        for n_str, path in sorted(manifest["sweep_files"].items(), key=lambda kv: int(kv[0])):
            if int(n_str) < n_main:
                sizes.append((f"n{n_str}", int(n_str), path))
    runs = []
    for tag, n, train_file in sizes:
        suffix = "" if tag == "main" else f"_{tag}"
        for m in ("plain", "e2ip", "eip"):
            runs.append(dict(name=f"{m}_s{seed}{suffix}", method=m, seed=seed, size=n, tag=tag, train=train_file))
        for j in range(1, k):
            runs.append(dict(name=f"plain_s{seed + j}{suffix}", method="plain", seed=seed + j, size=n, tag=tag,
                             train=train_file))
    return runs


def method_runs(runs: List[Dict[str, Any]], tag: str, prof: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Runs behind each method for one training-set tag (the ensemble = K plain seeds)."""
    by_tag = [r for r in runs if r["tag"] == tag]
    seed = prof["seed"]
    out = {
        "plain": [r for r in by_tag if r["method"] == "plain" and r["seed"] == seed],
        "e2ip": [r for r in by_tag if r["method"] == "e2ip"],
        "eip": [r for r in by_tag if r["method"] == "eip"],
        "ensemble": sorted([r for r in by_tag if r["method"] == "plain"], key=lambda r: r["seed"]),
    }
    return out


def train_all(backend, runs, manifest, prof, settings, bdir: Path, resume: bool) -> None:
    env = thread_env(prof["threads"])
    data = manifest["data_keys"]

    def one(run):
        run_dir = bdir / "runs" / run["name"]
        done = run_dir / "done.json"
        files = dict(manifest["files"], train=run["train"])
        cmd = backend.train_cmd(run["method"], run_dir, run["name"], run["seed"], files, settings["epochs"], data)
        if resume and done.is_file():
            info = json.loads(done.read_text())
            # reuse only a finished run made by exactly this command (same settings, data, epochs)
            if info.get("rc") == 0 and Path(info["artifact"]).exists() and info.get("command") == shlex.join(cmd):
                run.update(info, resumed=True)
                log(f"{backend.name}: {run['name']} already trained (resume)")
                return run
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"{backend.name}: training {run['name']} ({run['size']} frames, {settings['epochs']} epochs)")
        res = run_logged(cmd, run_dir / "train.log", env)
        art = backend.artifact(run_dir, run["name"])
        if res["rc"] != 0 or not art.exists():
            tail = (run_dir / "train.log").read_text()[-3000:]
            raise RuntimeError(f"training {run['name']} failed (rc={res['rc']}); see {run_dir / 'train.log'}\n{tail}")
        info = dict(res, artifact=str(art), command=shlex.join(cmd), loadavg_end=loadavg(),
                    timing=backend.epoch_timing(run_dir, run["name"], run["seed"], settings["epochs"]))
        done.write_text(json.dumps(info, indent=1))
        run.update(info)
        log(f"{backend.name}: {run['name']} done in {res['wall_s']:.0f} s")
        return run

    jobs = max(1, int(prof.get("jobs") or 1))
    if jobs == 1:
        for run in runs:
            one(run)
    else:
        with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
            list(ex.map(one, runs))


def training_cost(runs, prof) -> Dict[str, Any]:
    import numpy as np

    per_method = method_runs(runs, "main", prof)
    out = {}
    for m, mruns in per_method.items():
        steps = [r["timing"]["step_s_per_epoch"] for r in mruns]
        epochs = [r["timing"]["epoch_s"] for r in mruns]
        k = len(mruns)
        out[m] = {
            "members": k,
            # the ensemble trains K models: its cost per epoch is the sum over members
            "step_s_per_epoch": float(np.sum(steps)) if None not in steps else None,
            "epoch_s": float(np.sum(epochs)) if None not in epochs else None,
            "wall_s": float(np.sum([r["wall_s"] for r in mruns])),
            "cpu_s": float(np.sum([r["cpu_s"] for r in mruns])) if all(r.get("cpu_s") for r in mruns) else None,
            "peak_rss_mb": float(np.max([r["peak_rss_mb"] for r in mruns])),
        }
    for key in ("step_s_per_epoch", "epoch_s", "wall_s", "cpu_s", "peak_rss_mb"):
        base = out["plain"][key]
        for m in out:
            v = out[m][key]
            out[m][f"{key}_ratio"] = (v / base) if (v is not None and base) else None
    return out
