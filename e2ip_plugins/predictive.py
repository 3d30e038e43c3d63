"""Per-atom predictive distributions of the 3-vector force, with one interface.

Every predictive exposes the DESIGN §3 covariances, a per-atom negative log
density ``nll(y)``, the central-region PIT value ``pit(y)`` (the probability mass
of the predictive inside the ellipsoid through y) and ``scaled(c)`` (all
covariances × c, used by the global recalibration).

- :class:`StudentTPredictive` — NIW evidential (e²IP): multivariate Student-t,
  df ν′ = ν − d + 1, scale Λ = ν(1+κ)/(κν′)·Σ₀; d²/3 = (y−γ)ᵀΛ⁻¹(y−γ)/3 ~ F(3, ν′).
- :class:`GaussianPredictive` — ensembles / MVE: N(γ, C), d² ~ χ²₃.
- :class:`IndependentStudentTPredictive` — eIP: one Student-t per Cartesian
  component (not rotation-equivariant). Its PIT uses the Gaussian copula
  z_a = Φ⁻¹(F_a(y_a)), Σ z_a² ~ χ²₃ exactly when the model is right.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, TypeVar

import numpy as np
import torch
from scipy import special, stats

from .head_covariance import covariance_uncertainty as atom_uncertainty
from .head_covariance import niw_covariances

D = 3
P = TypeVar("P", bound="_Predictive")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def quad_form(mat: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """rᵀ M r per atom: mat (N,3,3), r (N,3) → (N,)."""
    return torch.einsum("ni,nij,nj->n", r, mat, r)


def student_t_nll(nu: torch.Tensor, logdet_lam: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """−log of the NIW Student-t (df ν′ = ν − d + 1, scale Λ) at Mahalanobis distance d² = rᵀΛ⁻¹r:
    lnΓ(ν′/2) − lnΓ((ν+1)/2) + (d/2)ln(ν′π) + ½ln|Λ| + ((ν+1)/2)·ln(1 + d²/ν′)."""
    df = nu - D + 1
    return (
        torch.lgamma(df / 2)
        - torch.lgamma((nu + 1) / 2)
        + 0.5 * D * torch.log(df * math.pi)
        + 0.5 * logdet_lam
        + 0.5 * (nu + 1) * torch.log1p(d2 / df)
    )


@dataclasses.dataclass
class _Predictive:
    mean: torch.Tensor

    @classmethod
    def cat(cls: type[P], parts: Sequence[P]) -> P:
        """Concatenate per-atom predictives along the atom axis."""
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**{f: torch.cat([getattr(p, f) for p in parts], dim=0) for f in fields})

    @property
    def uncertainty(self) -> torch.Tensor:
        return atom_uncertainty(self.covariance_epistemic)

    @property
    def covariance(self) -> torch.Tensor:
        return self.covariance_aleatoric + self.covariance_epistemic


@dataclasses.dataclass
class StudentTPredictive(_Predictive):
    """Posterior predictive of the NIW prior μ|Σ ~ N(γ, Σ/κ), Σ ~ IW(νΣ₀, ν)."""

    nu: torch.Tensor
    kappa: torch.Tensor
    sigma0: torch.Tensor
    sigma0_inv: torch.Tensor
    sigma0_logdet: torch.Tensor

    @property
    def df(self) -> torch.Tensor:
        return self.nu - D + 1

    @property
    def scale_factor(self) -> torch.Tensor:
        """Λ = f·Σ₀ with f = ν(1+κ)/(κν′)."""
        return self.nu * (1 + self.kappa) / (self.kappa * self.df)

    def mahalanobis2(self, y: torch.Tensor) -> torch.Tensor:
        r = y - self.mean
        return quad_form(self.sigma0_inv, r) / self.scale_factor

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        """lnΓ(ν′/2) − lnΓ((ν+1)/2) + (d/2)ln(ν′π) + ½ln|Λ| + ((ν+1)/2)·ln(1 + d²/ν′)."""
        logdet_lam = D * torch.log(self.scale_factor) + self.sigma0_logdet
        return student_t_nll(self.nu, logdet_lam, self.mahalanobis2(y))

    def pit(self, y: torch.Tensor) -> torch.Tensor:
        d2 = _np(self.mahalanobis2(y))
        p = stats.f.cdf(d2 / D, D, _np(self.df))
        return torch.as_tensor(p, dtype=y.dtype, device=y.device)

    @property
    def covariance_aleatoric(self) -> torch.Tensor:
        """U_ale = E[Σ] = ν Σ₀ / (ν − d − 1)."""
        return niw_covariances(self.nu, self.kappa, self.sigma0)[2]

    @property
    def covariance_epistemic(self) -> torch.Tensor:
        """U_epi = Var[μ] = U_ale / κ."""
        return niw_covariances(self.nu, self.kappa, self.sigma0)[1]

    def scaled(self, c: float) -> "StudentTPredictive":
        return dataclasses.replace(
            self, sigma0=self.sigma0 * c, sigma0_inv=self.sigma0_inv / c, sigma0_logdet=self.sigma0_logdet + D * math.log(c)
        )


@dataclasses.dataclass
class GaussianPredictive(_Predictive):
    """N(γ, U_epi + U_ale); U_ale may be zero (plain ensemble)."""

    cov_epistemic: torch.Tensor
    cov_aleatoric: torch.Tensor

    @property
    def covariance_epistemic(self) -> torch.Tensor:
        return self.cov_epistemic

    @property
    def covariance_aleatoric(self) -> torch.Tensor:
        return self.cov_aleatoric

    def _chol(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.covariance)

    def mahalanobis2(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.linalg.solve_triangular(self._chol(), (y - self.mean)[..., None], upper=False)
        return (z[..., 0] ** 2).sum(-1)

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        """½(d ln 2π + ln|C| + (y−γ)ᵀC⁻¹(y−γ))."""
        logdet = 2 * torch.log(torch.diagonal(self._chol(), dim1=-2, dim2=-1)).sum(-1)
        return 0.5 * (D * math.log(2 * math.pi) + logdet + self.mahalanobis2(y))

    def pit(self, y: torch.Tensor) -> torch.Tensor:
        p = stats.chi2.cdf(_np(self.mahalanobis2(y)), D)
        return torch.as_tensor(p, dtype=y.dtype, device=y.device)

    def scaled(self, c: float) -> "GaussianPredictive":
        return dataclasses.replace(self, cov_epistemic=self.cov_epistemic * c, cov_aleatoric=self.cov_aleatoric * c)


@dataclasses.dataclass
class IndependentStudentTPredictive(_Predictive):
    """Per-component Student-t: y_a ~ t_{df_a}(loc_a, scale2_a); epistemic variance var_epi_a."""

    df: torch.Tensor
    scale2: torch.Tensor
    var_epi: torch.Tensor

    @property
    def covariance(self) -> torch.Tensor:
        return torch.diag_embed(self.scale2 * self.df / (self.df - 2))

    @property
    def covariance_epistemic(self) -> torch.Tensor:
        return torch.diag_embed(self.var_epi)

    @property
    def covariance_aleatoric(self) -> torch.Tensor:
        return self.covariance - self.covariance_epistemic

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        """Σ_a −log t_{df}(y_a; loc_a, scale_a)."""
        df = self.df
        z2 = (y - self.mean) ** 2 / self.scale2
        per = (
            torch.lgamma(df / 2)
            - torch.lgamma((df + 1) / 2)
            + 0.5 * torch.log(df * math.pi * self.scale2)
            + 0.5 * (df + 1) * torch.log1p(z2 / df)
        )
        return per.sum(-1)

    def pit(self, y: torch.Tensor) -> torch.Tensor:
        t = _np((y - self.mean) / torch.sqrt(self.scale2))
        u = stats.t.cdf(t, _np(self.df))
        z = special.ndtri(np.clip(u, 1e-300, 1 - 1e-16))
        p = stats.chi2.cdf((z**2).sum(-1), D)
        return torch.as_tensor(p, dtype=y.dtype, device=y.device)

    def scaled(self, c: float) -> "IndependentStudentTPredictive":
        return dataclasses.replace(self, scale2=self.scale2 * c, var_epi=self.var_epi * c)


def concat(parts: List[P]) -> P:
    """Concatenate predictives of one kind along atoms."""
    return type(parts[0]).cat(parts)
