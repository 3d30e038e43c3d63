"""Evaluation of ``benchmarks.run``: every method's predictions on val, test and the OOD sets through the ASE
calculators, metrics before and after the val-fitted recalibration (:func:`evaluate_tag`), prediction files
and plots, and the inference cost: interleaved timing and one memory probe process per method
(:func:`inference_cost`, :mod:`benchmarks.common.memprobe`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import REPO
from .runtime import log, thread_env
from .training import method_runs


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

    return dataclasses.replace(pred, cov_epistemic=isotropic_covariance(pred.cov_epistemic))


def isotropic_covariance(cov):
    """(N, 3, 3) → (tr C_i / 3)·I per atom: the variance of :func:`isotropic`, for a bare covariance tensor."""
    import torch

    var = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)
    return var[:, None, None] * torch.eye(3, dtype=var.dtype, device=var.device)


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
            cmd = [sys.executable, "-m", "benchmarks.common.memprobe", "--backbone", backend.name, "--method", m,
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
                                "see benchmarks/common/memprobe.py")
    return out
