"""The active-learning loop (issue 14): train → evaluate → explore → select → label → append, resumable.

Work directory::

    DIR/config.json                 resolved configuration; a resumed run must match it
    DIR/labelled.extxyz             every labelled frame (initial ones: al_iteration -1), rewritten atomically
    DIR/iter_<k>/train.extxyz       the training set of iteration k (initial + labels of iterations < k)
    DIR/iter_<k>/train/member_<m>/  one training run per model (committee: K), ``done.json`` when finished
    DIR/iter_<k>/explore/run_<j>/   one MD run per (start, temperature), ``done.json`` when finished
    DIR/iter_<k>/selected.extxyz    the frames chosen for labelling
    DIR/iter_<k>/label/             one file per labelled frame (``.failed.json`` for skipped ones)
    DIR/iter_<k>/<step>.done.json   completion record of each step (outputs, CPU seconds, wall seconds)
    DIR/iter_<k>/report.{md,json}   + plots

A step runs only if its ``.done.json`` is missing; every output is written through a temporary file and
``os.replace`` before the record, so a run killed at any point continues where it stopped with neither
lost nor duplicated labels, and never retrains a finished model. CPU time per step is the loop's own
process time plus its training subprocesses' (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .config import ALConfigError, run_fingerprint
from .label import atomic_write_frames, failures, label_frames, load_labeller
from .report import write_report
from .select import band_counts, frame_scores, select_frames
from .steps import evaluate, explore, open_explorer, read_json, train_models, write_json
from .trainers import find_trainer


def _read(path, what: str) -> List:
    import ase.io

    try:
        frames = ase.io.read(path, ":")
    except Exception as err:  # noqa: BLE001 - ASE raises many types
        raise ALConfigError(f"{what} {path}: cannot read ({err})") from err
    if not frames:
        raise ALConfigError(f"{what} {path} holds no frames")
    return frames


def _check_labels(frames, path, cfg) -> None:
    ek, fk = cfg["data"]["energy_key"], cfg["data"]["forces_key"]
    for i, a in enumerate(frames):
        if ek not in a.info or fk not in a.arrays:
            raise ALConfigError(f"{path} frame {i} lacks info[{ek!r}] or arrays[{fk!r}] "
                                "(set data.energy_key / data.forces_key)")
        if not (np.isfinite(a.info[ek]) and np.isfinite(a.arrays[fk]).all()):
            raise ALConfigError(f"{path} frame {i}: non-finite energy or forces")


class ActiveLearningLoop:
    """Runs ``cfg`` (from :func:`~.config.load_config`) in ``workdir``; :meth:`run` does all iterations."""

    def __init__(self, cfg: Dict[str, Any], workdir, log: Callable[[str], None] = print):
        self.cfg, self.dir, self.log = cfg, Path(workdir).resolve(), log
        self.trainer = find_trainer(cfg["framework"])
        committee = cfg["selector"] == "committee"
        self.trainer.check(cfg["committee"]["config"] if committee else cfg["train"]["config"], committee)
        self.make_labeller = load_labeller(cfg["label"]["calculator"], cfg["label"]["kwargs"])
        self.initial = _read(cfg["data"]["initial"], "data.initial")
        _check_labels(self.initial, cfg["data"]["initial"], cfg)
        self.valid = _read(cfg["data"]["valid"], "data.valid")
        self.held_out = {k: _read(v, f"data.held_out.{k}") for k, v in cfg["data"]["held_out"].items()}
        for k, frames in self.held_out.items():
            _check_labels(frames, cfg["data"]["held_out"][k], cfg)
        self.starts = _read(cfg["explore"]["structures"], "explore.structures")
        self._claim_workdir()

    # -- work directory -----------------------------------------------------------------------------------
    def _claim_workdir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stored = self.dir / "config.json"
        mine = json.loads(json.dumps(run_fingerprint(self.cfg), default=float))
        if stored.is_file():
            theirs = read_json(stored)
            # work directories started before select.order / select.stratify existed ranked the whole pool at once
            for key, before in (("order", "uncertainty"), ("stratify", "none")):
                theirs.get("select", {}).setdefault(key, before)
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise ALConfigError(f"--workdir {self.dir} was started with a different configuration (keys {diff} "
                                    "differ); resume with the same config or use a new --workdir")
        else:
            write_json(stored, mine)
        if not (self.dir / "labelled.extxyz").is_file():
            self._rebuild_labelled(-1)

    def _labelled_frames(self, upto: int) -> List:
        """Initial frames plus the labels of iterations 0..upto."""
        import ase.io

        frames = []
        for a in self.initial:
            b = a.copy()
            b.info.update(al_iteration=-1, al_selector="initial")
            frames.append(b)
        for k in range(upto + 1):
            path = self.dir / f"iter_{k}" / "labelled.extxyz"
            if path.is_file() and path.stat().st_size:
                frames.extend(ase.io.read(path, ":"))
        return frames

    def _rebuild_labelled(self, upto: int) -> None:
        atomic_write_frames(self.dir / "labelled.extxyz", self._labelled_frames(upto))

    # -- one step -------------------------------------------------------------------------------------------
    def _step(self, k: int, name: str, fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        done = self.dir / f"iter_{k}" / f"{name}.done.json"
        if done.is_file():
            return read_json(done)
        self._ran = True
        import resource

        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0, t0 = time.process_time(), time.time()
        rec = fn()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        rec.update(cpu_s=time.process_time() - cpu0 + children, wall_s=time.time() - t0)
        write_json(done, rec)
        return rec

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self, iterations: Optional[int] = None) -> Dict[str, Any]:
        n = self.cfg["iterations"] if iterations is None else iterations
        previous: List[str] = []
        summary = []
        for k in range(n + 1 if self.cfg["final_train"] else n):
            rec = self.iteration(k, last=(k == n), previous=previous)
            previous = rec["train"]["models"]
            summary.append(rec)
        self.log(f"active learning finished: {n} label iterations, {len(self._labelled_frames(n - 1))} labelled frames "
                 f"in {self.dir / 'labelled.extxyz'}")
        return {"iterations": summary}

    def iteration(self, k: int, last: bool, previous: List[str]) -> Dict[str, Any]:
        cfg, idir = self.cfg, self.dir / f"iter_{k}"
        idir.mkdir(parents=True, exist_ok=True)
        recs: Dict[str, Any] = {"iteration": k}
        self._ran = False

        def train():
            train_file = idir / "train.extxyz"
            frames = self._labelled_frames(k - 1)
            prev_frames = len(self._labelled_frames(k - 2)) if k > 0 else -1
            if k > 0 and len(frames) == prev_frames and previous:  # nothing new was labelled: keep the models
                self.log(f"iteration {k}: no new labels; reusing the models of iteration {k - 1}")
                return {"models": list(previous), "train_frames": len(frames), "reused": True}
            atomic_write_frames(train_file, frames)
            out = train_models(self.trainer, cfg, k, train_file, idir / "train", previous, self.log)
            return {**out, "train_frames": len(frames)}

        recs["train"] = self._step(k, "train", train)
        models = recs["train"]["models"]
        recs["evaluate"] = self._step(k, "evaluate", lambda: {"held_out": evaluate(self.trainer, models, self.held_out, cfg)})
        if not last:
            opened: Dict[str, Any] = {}

            def calc():  # opened only if a step that needs it runs
                if "calc" not in opened:
                    opened["calc"] = open_explorer(self.trainer, models, cfg["device"])
                return opened["calc"]

            recs["bands"] = self._step(k, "bands", lambda: self._bands(calc()))
            lo, hi = recs["bands"]["trust_lo"], recs["bands"]["trust_hi"]
            recs["explore"] = self._step(k, "explore", lambda: {"runs": explore(
                calc(), cfg, k, self.starts, lo, hi, idir / "explore", self.log, self._variance_fn(calc()))})
            recs["select"] = self._step(k, "select", lambda: self._select(k, idir, recs["explore"]["runs"], lo, hi))
            recs["label"] = self._step(k, "label", lambda: self._label(k, idir))
            recs["append"] = self._step(k, "append", lambda: self._append(k))
        if self._ran or not (idir / "report.json").is_file():  # a resumed, finished iteration is not re-reported
            write_report(idir, recs, cfg, self.log)
            if cfg.get("wandb"):
                from .report import log_wandb

                log_wandb(self.dir, cfg, recs)
        return recs

    def _variance_fn(self, calc):
        if self.cfg["explore"]["udd"] is None:
            return None
        from e2ip_plugins.md.registry import variance_function_for

        return variance_function_for(calc)

    def _bands(self, calc) -> Dict[str, Any]:
        """Trust band edges in eV/Å: numbers as given, or ``{quantile: q}`` of max u over the validation set."""
        s = self.cfg["select"]
        val_max_u = []
        for atoms in self.valid:
            a = atoms.copy()
            a.calc = calc
            a.get_forces()
            val_max_u.append(float(np.max(calc.results["forces_uncertainty"])))
        lo = s["trust_lo"] if isinstance(s["trust_lo"], float) else float(np.quantile(val_max_u, s["trust_lo"]["quantile"]))
        hi = s["trust_hi"] if isinstance(s["trust_hi"], float) else lo * s["trust_hi"]["factor"]
        if not lo < hi:
            raise ALConfigError(f"trust_lo ({lo:.4g} eV/A from {s['trust_lo']}) is not below trust_hi ({hi:.4g}); "
                                "raise select.trust_hi")
        return {"trust_lo": lo, "trust_hi": hi if math.isfinite(hi) else math.inf,
                "val_max_u_median": float(np.median(val_max_u))}

    def _pool(self, runs) -> List:
        import ase.io

        frames = []
        for r in runs:
            path = Path(r["dir"]) / "trajectory.extxyz"
            if not path.is_file() or not path.stat().st_size:
                continue
            for a in ase.io.read(path, ":"):
                if int(a.info.get("md_step", 0)) == 0:
                    continue  # the start structure itself
                a.info.update(al_run=r["run"], al_start=r["start"], temperature=r["temperature"])
                frames.append(a)
        return frames

    def _select(self, k: int, idir: Path, runs, lo: float, hi: float) -> Dict[str, Any]:
        s, cfg = self.cfg["select"], self.cfg
        pool = self._pool(runs)
        scores = frame_scores(pool) if pool else np.zeros(0)
        rnd = cfg["seed"] * 7919 + k if cfg["selector"] == "random" else None
        chosen = select_frames(pool, scores, s["budget"], s["min_distance"], lo, hi, random_seed=rnd,
                               band_order=s["order"], band_seed=cfg["seed"] * 7919 + k,
                               reference=self._labelled_frames(k - 1) if s["order"] == "diverse" else (),
                               groups=None if s["stratify"] == "none" else
                               [a.info["al_" + s["stratify"]] for a in pool])
        frames = []
        for i in chosen:
            a = pool[i].copy()
            a.info.update(al_iteration=k, al_selector=cfg["selector"], al_score=float(scores[i]))
            frames.append(a)
        atomic_write_frames(idir / "selected.extxyz", frames)
        if not chosen:
            self.log(f"iteration {k}: no candidate structures (pool {len(pool)} frames, band [{lo:.4g}, {hi:.4g}) eV/A); "
                     "nothing to label this iteration")
        else:
            self.log(f"iteration {k}: selected {len(chosen)} of {len(pool)} explored frames ({cfg['selector']})")
        taken = set(chosen)
        rejected = [float(scores[i]) for i in range(len(pool)) if i not in taken]
        return {"pool": len(pool), "selected": len(chosen), "bands": band_counts(scores, lo, hi),
                "selected_scores": [float(scores[i]) for i in chosen], "rejected_scores": rejected}

    def _label(self, k: int, idir: Path) -> Dict[str, Any]:
        import ase.io

        sel_path = idir / "selected.extxyz"
        selected = ase.io.read(sel_path, ":") if sel_path.stat().st_size else []
        keep = ("al_iteration", "al_selector", "al_score", "al_run", "al_start", "temperature", "md_step")
        info = [{key: a.info[key] for key in keep if key in a.info} for a in selected]
        done = label_frames(selected, idir / "label", self.make_labeller, self.cfg["data"]["energy_key"],
                            self.cfg["data"]["forces_key"], info, log=self.log)
        atomic_write_frames(idir / "labelled.extxyz", done)
        failed = failures(idir / "label")
        return {"labelled": len(done), "failed": len(failed), "failures": failed}

    def _append(self, k: int) -> Dict[str, Any]:
        self._rebuild_labelled(k)
        return {"labelled_total": len(self._labelled_frames(k))}
