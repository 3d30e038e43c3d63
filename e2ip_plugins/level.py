"""The calibrated epistemic level stored in a model: fit of [c, β] on validation data (issue 12).

With the head's evidence (ν, κ, Σ₀), the novelty ratio r̄ (min(s/s_ref, r_cap), see
:mod:`e2ip_plugins.novelty`) and force residuals y − γ of the **validation** atoms, the two
constants of the deployed predictive are

    (ĉ, β̂) = argmin_{c>0, β≥0}  (1/N) Σ_i NLL_t(y_i | γ_i, ν_i, κ_eff,i(β), c·Σ₀,i),
    1/κ_eff,i = 1/κ_i + β·r̄_i                  (mode ``linear``; ``power``: β ≡ 0, κ as given, i.e.
                                                 already mapped by the power map)

(NLL_t the NIW Student-t of :class:`e2ip_plugins.StudentTPredictive`). The search is a grid over
log β around β₀ = median(1/κ)/median(r̄) (plus β = 0), a bounded Brent search in log c at each β,
then a Brent refinement in log β around the best grid point — deterministic, no test data.
The adapters write the result into the model's ``novelty_calib`` buffer, so every output path
(checkpoints, packages, AOTI, ``.model``, ``_compiled.model``, calculators) reports
covariances already multiplied by c (and U_epi raised by β·r̄·U_ale).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .predictive import student_t_nll

D = 3


def scale_sigma0(sigma0: torch.Tensor, sigma0_inv: torch.Tensor, logdet: torch.Tensor,
                 c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c·Σ₀, Σ₀⁻¹/c, log|Σ₀| + 3 ln c) for a 0-dim factor c (TorchScript-friendly)."""
    c = c.to(sigma0.dtype)
    return sigma0 * c, sigma0_inv / c, logdet + 3.0 * torch.log(c)


def _nll(nu, kappa_eff, quad0, logdet0, logc) -> float:
    """Mean Student-t NLL (:func:`e2ip_plugins.predictive.student_t_nll`) with Λ = c·f·Σ₀,
    f = ν(1+κ)/(κν′); quad0 = rᵀΣ₀⁻¹r and logdet0 = log|Σ₀| precomputed once per fit."""
    nu, kappa_eff, quad0, logdet0 = (torch.as_tensor(x, dtype=torch.float64) for x in (nu, kappa_eff, quad0, logdet0))
    log_scale = logc + torch.log(nu * (1 + kappa_eff) / (kappa_eff * (nu - D + 1)))
    return float(student_t_nll(nu, D * log_scale + logdet0, quad0 / torch.exp(log_scale)).mean())


def _nll_of_logc(nu: np.ndarray, kappa_eff: np.ndarray, quad0: np.ndarray, logdet0: np.ndarray):
    """:func:`_nll` as a function of log c alone, with every c-independent term computed once:
    NLL(log c) = A + (D/2)·log c + mean(((ν+1)/2)·ln(1 + q·e^{−log c})), q = quad0/(f·ν′),
    A = mean(lnΓ(ν′/2) − lnΓ((ν+1)/2) + (D/2)ln(ν′π) + (D/2)ln f + ½ log|Σ₀|)."""
    from scipy.special import gammaln

    df = nu - D + 1
    logf = np.log(nu * (1 + kappa_eff) / (kappa_eff * df))
    a = float(np.mean(gammaln(df / 2) - gammaln((nu + 1) / 2) + 0.5 * D * np.log(df * math.pi) + 0.5 * D * logf
                      + 0.5 * logdet0))
    w, q = 0.5 * (nu + 1), quad0 * np.exp(-logf) / df
    return lambda logc: a + 0.5 * D * logc + float(np.mean(w * np.log1p(q * math.exp(-logc))))


def fit_level(nu: torch.Tensor, kappa: torch.Tensor, sigma0_inv: torch.Tensor, sigma0_logdet: torch.Tensor,
              residual: torch.Tensor, ratio: torch.Tensor, mode: str = "linear",
              ratio_cap: float = 100.0, grid: int = 29) -> Tuple[float, float, Dict[str, float]]:
    """(ĉ, β̂, info) from per-atom validation tensors (module docstring).

    ``kappa`` is the head's own κ in ``linear`` mode, the power-mapped κ in ``power`` mode (only c is
    fitted then); ``ratio`` the novelty ratio r (0 if unfitted);
    ``residual`` = y − γ (N, 3). ``info`` holds the fitted NLL and that of the head alone (c = 1, β = 0).
    """
    to = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    nu_, kap, r3 = to(nu).numpy(), to(kappa).numpy(), to(residual)
    quad0 = torch.einsum("ni,nij,nj->n", r3, to(sigma0_inv), r3).numpy()
    logdet0 = to(sigma0_logdet).numpy()
    rbar = np.minimum(to(ratio).numpy(), ratio_cap)
    if mode not in ("linear", "power"):
        raise ValueError(f"mode must be 'linear' or 'power', got {mode!r}")
    if len(nu_) == 0:
        raise ValueError("fit_level needs at least one validation atom")

    def kappa_eff(beta: float) -> np.ndarray:
        return kap / (1.0 + beta * kap * rbar)

    def best_c(beta: float) -> Tuple[float, float]:
        ke = kappa_eff(beta)
        res = minimize_scalar(_nll_of_logc(nu_, ke, quad0, logdet0), bounds=(-20.0, 20.0),
                              method="bounded", options={"xatol": 1e-7})
        return float(res.fun), float(res.x)

    head_nll = _nll(nu_, kap, quad0, logdet0, 0.0)
    pos = rbar[rbar > 0]
    if mode == "power" or len(pos) == 0:
        fun, logc = best_c(0.0)
        return math.exp(logc), 0.0, {"nll": fun, "nll_head": head_nll, "beta0": 0.0}
    beta0 = float(np.median(1.0 / kap) / np.median(pos))
    ts = np.linspace(-9.0, 5.0, grid)
    trials = [(best_c(0.0), 0.0)] + [(best_c(beta0 * math.exp(t)), beta0 * math.exp(t)) for t in ts]
    (fun, logc), beta = min(trials, key=lambda x: x[0][0])
    if beta > 0:
        step = ts[1] - ts[0]
        t_best = math.log(beta / beta0)
        res = minimize_scalar(lambda t: best_c(beta0 * math.exp(t))[0], bounds=(t_best - step, t_best + step),
                              method="bounded", options={"xatol": 1e-4})
        if res.fun < fun:
            beta = beta0 * math.exp(float(res.x))
            fun, logc = best_c(beta)
    return math.exp(logc), float(beta), {"nll": fun, "nll_head": head_nll, "beta0": beta0}


def fit_stored_level(module, batches) -> Dict[str, float]:
    """Fit [c, β] of a :class:`~e2ip_plugins.novelty.NoveltyEvidence` and write its ``novelty_calib``.

    ``batches`` yields dicts of per-atom validation tensors ``nu``, ``kappa`` (effective κ of a
    forward with the calibration at identity, i.e. the head's own κ in ``linear`` mode),
    ``sigma0_inv``, ``sigma0_logdet``, ``residual`` (y − γ) and ``ratio``. It is iterated only
    after the calibration is reset to [1, 0], so it may be a lazy generator running the model.
    Under ``torch.distributed`` the columns of all ranks are gathered, so every rank stores the
    same constants. Returns ``{"c", "beta", "nll", "nll_head", "atoms"}``.
    """
    with torch.no_grad():
        module.novelty_calib.copy_(torch.tensor([1.0, 0.0]).to(module.novelty_calib))
    keys = ("nu", "kappa", "sigma0_inv", "sigma0_logdet", "residual", "ratio")
    cols: Dict[str, list] = {k: [] for k in keys}
    for b in batches:
        for k in keys:
            cols[k].append(b[k].detach().to("cpu", torch.float64))
    cat = {k: (torch.cat(v) if v else torch.zeros(0)) for k, v in cols.items()}
    cat = _gather_columns(cat)
    if len(cat["nu"]) == 0:
        raise ValueError("no validation atoms to fit the stored calibration on")
    # linear mode: κ is the head's own (calibration at identity); power mode: κ is already mapped, only c is fitted
    c, beta, info = fit_level(cat["nu"], cat["kappa"], cat["sigma0_inv"], cat["sigma0_logdet"], cat["residual"],
                              cat["ratio"], "linear" if module.linear else "power", ratio_cap=module.ratio_cap)
    with torch.no_grad():
        module.novelty_calib.copy_(torch.tensor([c, beta]).to(module.novelty_calib))
    return {"c": c, "beta": beta, "atoms": float(len(cat["nu"])), **info}


def _gather_columns(cat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return cat
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, cat)
    return {k: torch.cat([p[k] for p in parts]) for k in cat}
