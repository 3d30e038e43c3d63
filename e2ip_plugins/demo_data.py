"""Paths of the demo data shipped inside the package (see ``data/README.md``)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "val", "test", "ood_mol", "ood_hot")


def demo_file(split: str) -> Path:
    """Path of ``iso7_<split>.xyz``; split in train, val, test, ood_mol, ood_hot."""
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; choose one of {SPLITS}")
    return DATA_DIR / f"iso7_{split}.xyz"
