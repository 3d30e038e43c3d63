"""The benchmark: plain backbone vs e²IP vs eIP vs a deep ensemble, for MACE and NequIP.

    python -m benchmarks.run --backbone both --profile quick --data-dir ../shared/data --out bench_out
    python -m benchmarks.run --backbone nequip --profile full --data-dir ../shared/data --out bench_full --wandb
    python -m benchmarks.run --backbone mace --id-file my_pool.xyz --ood-file hot=my_hot.xyz --out my_bench

What one backbone's part does (it must run in that backbone's environment; ``--backbone both`` runs
``.venv-mace/bin/python -m benchmarks.run --backbone mace ...`` and the NequIP one side by side, one CPU
thread each, then merges their ``results_<backbone>.json`` into ``report.md``):

1. **data** — the in-distribution pool is split into train / val / test by time blocks within each
   trajectory (:mod:`benchmarks.common.data`; gaps between blocks, seeded), subsampled to the profile's
   budget; OOD files are subsampled evenly. The split files are written to ``<out>/data`` and passed
   to the training CLIs.
2. **training** through the public CLIs (:mod:`benchmarks.common.training`, command lines from
   :mod:`benchmarks.common.backends`): plain, e²IP, eIP and K − 1 more plain members (the plain run is
   ensemble member 0), identical backbone flags, data and epochs; then the same for each smaller
   training set of the data-efficiency sweep. Each run's wall time and peak RSS (``os.wait4`` rusage
   of the CLI process) are recorded, and its per-epoch training time is read from the CLI's own files.
3. **evaluation** (:mod:`benchmarks.common.evaluation`) through the ASE calculators on val, test and
   every OOD set; per-atom predictives (Student-t for e²IP, per-component Student-t for eIP, Gaussian
   for the ensemble); metrics by ``e2ip_plugins.metrics.UQMetricState``; one global covariance scale
   per method fitted on val by ``e2ip_plugins.calibration.fit_covariance_scale`` and applied to every
   set ("recal").
4. **cost** (same module) — inference time per structure via the calculators (warm-up, then the median of
   interleaved repeats: each round calls every method once) for one molecule and a ≥ 1000-atom
   cluster of molecules, as ratios to the plain backbone; peak memory from
   :mod:`benchmarks.common.memprobe` (one fresh process per method).
5. ``results_<backbone>.json``, prediction files ``<out>/<backbone>/predictions/*.npz``, PNG plots
   in ``<out>/<backbone>/plots`` and ``report.md`` (:mod:`benchmarks.common.report`).

Nothing is tuned on test or OOD data: the only fitted quantity is the recalibration scale (val).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

from .common import REPO, SHARED_DATA
from .common.runtime import hardware, loadavg, log, thread_env, versions

DEFAULT_DATA = SHARED_DATA
ID_NAME = "iso7_dev_id.xyz"
OOD_NAMES = {"ood_mol": "iso7_dev_ood_mol.xyz", "ood_hot": "iso7_dev_ood_hot.xyz"}


# ============================================================================================ drivers
def data_manifest(args, prof, out: Path) -> Dict[str, Any]:
    from .common.data import SplitSpec, write_splits

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
    from .common.profiles import get_profile

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

    from .common.backends import make_backend
    from .common.evaluation import evaluate_tag, inference_cost, read_sets
    from .common.profiles import resolve_device
    from .common.training import plan_runs, train_all, training_cost

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
        from .common.report import write_report

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
    from .common.report import write_report

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