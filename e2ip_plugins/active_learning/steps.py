"""The steps of one active-learning iteration: train, evaluate, explore (select and label are in
:mod:`.select` / :mod:`.label`). Each returns what the loop records in the step's completion file.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from .label import atomic_write_text
from .select import CommitteeCalculator
from .trainers import run_logged


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v)) + "\n")


# ---------------------------------------------------------------------------------------------- train
def train_models(trainer, cfg: Dict[str, Any], iteration: int, train_file: Path, out_dir: Path,
                 previous: Sequence[str], log: Callable[[str], None]) -> Dict[str, Any]:
    """Train the iteration's model(s): one for selectors e2ip/random, ``committee.size`` for committee
    (member k: seed + k). Finished members (``member_k/done.json``) are not retrained on resume."""
    committee = cfg["selector"] == "committee"
    size = cfg["committee"]["size"] if committee else 1
    config = cfg["committee"]["config"] if committee else cfg["train"]["config"]
    args = cfg["committee"]["args"] if committee else cfg["train"]["args"]
    finetune = cfg["train"]["mode"] == "finetune" and iteration > 0
    models = []
    for k in range(size):
        run_dir = out_dir / f"member_{k}"
        done = run_dir / "done.json"
        if done.is_file():
            rec = read_json(done)
            models.append(rec["model"])
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted training: start it again from scratch
        run_dir.mkdir(parents=True)
        init = previous[k] if finetune else None
        cmd = trainer.command(config, train_file, cfg["data"]["valid"], run_dir, cfg["seed"] + k, args, init, committee)
        log(f"iteration {iteration}: training model {k + 1}/{size} ({trainer.name}) in {run_dir}")
        t0 = time.time()
        used = run_logged(cmd, run_dir / "train.log")
        model = str(trainer.model_file(run_dir))
        write_json(done, {"model": model, "cpu_s": used, "wall_s": time.time() - t0})
        models.append(model)
    return {"models": models}


def open_explorer(trainer, models: Sequence[str], device: str):
    """The calculator that drives MD and scores frames: the model itself, or the committee of the members."""
    if len(models) == 1:
        return trainer.open(models[0], device=device)
    return CommitteeCalculator([trainer.open(m, device=device, plain=True) for m in models])


# ------------------------------------------------------------------------------------------- evaluate
def _errors(pred_f, pred_e, frames, energy_key: str, forces_key: str) -> Dict[str, float]:
    d = np.concatenate([(f - np.asarray(a.arrays[forces_key])).reshape(-1) for f, a in zip(pred_f, frames)])
    out = {"forces_mae": float(np.abs(d).mean()), "forces_rmse": float(np.sqrt(np.mean(d ** 2))), "frames": len(frames)}
    de = [(e - float(a.info[energy_key])) / len(a) for e, a in zip(pred_e, frames) if energy_key in a.info]
    if de:
        out["energy_mae_per_atom"] = float(np.abs(de).mean())
    return out


def force_errors(calcs: Sequence, frames: Sequence, energy_key: str, forces_key: str) -> Dict[str, Dict[str, float]]:
    """Force MAE / RMSE (eV/Å, over components) and energy MAE per atom (eV/atom) on ``frames`` of the first
    calculator (``model``) and, for several, of the mean of all (``committee_mean``); each member runs once."""
    forces = np.zeros((len(calcs), len(frames)), dtype=object)
    energies = np.zeros((len(calcs), len(frames)))
    for m, calc in enumerate(calcs):
        for j, atoms in enumerate(frames):
            a = atoms.copy()
            a.calc = calc
            forces[m, j] = np.asarray(a.get_forces(), dtype=np.float64)
            energies[m, j] = a.get_potential_energy()
    out = {"model": _errors(list(forces[0]), energies[0], frames, energy_key, forces_key)}
    if len(calcs) > 1:
        mean_f = [np.mean(np.stack(list(forces[:, j])), axis=0) for j in range(len(frames))]
        out["committee_mean"] = _errors(mean_f, energies.mean(0), frames, energy_key, forces_key)
    return out


def evaluate(trainer, models: Sequence[str], held_out: Dict[str, Sequence], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Held-out errors after training: the single model (``model``) — for a committee member 0, the single
    model a user would deploy — and, for committees, the committee mean (``committee_mean``)."""
    ek, fk = cfg["data"]["energy_key"], cfg["data"]["forces_key"]
    calcs = [trainer.open(m, device=cfg["device"], plain=len(models) > 1) for m in models]
    return {name: force_errors(calcs, frames, ek, fk) for name, frames in held_out.items()}


# -------------------------------------------------------------------------------------------- explore
def explore(calc, cfg: Dict[str, Any], iteration: int, starts: Sequence, trust_lo: float, trust_hi: float, out_dir: Path,
            log: Callable[[str], None], variance_fn=None) -> List[Dict[str, Any]]:
    """Langevin MD (``e2ip_plugins.md``) from every start structure at every temperature, observed by the
    trust-band monitor every ``interval`` steps (every observed frame is kept in the trajectory with its
    band; the run stops at ``trust_hi``). Run j writes ``out_dir/run_<j>/`` and ``done.json``; finished
    runs are kept on resume, an interrupted one is rerun from its seed."""
    from e2ip_plugins.md.cli import langevin
    from e2ip_plugins.md.monitor import TrustBandExceeded, UncertaintyMonitor
    from e2ip_plugins.md.udd import UDDCalculator

    e = cfg["explore"]
    runs = []
    j = 0
    for s, start in enumerate(starts):
        for temperature in e["temperatures"]:
            run_dir = out_dir / f"run_{j}"
            done = run_dir / "done.json"
            if done.is_file():
                runs.append(read_json(done))
                j += 1
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            atoms = start.copy()
            atoms.info = {"al_start": s, "temperature": float(temperature)}
            driver = calc
            if e["udd"] is not None:
                driver = UDDCalculator(calc, float(e["udd"]["A"]), float(e["udd"]["B"]), variance_fn=variance_fn)
            seed = cfg["seed"] * 1_000_003 + iteration * 1000 + j
            dyn = langevin(atoms, driver, temperature, e["timestep"], e["friction"], seed)
            mon = UncertaintyMonitor(atoms, trust_lo, trust_hi,
                                     trajectory_path=run_dir / "trajectory.extxyz", summary_path=run_dir / "summary.json")
            mon.attach(dyn, interval=e["interval"])
            status = "completed"
            try:
                dyn.run(e["steps"])
                mon.finish()
            except TrustBandExceeded as stop:
                status = "stopped"
                log(f"iteration {iteration}: MD run {j} (start {s}, {temperature:g} K) stopped: {stop}")
            rec = {"run": j, "start": s, "temperature": float(temperature), "status": status, "seed": seed,
                   "observations": mon.summary["observations"], "dir": str(run_dir)}
            write_json(done, rec)
            runs.append(rec)
            j += 1
    return runs
