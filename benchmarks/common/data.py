"""Benchmark data: time-block split of the in-distribution pool, OOD subsampling, a ≥ 1000-atom cluster.

Split (per trajectory, i.e. per ``smiles`` / ``config_type`` group of consecutive frames):
the trajectory is cut into ``n_blocks`` contiguous blocks; a seeded permutation assigns
``n_val`` blocks to validation, ``n_test`` to test, the rest to training; ``gap`` frames at
both ends of every block are dropped, so any two frames of different splits are at least
``2·gap + 1`` frames apart in time (no test frame is a time neighbour of a training frame).
The profile then subsamples each split (seeded, without replacement) to its frame budget.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class SplitSpec:
    n_blocks: int = 10
    n_val: int = 2
    n_test: int = 2
    gap: int = 2
    seed: int = 0


def trajectory_key(atoms, index: int) -> str:
    info = atoms.info
    for key in ("smiles", "config_type"):
        if key in info:
            return str(info[key])
    return "all"


def group_trajectories(frames: Sequence) -> Dict[str, List[int]]:
    """Frame indices per trajectory, in file order (frames of one trajectory are consecutive in time)."""
    groups: Dict[str, List[int]] = {}
    for i, at in enumerate(frames):
        groups.setdefault(trajectory_key(at, i), []).append(i)
    return groups


def time_block_split(frames: Sequence, spec: SplitSpec) -> Dict[str, List[int]]:
    """{'train': [...], 'val': [...], 'test': [...]} frame indices (see module docstring)."""
    rng = np.random.default_rng(spec.seed)
    out = {"train": [], "val": [], "test": []}
    for _, idx in sorted(group_trajectories(frames).items()):
        blocks = np.array_split(np.asarray(idx), spec.n_blocks)
        order = rng.permutation(len(blocks))
        roles = {}
        for rank, b in enumerate(order):
            roles[b] = "val" if rank < spec.n_val else "test" if rank < spec.n_val + spec.n_test else "train"
        for b, block in enumerate(blocks):
            kept = block[spec.gap : len(block) - spec.gap] if len(block) > 2 * spec.gap else block[:0]
            out[roles[b]].extend(int(i) for i in kept)
    return {k: sorted(v) for k, v in out.items()}


def subsample(indices: Sequence[int], n: Optional[int], seed: int) -> List[int]:
    """n indices (seeded, sorted) or all of them when n is None / larger than the pool."""
    indices = list(indices)
    if n is None or n >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(indices, size=n, replace=False))


def strided(n_total: int, n: Optional[int]) -> List[int]:
    """n evenly spaced indices of range(n_total) (every trajectory of an OOD file stays represented)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(set(int(round(x)) for x in np.linspace(0, n_total - 1, n)))


def min_time_distance(split: Dict[str, List[int]], frames: Sequence, a: str, b: str) -> int:
    """Smallest |i − j| between a frame of split a and one of split b within the same trajectory."""
    key = {i: trajectory_key(at, i) for i, at in enumerate(frames)}
    best = 10**9
    sb: Dict[str, np.ndarray] = {}
    for j in split[b]:
        sb.setdefault(key[j], []).append(j)  # type: ignore[arg-type]
    sb = {k: np.asarray(v) for k, v in sb.items()}
    for i in split[a]:
        arr = sb.get(key[i])
        if arr is not None and len(arr):
            best = min(best, int(np.abs(arr - i).min()))
    return best


def molecule_cluster(molecules: Sequence, n_atoms_min: int = 1000, spacing: float = 10.0):
    """A non-periodic cluster of molecules on a cubic grid (``spacing`` Å between centres), ≥ n_atoms_min atoms.

    Molecules are taken round-robin from ``molecules`` (centred at their centre of positions)."""
    from ase import Atoms

    per = len(molecules[0])
    n_mol = -(-n_atoms_min // per)
    side = int(np.ceil(n_mol ** (1 / 3)))
    cluster = Atoms()
    k = 0
    for ix in range(side):
        for iy in range(side):
            for iz in range(side):
                if k >= n_mol:
                    break
                m = molecules[k % len(molecules)].copy()
                m.positions -= m.positions.mean(0)
                m.positions += spacing * np.array([ix, iy, iz], dtype=float)
                cluster += m
                k += 1
    cluster.info = {}
    cluster.arrays = {k: v for k, v in cluster.arrays.items() if k in ("numbers", "positions")}
    cluster.pbc = False
    return cluster


def write_splits(
    id_file: str,
    ood_files: Dict[str, str],
    out_dir: Path,
    spec: SplitSpec,
    n_train: Optional[int],
    n_val: Optional[int],
    n_test: Optional[int],
    n_ood: Optional[int],
    sweep_sizes: Sequence[int] = (),
) -> Dict[str, object]:
    """Write train/val/test(/OOD) extxyz files into ``out_dir``; returns a manifest (also ``split.json``).

    Sweep training sets are nested subsets of the main training set (``train_<n>.xyz``)."""
    import ase.io

    out_dir.mkdir(parents=True, exist_ok=True)
    frames = ase.io.read(id_file, ":")
    pools = time_block_split(frames, spec)
    chosen = {
        "train": subsample(pools["train"], n_train, spec.seed + 1),
        "val": subsample(pools["val"], n_val, spec.seed + 2),
        "test": subsample(pools["test"], n_test, spec.seed + 3),
    }
    files: Dict[str, str] = {}
    for name, idx in chosen.items():
        path = out_dir / f"{name}.xyz"
        ase.io.write(path, [frames[i] for i in idx], format="extxyz")
        files[name] = str(path.resolve())
    sweep_files = {}
    rng = np.random.default_rng(spec.seed + 4)
    order = [chosen["train"][i] for i in rng.permutation(len(chosen["train"]))]
    for n in sorted(set(sweep_sizes)):
        if n >= len(chosen["train"]):
            sweep_files[int(n)] = files["train"]
            continue
        path = out_dir / f"train_{n}.xyz"
        ase.io.write(path, [frames[i] for i in sorted(order[:n])], format="extxyz")
        sweep_files[int(n)] = str(path.resolve())
    ood_counts = {}
    for name, src in ood_files.items():
        ood = ase.io.read(src, ":")
        idx = strided(len(ood), n_ood)
        path = out_dir / f"{name}.xyz"
        ase.io.write(path, [ood[i] for i in idx], format="extxyz")
        files[name] = str(path.resolve())
        ood_counts[name] = len(idx)
    manifest = {
        "id_file": str(Path(id_file).resolve()),
        "ood_files": {k: str(Path(v).resolve()) for k, v in ood_files.items()},
        "split": dataclasses.asdict(spec),
        "pool_sizes": {k: len(v) for k, v in pools.items()},
        "frames": {**{k: len(v) for k, v in chosen.items()}, **ood_counts},
        "min_time_gap_frames": {
            "train-test": min_time_distance(chosen, frames, "train", "test"),
            "train-val": min_time_distance(chosen, frames, "train", "val"),
        },
        "files": files,
        "sweep_files": sweep_files,
        "elements": sorted({s for at in frames for s in at.get_chemical_symbols()}),
        "atoms_per_frame": sorted({len(at) for at in frames}),
    }
    (out_dir / "split.json").write_text(json.dumps(manifest, indent=1))
    return manifest
