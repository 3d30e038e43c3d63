"""Per-species Gaussian-mixture density of latent features as a novelty score (issue 26's comparison).

The shipped novelty (:mod:`e2ip_plugins.novelty`) scores an atom by its squared Mahalanobis distance to ONE
Gaussian per species. The latent-density evidence of Zhu et al. (2023; the GMM of NequIP 0.6) replaces that
Gaussian by a mixture, fitted on the same invariant features h of the training atoms of species z:

    p_z(h) = Σ_k π_k N(h; μ_k, Σ_k)                           full covariances, fitted by EM
    K_z    = argmin_{K ∈ ks} −2 log L_K + P_K log n_z         BIC on the training atoms (NequIP 0.6's rule),
             P_K = K − 1 + K·D + K·D(D + 1)/2
    Σ_k   ← Σ_k + δ_k·tr(Σ_k)/D·I,  δ_k = max(jitter, (D/n_k)^ridge_power),  n_k = Σ_i γ_ik   (the shipped ridge)
    s_i    = max(0, −2 log p_z(h_i) + 2 max_k log π_k N(μ_k; μ_k, Σ_k))

For K = 1, s is the shipped score (its covariance divides by n, the shipped one by n − 1). :meth:`SpeciesMixture.score`
has ``NoveltyEvidence.score``'s signature, so the rest of the shipped level (r = s/s_ref, the linear κ map, [c, β]
by the validation NLL) applies unchanged. Diagnostic: nothing here is deployed.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

KS = (1, 2, 4, 8)


def _log_gauss(x: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """(n, K) log N(x_i; μ_k, L_k L_kᵀ) for x (n, D), mean (K, D), chol (K, D, D)."""
    d = x.shape[1]
    out = []
    for mu, lk in zip(mean, chol):
        z = torch.linalg.solve_triangular(lk, (x - mu).T, upper=False)
        logdet = 2.0 * torch.log(torch.diagonal(lk)).sum()
        out.append(-0.5 * (d * math.log(2 * math.pi) + logdet + (z * z).sum(0)))
    return torch.stack(out, 1)


def _m_step(x: torch.Tensor, resp: torch.Tensor, jitter: float, ridge_power: float):
    """(weights, means, Cholesky factors) from responsibilities; components with n_k < 2 are dropped."""
    nk = resp.sum(0)
    keep = nk >= 2.0
    resp, nk = resp[:, keep], nk[keep]
    d = x.shape[1]
    means = (resp.T @ x) / nk[:, None]
    eye = torch.eye(d, dtype=x.dtype)
    chol = []
    for k in range(len(nk)):
        xc = x - means[k]
        cov = (resp[:, k, None] * xc).T @ xc / nk[k]
        cov = 0.5 * (cov + cov.T)
        delta = max(jitter, (d / float(nk[k])) ** ridge_power)
        chol.append(torch.linalg.cholesky(cov + delta * max(float(torch.trace(cov)) / d, 1e-12) * eye))
    return nk / nk.sum(), means, torch.stack(chol)


def _kmeans_resp(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 10) -> torch.Tensor:
    """Hard responsibilities (n, k) of k-means (k-means++ seeding, Lloyd iterations)."""
    centers = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        centers.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)].squeeze(0))
    c = torch.stack(centers)
    for _ in range(iters):
        lab = torch.cdist(x, c).argmin(1)
        c = torch.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
    return torch.nn.functional.one_hot(torch.cdist(x, c).argmin(1), k).to(x.dtype)


def fit_mixture(x: torch.Tensor, k: int, seed: int = 0, jitter: float = 1e-6, ridge_power: float = 6.0,
                max_iter: int = 200, tol: float = 1e-7) -> Dict[str, object]:
    """EM fit of a k-component full-covariance mixture to x (n, D). Returns weights, means, chol, the total
    log-likelihood ``loglik`` and its ``history`` (one value per E-step)."""
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("fit_mixture: the latent features contain NaN or Inf")
    gen = torch.Generator().manual_seed(int(seed))
    resp = _kmeans_resp(x, k, gen) if k > 1 else torch.ones(len(x), 1, dtype=x.dtype)
    history: List[float] = []
    for _ in range(max_iter):
        w, means, chol = _m_step(x, resp, jitter, ridge_power)
        lp = _log_gauss(x, means, chol) + torch.log(w)
        ll = torch.logsumexp(lp, 1)
        history.append(float(ll.sum()))
        resp = torch.exp(lp - ll[:, None])
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol * len(x):
            break
    return {"weights": w, "means": means, "chol": chol, "loglik": history[-1], "history": history}


def bic(loglik: float, k: int, d: int, n: int) -> float:
    """−2 log L + P log n, P = k − 1 + k·d + k·d(d + 1)/2 (full covariances)."""
    return -2.0 * loglik + (k - 1 + k * d + k * d * (d + 1) / 2) * math.log(n)


class SpeciesMixture:
    """One mixture per species, K chosen by BIC on the training atoms; :meth:`score` is the novelty score s."""

    def __init__(self, num_species: int, ks: Sequence[int] = KS, seed: int = 0, jitter: float = 1e-6,
                 ridge_power: float = 6.0):
        self.num_species, self.ks, self.seed = int(num_species), tuple(int(k) for k in ks), int(seed)
        self.jitter, self.ridge_power = float(jitter), float(ridge_power)
        self.components: Dict[int, Dict[str, object]] = {}
        self.bic: Dict[int, Dict[int, float]] = {}

    def fit(self, feats: torch.Tensor, species: torch.Tensor) -> "SpeciesMixture":
        x, sp = feats.detach().to("cpu", torch.float64), species.detach().to("cpu").long().reshape(-1)
        if not torch.isfinite(x).all():
            raise ValueError("SpeciesMixture.fit: the latent features contain NaN or Inf")
        for z in range(self.num_species):
            xz = x[sp == z]
            if len(xz) < 2:
                continue  # species absent from training: score 0, as the shipped novelty
            fits = {k: fit_mixture(xz, k, self.seed + z, self.jitter, self.ridge_power) for k in self.ks
                    if len(xz) >= 10 * k}
            self.bic[z] = {k: bic(f["loglik"], len(f["weights"]), xz.shape[1], len(xz)) for k, f in fits.items()}
            self.components[z] = fits[min(self.bic[z], key=self.bic[z].get)]
        return self

    @property
    def chosen(self) -> Dict[int, int]:
        """{species: number of components kept}."""
        return {z: len(f["weights"]) for z, f in self.components.items()}

    def log_density(self, x: torch.Tensor, z: int) -> torch.Tensor:
        f = self.components[z]
        return torch.logsumexp(_log_gauss(x, f["means"], f["chol"]) + torch.log(f["weights"]), 1)

    def score(self, feats: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """s_i (N,) of the module docstring, in ``feats``' dtype and device."""
        x, sp = feats.detach().to("cpu", torch.float64), species.detach().to("cpu").long().reshape(-1)
        out = torch.zeros(len(x), dtype=torch.float64)
        for z, f in self.components.items():
            mask = sp == z
            if mask.any():
                peak = torch.log(f["weights"]) - torch.log(torch.diagonal(f["chol"], dim1=1, dim2=2)).sum(1)
                # log π_k N(μ_k; μ_k, Σ_k) + (D/2) log 2π = log π_k − ½ log|Σ_k|; the 2π terms cancel in s
                dpi = 0.5 * x.shape[1] * math.log(2 * math.pi)
                out[mask] = (-2.0 * (self.log_density(x[mask], z) + dpi) + 2.0 * peak.max()).clamp(min=0.0)
        return out.to(device=feats.device, dtype=feats.dtype)
