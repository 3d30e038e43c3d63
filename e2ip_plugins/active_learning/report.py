"""Per-iteration report of the active-learning loop: ``iter_<k>/report.md``, ``report.json``, plots, W&B.

Figures: held-out force MAE/RMSE of the iteration's model (and committee mean); max u of the selected
vs the rejected explored frames; frames per trust band; CPU seconds of train / explore / select / label.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

from .label import atomic_write_text

STEPS = ("train", "explore", "select", "label")


def cpu_split(recs: Dict[str, Any]) -> Dict[str, float]:
    """CPU seconds per step (evaluation and band fitting count with select: they score structures)."""
    out = {s: float(recs.get(s, {}).get("cpu_s", 0.0)) for s in STEPS}
    out["select"] += float(recs.get("bands", {}).get("cpu_s", 0.0))
    out["evaluate"] = float(recs.get("evaluate", {}).get("cpu_s", 0.0))
    return out


def _plots(idir: Path, recs: Dict[str, Any]) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    sel = recs.get("select")
    if sel and (sel["selected_scores"] or sel["rejected_scores"]):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        allv = np.asarray(sel["selected_scores"] + sel["rejected_scores"])
        bins = np.geomspace(max(allv[allv > 0].min(), 1e-4), allv.max() * 1.01, 30) if (allv > 0).any() else 30
        ax.hist(sel["rejected_scores"], bins=bins, alpha=0.6, label=f"rejected ({len(sel['rejected_scores'])})")
        ax.hist(sel["selected_scores"], bins=bins, alpha=0.6, label=f"selected ({len(sel['selected_scores'])})")
        ax.axvline(recs["bands"]["trust_lo"], color="k", ls="--", lw=1, label="trust_lo")
        ax.set_xscale("log")
        ax.set_xlabel("max u of the explored frame (eV/Å)")
        ax.set_ylabel("frames")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(idir / "selection.png", dpi=110)
        plt.close(fig)
        files["selection"] = "selection.png"
    ev = recs["evaluate"]["held_out"]
    if ev:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = list(ev)
        ax.bar(names, [ev[n]["model"]["forces_mae"] for n in names])
        ax.set_ylabel("force MAE (eV/Å)")
        ax.set_title(f"iteration {recs['iteration']}: held-out error")
        fig.tight_layout()
        fig.savefig(idir / "held_out.png", dpi=110)
        plt.close(fig)
        files["held_out"] = "held_out.png"
    return files


def write_report(idir: Path, recs: Dict[str, Any], cfg: Dict[str, Any], log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots of one iteration; returns the JSON content."""
    k = recs["iteration"]
    rep: Dict[str, Any] = {"iteration": k, "selector": cfg["selector"], "framework": cfg["framework"],
                           "train_frames": recs["train"].get("train_frames"), "models": recs["train"]["models"],
                           "held_out": recs["evaluate"]["held_out"], "cpu_s": cpu_split(recs)}
    if "select" in recs:
        sel = recs["select"]
        rep.update(trust_lo=recs["bands"]["trust_lo"], trust_hi=recs["bands"]["trust_hi"], pool=sel["pool"],
                   selected=sel["selected"], bands=sel["bands"], labelled=recs["label"]["labelled"],
                   label_failed=recs["label"]["failed"],
                   selected_max_u_median=float(np.median(sel["selected_scores"])) if sel["selected_scores"] else None,
                   rejected_max_u_median=float(np.median(sel["rejected_scores"])) if sel["rejected_scores"] else None,
                   md_runs_stopped=sum(r["status"] == "stopped" for r in recs["explore"]["runs"]))
    rep["plots"] = _plots(idir, recs)
    atomic_write_text(idir / "report.json", json.dumps(rep, indent=2, default=float) + "\n")
    lines = [f"# Active learning, iteration {k} ({cfg['selector']}, {cfg['framework']})", "",
             f"Trained on {rep['train_frames']} frames ({len(rep['models'])} model(s)).", "",
             "| held-out set | frames | force MAE (eV/Å) | force RMSE (eV/Å) | committee-mean MAE |", "|---|---|---|---|---|"]
    for name, r in rep["held_out"].items():
        cm = r.get("committee_mean", {}).get("forces_mae")
        lines.append(f"| {name} | {r['model']['frames']} | {r['model']['forces_mae']:.4f} | {r['model']['forces_rmse']:.4f} | "
                     f"{'—' if cm is None else f'{cm:.4f}'} |")
    if "select" in recs:
        b = rep["bands"]
        lines += ["", f"Trust band [{rep['trust_lo']:.4g}, {rep['trust_hi']:.4g}) eV/Å on max u; explored {rep['pool']} frames: "
                  f"{b['accurate']} accurate, {b['candidate']} candidate, {b['stop']} above trust_hi; "
                  f"{rep['md_runs_stopped']} MD runs stopped at trust_hi.",
                  f"Selected {rep['selected']} (median max u {rep['selected_max_u_median']}), rejected median max u "
                  f"{rep['rejected_max_u_median']}; labelled {rep['labelled']}, labeller failures {rep['label_failed']}."]
    c = rep["cpu_s"]
    lines += ["", "| CPU s | train | explore | select | label | evaluate |", "|---|---|---|---|---|---|",
              f"| iteration {k} | {c['train']:.1f} | {c['explore']:.1f} | {c['select']:.1f} | {c['label']:.1f} | {c['evaluate']:.1f} |"]
    lines += [""] + [f"![{n}]({f})" for n, f in rep["plots"].items()]
    atomic_write_text(idir / "report.md", "\n".join(lines) + "\n")
    log(f"iteration {k}: report {idir / 'report.md'}")
    return rep


def log_wandb(workdir: Path, cfg: Dict[str, Any], recs: Dict[str, Any]) -> None:
    """Log the iteration's figures to one W&B run per work directory (its id kept in ``wandb_id``, so a
    resumed loop continues the same run); ``WANDB_MODE`` (e.g. offline) is honoured."""
    import wandb

    id_file = Path(workdir) / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    if not id_file.is_file():
        atomic_write_text(id_file, run_id + "\n")
    w = cfg["wandb"]
    run = wandb.init(project=w["project"], name=w.get("name"), id=run_id, resume="allow", dir=str(workdir),
                     config={k: v for k, v in cfg.items() if k != "wandb"}, reinit=True)
    rep = json.loads((Path(workdir) / f"iter_{recs['iteration']}" / "report.json").read_text())
    metrics = {"al/iteration": rep["iteration"], "al/train_frames": rep["train_frames"]}
    for name, r in rep["held_out"].items():
        metrics[f"al/{name}/forces_mae"] = r["model"]["forces_mae"]
        metrics[f"al/{name}/forces_rmse"] = r["model"]["forces_rmse"]
    for step, v in rep["cpu_s"].items():
        metrics[f"al/cpu_s/{step}"] = v
    for key in ("selected", "labelled", "label_failed", "trust_lo"):
        if rep.get(key) is not None:
            metrics[f"al/{key}"] = rep[key]
    run.log(metrics, step=rep["iteration"])
    run.finish()
