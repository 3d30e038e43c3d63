"""``make demo``: train an e²IP NequIP model on the shipped C7H10O2 data and print its UQ table.

1. ``nequip-train -cp configs/nequip -cn e2ip`` (the shipped config, small CPU overrides) on
   ``iso7_train.xyz`` / ``iso7_val.xyz``, tested on ``[iso7_test, iso7_ood_mol, iso7_ood_hot]``
   (the :class:`nequip_ext.UQPlotsCallback` writes its test-time plots into ``<out>/run/uq_plots``);
2. loads ``best.ckpt`` with NequIP's own loader (:func:`nequip.model.saved_models.load_saved_model`,
   eager mode, EMA weights) and the data pipeline stored in the checkpoint;
3. evaluates the model as deployed (its covariances carry the calibration [c, β] that nequip-train
   fitted on val and stored) on val and on the three test sets, and with one further covariance scale
   (:func:`e2ip_plugins.fit_covariance_scale`, **val only**; ≈ 1 when the stored calibration holds);
   prints force MAE/RMSE, NLL, mean / median u (and the ratio to the in-distribution value),
   Spearman, AUROC, coverage 90, RMV/RMSE, ENCE, u-tail and the frame-level Spearman / AUROC of
   max u; writes the table (``uq_table.txt``, ``uq_metrics.json``) and reliability /
   error-vs-uncertainty / ROC plots (PNG) into ``--out``.

A fixed amount of training (``--max-epochs``, 60) with fixed seeds (``--seed`` for nequip-train's model,
data and shuffling) on one thread, so the table is the same on any machine and under any load, up to
float round-off between CPU kinds; the timings printed around it are the only numbers that vary.

    python -m nequip_ext.demo --out demo_out              # full demo (about 3 minutes on one CPU core)
    python -m nequip_ext.demo --out /tmp/d --max-epochs 1 # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from e2ip_plugins import fit_covariance_scale
from e2ip_plugins.demo_data import demo_file
from e2ip_plugins.metrics import UQMetricState
from e2ip_plugins.plots import write_uq_plots
from e2ip_plugins.predictive import concat

from .novelty import novelty_head

REPO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "nequip"
# (key, label, demo split): evaluated sets; "val" is only used to fit the calibration scale
TEST_SETS = [("id", "ID (test)", "test"), ("ood_mol", "OOD molecules", "ood_mol"), ("ood_hot", "OOD 1200 K", "ood_hot")]
TABLE_COLUMNS = [
    ("forces_mae", "MAE", "{:.4f}"),
    ("forces_rmse", "RMSE", "{:.4f}"),
    ("forces_nll", "NLL", "{:.3f}"),
    ("forces_sharpness", "mean u", "{:.4f}"),
    ("median_u", "median u", "{:.4f}"),
    ("u_ratio", "u/u_ID", "{:.2f}"),
    ("forces_spearman", "Spearman", "{:.3f}"),
    ("forces_auroc", "AUROC", "{:.3f}"),
    ("forces_coverage_90", "cov90", "{:.3f}"),
    ("rmv_rmse", "RMV/RMSE", "{:.2f}"),
    ("forces_ence", "ENCE", "{:.3f}"),
    ("u_tail", "u-tail", "{:.2f}"),
    ("frame_spearman", "frame ρ", "{:.3f}"),
    ("frame_auroc", "frame AUC", "{:.3f}"),
]


def _nequip_train_cmd() -> List[str]:
    exe = Path(sys.executable).parent / "nequip-train"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "nequip.scripts.train"]


def train_overrides(args, run_dir: Path) -> List[str]:
    """Hydra overrides of ``configs/nequip/e2ip.yaml`` used by the demo."""
    tests = ",".join(str(demo_file(split)) for _, _, split in TEST_SETS)
    ov = [
        f"hydra.run.dir={run_dir}",
        f"seed={args.seed}",
        f"train_file={demo_file('train')}",
        f"val_file={demo_file('val')}",
        f"test_file=[{tests}]",
        f"max_epochs={args.max_epochs}",
        f"batch_size={args.batch_size}",
        f"training_module.optimizer.lr={args.lr}",
        f"training_module.model.num_layers={args.num_layers}",
        f"training_module.model.l_max={args.l_max}",
        f"training_module.model.num_features={args.num_features}",
        f"training_module.model.radial_mlp_width={args.num_features}",
        f"training_module.model.uq_head.num_channels={args.num_features}",
    ]
    if args.max_epochs > 1:
        # step the learning rate down over the run (cosine to lr/50), per epoch
        ov.append(
            "+training_module.lr_scheduler={scheduler: {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, "
            f"T_max: {args.max_epochs}, eta_min: {args.lr / 50}}}, interval: epoch, frequency: 1}}"
        )
    if args.wandb:
        ov += [
            "~trainer.logger",
            "+trainer.logger={_target_: lightning.pytorch.loggers.wandb.WandbLogger, project: e2ip-demo, "
            f"save_dir: {run_dir}}}",
        ]
    return ov + list(args.override or [])


def run_training(args, run_dir: Path) -> Path:
    """Run ``nequip-train`` (subprocess); return the path of ``best.ckpt``."""
    config_dir = Path(args.config_dir).resolve()
    if not (config_dir / "e2ip.yaml").is_file():
        raise SystemExit(f"no e2ip.yaml in {config_dir}: pass --config-dir <repo>/configs/nequip")
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = _nequip_train_cmd() + ["-cp", str(config_dir), "-cn", "e2ip"] + train_overrides(args, run_dir)
    log = run_dir / "nequip-train.log"
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(run_dir))
    if res.returncode != 0:
        sys.stderr.write(log.read_text()[-5000:])
        raise SystemExit(f"nequip-train failed (exit {res.returncode}); full log: {log}")
    ckpt = run_dir / "best.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"nequip-train finished but wrote no {ckpt}")
    return ckpt


def load_model(ckpt: Path):
    """The trained model (EMA weights, eager) via NequIP's own checkpoint loader."""
    from nequip.model.saved_models import load_saved_model
    from nequip.utils.global_state import set_global_state

    set_global_state()
    model = load_saved_model(str(ckpt), compile_mode="eager")
    model.eval()
    return model


def eval_loaders(ckpt: Path, files: List[str]):
    """NequIP test dataloaders (the checkpoint's own data pipeline: key mapping, type mapper, neighbor
    list) over ``files``."""
    from hydra.utils import instantiate

    data_cfg = dict(torch.load(str(ckpt), map_location="cpu", weights_only=False)["hyper_parameters"]["info_dict"]["data"])
    data_cfg["test_file_path"] = [str(f) for f in files]
    dm = instantiate(data_cfg, _recursive_=False)
    dm.setup(stage="test")
    return dm.test_dataloader()


def predict(model, loader):
    """(predictive, reference forces, structure index per atom) over one dataloader, float64, from the
    model's head outputs (as deployed: the stored calibration is applied by the model)."""
    from nequip.data import AtomicDataDict

    from .train import predictive

    parts, refs, frames = [], [], []
    offset = 0
    for batch in loader:
        y = batch[AtomicDataDict.FORCE_KEY].detach().to(torch.float64).clone()
        frame = batch[AtomicDataDict.BATCH_KEY].detach().clone() + offset
        offset += int(batch[AtomicDataDict.NUM_NODES_KEY].shape[0])
        with torch.enable_grad():
            out = model(batch)
        out = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
        parts.append(predictive(out, dtype=torch.float64))
        refs.append(y)
        frames.append(frame)
    return concat(parts), torch.cat(refs), torch.cat(frames)


def format_table(results: Dict[str, Dict[str, float]], labels: Dict[str, str]) -> str:
    """One row per entry of ``labels`` (in its order)."""
    w = max(len(v) for v in labels.values()) + 2
    head = "set".ljust(w) + "".join(f"{name:>10s}" for _, name, _ in TABLE_COLUMNS)
    lines = [head, "-" * len(head)]
    for key, label in labels.items():
        m = results[key]
        lines.append(label.ljust(w) + "".join(f"{fmt.format(m[k]):>10s}" for k, _, fmt in TABLE_COLUMNS))
    return "\n".join(lines)


def evaluate(ckpt: Path, out: Path) -> dict:
    model = load_model(ckpt)
    splits = ["val"] + [split for _, _, split in TEST_SETS]
    loaders = eval_loaders(ckpt, [demo_file(s) for s in splits])
    preds = {s: predict(model, dl) for s, dl in zip(splits, loaders)}

    pred_val, y_val, _ = preds["val"]
    # a further global scale fitted on val: ≈ 1 when the stored calibration (fitted by nequip-train) holds
    c = fit_covariance_scale(pred_val, y_val)  # validation split only

    results, labels, cols_out = {}, {}, {}
    for scale_tag, scale in (("", 1.0), ("_calibrated", c)):
        for key, label, split in TEST_SETS + [("val", "val (calibration set)", "val")]:
            pred, y, frame = preds[split]
            state = UQMetricState().update(pred.scaled(scale) if scale != 1.0 else pred, y, frame=frame)
            results[key + scale_tag] = state.compute()
            if key == "val":  # reported in uq_metrics.json, not in the test table
                continue
            labels[key + scale_tag] = label + (f" + recal (c={c:.3g})" if scale_tag else " as deployed")
            cols_out[key + scale_tag] = state.columns()
        u_id = results["id" + scale_tag]["forces_sharpness"]
        for key in [k for k, _, _ in TEST_SETS] + ["val"]:
            results[key + scale_tag]["u_ratio"] = results[key + scale_tag]["forces_sharpness"] / u_id

    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for key, cols in cols_out.items():
        plots[key] = {n: str(p) for n, p in write_uq_plots(cols, out, prefix=f"{key}_").items()}
    n_atoms = {split: int(preds[split][1].shape[0]) for split in splits}
    head = novelty_head(model)
    return {"scale": c, "stored_calibration": head.novelty.novelty_calib.tolist() if head else None, "results": results, "labels": labels,
            "plots": plots, "n_atoms": n_atoms}


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="output folder (table, plots, nequip-train run in <out>/run)")
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--num-features", type=int, default=32)
    ap.add_argument("--num-layers", type=int, default=3)
    ap.add_argument("--l-max", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads (the model's tensors are small: more threads rarely help on CPU)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--wandb", action="store_true", help="log the training run to W&B (offline unless WANDB_MODE says otherwise)")
    ap.add_argument("--config-dir", default=str(REPO_CONFIG_DIR), help="folder holding e2ip.yaml (default: the repo's configs/nequip)")
    ap.add_argument("--ckpt", default=None, help="skip training: evaluate this nequip checkpoint")
    ap.add_argument("override", nargs="*", help="extra Hydra overrides for nequip-train (key=value)")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.ckpt is None:
        print(
            f"e2ip NequIP demo: nequip-train -cn e2ip, {args.max_epochs} epochs, num_layers={args.num_layers}, "
            f"l_max={args.l_max}, num_features={args.num_features} on iso7_train (250 frames) ...",
            flush=True,
        )
        ckpt = run_training(args, out / "run")
        print(f"trained in {time.time() - t0:.0f} s; checkpoint {ckpt}", flush=True)
    else:
        ckpt = Path(args.ckpt).resolve()
    report = evaluate(ckpt, out)
    report["ckpt"] = str(ckpt)
    report["wall_s"] = time.time() - t0

    table = format_table(report["results"], report["labels"])
    n = report["n_atoms"]
    text = (
        "UQ of the e2ip model (forces in eV/Å; u = sqrt(tr U_epi / 3); AUROC: u detecting the top-10% |ΔF| atoms;\n"
        "as deployed: the calibration [c, β] that nequip-train fitted on val and stored in the model;\n"
        f"+ recal: one further covariance scale fitted by NLL on val ({n['val']} atoms), never on test;\n"
        "RMV/RMSE: sqrt(mean tr U_tot/3) over the force RMSE; u-tail: P99.9(u) / P99.9(|ΔF|/√3);\n"
        "frame ρ / AUC: per structure, max u against max |ΔF|)\n"
        f"atoms: ID {n['test']}, OOD molecules {n['ood_mol']}, OOD 1200 K {n['ood_hot']}\n\n" + table
    )
    print(text)
    (out / "uq_table.txt").write_text(text + "\n")
    with open(out / "uq_metrics.json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"plots: {out}/<set>[_calibrated]_{{reliability,error_vs_uncertainty,roc}}.png; "
          f"test-time plots of nequip-train: {out / 'run' / 'uq_plots'}")
    print(f"demo wall time {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
