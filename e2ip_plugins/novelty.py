"""Novelty-aware, calibrated epistemic level (issues 6 and 12).

The head's own κ cannot learn novelty: for κ ≪ 1 the NIW predictive depends on Σ₀/κ only,
so the NLL never separates U_epi from U_ale, and nothing in training lowers evidence where
there is no training data. The evidence is therefore tied to a feature-space distance:

    h_i          invariant features of atom i (scalars and per-channel norms ‖x_c‖ of l > 0
                 channels, of every layer the adapter passes in)
    s_i          = ‖W_z (h_i − μ_z)‖²,  W_zᵀW_z = (C_z + δ_z·tr(C_z)/D·I)⁻¹  (squared Mahalanobis
                 distance to the Gaussian of the n_z training atoms of species z;
                 δ_z = max(``jitter``, (D/n_z)^k), k = ``ridge_power`` (6): a ridge that matters only
                 for few atoms per feature)
    r_i          = s_i / s_ref,z        s_ref,z = q-quantile of s over the validation atoms of z

Evidence maps (``mode``), with r̄_i = min(r_i, r_cap), r_cap = 100:

    linear (default, LLPR-style):  1/κ_i = 1/κ_head,i + β·r̄_i
        ⇒ U_epi,i = U_ale,i·(1/κ_head,i + β·r̄_i): an epistemic variance linear in the
          feature-space distance, shaped by the head's Σ₀ (Bigi et al. 2024 use the same
          linear form with the last-layer features' covariance as the metric).
    power (issue 6, kept for comparison):  κ_i = κ_head,i·max(1, r̄_i)^(−p)

and one global covariance factor c: Σ₀ → c·Σ₀ (all three covariances × c). c and β are
stored in the buffer ``novelty_calib`` = [c, β] and fitted by :func:`e2ip_plugins.level.fit_level`
on the validation split (NLL); unfitted they are [1, 0]. Bound (linear): u_i² ≤
c·tr U_ale,i/3·(1/κ_head,i + β·r_cap), so no atom's level exceeds the head's by more than
the factor sqrt(1 + β·κ_head·r_cap).

μ_z, W_z are fitted in one pass over the training atoms (sums and outer products), s_ref,z in
one pass over the validation atoms; everything is a buffer, so checkpoints, packaged /
compiled models and MACE ``.model`` files carry it. Until fitted (s_ref = 0) r = 0. The
map and c apply at evaluation only (the adapters pass ``training``: NequIP's module mode,
MACE's ``training`` argument), so training (the head's NLL) is unchanged.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch

from ._e3nn import o3

MODES = ("linear", "power")


class InvariantFeatures(torch.nn.Module):
    """Rotation-invariant view of e3nn features: l = 0 channels as they are, ‖x_c‖ for l > 0.

    ``irreps_list``: one irreps string per concatenated block (e.g. one per layer).
    Output: (N, num_features).
    """

    def __init__(self, irreps_list: List[str]):
        super().__init__()
        blocks: List[Tuple[int, int, int]] = []  # (start, mul, dim)
        off = 0
        for irreps in irreps_list:
            for mul, ir in o3.Irreps(irreps):
                blocks.append((off, mul, ir.dim))
                off += mul * ir.dim
        self.blocks = blocks
        self.dim_in = off
        self.num_features = sum(mul for _, mul, _ in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols: List[torch.Tensor] = []
        n = x.shape[0]
        for start, mul, dim in self.blocks:
            blk = x[:, start : start + mul * dim]
            if dim == 1:
                cols.append(blk)
            else:
                b = blk.reshape(n, mul, dim)
                cols.append((b * b).sum(-1).sqrt())
        return torch.cat(cols, dim=1)


class NoveltyEvidence(torch.nn.Module):
    """Per-species Gaussian novelty score, evidence map and stored calibration [c, β] (module docstring).

    Args:
        num_features: D, length of the invariant feature vector
        num_species: number of species indices (0 … S−1)
        mode: ``linear`` (default: 1/κ ← 1/κ + β·r) or ``power`` (κ ← κ·max(1, r)^(−p))
        power: p of the ``power`` mode (default 10)
        quantile: q of the reference score on the validation split (default 0.99)
        jitter: δ, relative ridge added to each species covariance (default 1e-6)
        ridge_power: k of the small-sample ridge (D/n_z)^k (default 6)
    """

    def __init__(self, num_features: int, num_species: int, mode: str = "linear", power: float = 10.0,
                 quantile: float = 0.99, jitter: float = 1e-6, ridge_power: float = 6.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"novelty mode must be one of {MODES}, got {mode!r}")
        self.mode = str(mode)
        self.linear = mode == "linear"
        if power < 0:
            raise ValueError(f"novelty power must be >= 0, got {power}")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"novelty quantile must be in (0, 1), got {quantile}")
        self.num_features = int(num_features)
        self.num_species = int(num_species)
        self.power = float(power)
        self.quantile = float(quantile)
        self.jitter = float(jitter)
        self.ridge_power = float(ridge_power)
        self.ratio_cap = 100.0  # r_cap of the factor (module docstring)
        d, s = self.num_features, self.num_species
        self.register_buffer("novelty_mean", torch.zeros(s, d))
        self.register_buffer("novelty_whiten", torch.zeros(s, d, d))
        self.register_buffer("novelty_ref", torch.zeros(s))
        self.register_buffer("novelty_calib", torch.tensor([1.0, 0.0]))  # [c, β], fitted by e2ip_plugins.level

    def score(self, feats: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """s_i (N,): squared Mahalanobis distance to the training Gaussian of the atom's species."""
        out = feats.new_zeros(feats.shape[0])
        mean = self.novelty_mean.to(device=feats.device, dtype=feats.dtype)
        whiten = self.novelty_whiten.to(device=feats.device, dtype=feats.dtype)
        for z in range(self.num_species):
            w = (feats - mean[z]) @ whiten[z]
            out = torch.where(species == z, (w * w).sum(-1), out)
        return out

    def ratio(self, feats: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """r_i = s_i / s_ref (N,); 0 where the species has no fitted reference."""
        ref = self.novelty_ref.to(device=feats.device, dtype=feats.dtype)[species]
        fitted = ref > 0
        return torch.where(fitted, self.score(feats, species) / torch.where(fitted, ref, torch.ones_like(ref)),
                           torch.zeros_like(ref))

    def forward(self, feats: torch.Tensor, species: torch.Tensor, kappa: torch.Tensor,
                training: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r (N,), effective κ (N,), covariance factor c (0-dim)); with ``training`` (0, κ, 1)."""
        if training:
            return kappa * 0.0, kappa, kappa.new_ones(())
        r = self.ratio(feats, species)
        rc = r.clamp(max=self.ratio_cap)
        calib = self.novelty_calib.to(device=kappa.device, dtype=kappa.dtype)
        if self.linear:
            kappa_eff = kappa / (1.0 + calib[1] * kappa * rc)
        else:
            kappa_eff = kappa * rc.clamp(min=1.0).pow(-self.power)
        return r, kappa_eff, calib[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a checkpoint written before the novelty buffers existed, or with another feature layout, loads as
        # unfitted (factor 1) instead of failing: refit it with the fit command of the adapter
        if prefix + "novelty_calib" not in state_dict:  # written before the stored calibration existed
            import warnings

            warnings.warn(f"{prefix}novelty_calib missing from the state dict: the model loads uncalibrated "
                          "(c = 1, β = 0); fit it with nequip_fit_novelty_e2ip / mace_fit_novelty_e2ip")
            state_dict[prefix + "novelty_calib"] = torch.tensor([1.0, 0.0]).to(self.novelty_calib)
        names = ("novelty_mean", "novelty_whiten", "novelty_ref")
        stale = [n for n in names if prefix + n not in state_dict or state_dict[prefix + n].shape != getattr(self, n).shape]
        if stale:
            import warnings

            warnings.warn(f"{prefix}novelty buffers missing or of another shape in the state dict: the novelty "
                          "factor is left unfitted (1); refit it with nequip_fit_novelty_e2ip / mace_fit_novelty_e2ip")
            for n in names:
                state_dict[prefix + n] = torch.zeros_like(getattr(self, n))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def is_fitted(self) -> bool:
        return bool((self.novelty_ref > 0).any())


class NoveltyFitter:
    """One-pass fit of a :class:`NoveltyEvidence`: training moments, then validation reference.

    Usage::

        fit = NoveltyFitter(module)
        for feats, species in train_batches: fit.add_train(feats, species)
        fit.finish_moments()
        for feats, species in val_batches: fit.add_val(feats, species)
        fit.finish_reference()          # keep_train=True and no val batches: the training scores are used

    Moments are accumulated in float64 and summed over ranks when ``torch.distributed``
    is initialised (``all_reduce``); the reference is the mean over ranks of each rank's
    per-species quantile.
    """

    def __init__(self, module: NoveltyEvidence, keep_train: bool = False):
        self.module = module
        self.keep_train = bool(keep_train)  # keep the training features for a reference without val data
        d, s = module.num_features, module.num_species
        self.n = torch.zeros(s, dtype=torch.float64)
        self.sx = torch.zeros(s, d, dtype=torch.float64)
        self.sxx = torch.zeros(s, d, d, dtype=torch.float64)
        self.val_scores: List[List[torch.Tensor]] = [[] for _ in range(s)]
        self.train_feats: List[Tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def add_train(self, feats: torch.Tensor, species: torch.Tensor) -> None:
        x = feats.detach().to("cpu", torch.float64)
        sp = species.detach().to("cpu").long()
        for z in range(self.module.num_species):
            xz = x[sp == z]
            if len(xz):
                self.n[z] += len(xz)
                self.sx[z] += xz.sum(0)
                self.sxx[z] += xz.T @ xz
        if self.keep_train:
            self.train_feats.append((x, sp))

    @torch.no_grad()
    def finish_moments(self) -> None:
        _all_reduce_(self.n, self.sx, self.sxx)
        m = self.module
        eye = torch.eye(m.num_features, dtype=torch.float64)
        mean = torch.zeros(m.num_species, m.num_features, dtype=torch.float64)
        whiten = torch.zeros(m.num_species, m.num_features, m.num_features, dtype=torch.float64)
        for z in range(m.num_species):
            n = float(self.n[z])
            if n < 2:
                continue  # species absent from training: no novelty factor (left unfitted)
            mu = self.sx[z] / n
            cov = (self.sxx[z] - n * torch.outer(mu, mu)) / (n - 1)
            cov = 0.5 * (cov + cov.T)
            delta = max(m.jitter, (m.num_features / n) ** m.ridge_power)  # few atoms per feature (n = D → δ = 1)
            cov = cov + delta * max(float(torch.trace(cov)) / m.num_features, 1e-12) * eye
            prec = torch.linalg.inv(cov)
            whiten[z] = torch.linalg.cholesky(0.5 * (prec + prec.T))  # prec = W Wᵀ, s = ‖(h−μ)W‖²
            mean[z] = mu
        m.novelty_mean.copy_(mean.to(m.novelty_mean))
        m.novelty_whiten.copy_(whiten.to(m.novelty_whiten))
        m.novelty_ref.zero_()
        m.novelty_calib.copy_(torch.tensor([1.0, 0.0]).to(m.novelty_calib))  # refit with e2ip_plugins.level

    @torch.no_grad()
    def add_val(self, feats: torch.Tensor, species: torch.Tensor) -> None:
        x = feats.detach().to("cpu", torch.float64)
        self.add_val_scores(self.module.score(x, species.detach().to("cpu")), species)  # float64 buffers

    @torch.no_grad()
    def add_val_scores(self, scores: torch.Tensor, species: torch.Tensor) -> None:
        """Validation scores s_i already computed (e.g. by a model forward with the reference at 1)."""
        s = scores.detach().to("cpu", torch.float64).reshape(-1)
        sp = species.detach().to("cpu").long().reshape(-1)
        for z in range(self.module.num_species):
            if (sp == z).any():
                self.val_scores[z].append(s[sp == z])

    @torch.no_grad()
    def finish_reference(self) -> None:
        if not any(self.val_scores[z] for z in range(self.module.num_species)):
            for x, sp in self.train_feats:  # no validation data: reference from the training atoms
                self.add_val(x, sp)
        m = self.module
        ref = torch.zeros(m.num_species, dtype=torch.float64)
        has = torch.zeros(m.num_species, dtype=torch.float64)
        for z in range(m.num_species):
            if self.val_scores[z] and float(self.n[z]) >= 2:
                ref[z] = torch.quantile(torch.cat(self.val_scores[z]), m.quantile)
                has[z] = 1.0
        _all_reduce_(ref, has)
        ref = torch.where(has > 0, ref / has.clamp(min=1.0), torch.zeros_like(ref))
        m.novelty_ref.copy_(ref.clamp(min=0.0).to(m.novelty_ref))
        self.train_feats = []


def _all_reduce_(*tensors: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def fit_novelty(
    module: NoveltyEvidence, train_batches: Iterable, val_batches: Optional[Iterable] = None
) -> NoveltyEvidence:
    """Fit ``module`` from iterables of (features, species): training moments, then the reference
    (from the validation batches; without them, from the training atoms). ``val_batches`` is only
    iterated after the moments are fitted, so it may be a lazy generator."""
    fit = NoveltyFitter(module, keep_train=val_batches is None)
    for feats, species in train_batches:
        fit.add_train(feats, species)
    fit.finish_moments()
    for feats, species in val_batches if val_batches is not None else []:
        fit.add_val(feats, species)
    fit.finish_reference()
    return module
