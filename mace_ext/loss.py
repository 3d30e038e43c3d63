"""MACE loss and evaluation metric with the evidential force term (DESIGN §2.1, §4).

:class:`E2IPLoss` wraps any MACE loss module ``base`` (energy/forces/stress ...):

    loss = base(ref, pred) + w · mean_i[ c_i · L_i ]  (+ w_E · mean_s[ c_s · NLL_s/(1+3N_s) ])

with ``L_i`` the per-atom evidential loss of the head that produced ``pred``
(``e2ip_plugins.evidential_force_loss`` or ``e2ip_plugins.eip_loss``), ``c_i`` the
configuration weight × forces weight of atom i's structure (as in MACE's force MSE),
and the mean DDP-corrected with MACE's ``reduce_loss``. With ``energy_noise_weight`` w_E > 0 the
coherent energy/force NLL of the energy-noise head is added per structure (c_s = configuration weight ×
energy weight; issue 15, :mod:`e2ip_plugins.energy_noise_head`). ``sigma_f`` (σ_F, eV/Å)
makes the regulariser dimensionless; ``mace_run_train_e2ip`` sets it to the RMS of
the training forces (see :mod:`mace_ext.cli`).

:class:`E2IPMACELoss` is MACE's ``MACELoss`` evaluation metric plus the UQ metric
columns of ``e2ip_plugins.metrics`` as torchmetrics ``cat`` states (so they are
gathered across DDP ranks like MACE's own ``delta_fs``); ``compute()`` adds
``forces_nll``, ``forces_spearman``, ... to MACE's aux dict.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from e2ip_plugins import check_finite, eip_loss, evidential_force_loss
from e2ip_plugins.energy_noise_head import coherent_head_loss
from e2ip_plugins.force_committee import committee_loss
from e2ip_plugins.metrics import COLUMNS, UQMetricState, atom_columns
from mace.modules.loss import reduce_loss
from mace.tools.train import MACELoss

from .outputs import head_out_from_output, output_head_type, predictive_from_output


class E2IPLoss(torch.nn.Module):
    """MACE loss + ``weight`` × mean per-atom evidential loss (see module docstring)."""

    def __init__(
        self,
        base: torch.nn.Module,
        weight: float = 1.0,
        reg_weight: float = 0.1,
        sigma_f: float = 1.0,
        detach_mean: bool = False,
        residual_metric: str = "euclidean",
        quantile: float = 0.5,
        energy_noise_weight: float = 0.0,
        committee_weight: float = 0.0,
        committee_nll_weight: float = 0.0,
    ):
        super().__init__()
        self.committee_weight = float(committee_weight)
        self.committee_nll_weight = float(committee_nll_weight)
        self.energy_noise_weight = float(energy_noise_weight)
        self.base = base
        self.weight = float(weight)
        self.reg_weight = float(reg_weight)
        self.sigma_f = float(sigma_f)
        self.detach_mean = bool(detach_mean)
        self.residual_metric = residual_metric
        self.quantile = float(quantile)

    def evidential_per_atom(self, ref, pred) -> torch.Tensor:
        head_type = output_head_type(pred)
        if head_type is None:
            raise KeyError(
                "E2IPLoss: the model output has no e2ip/eip evidence keys; the evidential head was not "
                "attached (is the model built by mace_run_train_e2ip / mace_ext.attach_e2ip_head?)"
            )
        head_out = head_out_from_output(pred, head_type)
        forces, y = pred["forces"], ref["forces"]
        if head_type == "e2ip":
            return evidential_force_loss(
                forces, head_out, y, self.sigma_f, reg_weight=self.reg_weight,
                residual_metric=self.residual_metric, detach_mean=self.detach_mean,
            )
        gamma = forces.detach() if self.detach_mean else forces
        return eip_loss(y, gamma, head_out, q=self.quantile, reg_weight=self.reg_weight)

    def energy_noise_per_structure(self, ref, pred) -> torch.Tensor:
        """Coherent energy/force NLL / (1 + 3N) per structure (:func:`e2ip_plugins.energy_noise_head.coherent_head_loss`)."""
        if pred.get("energy_noise_length") is None:
            raise KeyError("--e2ip_energy_noise_weight > 0 needs the energy-noise head (--e2ip_energy_noise)")
        num = ref.ptr.numel() - 1
        return coherent_head_loss(ref.energy - pred["energy"], ref.forces - pred["forces"],
                                  pred["forces_covariance_aleatoric"], pred["energy_noise_length"],
                                  pred["energy_noise_amplitude"], ref.batch, num, pred.get("energy_noise_amplitude_grad"))

    def forward(self, ref, pred, ddp: Optional[bool] = None) -> torch.Tensor:
        loss = self.base(ref=ref, pred=pred, ddp=ddp)
        if self.energy_noise_weight > 0.0:
            per_structure = self.energy_noise_per_structure(ref, pred)
            check_finite(per_structure, "energy-noise loss")
            loss = loss + self.energy_noise_weight * reduce_loss(ref.weight * ref.energy_weight * per_structure, ddp)
        counts = ref.ptr[1:] - ref.ptr[:-1]
        w = torch.repeat_interleave(ref.weight * ref.forces_weight, counts)
        if self.committee_weight > 0.0:  # issue 26: the in-model committee's members (--e2ip_committee)
            members = pred.get("e2ip_committee_forces")
            if members is None:
                raise KeyError("--e2ip_committee_weight > 0 needs the in-model committee (--e2ip_committee M)")
            per_atom_c = committee_loss(members, ref["forces"], self.sigma_f, nll_weight=self.committee_nll_weight)
            check_finite(per_atom_c, "committee loss")
            loss = loss + self.committee_weight * reduce_loss(w * per_atom_c, ddp)
        if self.weight == 0.0:
            return loss
        per_atom = self.evidential_per_atom(ref, pred)
        return loss + self.weight * reduce_loss(w * per_atom, ddp)

    def __repr__(self) -> str:
        return (
            f"E2IPLoss(base={self.base!r}, weight={self.weight:.3g}, reg_weight={self.reg_weight:.3g}, "
            f"sigma_f={self.sigma_f:.4g}, detach_mean={self.detach_mean}, residual_metric={self.residual_metric}, "
            f"quantile={self.quantile}, energy_noise_weight={self.energy_noise_weight:.3g}, "
            f"committee_weight={self.committee_weight:.3g}, committee_nll_weight={self.committee_nll_weight:.3g})"
        )


class E2IPMACELoss(MACELoss):
    """MACE's evaluation metric plus the DESIGN §4 UQ metrics (see module docstring)."""

    def __init__(self, loss_fn: torch.nn.Module, quantile: float = 0.5):
        super().__init__(loss_fn=loss_fn)
        self.e2ip_quantile = float(getattr(loss_fn, "quantile", quantile))
        for c in COLUMNS:
            self.add_state(f"e2ip_col_{c}", default=[], dist_reduce_fx="cat")

    def update(self, batch, output):  # pylint: disable=arguments-differ
        super().update(batch, output)
        if output_head_type(output) is None or output.get("forces") is None or batch.forces is None:
            return
        pred = predictive_from_output(output, self.e2ip_quantile)
        for c, v in atom_columns(pred, batch.forces).items():
            getattr(self, f"e2ip_col_{c}").append(v.detach().to(torch.float64).reshape(-1))

    def compute(self):
        loss, aux = super().compute()
        parts = {c: getattr(self, f"e2ip_col_{c}") for c in COLUMNS}
        if any(len(p) if isinstance(p, list) else p.numel() for p in parts.values()):
            state = UQMetricState().update_columns(
                {c: (torch.cat(p) if isinstance(p, list) else p) for c, p in parts.items()}
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                aux.update(state.compute())
        return loss, aux
