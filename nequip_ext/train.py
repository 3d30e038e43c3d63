"""Loss and metric terms for ``nequip-train`` (DESIGN §2, §4).

Both are :class:`nequip.train.MetricsManager` s, used like NequIP's own::

    training_module:
      loss:
        _target_: nequip_ext.EvidentialEnergyForceLoss
        coeffs: {total_energy: 1.0, forces: 1.0, evidential: 0.1}
        force_rms: ${training_data_stats:forces_rms}
      val_metrics:
        _target_: nequip_ext.UQMetrics
      test_metrics: ${training_module.val_metrics}

The UQ terms are ``field: null`` entries (they receive the whole prediction and
target dicts). The evidential loss keeps sum/count states (``dist_reduce_fx="sum"``);
the UQ metrics keep per-atom columns as ``"cat"`` states so DDP gathers every
rank's atoms and ranks/percentile metrics equal the one-process values. All math
is in :mod:`e2ip_plugins`; the head kind is read off the prediction dict.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from nequip.data import AtomicDataDict
from nequip.train import EnergyForceLoss, EnergyForceMetrics, MetricsManager

import e2ip_plugins
from e2ip_plugins.committee_level import committee_predictive
from e2ip_plugins.energy_noise_head import coherent_head_loss
from e2ip_plugins.force_committee import committee_loss
from e2ip_plugins.metrics import COLUMNS, atom_columns, compute_metrics

from . import _keys as K
from .nn import _frame_index

UQ_METRIC_NAMES = (
    "forces_nll",
    "forces_spearman",
    "forces_auroc",
    "forces_coverage_50",
    "forces_coverage_90",
    "forces_miscal_area",
    "forces_ence",
    "forces_sharpness",
)


def head_kind(data: AtomicDataDict.Type) -> str:
    """``e2ip`` or ``eip`` from the fields present in a model output dict."""
    if K.E2IP_NU_KEY in data:
        return "e2ip"
    if K.EIP_NU_KEY in data:
        return "eip"
    raise KeyError(
        "the prediction holds no evidential head output (e2ip_nu / eip_nu): use "
        "nequip_ext.EvidentialNequIPGNNModel as the model"
    )


def head_out(data: AtomicDataDict.Type, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The e2ip_plugins head-output dict read back from a model output dict (optionally cast to ``dtype``;
    NequIP keeps reference data in float64 while the model may run in float32)."""
    mapping = K.E2IP_HEAD_FIELDS if head_kind(data) == "e2ip" else K.EIP_HEAD_FIELDS
    out = {hk: data[field] for hk, field in mapping.items()}
    return out if dtype is None else {k: v.to(dtype) for k, v in out.items()}


def predictive(data: AtomicDataDict.Type, q: float = 0.5, dtype: Optional[torch.dtype] = None):
    """Per-atom force predictive (e2ip_plugins) from a model output dict: with a committee level (issue 26) the
    deployed N(γ, U_tot) of its covariance keys, else the head's predictive from its evidence."""
    forces = data[AtomicDataDict.FORCE_KEY]
    forces = forces if dtype is None else forces.to(dtype)
    if K.E2IP_COMMITTEE_FORCES_KEY in data and K.FORCES_COVARIANCE_EPISTEMIC_KEY in data:
        return committee_predictive(forces, data[K.FORCES_COVARIANCE_EPISTEMIC_KEY],
                                    data[K.FORCES_COVARIANCE_ALEATORIC_KEY])
    if head_kind(data) == "e2ip":
        return e2ip_plugins.evidential_predictive(forces, head_out(data, dtype))
    return e2ip_plugins.eip_predictive(forces, head_out(data, dtype), q=q)


class _MeanLossMetric(Metric):
    """Mean over the loss entries of every update (float64 sum / count states, summed across DDP ranks);
    subclasses compute a per-atom or per-structure loss in ``update`` and pass it to :meth:`_accumulate`."""

    full_state_update = False
    loss_name = "loss"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, loss: torch.Tensor) -> None:
        self.sum = self.sum + loss.sum()
        self.count = self.count + loss.numel()

    def compute(self) -> torch.Tensor:
        return self.sum / self.count

    def __str__(self) -> str:
        return self.loss_name


class EvidentialForceLossMetric(_MeanLossMetric):
    """Mean over atoms of the evidential force loss (``field: null`` metric).

    e2ip: NLL_StudentT + λ(ν+κ)r² (:func:`e2ip_plugins.evidential_force_loss`);
    eip: seed-002 NLL + λ·Reg (:func:`e2ip_plugins.eip_loss`).
    """

    loss_name = "evidential"

    def __init__(
        self,
        force_rms: float = 1.0,
        reg_weight: float = 0.1,
        residual_metric: str = "euclidean",
        detach_mean: bool = False,
        eip_q: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.force_rms = float(force_rms)
        self.reg_weight = float(reg_weight)
        self.residual_metric = residual_metric
        self.detach_mean = bool(detach_mean)
        self.eip_q = float(eip_q)

    def update(self, preds: AtomicDataDict.Type, target: AtomicDataDict.Type) -> None:
        # evaluate in float64 like NequIP's own metrics (gradients flow through the cast)
        forces = preds[AtomicDataDict.FORCE_KEY].to(torch.float64)
        ref = target[AtomicDataDict.FORCE_KEY].to(torch.float64)
        if head_kind(preds) == "e2ip":
            loss = e2ip_plugins.evidential_force_loss(
                forces,
                head_out(preds, torch.float64),
                ref,
                self.force_rms,
                reg_weight=self.reg_weight,
                residual_metric=self.residual_metric,
                detach_mean=self.detach_mean,
            )
        else:
            mean = forces.detach() if self.detach_mean else forces
            loss = e2ip_plugins.eip_loss(ref, mean, head_out(preds, torch.float64), q=self.eip_q, reg_weight=self.reg_weight)
            e2ip_plugins.check_finite(loss, "eip force loss")
        self._accumulate(loss)



class EnergyNoiseLossMetric(_MeanLossMetric):
    """Coherent energy/force NLL of the energy-noise head per structure / (1 + 3N), mean over structures
    (``field: null``; :func:`e2ip_plugins.energy_noise_head.coherent_head_loss`; docs/energy_uncertainty.md §10).
    Residuals and U_ale are detached, so only ℓ_i, c_i and the features under them are trained."""

    loss_name = "energy_noise"

    def update(self, preds: AtomicDataDict.Type, target: AtomicDataDict.Type) -> None:
        if K.ENERGY_NOISE_LENGTH_KEY not in preds:
            raise KeyError("coeffs.energy_noise needs the energy-noise head: set uq_head.energy_noise.enabled: true "
                           "in the model (nequip_ext.EvidentialNequIPGNNModel)")
        f64 = torch.float64
        num = AtomicDataDict.num_frames(preds)
        forces = preds[AtomicDataDict.FORCE_KEY]
        batch = _frame_index(preds, forces.shape[0], forces.device)
        r_e = (target[AtomicDataDict.TOTAL_ENERGY_KEY].to(f64) - preds[AtomicDataDict.TOTAL_ENERGY_KEY].to(f64)).reshape(-1)
        r_f = target[AtomicDataDict.FORCE_KEY].to(f64) - preds[AtomicDataDict.FORCE_KEY].to(f64)
        h = preds.get(K.ENERGY_NOISE_AMPLITUDE_GRAD_KEY, None)
        loss = coherent_head_loss(r_e, r_f, preds[K.FORCES_COVARIANCE_ALEATORIC_KEY].to(f64),
                                  preds[K.ENERGY_NOISE_LENGTH_KEY].to(f64), preds[K.ENERGY_NOISE_AMPLITUDE_KEY].to(f64),
                                  batch, num, None if h is None else h.to(f64))
        e2ip_plugins.check_finite(loss, "energy-noise loss")
        self._accumulate(loss)



class CommitteeLossMetric(_MeanLossMetric):
    """Mean over atoms of :func:`e2ip_plugins.force_committee.committee_loss` of the in-model committee
    (``field: null``; the model needs ``uq_head.committee``): members' MSE / σ_F² + the committee's 3×3 NLL.
    Reaches the members and, through the features they read, the backbone."""

    loss_name = "committee"

    def __init__(self, force_rms: float = 1.0, nll_weight: float = 1.0, target: str = "forces", **kwargs):
        super().__init__(**kwargs)
        if target not in ("forces", "residual"):
            raise ValueError(f"committee_target must be 'forces' or 'residual', got {target!r}")
        self.force_rms, self.nll_weight, self.target = float(force_rms), float(nll_weight), target

    def update(self, preds: AtomicDataDict.Type, target: AtomicDataDict.Type) -> None:
        if K.E2IP_COMMITTEE_FORCES_KEY not in preds:
            raise KeyError("coeffs.committee needs the in-model committee: set uq_head.committee.enabled: true "
                           "in the model (nequip_ext.EvidentialNequIPGNNModel)")
        f = preds[K.E2IP_COMMITTEE_FORCES_KEY]
        members = f.reshape(f.shape[0], -1, 3).to(torch.float64)
        y = target[AtomicDataDict.FORCE_KEY].to(torch.float64)
        if self.target == "residual":  # members model the error of γ around it: y − γ, γ detached
            y = y - preds[AtomicDataDict.FORCE_KEY].detach().to(torch.float64)
        loss = committee_loss(members, y, self.force_rms, nll_weight=self.nll_weight)
        e2ip_plugins.check_finite(loss, "committee loss")
        self._accumulate(loss)



def EvidentialEnergyForceLoss(
    coeffs: Dict[str, float] = {
        AtomicDataDict.TOTAL_ENERGY_KEY: 1.0,
        AtomicDataDict.FORCE_KEY: 1.0,
        "evidential": 0.1,
    },
    per_atom_energy: bool = True,
    force_rms: float = 1.0,
    reg_weight: float = 0.1,
    residual_metric: str = "euclidean",
    detach_mean: bool = False,
    eip_q: float = 0.5,
    type_names: Optional[List[str]] = None,
    extra_metrics: Optional[List[Dict[str, Any]]] = None,
    committee_target: str = "forces",
    committee_nll_weight: float = 1.0,
) -> MetricsManager:
    """:func:`nequip.train.EnergyForceLoss` plus an ``evidential`` term (coefficient ``coeffs.evidential``).

    Components: ``per_atom_energy_mse`` (or ``total_energy_mse``), ``forces_mse`` and ``evidential``
    (names usable in NequIP's loss-coefficient callbacks). The force MSE term is kept so accuracy is
    not traded for variance (DESIGN §2.1); ``detach_mean: true`` stops the evidential gradient into
    the mean forces. ``force_rms`` (σ_F, set it to ``${training_data_stats:forces_rms}``) makes the
    regulariser's residual dimensionless. ``coeffs.energy_noise`` (optional) adds the coherent energy/force
    NLL of the energy-noise head (:class:`EnergyNoiseLossMetric`; the model needs ``uq_head.energy_noise``);
    ``coeffs.committee`` (optional) the in-model committee's loss (:class:`CommitteeLossMetric`; the model needs
    ``uq_head.committee``); ``committee_target: residual`` makes its members fit y − γ (γ detached) instead of y;
    ``committee_nll_weight`` weighs the committee's 3×3 NLL against the members' MSE (0: MSE only).
    """
    coeffs = dict(coeffs)
    noise_coeff = coeffs.pop("energy_noise", None)
    extra = [] if noise_coeff is None else [
        {"name": "energy_noise", "field": None, "coeff": noise_coeff, "metric": EnergyNoiseLossMetric()}]
    committee_coeff = coeffs.pop("committee", None)
    if committee_coeff is not None:
        extra.append({"name": "committee", "field": None, "coeff": committee_coeff,
                      "metric": CommitteeLossMetric(force_rms=force_rms, target=committee_target,
                                                    nll_weight=committee_nll_weight)})
    ev = {
        "name": "evidential",
        "field": None,
        "coeff": coeffs.pop("evidential", 0.1),
        "metric": EvidentialForceLossMetric(
            force_rms=force_rms,
            reg_weight=reg_weight,
            residual_metric=residual_metric,
            detach_mean=detach_mean,
            eip_q=eip_q,
        ),
    }
    return EnergyForceLoss(
        coeffs=coeffs,
        per_atom_energy=per_atom_energy,
        type_names=type_names,
        extra_metrics=[ev] + extra + list(extra_metrics or []),
    )


class UQScalarMetric(Metric):
    """One DESIGN §4 UQ metric (``name``) over all atoms seen (``field: null`` metric).

    States are the per-atom columns of :func:`e2ip_plugins.metrics.atom_columns` as ``"cat"``
    states; ``compute`` calls :func:`e2ip_plugins.metrics.compute_metrics`.
    """

    full_state_update = False

    def __init__(self, name: str = "forces_nll", eip_q: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if name not in UQ_METRIC_NAMES:
            raise ValueError(f"unknown UQ metric {name!r}; choose from {UQ_METRIC_NAMES}")
        self.metric_name = name
        self.eip_q = float(eip_q)
        for c in COLUMNS:
            self.add_state(c, default=[], dist_reduce_fx="cat")

    def update(self, preds: AtomicDataDict.Type, target: AtomicDataDict.Type) -> None:
        with torch.no_grad():
            pred = predictive(preds, self.eip_q, torch.float64)
            cols = atom_columns(pred, target[AtomicDataDict.FORCE_KEY].to(torch.float64))
        for c in COLUMNS:
            getattr(self, c).append(cols[c].detach().to(torch.float64).reshape(-1))

    def compute(self) -> torch.Tensor:
        cols = {c: dim_zero_cat(getattr(self, c)).cpu().numpy() for c in COLUMNS}
        val = compute_metrics(cols).get(self.metric_name, float("nan"))
        return torch.tensor(val, dtype=torch.float64)

    def __str__(self) -> str:
        return self.metric_name


def UQMetrics(
    coeffs: Dict[str, Optional[float]] = {
        "total_energy_rmse": 1.0,
        "forces_rmse": 1.0,
        "forces_nll": None,
    },
    uq_metrics: Optional[List[str]] = None,
    eip_q: float = 0.5,
    type_names: Optional[List[str]] = None,
    extra_metrics: Optional[List[Dict[str, Any]]] = None,
    committee_target: str = "forces",
) -> MetricsManager:
    """:func:`nequip.train.EnergyForceMetrics` (energy/force RMSE, MAE, max error) plus the DESIGN §4
    UQ metrics, logged as ``val0_epoch/forces_nll``, ``test0_epoch/forces_spearman``, ….

    Args:
        coeffs: weights of the ``weighted_sum`` (accuracy keys of ``EnergyForceMetrics`` and any UQ name)
        uq_metrics: subset of UQ metric names (default: all of ``forces_nll, forces_spearman,
            forces_auroc, forces_coverage_50, forces_coverage_90, forces_miscal_area, forces_ence,
            forces_sharpness``)
    """
    coeffs = dict(coeffs)
    names = list(uq_metrics) if uq_metrics is not None else list(UQ_METRIC_NAMES)
    uq_coeffs = {n: coeffs.pop(n, None) for n in names}
    for n in list(coeffs):
        if n in UQ_METRIC_NAMES:
            raise ValueError(f"coeff given for {n!r} but it is not in uq_metrics {names}")
    uq_entries = [
        {"name": n, "field": None, "coeff": uq_coeffs[n], "metric": UQScalarMetric(n, eip_q=eip_q)} for n in names
    ]
    return EnergyForceMetrics(
        coeffs=coeffs, type_names=type_names, extra_metrics=uq_entries + list(extra_metrics or [])
    )
