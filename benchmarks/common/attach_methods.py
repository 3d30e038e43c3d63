"""The methods of ``benchmarks.attach`` beyond ``benchmarks.run``'s: the frozen-attach e²IP run on a trained
plain model (the public commands: ``mace_attach_e2ip``, ``nequip-train -cn attach_e2ip``), the post hoc
LLPR on the same plain model (:mod:`e2ip_plugins.llpr`), and the check that attaching leaves energies and
forces unchanged."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .backends import _bin

ATTACH_EPOCHS = {"mace": 20, "nequip": 3}  # head-fit epochs (cached features on MACE; full passes on NequIP)


def attach_cmd(backend, plain_artifact: Path, run_dir: Path, name: str, seed: int, files: Dict[str, str],
               data: Dict[str, Any]) -> List[str]:
    """The user's command that attaches the e²IP head to ``plain_artifact`` (backbone frozen)."""
    s = backend.s
    epochs = ATTACH_EPOCHS[backend.name]
    if backend.name == "mace":
        return [_bin("mace_attach_e2ip"), "--model", str(plain_artifact), "--train_file", files["train"],
                "--valid_file", files["val"], "--energy_key", data["energy_key"], "--forces_key", data["forces_key"],
                "--max_num_epochs", str(epochs), "--batch_size", str(s["batch_size"]), "--seed", str(seed),
                "--name", name, "--model_dir", str(run_dir), "--device", s["device"]]
    symbols = ",".join(data["elements"])
    return [_bin("nequip-train"), "-cp", "configs/nequip", "-cn", "attach_e2ip", f"hydra.run.dir={run_dir}",
            "backbone_package=null", f"backbone_checkpoint={plain_artifact}", f"train_file={files['train']}",
            f"val_file={files['val']}", f"test_file={files['test']}", "run=[train]", f"max_epochs={epochs}",
            f"seed={seed}", f"model_type_names=[{symbols}]", f"cutoff_radius={s['r_max']}", f"batch_size={s['batch_size']}",
            "trainer.accelerator=cpu",
            # per-epoch timing, as benchmarks.run's NequIP runs: Lightning's SimpleProfiler
            "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
            f"+trainer.profiler.dirpath={run_dir}", "+trainer.profiler.filename=profile"]


def attach_artifact(backend, run_dir: Path, name: str) -> Path:
    return run_dir / (f"{name}.model" if backend.name == "mace" else "best.ckpt")


def _mace_plain(path: str):
    import torch

    model = torch.load(path, map_location="cpu", weights_only=False).eval()
    torch.set_default_dtype(next(model.parameters()).dtype)  # MACE's AtomicData uses the default dtype
    return model


def jacobians(backend, plain_artifact: str, files: Dict[str, str], sets: Dict[str, list], data) -> Dict[str, Any]:
    """{set: G (N, P, 3)} of the plain model on ``train`` and every evaluated set; and seconds per set."""
    from .llpr_features import mace_jacobians, nequip_jacobians

    out, secs = {}, {}
    if backend.name == "mace":
        from mace_ext.fit_novelty import _loader

        model = _mace_plain(plain_artifact)
        for name in ["train", *sets]:
            t0 = time.process_time()
            out[name] = mace_jacobians(model, _loader(files[name], model, 1, data["forces_key"], data["energy_key"]))
            secs[name] = time.process_time() - t0
    else:
        import ase.io

        calc = backend.load("plain", [plain_artifact], "cpu").calcs[0]
        for name in ["train", *sets]:
            frames = sets[name] if name in sets else ase.io.read(files[name], ":")
            t0 = time.process_time()
            out[name] = nequip_jacobians(calc, frames)
            secs[name] = time.process_time() - t0
    return {"G": out, "cpu_s": secs}


def llpr_predictions(jac: Dict[str, Any], plain_preds: Dict[str, Any]):
    """Fit the LLPR (A on train, ς² and α² on val) and return ({set: (y, mean, predictive)}, fit info)."""
    from e2ip_plugins.llpr import LLPR

    g = jac["G"]
    y_val, mean_val, _ = plain_preds["val"]
    llpr = LLPR(g["train"]).fit(g["val"], mean_val, y_val)
    preds = {}
    for name, (y, mean, _) in plain_preds.items():
        pred = llpr.predictive(g[name], mean)
        preds[name] = (y, pred.mean, pred)
    info = {"reg": llpr.reg, "alpha2": llpr.alpha2, "val_nll": llpr.val_nll,
            "fit_cpu_s": jac["cpu_s"]["train"] + jac["cpu_s"]["val"], "features": int(g["train"].shape[1])}
    return preds, info


def unchanged(backend, plain_artifact: str, attach_artifact_path: str, frames: list) -> Dict[str, Any]:
    """max |ΔE| (eV) and max |ΔF| (eV/Å) between the plain model and the attached one over ``frames``, eager:
    MACE in float64 (both calculators with ``default_dtype="float64"``), NequIP in the models' own dtype."""
    de, df = 0.0, 0.0
    if backend.name == "mace":
        from mace.calculators import MACECalculator
        from mace_ext import E2IPMACECalculator

        plain = MACECalculator(model_paths=plain_artifact, device="cpu", default_dtype="float64")
        att = E2IPMACECalculator(model_paths=attach_artifact_path, device="cpu", default_dtype="float64")
        dtype = "float64"
    else:
        plain = backend.load("plain", [plain_artifact], "cpu").calcs[0]
        att = backend.load("e2ip", [attach_artifact_path], "cpu").calcs[0]
        dtype = str(next(plain.model.parameters()).dtype).replace("torch.", "")
    for at in frames:
        a, b = at.copy(), at.copy()
        a.calc, b.calc = plain, att
        de = max(de, abs(a.get_potential_energy() - b.get_potential_energy()))
        df = max(df, float(np.abs(a.get_forces() - b.get_forces()).max()))
    return {"max_abs_dE": de, "max_abs_dF": df, "frames": len(frames), "dtype": dtype}
