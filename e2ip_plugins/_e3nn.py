"""Import e3nn safely under both 0.4.4 (MACE) and 0.6 (NequIP).

e3nn 0.4.4 reads its ``constants.pt`` with ``torch.load``; since torch 2.6 that
defaults to ``weights_only=True`` and refuses the pickled ``slice`` global. We
allow-list exactly that one harmless global instead of disabling weights-only
loading process-wide (which is what importing MACE does).
"""

from __future__ import annotations

import torch

if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([slice])

import e3nn  # noqa: E402
from e3nn import o3  # noqa: E402
from e3nn.io import CartesianTensor  # noqa: E402

E3NN_VERSION: str = e3nn.__version__

__all__ = ["o3", "CartesianTensor", "E3NN_VERSION"]
