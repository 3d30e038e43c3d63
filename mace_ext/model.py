"""MACE models with an evidential force-uncertainty head (DESIGN §2.1, §3).

:func:`attach_e2ip_head` turns a built ``mace.modules.models.MACE`` or
``ScaleShiftMACE`` into :class:`E2IPMACE` / :class:`E2IPScaleShiftMACE` (in place:
the object's class is switched to the subclass and one submodule ``e2ip_head`` is
added; every MACE parameter is kept). The subclass' ``forward`` runs MACE's own
forward unchanged, reads the node features of the last product block whose output
still carries l > 0 (the penultimate block in a standard MACE, whose last block is
scalar-only) from MACE's ``node_feats`` output, and adds the keys listed in
:mod:`mace_ext.outputs` (covariances, evidence, novelty ratio, ``energy_uncertainty``).
Scalar-only backbones (``--max_L 0``; or ``geometric=True``): the head reads l = 1, 2 features built
from the edges and the last block's scalars instead (:mod:`mace_ext.geometric`, issue 28).

``energy_uncertainty`` (issue 15, :mod:`e2ip_plugins.energy_uq`) is derived from the force covariance
under the assumption of docs/energy_uncertainty.md §4 (independent per-atom energy-noise processes, one
length scale ℓ); ℓ is stored in ``e2ip_energy_uq.energy_noise_length`` and fitted on the validation
energies right after the force level (:func:`mace_ext.energy_uq.fit_energy_noise`). ``.model`` files
saved before it existed load with a warning and the unfitted default ℓ = 0.1 Å.

Novelty-aware evidence (:mod:`e2ip_plugins.novelty`, head ``e2ip``, on by default): the
head's κ is multiplied by max(1, s/s_ref)^(−p), s the per-species Mahalanobis distance of the
invariants of *every* product block's output (MACE's ``node_feats``) to the training atoms.
``mace_run_train_e2ip`` fits it when it loads the final stage-one / stage-two checkpoints,
before MACE saves the ``.model`` files (:func:`mace_ext.fit_novelty.fit_novelty`);
``mace_fit_novelty_e2ip`` refits an existing model.

MACE's ``forces`` stay the mean γ. The model pickles like any MACE model
(``torch.save``/``torch.load`` of a ``.model`` file; loading needs ``mace_ext``
importable) and is TorchScript-compilable with ``e3nn.util.jit.compile`` like MACE's
own models, so MACE's run writes ``<name>_compiled.model`` (``torch.jit.load``-able
without ``mace_ext``), whose forward returns every key of :mod:`mace_ext.outputs`.
"""

import inspect
import logging
import types
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

import e2ip_plugins
from e2ip_plugins import EIPHead, EvidentialHead
from e2ip_plugins._e3nn import o3
from e2ip_plugins.head_covariance import covariance_uncertainty, eip_covariances, niw_covariances
from e2ip_plugins.committee_level import CommitteeLevel
from e2ip_plugins.energy_noise_head import EnergyNoiseHead, NoEnergyNoiseHead
from e2ip_plugins.energy_uq import LEGACY_WARNING, EnergyUncertainty
from e2ip_plugins.level import scale_sigma0
from e2ip_plugins.novelty import InvariantFeatures, NoveltyEvidence
from mace.modules.models import MACE, ScaleShiftMACE

from .errors import E2IPConfigError, MACEHookError, installed_mace_version
from .committee import NoCommittee, build_committee
from .geometric import NoGeometricFeatures, build_geometric, edge_geometry
from .outputs import (  # noqa: F401  (re-exported: imported from here by tests and users)
    ATOM_LEVEL_KEYS,
    COVARIANCE_KEYS,
    EVIDENCE_KEYS,
    HEAD_TYPES,
    head_out_from_output,
    output_head_type,
    predictive_from_output,
    zeros_forces,
)
from .validation_columns import level_columns, validation_outputs  # noqa: F401  (re-exported for benchmarks)


def _has_l_gt_0(irreps: "o3.Irreps") -> bool:
    return any(ir.l > 0 for _, ir in o3.Irreps(irreps))


def head_feature_slice(model: torch.nn.Module) -> Tuple[int, str, int, int]:
    """(block index, irreps, start, stop) of the head's input inside MACE's ``node_feats`` output.

    ``node_feats`` is the concatenation of every product block's output; the head reads
    the last block whose irreps still carry l > 0.
    """
    irreps_list = [o3.Irreps(str(p.linear.irreps_out)) for p in model.products]
    candidates = [i for i, irreps in enumerate(irreps_list) if _has_l_gt_0(irreps)]
    if not candidates:
        raise E2IPConfigError(
            "The e2ip head needs a MACE product block whose node features carry l > 0 "
            f"(1o/1e/2e), but the blocks output {[str(i) for i in irreps_list]}. MACE makes the "
            "last interaction scalar-only, so use --num_interactions 2 or more and hidden irreps "
            "with l > 0 (--max_L 1 or 2, e.g. --num_channels 32 --max_L 1)."
        )
    idx = candidates[-1]
    start = sum(irreps.dim for irreps in irreps_list[:idx])
    return idx, str(irreps_list[idx]), start, start + irreps_list[idx].dim


#: MACE.forward / ScaleShiftMACE.forward parameters (mace-torch 0.3.16), re-declared by
#: E2IPMixin.forward because TorchScript needs an explicit signature (checked by
#: :func:`check_forward_signature`, called by ``attach_e2ip_head`` and the hook test)
FORWARD_PARAMS = (
    "data", "training", "compute_force", "compute_virials", "compute_stress", "compute_displacement",
    "compute_hessian", "compute_edge_forces", "compute_atomic_stresses", "lammps_mliap",
)


def check_forward_signature() -> None:
    """Raise :class:`mace_ext.errors.MACEHookError` if MACE's forward signature moved."""
    for cls in (MACE, ScaleShiftMACE):
        params = tuple(inspect.signature(cls.forward).parameters)[1:]
        if params != FORWARD_PARAMS:
            raise MACEHookError(
                f"e2ip re-declares {cls.__name__}.forward's parameters {FORWARD_PARAMS} (mace-torch 0.3.16) "
                f"for TorchScript, but the installed mace-torch {installed_mace_version()} has {params}. "
                "Update mace_ext.model.E2IPMixin.forward and FORWARD_PARAMS."
            )


class E2IPMixin:
    """Adds the evidential head's outputs to a MACE model's forward (see module docstring).

    TorchScript-scriptable (``e3nn.util.jit.compile``, as MACE's run does for
    ``<name>_compiled.model``): no ``super()`` (the backbone's forward is reached through
    the class attribute ``_e2ip_backbone_forward``), an explicit signature, and the
    covariances from the pure-torch maps of ``e2ip_plugins.head_covariance`` (the same
    formulas as the predictive classes, tested equal in ``tests/core``).
    """

    def forward(
        self,
        data: Dict[str, torch.Tensor],
        training: bool = False,
        compute_force: bool = True,
        compute_virials: bool = False,
        compute_stress: bool = False,
        compute_displacement: bool = False,
        compute_hessian: bool = False,
        compute_edge_forces: bool = False,
        compute_atomic_stresses: bool = False,
        lammps_mliap: bool = False,
    ) -> Dict[str, Optional[torch.Tensor]]:
        out = self._e2ip_backbone_forward(
            data, training, compute_force, compute_virials, compute_stress, compute_displacement,
            compute_hessian, compute_edge_forces, compute_atomic_stresses, lammps_mliap,
        )
        node_feats = out["node_feats"]
        assert node_feats is not None
        head_in = self.e2ip_head_input(data, node_feats)
        head_out = self.e2ip_head(head_in)
        center, neighbor, vectors = edge_geometry(data)  # read by the committee and its level
        if self.e2ip_committee_enabled:  # issue 26: the members' direct forces, (N, M, 3)
            if training and self.e2ip_committee_detach:
                head_in, vectors = head_in.detach(), vectors.detach()
            out["e2ip_committee_forces"] = self.e2ip_committee(head_in, center, neighbor, vectors)
        invariants: Optional[torch.Tensor] = None  # read by the novelty score and the energy-noise head
        if self.e2ip_head_type == "e2ip":
            kappa = head_out["kappa"]
            if self.e2ip_novelty_enabled:
                invariants = self.e2ip_invariants(node_feats)
                ratio, kappa, calib = self.e2ip_novelty(
                    invariants, torch.argmax(data["node_attrs"], dim=-1), kappa, training
                )
                out["e2ip_novelty"] = ratio
                head_out["sigma0"], head_out["sigma0_inv"], head_out["sigma0_logdet"] = scale_sigma0(
                    head_out["sigma0"], head_out["sigma0_inv"], head_out["sigma0_logdet"], calib
                )
            head_out["kappa"] = kappa
            out["e2ip_nu"] = head_out["nu"]
            out["e2ip_kappa"] = kappa
            out["e2ip_sigma0"] = head_out["sigma0"]
            out["e2ip_sigma0_inv"] = head_out["sigma0_inv"]
            out["e2ip_sigma0_logdet"] = head_out["sigma0_logdet"]
            cov, cov_epi, cov_ale = niw_covariances(head_out["nu"], head_out["kappa"], head_out["sigma0"])
        else:
            out["eip_nu"] = head_out["eip_nu"]
            out["eip_alpha"] = head_out["eip_alpha"]
            out["eip_beta"] = head_out["eip_beta"]
            cov, cov_epi, cov_ale = eip_covariances(
                head_out["eip_nu"], head_out["eip_alpha"], head_out["eip_beta"], self.e2ip_quantile
            )
        members = out.get("e2ip_committee_forces")
        if members is not None:  # issue 26: the committee's level (e2ip_plugins.committee_level), stored constants
            cov, cov_epi = self.e2ip_committee_level(members, cov_ale, cov_epi, center, neighbor)
        out["forces_covariance"] = cov
        out["forces_covariance_epistemic"] = cov_epi
        out["forces_covariance_aleatoric"] = cov_ale
        out["forces_uncertainty"] = covariance_uncertainty(cov_epi)
        num_graphs = data["ptr"].numel() - 1
        if self.e2ip_energy_noise_enabled:  # energy-noise head (issue 15, e2ip_plugins.energy_noise_head)
            if invariants is None:
                invariants = self.e2ip_invariants(node_feats)
            length, amp = self.e2ip_energy_noise(invariants)
            out["energy_noise_length"] = length
            out["energy_noise_amplitude"] = amp
            if training:
                out["energy_noise_amplitude_grad"] = self.e2ip_energy_noise.amplitude_grad(
                    invariants, amp, data["positions"], data["batch"], num_graphs)
            out["energy_uncertainty"] = self.e2ip_energy_uq(cov, data["batch"], num_graphs, length, amp)
        else:
            out["energy_uncertainty"] = self.e2ip_energy_uq(cov, data["batch"], num_graphs)
        return out

    def e2ip_head_input(self, data: Dict[str, torch.Tensor], node_feats: torch.Tensor) -> torch.Tensor:
        """The head's input: the l > 0 block's features, or [h, v, t] of the geometric construction (issue 28)."""
        feats = node_feats[:, self.e2ip_feat_start : self.e2ip_feat_stop]
        if self.e2ip_geometric_enabled:
            center, neighbor, vectors = edge_geometry(data)
            feats = self.e2ip_geometric(feats, center, neighbor, vectors)
        return feats

    def __setstate__(self, state):
        """Unpickling a ``.model`` saved before issue 15: add the energy module with the default ℓ (warning)."""
        torch.nn.Module.__setstate__(self, state)
        if "e2ip_energy_uq" not in self._modules:
            warnings.warn("e2ip MACE model: " + LEGACY_WARNING)
            ref = next(self.parameters())
            self.e2ip_energy_uq = EnergyUncertainty().to(device=ref.device, dtype=ref.dtype)
        if "e2ip_energy_noise" not in self._modules:  # saved before the energy-noise head option existed
            self.e2ip_energy_noise = NoEnergyNoiseHead()
            self.e2ip_energy_noise_enabled = False
        if "e2ip_geometric" not in self._modules:  # saved before issue 28: the head reads l > 0 features
            self.e2ip_geometric = NoGeometricFeatures()
            self.e2ip_geometric_enabled = False
        if "e2ip_committee" not in self._modules:  # saved before the in-model committee (issue 26)
            self.e2ip_committee = NoCommittee()
            self.e2ip_committee_enabled = False
            self.e2ip_committee_detach = True
        if "e2ip_committee_level" not in self._modules:
            self.e2ip_committee_level = CommitteeLevel()

    def e2ip_config(self) -> Dict[str, Any]:
        return {
            "head": self.e2ip_head_type,
            "novelty": bool(self.e2ip_novelty_enabled),
            "quantile": self.e2ip_quantile,
            "feature_block": int(self.e2ip_feature_block),
            "irreps": self.e2ip_irreps,
            "force_rms": float(self.e2ip_force_rms),
            "energy_noise": bool(self.e2ip_energy_noise_enabled),
            "geometric": bool(self.e2ip_geometric_enabled),
            "committee_members": int(getattr(self.e2ip_committee, "num_members", 0)),
        }


def _backbone_forward(cls) -> Any:
    """``cls.forward`` as a function named ``_e2ip_backbone_forward``.

    TorchScript has no ``super()``; it compiles a method under its function's
    ``__name__``, so the backbone's forward is given a name of its own (same code,
    globals, defaults and annotations; MACE's source is what TorchScript compiles).
    """
    fn = cls.forward
    new = types.FunctionType(fn.__code__, fn.__globals__, "_e2ip_backbone_forward", fn.__defaults__, fn.__closure__)
    new.__annotations__ = dict(fn.__annotations__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__module__ = fn.__module__
    new.__qualname__ = f"{cls.__qualname__}._e2ip_backbone_forward"
    return new


class E2IPMACE(E2IPMixin, MACE):
    """``mace.modules.models.MACE`` plus the evidential head (build with :func:`attach_e2ip_head`)."""

    _e2ip_backbone_forward = _backbone_forward(MACE)


class E2IPScaleShiftMACE(E2IPMixin, ScaleShiftMACE):
    """``mace.modules.models.ScaleShiftMACE`` plus the evidential head (build with :func:`attach_e2ip_head`)."""

    _e2ip_backbone_forward = _backbone_forward(ScaleShiftMACE)


_SUBCLASS = {MACE: E2IPMACE, ScaleShiftMACE: E2IPScaleShiftMACE}


def attach_e2ip_head(
    model: torch.nn.Module,
    head: str = "e2ip",
    force_rms: float = 1.0,
    num_channels: int = 16,
    mlp_hidden: int = 32,
    quantile: float = 0.5,
    novelty: Optional[Dict[str, Any]] = None,
    energy_noise: Optional[Dict[str, Any]] = None,
    geometric: bool = False,
    committee: Optional[Dict[str, Any]] = None,
    **head_kwargs: Any,
) -> torch.nn.Module:
    """Attach an ``e2ip`` (EvidentialHead) or ``eip`` (EIPHead) head to a MACE model, in place.

    ``force_rms`` is σ_F (eV/Å), the force scale of Σ₀ (ignored by ``eip``). The head
    is created in the default dtype and moved to the model's device/dtype. ``novelty``:
    ``{enabled: True, power: 10.0, quantile: 0.99, jitter: 1e-6}`` (e2ip head only). Returns the
    same object, now an :class:`E2IPMACE` or :class:`E2IPScaleShiftMACE`. ``energy_noise``:
    ``{enabled: True, hidden: 16}`` adds the energy-noise head (e2ip head only; issue 15, reads the
    invariants of every product block, :mod:`e2ip_plugins.energy_noise_head`). ``geometric``: the head reads
    the geometric construction on the last block's scalars (:mod:`mace_ext.geometric`, issue 28); used
    whatever the flag when no product block carries l > 0 (``--max_L 0``). ``committee``: ``{num_members: M,
    num_channels: K, detach: True, seed: None, level: "scaled"}`` adds the in-model force committee (issue 26,
    :mod:`mace_ext.committee`) on the head's input; ``e2ip_committee_forces`` (N, M, 3) is then an output. ``level``:
    ``scaled`` (the head's U_epi times the members' local spread ratio) or ``spread`` (the members alone), as
    :class:`e2ip_plugins.committee_level.CommitteeLevel`.
    """
    if head not in HEAD_TYPES:
        raise E2IPConfigError(f"e2ip head must be one of {HEAD_TYPES}, got {head!r}")
    if isinstance(model, E2IPMixin):
        raise E2IPConfigError("this model already carries an e2ip head")
    base = type(model)
    if base not in _SUBCLASS:
        raise E2IPConfigError(
            f"The e2ip head supports MACE models of class MACE or ScaleShiftMACE (--model MACE or "
            f"--model ScaleShiftMACE), got {base.__name__}."
        )
    check_forward_signature()
    try:
        idx, irreps, start, stop = head_feature_slice(model)
    except E2IPConfigError:
        geometric = True  # scalar-only backbone: no l > 0 block to read
    geo_module: torch.nn.Module = NoGeometricFeatures()
    if geometric:
        try:
            geo_module, idx, start, stop = build_geometric(model)
        except ValueError as exc:
            raise E2IPConfigError(str(exc)) from exc
        irreps = geo_module.irreps_out
    try:
        if head == "e2ip":
            module = EvidentialHead(
                irreps, force_rms=float(force_rms), num_channels=num_channels, mlp_hidden=mlp_hidden, **head_kwargs
            )
        else:
            module = EIPHead(irreps, num_channels=num_channels, mlp_hidden=mlp_hidden, **head_kwargs)
    except ValueError as exc:
        raise E2IPConfigError(str(exc)) from exc
    nov = dict(novelty or {})
    novelty_enabled = bool(nov.pop("enabled", True)) and head == "e2ip"
    invariants = InvariantFeatures([str(p.linear.irreps_out) for p in model.products])
    novelty_module = NoveltyEvidence(invariants.num_features, int(model.atomic_numbers.numel()), **nov)
    noise = dict(energy_noise or {})
    noise_enabled = bool(noise.pop("enabled", bool(noise)))
    if noise_enabled and head != "e2ip":
        raise E2IPConfigError("the energy-noise head needs --e2ip_head e2ip (its local force block is the e2ip "
                              "head's aleatoric covariance)")
    noise_module = EnergyNoiseHead(invariants.num_features, **noise) if noise_enabled else NoEnergyNoiseHead()
    energy_module = EnergyUncertainty(length=1.0) if noise_enabled else EnergyUncertainty()
    com = dict(committee or {})
    committee_detach = bool(com.pop("detach", True))
    committee_level = str(com.pop("level", "scaled"))
    if committee_level not in ("scaled", "spread"):
        raise E2IPConfigError(f"the in-model committee's level must be 'scaled' or 'spread', got {committee_level!r}")
    committee_module: torch.nn.Module = NoCommittee()
    if com:
        try:
            committee_module = build_committee(model, irreps, float(force_rms), **com)
        except (TypeError, ValueError) as exc:
            raise E2IPConfigError(f"the in-model committee: {exc}") from exc
    try:
        ref = next(model.parameters())
        module = module.to(device=ref.device, dtype=ref.dtype)
        novelty_module = novelty_module.to(device=ref.device, dtype=ref.dtype)
        energy_module = energy_module.to(device=ref.device, dtype=ref.dtype)
        noise_module = noise_module.to(device=ref.device, dtype=ref.dtype)
        geo_module = geo_module.to(device=ref.device, dtype=ref.dtype)
        committee_module = committee_module.to(device=ref.device, dtype=ref.dtype)
    except StopIteration:  # pragma: no cover
        pass
    model.__class__ = _SUBCLASS[base]
    model.e2ip_head = module  # registers the submodule
    model.e2ip_head_type = head
    model.e2ip_quantile = float(quantile)
    model.e2ip_feature_block = idx
    model.e2ip_irreps = irreps
    model.e2ip_feat_start = int(start)
    model.e2ip_feat_stop = int(stop)
    model.e2ip_force_rms = float(force_rms)
    model.e2ip_invariants = invariants
    model.e2ip_novelty = novelty_module
    model.e2ip_novelty_enabled = novelty_enabled
    model.e2ip_energy_uq = energy_module
    model.e2ip_energy_noise = noise_module
    model.e2ip_energy_noise_enabled = noise_enabled
    model.e2ip_geometric = geo_module
    model.e2ip_geometric_enabled = bool(geometric)
    model.e2ip_committee = committee_module
    model.e2ip_committee_enabled = bool(com)
    model.e2ip_committee_detach = committee_detach
    # its constants are fitted by mace_ext.fit_novelty (with a committee)
    model.e2ip_committee_level = CommitteeLevel(scale_head=committee_level == "scaled")
    source = f"the geometric construction on the scalars of product block {idx}" if geometric else \
        f"product block {idx}"
    logging.info(
        f"e2ip: attached '{head}' head reading {source} ({irreps}), sigma_F = {force_rms:.4g} eV/A, "
        f"{sum(p.numel() for p in module.parameters()) + sum(p.numel() for p in geo_module.parameters())} head "
        "parameters"
    )
    return model


__all__ = [
    "ATOM_LEVEL_KEYS", "COVARIANCE_KEYS", "E2IPConfigError", "E2IPMACE", "E2IPScaleShiftMACE", "EVIDENCE_KEYS",
    "attach_e2ip_head", "head_feature_slice", "head_out_from_output", "output_head_type", "predictive_from_output",
]
_ = e2ip_plugins  # core import first (allow-lists e3nn's constants before mace imports e3nn)
