"""Uncertainty monitor for ASE dynamics: per-frame arrays, DP-GEN-style trust bands, early stop.

Per observed frame (``dyn.attach(monitor, interval=k)``: every k steps, and at step 0) the monitor
reads from ``atoms.calc.results``

    u_i  = sqrt(tr U_epi,i / 3)     (``forces_uncertainty``, (N,), eV/Å; DESIGN §2.5)
    U_i  = U_tot,i                   (``forces_covariance``, (N, 3, 3), (eV/Å)²)

and classifies the structure by its max-u statistic

    absolute:  m = max_i u_i                                 (eV/Å)
    relative:  m = max_i u_i / (‖F_i‖ + ε)                  (dimensionless; MACE's
               ``mace_active_learning_md`` uses sqrt(Σ_a var F_ia)/(‖F_i‖ + 0.2), i.e. √3·u_i in our terms)

into trust bands (DP-GEN's ``model_devi_f_trust_lo/hi``)::

    m <  trust_lo               accurate   (kept in the trajectory only)
    trust_lo <= m < trust_hi    candidate  (also appended to the candidates file, for labelling)
    m >= trust_hi               stop       (files flushed, summary written, TrustBandExceeded raised)

The band statistic is computed from u and F rounded to 8 decimals (:func:`as_stored`), exactly the numbers
the extxyz files hold, so the bands can be recomputed from the files bit for bit.

ASE writes only the standard calculator keys to extxyz, so the monitor copies the uncertainty into the
atoms themselves before writing: ``arrays['forces_uncertainty']`` (N,), ``arrays['forces_covariance']``
(N, 9) row-major (``forces_covariance_epistemic`` too when the calculator gives it), and
``info['forces_uncertainty_max' | '_mean']``, ``info['trust_band']``, ``info['md_step']``; with ``relative``
also ``arrays['forces_uncertainty_relative']`` and ``info['forces_uncertainty_relative_max']``. ASE writes
per-atom columns with 8 decimals, info floats at full precision.

Frames are written with the *model's* energy and forces: a calculator that biases the dynamics
(:class:`~e2ip_plugins.md.udd.UDDCalculator`) reports them as ``model_energy`` / ``model_forces``, which the
monitor prefers over ``energy`` / ``forces`` (the bias parts go to ``arrays['udd_bias_forces']``,
``info['udd_bias_energy']``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .registry import MDConfigError

ACCURATE, CANDIDATE, STOP = "accurate", "candidate", "stop"
BANDS = (ACCURATE, CANDIDATE, STOP)
#: MACE's ``reg`` in ``mace_active_learning_md.stop_error`` (eV/Å)
DEFAULT_EPS = 0.2


class TrustBandExceeded(RuntimeError):
    """Raised by :class:`UncertaintyMonitor` when the structure's max u reaches ``trust_hi``.

    The files written so far are flushed and the summary is written before it is raised.
    Attributes: ``step``, ``atoms`` (indices with u ≥ trust_hi), ``values`` (their u), ``summary``.
    """

    def __init__(self, message: str, step: int, atoms: List[int], values: List[float], summary: Dict[str, Any]):
        super().__init__(message)
        self.step, self.atoms, self.values, self.summary = step, atoms, values, summary


def check_bands(trust_lo: float, trust_hi: float) -> None:
    """:class:`MDConfigError` unless 0 ≤ trust_lo < trust_hi (both finite or trust_hi = inf)."""
    if not (math.isfinite(trust_lo) and trust_lo >= 0):
        raise MDConfigError(f"trust_lo must be a finite number >= 0, got {trust_lo}")
    if math.isnan(trust_hi) or not trust_lo < trust_hi:
        raise MDConfigError(f"trust_lo must be below trust_hi, got trust_lo={trust_lo} >= trust_hi={trust_hi}")


def as_stored(x: np.ndarray) -> np.ndarray:
    """``x`` rounded as ASE's extxyz writer stores per-atom columns (``%16.8f``), read back as float."""
    x = np.asarray(x, dtype=np.float64)
    return np.array([float(f"{v:.8f}") for v in x.reshape(-1)], dtype=np.float64).reshape(x.shape)


def band_of(value: float, trust_lo: float, trust_hi: float) -> str:
    """Trust band of a structure's max-u statistic (see module docstring); NaN/inf stop the run."""
    if not math.isfinite(value) or value >= trust_hi:
        return STOP
    if value >= trust_lo:
        return CANDIDATE
    return ACCURATE


def max_u_statistic(u: np.ndarray, forces: Optional[np.ndarray] = None, relative: bool = False,
                    eps: float = DEFAULT_EPS) -> np.ndarray:
    """Per-atom values the bands compare: u_i, or u_i / (‖F_i‖ + ε) with ``relative``."""
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    if not relative:
        return u
    norm = np.linalg.norm(np.asarray(forces, dtype=np.float64).reshape(-1, 3), axis=1)
    return u / (norm + eps)


class UncertaintyMonitor:
    """ASE dynamics observer applying trust bands to the force uncertainty (module docstring).

    Args:
        atoms: the atoms the dynamics propagates (``atoms.calc`` must fill ``forces_uncertainty`` and
            ``forces_covariance``).
        trust_lo, trust_hi: band edges on max u (eV/Å), or on max u/(‖F‖+ε) with ``relative``.
        relative: use MACE's relative form; ``eps`` its regulariser (eV/Å).
        trajectory_path: extxyz receiving every observed frame (truncated at construction).
        candidates_path: extxyz receiving candidate frames (truncated at construction).
        summary_path: JSON summary, written on stop and by :meth:`finish`.
        dyn: the dynamics object, for the step number (``dyn.nsteps``); :meth:`attach` sets it. Without it
            the step is counted as ``calls × interval``.
        interval: observation interval when ``dyn`` is not given.
    """

    def __init__(self, atoms, trust_lo: float, trust_hi: float, relative: bool = False, eps: float = DEFAULT_EPS,
                 candidates_path: Optional[Union[str, Path]] = None, trajectory_path: Optional[Union[str, Path]] = None,
                 summary_path: Optional[Union[str, Path]] = None, dyn=None, interval: int = 1):
        trust_lo, trust_hi = float(trust_lo), float(trust_hi)
        check_bands(trust_lo, trust_hi)
        if relative and not eps > 0:
            raise MDConfigError(f"eps must be > 0 for relative trust bands, got {eps}")
        self.atoms = atoms
        self.trust_lo, self.trust_hi = trust_lo, trust_hi
        self.relative, self.eps = bool(relative), float(eps)
        self.dyn, self.interval = dyn, int(interval)
        self.trajectory_path = Path(trajectory_path) if trajectory_path else None
        self.candidates_path = Path(candidates_path) if candidates_path else None
        self.summary_path = Path(summary_path) if summary_path else None
        for p in (self.trajectory_path, self.candidates_path):
            if p is not None:
                p.write_text("")  # a fresh file: a run's outputs never mix with an earlier run's
        self._calls = 0
        self._sum_max_u = 0.0
        self.history: List[Dict[str, Any]] = []  # step, band, max_u, mean_u, statistic per observed frame
        self.summary: Dict[str, Any] = {
            "status": "running", "stopped": False, "completed": False,
            "trust_lo": trust_lo, "trust_hi": trust_hi if math.isfinite(trust_hi) else None,  # None: no stop band
            "relative": self.relative,
            "eps": self.eps if self.relative else None,
            "observations": 0, "steps": 0, "counts": {b: 0 for b in BANDS},
            "first_candidate_step": None, "stop_step": None, "stop_atoms": None, "stop_values": None,
            "max_u_max": None, "mean_max_u": None,
        }

    def attach(self, dyn, interval: int = 1) -> "UncertaintyMonitor":
        """``dyn.attach(self, interval=interval)`` and remember ``dyn`` for the step numbers."""
        self.dyn, self.interval = dyn, int(interval)
        dyn.attach(self, interval=interval)
        return self

    # -- one observation -------------------------------------------------------------------------------
    def _step(self) -> int:
        if self.dyn is not None:
            return int(self.dyn.nsteps)
        return (self._calls - 1) * self.interval

    def __call__(self) -> str:
        """Observe the current frame; returns its band (raises :class:`TrustBandExceeded` at ``stop``)."""
        self._calls += 1
        atoms, calc = self.atoms, self.atoms.calc
        if calc is None:
            raise MDConfigError("the monitored atoms have no calculator")
        res = calc.results
        missing = [k for k in ("forces_uncertainty", "forces_covariance") if k not in res]
        if missing:
            raise MDConfigError(
                f"{type(calc).__name__} did not return {missing} (needs an e2ip model with covariance outputs)"
            )
        n = len(atoms)
        # bands are decided on the numbers as the extxyz files store them (8 decimals), so that they can be
        # recomputed exactly from the files; 1e-8 eV/Å is far below any meaningful uncertainty
        u = as_stored(np.asarray(res["forces_uncertainty"], dtype=np.float64).reshape(n))
        forces = as_stored(np.asarray(res.get("model_forces", res.get("forces")), dtype=np.float64).reshape(n, 3))
        energy = res.get("model_energy", res.get("energy"))
        u_max, u_mean = float(u.max()), float(u.mean())  # = the calculator's forces_uncertainty_max/_mean to 1e-8
        stat = max_u_statistic(u, forces, self.relative, self.eps)
        value = float(np.max(stat)) if np.isfinite(stat).all() else math.nan
        band = band_of(value, self.trust_lo, self.trust_hi)
        step = self._step()

        atoms.arrays["forces_uncertainty"] = u.copy()
        atoms.arrays["forces_covariance"] = np.asarray(res["forces_covariance"], dtype=np.float64).reshape(n, 9).copy()
        if "forces_covariance_epistemic" in res:
            atoms.arrays["forces_covariance_epistemic"] = np.asarray(
                res["forces_covariance_epistemic"], dtype=np.float64).reshape(n, 9).copy()
        if "udd_bias_forces" in res:
            atoms.arrays["udd_bias_forces"] = np.asarray(res["udd_bias_forces"], dtype=np.float64).reshape(n, 3).copy()
            atoms.info["udd_bias_energy"] = float(res["udd_bias_energy"])
            atoms.info["udd_sigma2"] = float(res["udd_sigma2"])
        atoms.info.update(forces_uncertainty_max=u_max, forces_uncertainty_mean=u_mean, trust_band=band, md_step=step)
        if self.relative:
            atoms.arrays["forces_uncertainty_relative"] = stat.copy()
            atoms.info["forces_uncertainty_relative_max"] = value

        s = self.summary
        s["observations"] += 1
        s["steps"] = step
        s["counts"][band] += 1
        s["max_u_max"] = u_max if s["max_u_max"] is None else max(s["max_u_max"], u_max)
        self.history.append({"step": step, "band": band, "max_u": u_max, "mean_u": u_mean, "statistic": value})
        self._sum_max_u += u_max
        s["mean_max_u"] = self._sum_max_u / s["observations"]
        self.last = {"step": step, "band": band, "max_u": u_max, "statistic": value}

        frame = self._frame(energy, forces)
        self._append(self.trajectory_path, frame)
        if band == CANDIDATE:
            if s["first_candidate_step"] is None:
                s["first_candidate_step"] = step
            self._append(self.candidates_path, frame)
        if band == STOP:
            idx = np.flatnonzero(~(stat < self.trust_hi) | ~np.isfinite(stat))
            s.update(status="stopped", stopped=True, stop_step=step, stop_atoms=idx.tolist(),
                     stop_values=[float(u[i]) for i in idx])
            self.write_summary()
            what = "u/(|F|+eps)" if self.relative else "u"
            if self.relative:
                listing = ", ".join(f"{i} ({what} = {stat[i]:.4g}, u = {u[i]:.4g} eV/A)" for i in idx)
            else:
                listing = ", ".join(f"{i} (u = {u[i]:.4g} eV/A)" for i in idx)
            raise TrustBandExceeded(
                f"step {step}: max {what} = {value:.4g} >= trust_hi = {self.trust_hi:.4g}; atoms {listing}. "
                f"Run stopped; {s['counts'][CANDIDATE]} candidate frames kept.",
                step, idx.tolist(), [float(u[i]) for i in idx], dict(s),
            )
        return band

    def _frame(self, energy, forces):
        from ase.calculators.singlepoint import SinglePointCalculator

        frame = self.atoms.copy()  # copies arrays and info, drops the calculator
        kw = {"forces": forces.copy()}
        if energy is not None:
            kw["energy"] = float(energy)
        frame.calc = SinglePointCalculator(frame, **kw)
        return frame

    @staticmethod
    def _append(path: Optional[Path], frame) -> None:
        if path is None:
            return
        import ase.io

        with open(path, "a") as fh:  # open/append/close: every frame is on disk when the call returns
            ase.io.write(fh, frame, format="extxyz")

    # -- run end -----------------------------------------------------------------------------------------
    def finish(self, completed: bool = True) -> Dict[str, Any]:
        """Mark the run completed (if it was not stopped) and write the summary; returns it."""
        if not self.summary["stopped"]:
            self.summary.update(status="completed" if completed else "interrupted", completed=bool(completed))
            if self.dyn is not None:  # the last step run, also when it is not a multiple of the interval
                self.summary["steps"] = int(self.dyn.nsteps)
        self.write_summary()
        return self.summary

    def write_summary(self, path: Optional[Union[str, Path]] = None, **extra) -> None:
        self.summary.update(extra)
        path = Path(path) if path else self.summary_path
        if path is not None:
            path.write_text(json.dumps(self.summary, indent=2) + "\n")


__all__ = [
    "ACCURATE", "BANDS", "CANDIDATE", "DEFAULT_EPS", "STOP", "TrustBandExceeded", "UncertaintyMonitor", "as_stored", "band_of",
    "check_bands", "max_u_statistic",
]
