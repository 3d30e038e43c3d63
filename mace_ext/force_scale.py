"""σ_F, the force scale of Σ₀ and the unit of the regulariser's residual (rules in :mod:`mace_ext.cli`), and
its broadcast from rank 0 under DDP."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch


def dist_world_size() -> int:
    """Number of ranks of the process group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (identity without a process group)."""
    if dist_world_size() <= 1:
        return value
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def _single_float(value) -> Optional[float]:
    try:
        import numpy as np

        arr = np.asarray(value, dtype=float).reshape(-1)
    except Exception:  # pylint: disable=broad-except
        return None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or not np.allclose(arr, arr[0]) or arr[0] <= 0:
        return None
    return float(arr[0])


def training_force_rms(args, train_loader) -> float:
    """σ_F: see :mod:`mace_ext.cli`."""
    if args.e2ip_force_rms is not None:
        return float(args.e2ip_force_rms)
    if getattr(args, "scaling", None) == "rms_forces_scaling":
        value = _single_float(getattr(args, "std", None))
        if value is not None:
            logging.info(f"e2ip: sigma_F = RMS of the training forces (MACE's rms_forces_scaling) = {value:.4g} eV/A")
            return value
    try:
        total, count = 0.0, 0
        for item in train_loader.dataset:
            f = item["forces"] if not hasattr(item, "forces") else item.forces
            if f is None:
                continue
            total += float((f.double() ** 2).sum())
            count += f.numel()
        if count > 0 and total > 0:
            value = math.sqrt(total / count)
            logging.info(f"e2ip: sigma_F = RMS of the training forces = {value:.4g} eV/A")
            return value
    except Exception as exc:  # pylint: disable=broad-except
        logging.warning(f"e2ip: could not compute the training force RMS ({exc})")
    logging.warning("e2ip: no training forces found; using sigma_F = 1.0 eV/A")
    return 1.0
