"""Profiles of ``benchmarks.run``: data budget, backbone hyperparameters, epochs, timing repeats.

``quick``  2-core CPU, one thread per process, < 60 min for both backbones (run side by side).
``full``   what a GPU user runs: every frame of the split pools and OOD files, larger backbones, many
           epochs, the 100 / 300 / 1000-frame data-efficiency sweep on both backbones.
``smoke``  seconds-scale plumbing check for the tests (1 epoch, ~20 frames, ensemble of 2, no sweep,
           no memory probes).

Within one backbone every method (plain, e²IP, eIP, ensemble members) gets the same backbone settings,
data and epochs; only the head flags differ. Seeds: the split uses ``seed``; training runs use
``seed`` (plain = ensemble member 0, e²IP, eIP) and ``seed + k`` for ensemble member k.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

_MACE_QUICK = dict(
    device="cpu", dtype="float32", channels=16, max_L=1, max_ell=2, layers=2, correlation=2, r_max=4.0,
    batch_size=10, lr=0.01, epochs=15,
)
_NEQUIP_QUICK = dict(
    device="cpu", dtype="float32", channels=16, max_L=1, layers=2, r_max=4.0, batch_size=10, lr=0.01, epochs=30,
)

PROFILES: Dict[str, Dict[str, Any]] = {
    "quick": dict(
        n_train=250, n_val=100, n_test=100, n_ood=100,
        ensemble_size=4, seed=0,
        sweep_sizes=[50, 100, 250], sweep_backbones=["mace", "nequip"],
        threads=1, jobs=1, memprobe=True,
        timing=dict(warmup=2, repeats_small=15, repeats_large=10, cluster_atoms=1000),
        backbones={"mace": _MACE_QUICK, "nequip": _NEQUIP_QUICK},
    ),
    "full": dict(
        n_train=None, n_val=None, n_test=None, n_ood=None,
        ensemble_size=4, seed=0,
        sweep_sizes=[100, 300, 1000], sweep_backbones=["mace", "nequip"],
        threads=None, jobs=1, memprobe=True,
        timing=dict(warmup=3, repeats_small=30, repeats_large=15, cluster_atoms=1000),
        backbones={
            "mace": dict(device="auto", dtype="float32", channels=64, max_L=1, max_ell=3, layers=2, correlation=3,
                         r_max=5.0, batch_size=10, lr=0.01, epochs=300),
            "nequip": dict(device="auto", dtype="float32", channels=64, max_L=2, layers=4, r_max=5.0, batch_size=10,
                           lr=0.005, epochs=400),
        },
    ),
    "smoke": dict(
        n_train=20, n_val=10, n_test=10, n_ood=10,
        ensemble_size=2, seed=0,
        sweep_sizes=[], sweep_backbones=[],
        threads=1, jobs=2, memprobe=False,
        timing=dict(warmup=1, repeats_small=2, repeats_large=1, cluster_atoms=200),
        backbones={
            "mace": dict(_MACE_QUICK, channels=8, epochs=1, batch_size=5),
            "nequip": dict(_NEQUIP_QUICK, channels=8, epochs=1, batch_size=5),
        },
    ),
}


def get_profile(name: str) -> Dict[str, Any]:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    return copy.deepcopy(PROFILES[name])


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        return "cpu"
