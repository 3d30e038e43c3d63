"""``e2ip-md``: Langevin MD with an e2ip model, trust-band monitoring and optional UDD.

    e2ip-md --model M --structure start.xyz --temperature 300 --steps 1000 --timestep 0.5 \\
            --interval 10 --trust-lo 0.3 --trust-hi 1.0 [--relative] [--udd A B] --seed 0 --out DIR

The model's file type picks the adapter (``e2ip.calculators`` entry points: MACE ``.model``, NequIP
``.ckpt`` / ``.nequip.zip`` / ``.nequip.pt2``). Writes ``DIR/trajectory.extxyz`` (every ``--interval``
steps and step 0: positions, the model's energy and forces, ``forces_uncertainty`` (N,), ``forces_covariance``
(N, 9), band and step), ``DIR/candidates.extxyz`` (frames in the candidate band) and ``DIR/summary.json``.

Everything is checked before anything is written: file types, trust bands, UDD parameters, and one
evaluation of the model on the starting structure (the covariance outputs must be there, and with
``--udd`` the σ² gradient). Exit status 0 when the run completed or was stopped at ``trust_hi``
(``summary.json`` ``status``: ``completed`` / ``stopped``), 2 for bad input, 1 for other errors.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from .monitor import DEFAULT_EPS, TrustBandExceeded, UncertaintyMonitor, check_bands
from .registry import MDConfigError, find_adapter
from .udd import UDDCalculator, check_udd_parameters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="e2ip-md", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model file: MACE .model, NequIP .ckpt / .nequip.zip / .nequip.pt2")
    p.add_argument("--structure", required=True, help="starting structure (any ASE-readable file)")
    p.add_argument("--index", type=int, default=0, help="frame of --structure to start from")
    p.add_argument("--temperature", type=float, default=300.0, help="Langevin temperature and initial velocities (K)")
    p.add_argument("--steps", type=int, default=1000, help="number of MD steps")
    p.add_argument("--timestep", type=float, default=0.5, help="time step (fs)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs)")
    p.add_argument("--interval", type=int, default=10, help="observe/write every this many steps")
    p.add_argument("--trust-lo", type=float, default=0.3, help="candidate band starts here (max u, eV/A)")
    p.add_argument("--trust-hi", type=float, default=math.inf, help="stop when max u reaches this (eV/A)")
    p.add_argument("--relative", action="store_true", help="bands on max u_i/(|F_i|+eps) (MACE's relative form)")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS, help="eps of --relative (eV/A)")
    p.add_argument("--udd", type=float, nargs=2, metavar=("A", "B"), default=None,
                   help="uncertainty-driven dynamics: E_bias = A[exp(-sigma2/(N B^2)) - 1], A in eV, B in eV/A")
    p.add_argument("--udd-damping", type=float, nargs=2, metavar=("C", "D"), default=None,
                   help="seed 002 eq. 14 Gaussian damping of the bias force (then not the gradient of E_bias)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the Langevin noise")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cpu", help="torch device of the model")
    p.add_argument("--overwrite", action="store_true", help="allow an --out directory that already holds results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


OUT_FILES = ("trajectory.extxyz", "candidates.extxyz", "summary.json")


def _validate_args(args) -> None:
    check_bands(args.trust_lo, args.trust_hi)
    if args.relative and not args.eps > 0:
        raise MDConfigError(f"--eps must be > 0, got {args.eps}")
    if args.udd is not None:
        check_udd_parameters(args.udd[0], args.udd[1], args.udd_damping)
    elif args.udd_damping is not None:
        raise MDConfigError("--udd-damping needs --udd A B")
    if args.steps < 0:
        raise MDConfigError(f"--steps must be >= 0, got {args.steps}")
    if args.interval < 1:
        raise MDConfigError(f"--interval must be >= 1, got {args.interval}")
    if not args.timestep > 0:
        raise MDConfigError(f"--timestep must be > 0 fs, got {args.timestep}")
    if not args.temperature >= 0:
        raise MDConfigError(f"--temperature must be >= 0 K, got {args.temperature}")
    if not args.friction >= 0:
        raise MDConfigError(f"--friction must be >= 0, got {args.friction}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MDConfigError(f"--out {out} exists and is not a directory")
    if not args.overwrite and any((out / f).exists() for f in OUT_FILES):
        raise MDConfigError(f"--out {out} already holds results ({', '.join(OUT_FILES)}); pass --overwrite")
    if not Path(args.structure).is_file():
        raise MDConfigError(f"--structure {args.structure}: no such file")


def _read_structure(args):
    import ase.io

    try:
        return ase.io.read(args.structure, index=args.index)
    except Exception as err:  # ASE raises many types for unknown formats / bad files
        raise MDConfigError(f"cannot read --structure {args.structure} (frame {args.index}): {err}") from err


def _open(args, atoms):
    """Adapter calculator (wrapped for UDD) after one checked evaluation on ``atoms``; writes nothing."""
    adapter = find_adapter(args.model)  # unknown file type → MDConfigError before anything is imported
    if not Path(args.model).exists():
        raise MDConfigError(f"--model {args.model}: no such file")
    try:
        calc = adapter.open(args.model, device=args.device)
    except MDConfigError:
        raise
    except Exception as err:  # a corrupt or foreign file: say which adapter failed on it, write nothing
        raise MDConfigError(
            f"the {getattr(adapter, 'name', type(adapter).__name__)} adapter cannot open --model {args.model}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if args.udd is not None:
        calc = UDDCalculator(calc, args.udd[0], args.udd[1], damping=args.udd_damping,
                             variance_fn=adapter.variance_function(calc))
    probe = atoms.copy()
    probe.calc = calc
    try:
        probe.get_forces()
    except MDConfigError:
        raise
    except Exception as err:  # e.g. a NequIP model without the e2ip fields: the calculator raises KeyError
        raise MDConfigError(
            f"--model {args.model} fails on the starting structure: {type(err).__name__}: {err}"
        ) from err
    missing = [k for k in ("forces_uncertainty", "forces_covariance") if k not in calc.results]
    if missing:
        raise MDConfigError(f"{args.model} gives no {missing}: e2ip-md needs a model with the e2ip covariance outputs")
    return calc


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.t0 = time.time()
        self.total = total
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="e2ip-md", unit="step", file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, max_u: float, band: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"max u {max_u:.3g} eV/A ({band})", refresh=True)
        else:
            print(f"\re2ip-md step {step}/{self.total}  max u {max_u:.3g} eV/A ({band})  "
                  f"{time.time() - self.t0:.0f} s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def langevin(atoms, calc, temperature_K: float, timestep_fs: float, friction_per_fs: float, seed: int):
    """Seeded Langevin dynamics on ``atoms`` with ``calc``: Maxwell–Boltzmann velocities at ``temperature_K``
    (no net momentum or rotation), then ASE's :class:`~ase.md.langevin.Langevin` sharing the same generator."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.calc = calc
    return Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_K,
                    friction=friction_per_fs / units.fs, fixcm=False, rng=rng)


def run(args) -> dict:
    """Validate, open, run; returns the summary. Raises :class:`MDConfigError` before writing on bad input."""
    _validate_args(args)
    atoms = _read_structure(args)
    calc = _open(args, atoms)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dyn = langevin(atoms, calc, args.temperature, args.timestep, args.friction, args.seed)
    monitor = UncertaintyMonitor(
        atoms, args.trust_lo, args.trust_hi, relative=args.relative, eps=args.eps,
        trajectory_path=out / "trajectory.extxyz", candidates_path=out / "candidates.extxyz",
        summary_path=out / "summary.json",
    )
    monitor.summary.update(
        model=str(args.model), structure=str(args.structure), temperature_K=args.temperature,
        steps_requested=args.steps, timestep_fs=args.timestep, interval=args.interval, seed=args.seed,
        udd=None if args.udd is None else {"A": args.udd[0], "B": args.udd[1], "damping": args.udd_damping},
    )
    monitor.attach(dyn, interval=args.interval)
    progress = _Progress(args.steps, enabled=not args.no_progress)
    dyn.attach(lambda: progress.update(dyn.nsteps, monitor.last["max_u"], monitor.last["band"]), interval=args.interval)
    t0 = time.time()
    try:
        dyn.run(args.steps)
    except TrustBandExceeded as stop:
        progress.close()
        print(f"e2ip-md: stopped at trust_hi: {stop}", file=sys.stderr)
        monitor.write_summary(wall_time_s=round(time.time() - t0, 3))
        return monitor.summary
    progress.close()
    monitor.finish(completed=True)
    monitor.write_summary(wall_time_s=round(time.time() - t0, 3))
    return monitor.summary


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except MDConfigError as err:
        print(f"e2ip-md: error: {err}", file=sys.stderr)
        return 2
    c = summary["counts"]
    print(f"e2ip-md: {summary['status']} after {summary['steps']} steps; frames accurate {c['accurate']}, "
          f"candidate {c['candidate']}, stop {c['stop']}; max u {summary['max_u_max']:.4g} eV/A; "
          f"outputs in {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
