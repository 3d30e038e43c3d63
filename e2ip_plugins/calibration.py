"""Global post-hoc recalibration of the force covariance.

Fit one factor c > 0 that multiplies every covariance (Σ₀ → cΣ₀ for e²IP, C → cC
for Gaussians, scale² → c·scale² for eIP) by minimising the mean validation NLL:

    ĉ = argmin_c  (1/N) Σ_i −log p(y_i | γ_i, c·Λ_i)

(1-D, bounded Brent search in log c). Apply with ``pred.scaled(ĉ)`` at inference.
Fit on the validation split only, never on test data.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import minimize_scalar


def fit_covariance_scale(pred, y: torch.Tensor, log_bounds: tuple = (-20.0, 20.0)) -> float:
    """Return ĉ minimising the mean NLL of ``pred.scaled(c)`` on (pred, y)."""
    with torch.no_grad():
        def objective(logc: float) -> float:
            return float(pred.scaled(math.exp(logc)).nll(y).mean())

        res = minimize_scalar(objective, bounds=log_bounds, method="bounded", options={"xatol": 1e-8})
    return float(math.exp(res.x))
