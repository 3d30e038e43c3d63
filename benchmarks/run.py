"""The benchmark: plain backbone vs e²IP vs eIP vs a deep ensemble, for MACE and NequIP.

    python -m benchmarks.run --backbone both --profile quick --data-dir ../shared/data --out bench_out
    python -m benchmarks.run --backbone nequip --profile full --data-dir ../shared/data --out bench_full --wandb
    python -m benchmarks.run --backbone mace --id-file my_pool.xyz --ood-file hot=my_hot.xyz --out my_bench

What one backbone's part does (it must run in that backbone's environment; ``--backbone both`` runs
``.venv-mace/bin/python -m benchmarks.run --backbone mace ...`` and the NequIP one side by side, one CPU
thread each, then merges their ``results_<backbone>.json`` into ``report.md``):

1. **data** — the in-distribution pool is split into train / val / test by time blocks within each
   trajectory (:mod:`benchmarks.data`; gaps between blocks, seeded), subsampled to the profile's
   budget; OOD files are subsampled evenly. The split files are written to ``<out>/data`` and passed
   to the training CLIs.
2. **training** through the public CLIs (:mod:`benchmarks.backends`): plain, e²IP, eIP and K − 1
   more plain members (the plain run is ensemble member 0), identical backbone flags, data and
   epochs; then the same for each smaller training set of the data-efficiency sweep. Each run's wall
   time and peak RSS (``os.wait4`` rusage of the CLI process) are recorded, and its per-epoch
   training time is read from the CLI's own files.
3. **evaluation** through the ASE calculators on val, test and every OOD set; per-atom predictives
   (Student-t for e²IP, per-component Student-t for eIP, Gaussian for the ensemble); metrics by
   ``e2ip_plugins.metrics.UQMetricState``; one global covariance scale per method fitted on val by
   ``e2ip_plugins.calibration.fit_covariance_scale`` and applied to every set ("recal").
4. **cost** — inference time per structure via the calculators (warm-up, then the median of
   interleaved repeats: each round calls every method once) for one molecule and a ≥ 1000-atom
   cluster of molecules, as ratios to the plain backbone; peak memory from
   :mod:`benchmarks.memprobe` (one fresh process per method).
5. ``results_<backbone>.json``, prediction files ``<out>/<backbone>/predictions/*.npz``, PNG plots
   in ``<out>/<backbone>/plots`` and ``report.md`` (:mod:`benchmarks.report`).

Nothing is tuned on test or OOD data: the only fitted quantity is the recalibration scale (val).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
ID_NAME = "iso7_dev_id.xyz"
OOD_NAMES = {"ood_mol": "iso7_dev_ood_mol.xyz", "ood_hot": "iso7_dev_ood_hot.xyz"}
VERSION_PACKAGES = {
    "common": ["python", "torch", "e3nn", "ase", "numpy", "scipy", "e2ip", "matplotlib"],
    "mace": ["mace-torch", "torch-ema"],
    "nequip": ["nequip", "lightning", "hydra-core", "torchmetrics"],
}


# ============================================================================================ helpers
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions(backbone: str) -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in VERSION_PACKAGES["common"] + VERSION_PACKAGES.get(backbone, []):
        if name == "python":
            out[name] = platform.python_version()
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def loadavg() -> Optional[List[float]]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:  # pragma: no cover
        return None


def hardware() -> Dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover
        pass
    return {
        "cpu_model": cpu, "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem, "gpu": gpu, "platform": platform.platform(), "loadavg_start": loadavg(),
    }


def thread_env(threads: Optional[int]) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONHASHSEED"] = "0"
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
    return env


def run_logged(cmd: List[str], log_path: Path, env: Dict[str, str], cwd: Path = REPO) -> Dict[str, Any]:
    """Run ``cmd``, output to ``log_path``; wall time and the child's peak RSS (``os.wait4`` rusage)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(cwd), env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024.0}


# ============================================================================================ planning
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


# ============================================================================================ training
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


# ========================================================================================== evaluation
def read_sets(manifest) -> Dict[str, list]:
    import ase.io

    return {name: ase.io.read(manifest["files"][name], ":") for name in manifest["eval_sets"]}


def predict_sets(backend, handle, sets, forces_key: str):
    """{set: (y, mean, predictive or None)}, all float64 torch tensors, atoms of all frames concatenated."""
    import torch
    from e2ip_plugins.predictive import concat

    out = {}
    for name, frames in sets.items():
        ys, fs, preds = [], [], []
        for at in frames:
            f, pred = backend.predict(handle, at)
            ys.append(torch.as_tensor(at.arrays[forces_key], dtype=torch.float64))
            fs.append(f)
            preds.append(pred)
        pred = concat(preds) if preds[0] is not None else None
        out[name] = (torch.cat(ys), torch.cat(fs) if pred is None else pred.mean, pred)
    return out


def accuracy(y, mean) -> Dict[str, float]:
    """Force MAE / RMSE over components — the definitions of ``e2ip_plugins.metrics.compute_metrics``."""
    r = (y - mean).double()
    return {"forces_mae": float(r.abs().mean()), "forces_rmse": float(r.pow(2).mean().sqrt())}


def frame_index(sets) -> Dict[str, Any]:
    """{set: (N_atoms,) structure index of each atom}, for the frame-level metrics."""
    import torch

    return {name: torch.repeat_interleave(torch.arange(len(frames)), torch.tensor([len(a) for a in frames]))
            for name, frames in sets.items()}


def score_method(preds, ood_sets: List[str], id_set: str = "test", frames: Optional[Dict[str, Any]] = None):
    """Metrics per set before and after the val-fitted global recalibration; also the columns.
    ``frames``: {set: structure index per atom} for the frame-level metrics."""
    from e2ip_plugins.calibration import fit_covariance_scale
    from e2ip_plugins.metrics import UQMetricState

    res: Dict[str, Any] = {"sets": {}}
    cols: Dict[str, Any] = {}
    has_uq = preds["val"][2] is not None
    scale = None
    if has_uq:
        _, _, pv = preds["val"]
        scale = fit_covariance_scale(pv, preds["val"][0])
        res["recal_scale"] = scale
    for name, (y, mean, pred) in preds.items():
        entry: Dict[str, Any] = {"n_atoms": int(y.shape[0])}
        if pred is None:
            entry["raw"] = accuracy(y, mean)
            entry["recal"] = dict(entry["raw"])
            cols[name] = {"raw": None, "recal": None}
        else:
            fr = (frames or {}).get(name)
            st_raw = UQMetricState().update(pred, y, frame=fr)
            st_cal = UQMetricState().update(pred.scaled(scale), y, frame=fr)
            entry["raw"], entry["recal"] = st_raw.compute(), st_cal.compute()
            cols[name] = {"raw": st_raw.columns(), "recal": st_cal.columns()}
        res["sets"][name] = entry
    if has_uq:
        u_id = res["sets"][id_set]["raw"]["forces_sharpness"]
        res["mean_u"] = {s: res["sets"][s]["raw"]["forces_sharpness"] for s in res["sets"]}
        res["mean_u_recal"] = {s: res["sets"][s]["recal"]["forces_sharpness"] for s in res["sets"]}
        res["u_ratio_ood_id"] = {s: res["sets"][s]["raw"]["forces_sharpness"] / u_id for s in ood_sets}
    return res, cols


def save_predictions(path: Path, preds_set, cols_set) -> None:
    import numpy as np

    y, mean, _ = preds_set
    arrays = {"ref_forces": y.numpy(), "pred_forces": mean.numpy()}
    for kind in ("raw", "recal"):
        if cols_set[kind] is not None:
            for c, v in cols_set[kind].items():
                arrays[f"{kind}_{c}"] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def isotropic(pred):
    """Diagnostic ensemble variant: the same members' Gaussian with U_epi replaced by (tr U_epi / 3)·I.

    Same mean and same u_i = sqrt(tr U_epi / 3) (so Spearman/AUROC are identical to ``ensemble``); only the
    shape of the covariance differs. With K = 4 members the 3×3 sample covariance has 3 degrees of freedom
    and is often nearly singular, which dominates the full-covariance NLL and coverage."""
    import dataclasses

    import torch

    var = torch.diagonal(pred.cov_epistemic, dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(3, dtype=var.dtype, device=var.device)
    return dataclasses.replace(pred, cov_epistemic=var[:, None, None] * eye)


def evaluate_tag(backend, runs, tag, prof, settings, sets, manifest, bdir: Path, write: bool):
    """Metrics of every method trained on one training-set tag; predictions/plots for ``write``."""
    from .plots import method_plots

    per_method = method_runs(runs, tag, prof)
    results, all_cols = {}, {}
    for method, mruns in per_method.items():
        if not mruns:
            continue
        t0 = time.perf_counter()
        handle = backend.load(method, [r["artifact"] for r in mruns], settings["device"])
        preds = predict_sets(backend, handle, sets, manifest["data_keys"]["forces_key"])
        del handle
        variants = {method: preds}
        if method == "ensemble":
            variants["ensemble_iso"] = {s: (y, mean, isotropic(pred)) for s, (y, mean, pred) in preds.items()}
        for name, vpreds in variants.items():
            res, cols = score_method(vpreds, manifest["ood_sets"], frames=frame_index(sets))
            res["runs"] = [r["name"] for r in mruns]
            res["eval_s"] = time.perf_counter() - t0
            results[name] = res
            if write:
                for s in vpreds:
                    p = bdir / "predictions" / f"{name}_{s}.npz"
                    save_predictions(p, vpreds[s], cols[s])
                    res["sets"][s]["predictions"] = str(p.relative_to(bdir.parent))
                all_cols[name] = cols
            log(f"{backend.name}: evaluated {name} [{tag}] in {res['eval_s']:.0f} s: test MAE "
                f"{1e3 * res['sets']['test']['raw']['forces_mae']:.1f} meV/Å")
    if write:
        method_plots(all_cols, bdir / "plots", backend.name)
    return results


# ================================================================================================ cost
def inference_cost(backend, runs, prof, settings, manifest, bdir: Path, sets) -> Dict[str, Any]:
    import ase.io

    from .data import molecule_cluster

    tm = prof["timing"]
    per_method = method_runs(runs, "main", prof)
    small = sets["test"][0].copy()
    big = molecule_cluster(sets["test"][: min(len(sets["test"]), 60)], tm["cluster_atoms"])
    struct_dir = bdir / "structures"
    struct_dir.mkdir(parents=True, exist_ok=True)
    paths = {"small": struct_dir / "molecule.xyz", "large": struct_dir / "cluster.xyz"}
    ase.io.write(paths["small"], small, format="extxyz")
    ase.io.write(paths["large"], big, format="extxyz")

    handles = {m: backend.load(m, [r["artifact"] for r in per_method[m]], settings["device"]) for m in per_method}
    out: Dict[str, Any] = {"threads": prof["threads"], "device": settings["device"], "timing": {}}
    for label, atoms, reps in (("small", small, tm["repeats_small"]), ("large", big, tm["repeats_large"])):
        for m, h in handles.items():
            for _ in range(tm["warmup"]):
                backend.calculate(h, atoms)
        times: Dict[str, List[float]] = {m: [] for m in handles}
        cpu: Dict[str, List[float]] = {m: [] for m in handles}
        for _ in range(reps):
            for m, h in handles.items():  # interleaved: load drifts hit every method alike
                c0, t0 = time.process_time(), time.perf_counter()
                backend.calculate(h, atoms)
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
        import numpy as np

        med = {m: float(np.median(v)) for m, v in times.items()}
        med_cpu = {m: float(np.median(v)) for m, v in cpu.items()}
        out["timing"][label] = {
            "n_atoms": len(atoms), "repeats": reps, "median_s": med,
            "min_s": {m: float(np.min(v)) for m, v in times.items()},
            "ratio_to_plain": {m: med[m] / med["plain"] for m in med},
            "median_cpu_s": med_cpu,
            "cpu_ratio_to_plain": {m: med_cpu[m] / med_cpu["plain"] for m in med_cpu},
        }
        log(f"{backend.name}: inference {label} ({len(atoms)} atoms): "
            + ", ".join(f"{m} {1e3 * t:.1f} ms (cpu {1e3 * med_cpu[m]:.1f})" for m, t in med.items()))
    del handles

    out["memory"] = {}
    if prof.get("memprobe"):
        sfile = bdir / "settings.json"
        for m, mruns in per_method.items():
            cmd = [sys.executable, "-m", "benchmarks.memprobe", "--backbone", backend.name, "--method", m,
                   "--settings", str(sfile), "--artifacts", *[r["artifact"] for r in mruns],
                   "--structures", str(paths["small"]), str(paths["large"])]
            proc = subprocess.run(cmd, cwd=str(REPO), env=thread_env(prof["threads"]), capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMPROBE ")]
            if proc.returncode != 0 or not line:
                out["memory"][m] = {"error": (proc.stdout + proc.stderr)[-1500:]}
                continue
            out["memory"][m] = json.loads(line[-1][len("MEMPROBE "):])
        out["memory_method"] = ("Linux peak RSS (VmHWM) of a fresh process per method, reset (/proc/self/clear_refs) "
                                "after the imports and before each structure; Δ = peak during 2 calculations minus "
                                "the RSS before the model was loaded (model(s) + activations + calculator); "
                                "see benchmarks/memprobe.py")
    return out


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


# ============================================================================================ drivers
def data_manifest(args, prof, out: Path) -> Dict[str, Any]:
    from .data import SplitSpec, write_splits

    if args.split_dir:
        return json.loads((Path(args.split_dir) / "split.json").read_text())
    id_file, ood = resolve_inputs(args)
    manifest = write_splits(
        id_file, ood, out / "data", SplitSpec(seed=prof["seed"]), prof["n_train"], prof["n_val"], prof["n_test"],
        prof["n_ood"], sweep_sizes=prof["sweep_sizes"],
    )
    manifest["data_keys"] = {"energy_key": args.energy_key, "forces_key": args.forces_key}
    manifest["ood_sets"] = list(ood)
    manifest["eval_sets"] = ["val", "test", *ood]
    (out / "data" / "split.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def resolve_inputs(args):
    data_dir = Path(args.data_dir)
    id_file = args.id_file or str(data_dir / ID_NAME)
    if args.ood_file:
        ood = {}
        for item in args.ood_file:
            name, _, path = item.partition("=")
            if not path:
                name, path = Path(item).stem, item
            ood[name] = path
    elif args.id_file:
        ood = {}
    else:
        ood = {k: str(data_dir / v) for k, v in OOD_NAMES.items()}
    for p in [id_file, *ood.values()]:
        if not Path(p).is_file():
            raise SystemExit(f"benchmark data file not found: {p} (use --data-dir, --id-file, --ood-file)")
    return id_file, ood


def effective_profile(args) -> Dict[str, Any]:
    from .profiles import get_profile

    prof = get_profile(args.profile)
    if args.epochs is not None:
        for s in prof["backbones"].values():
            s["epochs"] = args.epochs
    if args.no_sweep:
        prof["sweep_backbones"] = []
    if args.sweep_backbones is not None:
        prof["sweep_backbones"] = [b for b in args.sweep_backbones.split(",") if b]
    if args.jobs is not None:
        prof["jobs"] = args.jobs
    if args.threads is not None:
        prof["threads"] = args.threads or None
    if args.device is not None:
        for s in prof["backbones"].values():
            s["device"] = args.device
    return prof


def run_backbone(args) -> Path:
    import torch

    from .backends import make_backend
    from .profiles import resolve_device

    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    bdir = out / args.backbone
    bdir.mkdir(parents=True, exist_ok=True)
    prof = effective_profile(args)
    if prof["threads"]:
        torch.set_num_threads(prof["threads"])
    settings = dict(prof["backbones"][args.backbone])
    settings["device"] = resolve_device(settings["device"])
    (bdir / "settings.json").write_text(json.dumps(settings, indent=1))
    backend = make_backend(args.backbone, settings)
    hw = hardware()
    manifest = data_manifest(args, prof, out)
    manifest["data_keys"] = dict(manifest["data_keys"], elements=manifest["elements"])
    log(f"{args.backbone}: profile {args.profile}, frames {manifest['frames']}, device {settings['device']}")
    runs = plan_runs(prof, manifest, args.backbone)
    t0 = time.perf_counter()
    train_all(backend, runs, manifest, prof, settings, bdir, resume=not args.no_resume)
    wall = {"training_s": time.perf_counter() - t0}

    sets = read_sets(manifest)
    t0 = time.perf_counter()
    methods = evaluate_tag(backend, runs, "main", prof, settings, sets, manifest, bdir, write=True)
    wall["evaluation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cost = {"inference": inference_cost(backend, runs, prof, settings, manifest, bdir, sets),
            "training": training_cost(runs, prof)}
    wall["cost_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sweep = {}
    tags = sorted({r["tag"] for r in runs if r["tag"] != "main"}, key=lambda t: int(t[1:]))
    for tag in tags:
        n = int(tag[1:])
        sweep[str(n)] = evaluate_tag(backend, runs, tag, prof, settings, sets, manifest, bdir, write=False)
    if tags:
        sweep[str(manifest["frames"]["train"])] = methods
    wall["sweep_eval_s"] = time.perf_counter() - t0
    wall["total_s"] = time.perf_counter() - t_start
    hw["loadavg_end"] = loadavg()

    results = {
        "backbone": args.backbone,
        "profile": args.profile,
        "command": os.environ.get("E2IP_BENCH_COMMAND") or shlex.join([Path(sys.executable).name, "-m",
                                                                          "benchmarks.run", *sys.argv[1:]]),
        "part_command": shlex.join([sys.executable, "-m", "benchmarks.run", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": versions(args.backbone),
        "hardware": hw,
        "settings": settings,
        "profile_settings": {k: v for k, v in prof.items() if k != "backbones"},
        "data": {k: v for k, v in manifest.items() if k not in ("files",)},
        "data_files": manifest["files"],
        "runs": {r["name"]: {k: r.get(k) for k in ("method", "seed", "size", "tag", "wall_s", "cpu_s", "peak_rss_mb",
                                                    "timing", "artifact", "command", "resumed")} for r in runs},
        "methods": methods,
        "cost": cost,
        "sweep": sweep,
        "wall": wall,
    }
    path = out / f"results_{args.backbone}.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    log(f"{args.backbone}: wrote {path} ({wall['total_s'] / 60:.1f} min)")
    if not args.no_report:
        from .report import write_report

        write_report([path], out, wandb_enabled=args.wandb)
    return path


def backbone_python(args, backbone: str) -> str:
    explicit = args.mace_python if backbone == "mace" else args.nequip_python
    if explicit:
        return explicit
    venv = REPO / (".venv-mace" if backbone == "mace" else ".venv-nequip")
    return str(venv / "bin" / "python")


def run_both(args) -> None:
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prof = effective_profile(args)
    manifest = data_manifest(args, prof, out)
    command = os.environ.get("E2IP_BENCH_COMMAND") or shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]])
    passthrough = ["--profile", args.profile, "--out", str(out), "--split-dir", str(out / "data"), "--no-report",
                   "--energy-key", args.energy_key, "--forces-key", args.forces_key]
    for flag, val in (("--epochs", args.epochs), ("--jobs", args.jobs), ("--threads", args.threads),
                      ("--device", args.device), ("--sweep-backbones", args.sweep_backbones)):
        if val is not None:
            passthrough += [flag, str(val)]
    if args.no_sweep:
        passthrough.append("--no-sweep")
    if args.no_resume:
        passthrough.append("--no-resume")
    procs = {}
    for bb in ("mace", "nequip"):
        cmd = [backbone_python(args, bb), "-m", "benchmarks.run", "--backbone", bb, *passthrough]
        env = dict(thread_env(prof["threads"]), E2IP_BENCH_COMMAND=command)
        logf = open(out / f"{bb}.log", "w")
        log(f"starting {bb}: {shlex.join(cmd)} (log {out / f'{bb}.log'})")
        procs[bb] = (subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=logf, stderr=subprocess.STDOUT), logf)
        if args.sequential:
            procs[bb][0].wait()
    failed = []
    for bb, (p, logf) in procs.items():
        rc = p.wait()
        logf.close()
        log(f"{bb} part finished with rc={rc}")
        if rc != 0:
            failed.append(bb)
    paths = [out / f"results_{bb}.json" for bb in ("mace", "nequip") if (out / f"results_{bb}.json").is_file()
             and bb not in failed]
    from .report import write_report

    if paths:
        write_report(paths, out, wandb_enabled=args.wandb, total_wall_s=time.perf_counter() - t0,
                     failed=failed)
    log(f"both backbones: {(time.perf_counter() - t0) / 60:.1f} min; report {out / 'report.md'}")
    if failed:
        raise SystemExit(f"benchmark part(s) failed: {failed}; see {out}/<backbone>.log")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("mace", "nequip", "both"), required=True)
    p.add_argument("--profile", choices=("quick", "full", "smoke"), default="quick")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help=f"directory with {ID_NAME} and {', '.join(OOD_NAMES.values())}")
    p.add_argument("--id-file", default=None, help="in-distribution extxyz pool (overrides --data-dir)")
    p.add_argument("--ood-file", action="append", default=None, metavar="NAME=PATH",
                   help="an OOD extxyz test file (repeatable)")
    p.add_argument("--energy-key", default="REF_energy")
    p.add_argument("--forces-key", default="REF_forces")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--wandb", action="store_true", help="log the report to W&B (WANDB_MODE, default offline)")
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs (every method)")
    p.add_argument("--no-sweep", action="store_true", help="skip the data-efficiency sweep")
    p.add_argument("--sweep-backbones", default=None, help="comma list of backbones that run the sweep")
    p.add_argument("--jobs", type=int, default=None, help="concurrent training runs per backbone")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads per process (0: leave)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the profile's)")
    p.add_argument("--sequential", action="store_true", help="--backbone both: one backbone after the other")
    p.add_argument("--no-resume", action="store_true", help="retrain runs that already finished in --out")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--split-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mace-python", default=None, help="python of the MACE environment (default .venv-mace)")
    p.add_argument("--nequip-python", default=None, help="python of the NequIP environment (default .venv-nequip)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.backbone == "both":
        run_both(args)
    else:
        run_backbone(args)


if __name__ == "__main__":
    main()
