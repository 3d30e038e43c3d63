"""Labelling with any ASE calculator given by import path, one structure at a time, resumable.

``label.calculator: "tblite.ase:TBLite"`` and ``label.kwargs: {method: GFN2-xTB}`` build
``TBLite(method="GFN2-xTB")``. Each selected structure is labelled into its own file
``<dir>/<index>.extxyz`` (energy in ``info[energy_key]``, forces in ``arrays[forces_key]``) by a fresh
calculator, written atomically, so a killed run resumes at the first structure without a file. A structure whose
calculation raises, or returns non-finite energy or forces, is skipped: ``<dir>/<index>.failed.json``
records the error, and the rest are kept.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from .config import ALConfigError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_frames(path: Path, frames: Sequence) -> None:
    """Write frames as extxyz atomically (an empty file for no frames)."""
    import ase.io

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        for atoms in frames:
            ase.io.write(fh, atoms, format="extxyz")
    os.replace(tmp, path)


def _plain(value):
    """JSON fallback for numpy scalars (ASE reads info integers as numpy types)."""
    return value.item() if hasattr(value, "item") else str(value)


def load_labeller(import_path: str, kwargs: Dict[str, Any]) -> Callable[[], Any]:
    """A factory of fresh ASE calculators ``module:attr(**kwargs)``; :class:`ALConfigError` if it cannot be imported."""
    module_name, _, attr = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ALConfigError(f"label.calculator {import_path!r}: cannot import module {module_name!r} ({err}); "
                            "install it (GFN2-xTB: pip install 'e2ip[xtb]') or fix the path") from err
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ALConfigError(f"label.calculator {import_path!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ALConfigError(f"label.calculator {import_path!r} is not callable")
    return lambda: factory(**kwargs)


def _bare(atoms):
    """A copy holding positions, numbers, cell and pbc only (no calculator results, no model arrays)."""
    from ase import Atoms

    return Atoms(numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions(), cell=atoms.get_cell(),
                 pbc=atoms.get_pbc())


def label_frames(frames: Sequence, out_dir: Path, make_calc: Callable[[], Any], energy_key: str, forces_key: str,
                 info: Sequence[Dict[str, Any]], log: Callable[[str], None] = print) -> List:
    """Label ``frames`` (resuming from ``out_dir``); returns the labelled frames in order, failures left out.

    ``info[i]`` is copied into frame i's ``atoms.info`` (iteration, selector, score, source).
    """
    import ase.io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: List = []
    for i, atoms in enumerate(frames):
        ok_file, bad_file = out_dir / f"{i:05d}.extxyz", out_dir / f"{i:05d}.failed.json"
        if ok_file.is_file():
            done.append(ase.io.read(ok_file, format="extxyz"))
            continue
        if bad_file.is_file():
            continue
        target = _bare(atoms)
        try:
            # a fresh calculator per structure: a label never depends on which structures came before it
            # (e.g. an SCF started from the previous density), so a resumed run labels exactly as an uninterrupted one
            target.calc = make_calc()
            energy = float(target.get_potential_energy())
            forces = np.array(target.get_forces(), dtype=np.float64)
            if not (math.isfinite(energy) and np.isfinite(forces).all()):
                raise FloatingPointError(f"non-finite label: energy {energy}, "
                                         f"{int((~np.isfinite(forces)).sum())} non-finite force components")
        except Exception as err:  # noqa: BLE001 - any labeller failure: skip this structure, keep the rest
            msg = f"{type(err).__name__}: {err}"
            atomic_write_text(bad_file, json.dumps({"index": i, "error": msg, **info[i]}, indent=2, default=_plain) + "\n")
            log(f"label: structure {i} skipped ({msg})")
            continue
        labelled = _bare(atoms)
        labelled.info.update(info[i])
        labelled.info[energy_key] = energy
        labelled.arrays[forces_key] = forces
        atomic_write_frames(ok_file, [labelled])
        done.append(ase.io.read(ok_file, format="extxyz"))
    return done


def failures(out_dir: Path) -> List[Dict[str, Any]]:
    """The skipped structures of a labelling directory (their ``.failed.json`` records)."""
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.failed.json"))]
