"""Paths of the demo data shipped inside the package (see ``data/README.md``)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "val", "test", "ood_mol", "ood_hot")


def demo_file(split: str) -> Path:
    """Path of ``iso7_<split>.xyz``; split in train, val, test, ood_mol, ood_hot."""
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; choose one of {SPLITS}")
    return DATA_DIR / f"iso7_{split}.xyz"


def stretched_bond(atoms, length: float = 2.2, element: int = 1, partner: int = 6):
    """Copy of ``atoms`` with the first ``element`` atom (default H) pulled to ``length`` Å from its
    nearest ``partner`` atom (default C), along the bond: an atom far from the training features.
    The moved atom's index is stored in ``info["stretched_atom"]``."""
    import numpy as np

    a = atoms.copy()
    i = int(np.flatnonzero(a.numbers == element)[0])
    j = min(np.flatnonzero(a.numbers == partner), key=lambda k: a.get_distance(i, int(k)))
    bond = a.positions[i] - a.positions[j]
    a.positions[i] = a.positions[j] + length * bond / np.linalg.norm(bond)
    a.info["stretched_atom"] = i
    return a
