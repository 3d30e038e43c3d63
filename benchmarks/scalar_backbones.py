"""Scalar backbones (issue 28): the geometric construction of :mod:`e2ip_plugins.geometric_features` on MACE
``max_L 0`` and Allegro, each against its plain backbone and a 4-member ensemble of it; and, on the MACE L = 1
backbone, the geometric construction against the l > 0 head.

    .venv-mace/bin/python   -m benchmarks.scalar_backbones --variant mace_l0           --out bs
    .venv-mace/bin/python   -m benchmarks.scalar_backbones --variant mace_l1_geometric --out bs
    .venv-nequip/bin/python -m benchmarks.scalar_backbones --variant allegro           --out bs
    python -m benchmarks.scalar_backbones --report --out bs

Development data split as ``benchmarks.run`` / ``benchmarks.attach`` split it (quick profile: 250 train / 100
val / 100 test frames, 100 frames of ood_mol, ood_hot, ood_chem, ood_1500K), one thread. Per variant: plain
seeds 0–3 (the ensemble; seed 0–2 are also the plain rows), e²IP seeds 0–2, through the public CLIs
(``mace_run_train[_e2ip] --max_L 0``, ``nequip-train -cn allegro_plain`` / ``-cn allegro_e2ip``); every
e²IP model read as deployed (stored calibration), the ensemble with (tr/3)·I and one validation scale.
``mace_l1_geometric`` trains the geometric head (``--e2ip_geometric``) next to the l > 0 head and reuses the
plain / e²IP runs of ``benchmarks.attach`` when both use the same ``--out``. Nothing is fitted on test or OOD.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

from .attach import _manifest, _scores
from .common import REPO, SHARED_DATA
from .common.runtime import hardware, log

VARIANTS = {
    # variant: (backbone environment, settings changes, e2ip methods {label: head flags/overrides})
    "mace_l0": ("mace", {"max_L": 0}, {"e2ip_geometric": []}),
    "mace_l1_geometric": ("mace", {}, {"e2ip": [], "e2ip_geometric": ["--e2ip_geometric"]}),
    # Allegro: lr 0.005 / 60 epochs, where the plain Allegro trains stably on validation (at the quick profile's
    # lr 0.01 / 30 epochs its validation force MAE was 263 ± 123 meV/Å over seeds; 60 epochs at 0.005: stable)
    "allegro": ("allegro", {"epochs": 60, "lr": 0.005}, {"e2ip_geometric": []}),
}


def _backend(name: str, settings: Dict[str, Any]):
    from .common.backends import BENCH_CONFIGS, NequipBackend, _bin, make_backend

    if name != "allegro":
        return make_backend(name, settings)

    class AllegroBackend(NequipBackend):
        """NequIP's backend with the Allegro configs; the architecture is the configs' own (tiny) one."""

        def train_cmd(self, method, run_dir, run_name, seed, files, epochs, data):
            s = self.s
            cfg = (["-cp", str(BENCH_CONFIGS.relative_to(REPO)), "-cn", "allegro_plain"] if method == "plain"
                   else ["-cp", "configs/nequip", "-cn", "allegro_e2ip"])
            return [_bin("nequip-train"), *cfg, f"hydra.run.dir={run_dir}",
                    f"train_file={files['train']}", f"val_file={files['val']}", f"test_file={files['test']}",
                    "run=[train]", f"max_epochs={epochs}", f"seed={seed}",
                    f"chemical_symbols=[{','.join(data['elements'])}]", f"cutoff_radius={s['r_max']}",
                    f"batch_size={s['batch_size']}", "trainer.accelerator=cpu",
                    f"training_module.optimizer.lr={s['lr']}", f"training_module.model.model_dtype={s['dtype']}",
                    "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
                    f"+trainer.profiler.dirpath={run_dir}", "+trainer.profiler.filename=profile"]

    return AllegroBackend(settings)


def run_variant(args, variants: Dict[str, Any] = VARIANTS, prefix: str = "scalar") -> Path:
    """Train (resuming) and score ``variants[args.variant]``; ``results_<prefix>_<variant>.json``. With
    ``args.frames_out``, also ``frames_<prefix>_<variant>.npz``: per method, seed and set the per-structure max u
    and max ‖ΔF‖ (for trajectory-bootstrap intervals, ``benchmarks.committee``)."""
    import numpy as np
    import torch

    from e2ip_plugins.metrics import atom_columns, frame_maxima

    from .common.evaluation import frame_index, isotropic, predict_sets, read_sets
    from .common.profiles import get_profile
    from .common.tail_shape import nu_shift_table
    from .common.training import train_all

    torch.set_num_threads(1)
    env_name, changes, heads = variants[args.variant]
    if getattr(args, "heads", None):
        heads = {k: v for k, v in heads.items() if k in args.heads}
    head_key = "head_flags" if env_name == "mace" else "head_overrides"
    out = Path(args.out).resolve()
    bdir = out / ("nequip" if env_name == "allegro" else env_name)
    if args.variant != "mace_l1_geometric":
        bdir = out / args.variant
    bdir.mkdir(parents=True, exist_ok=True)
    prof = get_profile("quick")
    prof["sweep_sizes"], prof["sweep_backbones"] = [], []
    settings = dict(prof["backbones"]["mace" if env_name == "mace" else "nequip"], **changes)
    settings.update({k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None})
    manifest = _manifest(args, prof, out)
    manifest["data_keys"] = dict(manifest["data_keys"], elements=manifest["elements"])
    s0 = prof["seed"] + getattr(args, "seed0", 0)  # training seeds only; the split keeps the profile's seed
    seeds = list(range(s0, s0 + args.seeds))
    n = manifest["frames"]["train"]
    plain_runs = [dict(name=f"plain_s{s0 + j}", method="plain", seed=s0 + j, size=n, tag="main",
                       train=manifest["files"]["train"]) for j in range(prof["ensemble_size"])]
    train_all(_backend(env_name, settings), plain_runs, manifest, prof, settings, bdir, resume=True)
    head_runs: Dict[str, List[Dict[str, Any]]] = {}
    for label, flags in heads.items():
        runs = [dict(name=f"{label}_s{s}", method="e2ip", seed=s, size=n, tag="main", train=manifest["files"]["train"])
                for s in seeds]
        train_all(_backend(env_name, dict(settings, **{head_key: flags})), runs, manifest, prof, settings, bdir,
                  resume=True)
        head_runs[label] = runs
    backend = _backend(env_name, settings)
    sets = read_sets(manifest)
    frames = frame_index(sets)
    fk = manifest["data_keys"]["forces_key"]
    results: Dict[str, Any] = {"variant": args.variant, "settings": settings, "frames": manifest["frames"],
                               "hardware": hardware(), "seeds": seeds, "methods": {}, "train_cpu_s": {}}
    for r in plain_runs[: len(seeds)]:
        preds = predict_sets(backend, backend.load("plain", [r["artifact"]], "cpu"), sets, fk)
        results["methods"].setdefault("plain", {})[f"seed{r['seed']}"] = {
            "deployed": {s: {"forces_mae": float((y - m).abs().mean()), "forces_rmse": float((y - m).pow(2).mean().sqrt())}
                         for s, (y, m, _) in preds.items()}}
    tails: Dict[str, Any] = {}
    dump: Dict[str, np.ndarray] = {}

    def frame_max(tag: str, preds) -> None:
        for name, (y, _, pred) in preds.items():
            cols = atom_columns(pred, y)
            umax, emax = frame_maxima(frames[name].numpy(), cols["u"].detach().numpy(), cols["e"].detach().numpy())
            dump[f"{tag}/{name}/umax"], dump[f"{tag}/{name}/emax"] = umax, emax
    for label, runs in head_runs.items():
        for r in runs:
            preds = predict_sets(backend, backend.load("e2ip", [r["artifact"]], "cpu"), sets, fk)
            if args.tail_check:
                tails[r["name"]] = nu_shift_table(preds)
            entry = {"deployed": _scores(preds, manifest, frames, "raw")}
            frame_max(f"{label}/seed{r['seed']}", preds)
            for s, (y, m, _) in preds.items():
                entry["deployed"][s]["forces_mae"] = float((y - m).abs().mean())
            results["methods"].setdefault(label, {})[f"seed{r['seed']}"] = entry
        results["train_cpu_s"][label] = [r["cpu_s"] for r in runs]
    results["train_cpu_s"]["plain"] = [r["cpu_s"] for r in plain_runs]
    if args.tail_check:
        _write_tail_check(tails, out, args.variant)
    ens = predict_sets(backend, backend.load("ensemble", [r["artifact"] for r in plain_runs], "cpu"), sets, fk)
    ens = {name: (y, mean, isotropic(pred)) for name, (y, mean, pred) in ens.items()}
    entry = {"deployed": _scores(ens, manifest, frames, "recal")}
    frame_max("ensemble/all", ens)  # ranks: a global scale does not change them
    for s, (y, m, _) in ens.items():
        entry["deployed"][s]["forces_mae"] = float((y - m).abs().mean())
    results["methods"]["ensemble"] = {"all": entry}
    if getattr(args, "frames_out", False):
        np.savez(out / f"frames_{prefix}_{args.variant}.npz", **dump)
    path = out / f"results_{prefix}_{args.variant}.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    log(f"{args.variant}: wrote {path}")
    return path


def _write_tail_check(tables: Dict[str, Any], out: Path, variant: str) -> None:
    """tail_<variant>.json / .md: the ν-shift tables of :mod:`benchmarks.common.tail_shape` per e²IP run (val
    chooses the shift; not deployed)."""
    from .common.tail_shape import markdown

    (out / f"tail_{variant}.json").write_text(json.dumps(tables, indent=1))
    md = markdown(tables)
    (out / f"tail_{variant}.md").write_text(f"# ν shift refitted on validation ({variant}; not deployed)\n\n{md}")
    log(f"{variant}: wrote {out / f'tail_{variant}.md'}")


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS))
    p.add_argument("--out", default="bench_scalar")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="override the quick profile's epochs")
    p.add_argument("--lr", type=float, default=None, help="override the quick profile's learning rate")
    p.add_argument("--tail-check", action="store_true", help="also write tail_<variant>.md: a global shift of ν "
                   "refitted on val with c (benchmarks.common.tail_shape; diagnostic, not deployed)")
    p.add_argument("--report", action="store_true", help="write report_scalar.md from results_scalar_*.json")
    p.add_argument("--frames-out", action="store_true", help="also write the per-structure max u / max error")
    args = p.parse_args(argv)
    if args.variant:
        run_variant(args)
    if args.report:
        from .common.scalar_report import write_report

        print(write_report(Path(args.out)))


if __name__ == "__main__":
    main()
