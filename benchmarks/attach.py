"""Uncertainty for a model that already exists (issue 27): frozen-attach e²IP vs end-to-end e²IP vs a post hoc
LLPR on the same frozen plain models vs the 4-member plain ensemble.

    .venv-mace/bin/python   -m benchmarks.attach --backbone mace   --out bench_attach
    .venv-nequip/bin/python -m benchmarks.attach --backbone nequip --out bench_attach
    python -m benchmarks.attach --report --out bench_attach        # merges results_*.json into report.md

Per backbone (quick profile of :mod:`benchmarks.common.profiles`, one CPU thread, development data split as
``benchmarks.run`` splits it, with the four out-of-distribution sets ood_mol, ood_hot, ood_chem, ood_1500K):

1. train plain seeds s₀…s₀+3 and end-to-end e²IP seeds s₀…s₀+S−1 through the public CLIs;
2. **attach** (seed k): the user's attach command on plain seed k (``mace_attach_e2ip`` / ``nequip-train
   -cn attach_e2ip``), its whole-process CPU time against plain seed k's training CPU time;
3. **LLPR** (seed k): :mod:`e2ip_plugins.llpr` on plain seed k — A from the training structures, ς² and α²
   by validation NLL (the Jacobian pass over train + val is its fit cost);
4. score every method on val, test and the OOD sets (:func:`benchmarks.common.evaluation.score_method`):
   "deployed" = the model's own stored calibration (attach, e²IP) or fitted scale (LLPR); the ensemble gets
   one covariance scale fitted on val ("recal"); mean ± sd over seeds;
5. max |ΔE|, max |ΔF| between each plain model and its attached model on the test set.

Nothing is fitted on test or OOD data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

from .common import SHARED_DATA
from .common.runtime import hardware, log, run_logged, thread_env

OOD = {"ood_mol": "iso7_dev_ood_mol.xyz", "ood_hot": "iso7_dev_ood_hot.xyz", "ood_chem": "iso7_dev_ood_chem.xyz",
       "ood_1500K": "iso7_dev_ood_1500K.xyz"}
KEYS = ("forces_rmse", "forces_coverage_90", "rmv_rmse", "forces_ence", "forces_nll", "u_tail", "forces_spearman",
        "forces_auroc", "frame_spearman", "frame_auroc")


def _manifest(args, prof, out: Path):
    from .run import data_manifest

    ns = argparse.Namespace(split_dir=None, data_dir=args.data_dir, id_file=None, energy_key="REF_energy",
                            forces_key="REF_forces", ood_file=[f"{k}={Path(args.data_dir) / v}" for k, v in OOD.items()])
    return data_manifest(ns, prof, out)


def _scores(preds, manifest, frames, kind: str) -> Dict[str, Dict[str, float]]:
    from .common.evaluation import score_method

    res, _ = score_method(preds, manifest["ood_sets"], frames=frames)
    return {s: {k: v.get(k) for k in KEYS} for s, e in res["sets"].items() for v in [e[kind]]}


def run_backbone(args) -> Path:
    import torch

    from .common.attach_methods import (ATTACH_EPOCHS, attach_artifact, attach_cmd, jacobians, llpr_predictions,
                                         unchanged)
    from .common.backends import make_backend
    from .common.evaluation import frame_index, isotropic, predict_sets, read_sets
    from .common.profiles import get_profile
    from .common.training import train_all

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    bdir = out / args.backbone
    bdir.mkdir(parents=True, exist_ok=True)
    prof = get_profile("quick")
    prof["sweep_sizes"], prof["sweep_backbones"] = [], []
    settings = dict(prof["backbones"][args.backbone])
    backend = make_backend(args.backbone, settings)
    manifest = _manifest(args, prof, out)
    manifest["data_keys"] = dict(manifest["data_keys"], elements=manifest["elements"])
    data = manifest["data_keys"]
    s0, seeds = prof["seed"], list(range(prof["seed"], prof["seed"] + args.seeds))
    runs = [dict(name=f"plain_s{s0 + j}", method="plain", seed=s0 + j, size=manifest["frames"]["train"], tag="main",
                 train=manifest["files"]["train"]) for j in range(prof["ensemble_size"])]
    runs += [dict(name=f"e2ip_s{s}", method="e2ip", seed=s, size=manifest["frames"]["train"], tag="main",
                  train=manifest["files"]["train"]) for s in seeds]
    train_all(backend, runs, manifest, prof, settings, bdir, resume=True)
    by_name = {r["name"]: r for r in runs}

    sets = read_sets(manifest)
    frames = frame_index(sets)
    fk = data["forces_key"]
    results: Dict[str, Any] = {"backbone": args.backbone, "settings": settings, "frames": manifest["frames"],
                               "hardware": hardware(), "seeds": seeds, "methods": {}, "cost": {}, "unchanged": {}}
    env = thread_env(1)
    for s in seeds:
        plain = by_name[f"plain_s{s}"]
        name = f"attach_s{s}"
        run_dir = bdir / "runs" / name
        art = attach_artifact(backend, run_dir, name)
        info_path = run_dir / "attach.json"
        if not (info_path.is_file() and art.exists()):
            log(f"{args.backbone}: attaching e2ip to plain_s{s}")
            res = run_logged(attach_cmd(backend, Path(plain["artifact"]), run_dir, name, s, manifest["files"], data),
                             run_dir / "attach.log", env)
            if res["rc"] != 0 or not art.exists():
                raise RuntimeError(f"attach {name} failed; see {run_dir / 'attach.log'}")
            info_path.write_text(json.dumps(res))
        res = json.loads(info_path.read_text())
        results["cost"][f"seed{s}"] = {"plain_train_cpu_s": plain["cpu_s"], "attach_cpu_s": res["cpu_s"],
                                       "attach_over_plain": res["cpu_s"] / plain["cpu_s"],
                                       "plain_epoch_s": plain["timing"]["epoch_s"], "plain_epochs": settings["epochs"],
                                       "attach_epochs": ATTACH_EPOCHS[args.backbone],
                                       "attach_epoch_s": backend.epoch_timing(run_dir, name, s, 0).get("epoch_s")
                                       if args.backbone == "nequip" else None}
        results["unchanged"][f"seed{s}"] = unchanged(backend, plain["artifact"], str(art), sets["test"])
        t0 = time.perf_counter()
        plain_preds = predict_sets(backend, backend.load("plain", [plain["artifact"]], "cpu"), sets, fk)
        att_preds = predict_sets(backend, backend.load("e2ip", [str(art)], "cpu"), sets, fk)
        e2e_preds = predict_sets(backend, backend.load("e2ip", [by_name[f"e2ip_s{s}"]["artifact"]], "cpu"), sets, fk)
        jac = jacobians(backend, plain["artifact"], manifest["files"], sets, data)
        llpr_preds, llpr_info = llpr_predictions(jac, plain_preds)
        results["cost"][f"seed{s}"].update(llpr_fit_cpu_s=llpr_info["fit_cpu_s"],
                                           llpr_over_plain=llpr_info["fit_cpu_s"] / plain["cpu_s"])
        for method, preds in (("attach", att_preds), ("e2ip", e2e_preds), ("llpr", llpr_preds)):
            entry = results["methods"].setdefault(method, {})
            entry[f"seed{s}"] = {"deployed": _scores(preds, manifest, frames, "raw"),
                                 "recal": _scores(preds, manifest, frames, "recal")}
        results["methods"]["llpr"][f"seed{s}"]["fit"] = llpr_info
        log(f"{args.backbone}: seed {s} scored in {time.perf_counter() - t0:.0f} s")
    members = [by_name[f"plain_s{s0 + j}"]["artifact"] for j in range(prof["ensemble_size"])]
    ens = predict_sets(backend, backend.load("ensemble", members, "cpu"), sets, fk)
    # the issue-26 baseline: (tr/3)·I of the members' sample covariance, one val scale (evaluation.isotropic)
    ens = {name: (y, mean, isotropic(pred)) for name, (y, mean, pred) in ens.items()}
    results["methods"]["ensemble"] = {"all": {"deployed": _scores(ens, manifest, frames, "recal"),
                                              "recal": _scores(ens, manifest, frames, "recal")}}
    path = out / f"results_{args.backbone}.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    log(f"{args.backbone}: wrote {path}")
    return path


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("mace", "nequip"))
    p.add_argument("--out", default="bench_attach")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--report", action="store_true", help="write report.md from the results_*.json in --out")
    args = p.parse_args(argv)
    if args.backbone:
        run_backbone(args)
    if args.report:
        from .common.attach_report import write_report

        print(write_report(Path(args.out)))


if __name__ == "__main__":
    main()
