"""Graph modules wrapping the e2ip_plugins heads for NequIP (DESIGN §3, §6).

Each module reads node features that still carry l > 0 (the input of the last
NequIP convnet), runs the framework-agnostic head, and writes into the data dict:

- the raw evidence (``e2ip_nu`` … or ``eip_nu`` …),
- ``forces_covariance`` (U_tot), ``forces_covariance_epistemic``,
  ``forces_covariance_aleatoric`` (N, 3, 3) and ``forces_uncertainty`` (N,).

With novelty-aware evidence (e²IP, default), :class:`E2IPNoveltyModule` after the last
convnet applies the novelty factor to κ and writes the covariance keys instead.
The covariances depend only on the head outputs, so they are produced here, in the
same forward pass as the energy; the mean forces come from NequIP's
``ForceStressOutput``. Both modules are TorchScript-scriptable and
``torch.export``-traceable (no ``.item()``, no branching on tensor values).
"""


from typing import Optional

import torch

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from e2ip_plugins import EIPHead, EvidentialHead
from e2ip_plugins.head_covariance import covariance_uncertainty, eip_covariances, niw_covariances
from e2ip_plugins.energy_noise_head import EnergyNoiseHead
from e2ip_plugins.energy_uq import EnergyUncertainty
from e2ip_plugins.force_committee import ForceCommittee
from e2ip_plugins.level import scale_sigma0
from e2ip_plugins.novelty import InvariantFeatures, NoveltyEvidence

from . import _keys as K

_COV_OUT = {
    K.FORCES_COVARIANCE_KEY: None,  # (N,3,3): Cartesian "ij=ji", registered in nequip_ext/__init__
    K.FORCES_COVARIANCE_EPISTEMIC_KEY: None,
    K.FORCES_COVARIANCE_ALEATORIC_KEY: None,
    K.FORCES_UNCERTAINTY_KEY: None,  # (N,) invariant
}


def _input(x: torch.Tensor, detach: bool) -> torch.Tensor:
    """The features a module reads, cut from the graph when ``detach`` (``detach_input`` in training: a frozen
    backbone, :mod:`nequip_ext.attach`, gets no backward pass from the head's loss; inference keeps ∂/∂r)."""
    return x.detach() if detach else x


def _write_covariances(
    data: AtomicDataDict.Type, tot: torch.Tensor, epi: torch.Tensor, ale: torch.Tensor
) -> AtomicDataDict.Type:
    """Write the DESIGN §3 covariance keys and u_i into the graph dict."""
    data[K.FORCES_COVARIANCE_KEY] = tot
    data[K.FORCES_COVARIANCE_EPISTEMIC_KEY] = epi
    data[K.FORCES_COVARIANCE_ALEATORIC_KEY] = ale
    data[K.FORCES_UNCERTAINTY_KEY] = covariance_uncertainty(epi)
    return data


class E2IPHeadModule(GraphModuleMixin, torch.nn.Module):
    """Equivariant NIW evidential head (DESIGN §2.1) as a NequIP graph module (before the last convnet).

    With novelty (on by default) it writes the head's raw evidence and the invariants of its input
    (``e2ip_head_invariants``); :class:`E2IPNoveltyModule`, after the last convnet, applies the
    novelty factor and writes κ and the covariance keys. Without novelty it writes them itself.

    Args:
        irreps_in: irreps dict of the preceding module (must hold ``field`` with l > 0)
        field: node feature field to read (default ``node_features``)
        num_species: accepted for a uniform ``uq_head`` interface (used by :class:`E2IPNoveltyModule`)
        novelty: ``{enabled: true, ...}``; the other options go to :class:`E2IPNoveltyModule`
        **head_kwargs: forwarded to :class:`e2ip_plugins.EvidentialHead`
            (``force_rms``, ``num_channels``, ``mlp_hidden``, ``nu_offset``, ...)
    """

    novelty_enabled: bool
    detach_input: bool

    def __init__(self, irreps_in, field: str = AtomicDataDict.NODE_FEATURES_KEY, num_species: int = 1,
                 novelty: Optional[dict] = None, **head_kwargs):
        super().__init__()
        self.field = field
        self.detach_input = False
        self.novelty_enabled = bool(dict(novelty or {}).get("enabled", True))
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[field],
            irreps_out={
                **_COV_OUT,
                K.E2IP_NU_KEY: None,
                K.E2IP_KAPPA_KEY: None,
                K.E2IP_SIGMA0_KEY: None,
                K.E2IP_SIGMA0_INV_KEY: None,
                K.E2IP_SIGMA0_LOGDET_KEY: None,
                K.E2IP_NOVELTY_KEY: None,
                **({K.E2IP_HEAD_INVARIANTS_KEY: None} if self.novelty_enabled else {}),
            },
        )
        self.head = EvidentialHead(self.irreps_in[field], **head_kwargs)
        self.invariants = InvariantFeatures([str(self.irreps_in[field])])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the novelty moved to E2IPNoveltyModule hold its buffers here
        for key in [k for k in state_dict if k.startswith(prefix + "novelty.")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        x = _input(data[self.field], self.training and self.detach_input)
        out = self.head(x)
        data[K.E2IP_NU_KEY] = out["nu"]
        data[K.E2IP_KAPPA_KEY] = out["kappa"]
        data[K.E2IP_SIGMA0_KEY] = out["sigma0"]
        data[K.E2IP_SIGMA0_INV_KEY] = out["sigma0_inv"]
        data[K.E2IP_SIGMA0_LOGDET_KEY] = out["sigma0_logdet"]
        if self.novelty_enabled:
            data[K.E2IP_HEAD_INVARIANTS_KEY] = self.invariants(x)
            return data  # E2IPNoveltyModule writes e2ip_novelty, κ and the covariances
        data[K.E2IP_NOVELTY_KEY] = torch.zeros_like(out["kappa"])
        tot, epi, ale = niw_covariances(out["nu"], out["kappa"], out["sigma0"])
        return _write_covariances(data, tot, epi, ale)


class E2IPCommitteeModule(GraphModuleMixin, torch.nn.Module):
    """M direct force heads (:class:`e2ip_plugins.force_committee.ForceCommittee`) on the node features the
    e²IP head reads (before the last convnet); writes ``e2ip_committee_forces`` (N, 3M), irreps M×1o.
    Opt-in (``uq_head.committee.enabled``, issue 26): trained by ``coeffs.committee`` of
    :func:`nequip_ext.EvidentialEnergyForceLoss`; not yet read by the deployed covariances.

    Args:
        irreps_in: irreps dict of the preceding module (``field`` must hold 1o features)
        field: node feature field to read (default ``node_features``)
        depth_field: also read these node features (an earlier convnet's output, written by
            :class:`E2IPFeatureTap`), concatenated before ``field``: members reading two depths
        **committee: ``num_members`` (8), ``num_channels`` (8), ``mlp_hidden`` (16), ``force_rms``, ``seed``
    """

    detach_input: bool
    two_depths: bool

    def __init__(self, irreps_in, field: str = AtomicDataDict.NODE_FEATURES_KEY, depth_field: Optional[str] = None,
                 **committee):
        super().__init__()
        self.field = field
        self.depth_field = field if depth_field is None else depth_field
        self.two_depths = depth_field is not None
        self.detach_input = False
        members = int(committee.get("num_members", 8))
        required = [field] + ([depth_field] if depth_field is not None else [])
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=required,
                          irreps_out={K.E2IP_COMMITTEE_FORCES_KEY: f"{members}x1o"})
        feats = self.irreps_in[field]
        if depth_field is not None:
            feats = self.irreps_in[depth_field] + feats  # concatenated in this order (not simplified)
        self.committee = ForceCommittee(feats, **committee)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        x = data[self.field]
        if self.two_depths:
            x = torch.cat([data[self.depth_field], x], dim=-1)
        f = self.committee(_input(x, self.training and self.detach_input))
        data[K.E2IP_COMMITTEE_FORCES_KEY] = f.reshape(f.shape[0], -1)
        return data


class E2IPFeatureTap(GraphModuleMixin, torch.nn.Module):
    """Copies ``node_features`` (an intermediate convnet's output) into ``out_field`` for a later module."""

    def __init__(self, irreps_in, out_field: str = K.E2IP_COMMITTEE_DEPTH_KEY):
        super().__init__()
        self.out_field = out_field
        nf = AtomicDataDict.NODE_FEATURES_KEY
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[nf], irreps_out={out_field: irreps_in[nf]})

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data[self.out_field] = data[AtomicDataDict.NODE_FEATURES_KEY]
        return data


class E2IPNoveltyModule(GraphModuleMixin, torch.nn.Module):
    """Novelty-aware evidence (:mod:`e2ip_plugins.novelty`) after the last NequIP convnet.

    1/κ ← 1/κ + β·min(r, r_cap) (mode ``linear``, default) or κ ← κ·max(1, r)^(−p) (``power``), and
    Σ₀ ← c·Σ₀ (the stored validation-fitted calibration [c, β]); r = s/s_ref, s the per-species
    Mahalanobis distance to the training atoms of [invariants of the head's input, invariants of
    ``field`` (the last convnet's output)]. Writes ``e2ip_novelty`` = r, the effective
    ``e2ip_kappa``, the calibrated ``e2ip_sigma0*`` and the covariance keys.
    Parameter-free (buffers only), so checkpoints keep the parameter order of the head-only
    model. Fitted by :class:`nequip_ext.NoveltyFitCallback` or ``nequip_fit_novelty_e2ip``.

    Args:
        irreps_in: irreps dict after the last convnet
        num_species: number of atom types (the model's ``type_names``)
        head_invariants: D of ``e2ip_head_invariants``
        field: node features after the last convnet (default ``node_features``)
        **novelty: ``mode`` (``linear``), ``power`` (10), ``quantile`` (0.99), ``jitter`` (1e-6) of
            :class:`e2ip_plugins.novelty.NoveltyEvidence`
    """

    detach_input: bool

    def __init__(self, irreps_in, num_species: int, head_invariants: int,
                 field: str = AtomicDataDict.NODE_FEATURES_KEY, **novelty):
        super().__init__()
        self.field = field
        self.detach_input = False
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[field, K.E2IP_HEAD_INVARIANTS_KEY],
            irreps_out={**_COV_OUT, K.E2IP_KAPPA_KEY: None, K.E2IP_NOVELTY_KEY: None, K.E2IP_SIGMA0_KEY: None,
                        K.E2IP_SIGMA0_INV_KEY: None, K.E2IP_SIGMA0_LOGDET_KEY: None},
        )
        self.invariants = InvariantFeatures([str(self.irreps_in[field])])
        self.novelty = NoveltyEvidence(int(head_invariants) + self.invariants.num_features, int(num_species), **novelty)

    def novelty_features(self, data: AtomicDataDict.Type):
        """(invariant features (N, D), atom types (N,)) that the novelty score reads."""
        x = _input(data[self.field], self.training and self.detach_input)
        feats = torch.cat([data[K.E2IP_HEAD_INVARIANTS_KEY], self.invariants(x)], dim=1)
        return feats, data[AtomicDataDict.ATOM_TYPE_KEY]

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        feats, species = self.novelty_features(data)
        ratio, kappa, calib = self.novelty(feats, species, data[K.E2IP_KAPPA_KEY], self.training)
        sigma0, sigma0_inv, logdet = scale_sigma0(
            data[K.E2IP_SIGMA0_KEY], data[K.E2IP_SIGMA0_INV_KEY], data[K.E2IP_SIGMA0_LOGDET_KEY], calib
        )
        tot, epi, ale = niw_covariances(data[K.E2IP_NU_KEY], kappa, sigma0)
        data[K.E2IP_KAPPA_KEY] = kappa
        data[K.E2IP_SIGMA0_KEY] = sigma0
        data[K.E2IP_SIGMA0_INV_KEY] = sigma0_inv
        data[K.E2IP_SIGMA0_LOGDET_KEY] = logdet
        data[K.E2IP_NOVELTY_KEY] = ratio
        return _write_covariances(data, tot, epi, ale)


def _frame_index(data: AtomicDataDict.Type, num_atoms: int, device: torch.device) -> torch.Tensor:
    if AtomicDataDict.BATCH_KEY in data:
        return data[AtomicDataDict.BATCH_KEY]
    return torch.zeros(num_atoms, dtype=torch.long, device=device)


class E2IPEnergyUncertaintyModule(GraphModuleMixin, torch.nn.Module):
    """Per-frame ``energy_uncertainty`` (frames, 1), eV: σ_E = ℓ·sqrt(Σ_i tr U_tot,i/3) (issue 15).

    APPROXIMATION (docs/energy_uncertainty.md §4): the force covariance is read as the derivative of
    independent per-atom energy-noise processes with one length scale ℓ, stored in the buffer
    ``energy.energy_noise_length`` = [ℓ, S_fit] and fitted on validation energies next to the force level
    (:mod:`nequip_ext.novelty`). Checkpoints without it load with a warning and ℓ = 0.1 Å (unfitted).
    Appended at the end of the energy model, after the covariance fields exist. Buffers only.
    """

    def __init__(self, irreps_in):
        super().__init__()
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[K.FORCES_COVARIANCE_KEY],
                          irreps_out={K.ENERGY_UNCERTAINTY_KEY: "0e"})
        self.energy = EnergyUncertainty()

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        cov = data[K.FORCES_COVARIANCE_KEY]
        sigma = self.energy(cov, _frame_index(data, cov.shape[0], cov.device), AtomicDataDict.num_frames(data))
        data[K.ENERGY_UNCERTAINTY_KEY] = sigma.unsqueeze(-1)
        return data


class E2IPEnergyNoiseModule(GraphModuleMixin, torch.nn.Module):
    """``energy_uncertainty`` from an energy-noise head (``uq_head.energy_noise``, issue 15, docs §10).

    Reads the invariant node features after the last convnet, predicts ℓ_i (``energy_noise_length``) and
    c_i (``energy_noise_amplitude``) with :class:`e2ip_plugins.energy_noise_head.EnergyNoiseHead`, and writes
    σ_E = k·sqrt(A² + Σ_i ℓ_i² tr U_tot,i/3) (frames, 1), k fitted on validation energies (buffer
    ``energy.energy_noise_length`` = [k, S_fit]). In training it also writes h = ∂A/∂r
    (``energy_noise_amplitude_grad``) for the coherent loss term (:class:`nequip_ext.train.EnergyNoiseLossMetric`).
    ``detach_features`` (default true): the term trains the head only, not the backbone.
    Appended last, like :class:`E2IPEnergyUncertaintyModule`.
    """

    def __init__(self, irreps_in, mlp_hidden: int = 16, init_length: float = 1.0, detach_features: bool = True,
                 field: str = AtomicDataDict.NODE_FEATURES_KEY):
        super().__init__()
        self.field = field
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[K.FORCES_COVARIANCE_KEY, field],
                          irreps_out={K.ENERGY_UNCERTAINTY_KEY: "0e", K.ENERGY_NOISE_LENGTH_KEY: None,
                                      K.ENERGY_NOISE_AMPLITUDE_KEY: None, K.ENERGY_NOISE_AMPLITUDE_GRAD_KEY: None})
        irreps = self.irreps_in[field]
        if any(ir.l != 0 for _, ir in irreps):
            raise ValueError(f"the energy-noise head reads invariant features, but {field} has irreps {irreps}")
        self.noise_head = EnergyNoiseHead(irreps.dim, hidden=mlp_hidden, init_length=init_length,
                                          detach_features=detach_features)
        self.energy = EnergyUncertainty(length=1.0)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        cov = data[K.FORCES_COVARIANCE_KEY]
        batch = _frame_index(data, cov.shape[0], cov.device)
        num = AtomicDataDict.num_frames(data)
        length, amp = self.noise_head(data[self.field])
        data[K.ENERGY_NOISE_LENGTH_KEY] = length
        data[K.ENERGY_NOISE_AMPLITUDE_KEY] = amp
        if self.training:
            data[K.ENERGY_NOISE_AMPLITUDE_GRAD_KEY] = self.noise_head.amplitude_grad(
                data[self.field], amp, data[AtomicDataDict.POSITIONS_KEY], batch, num)
        data[K.ENERGY_UNCERTAINTY_KEY] = self.energy(cov, batch, num, length, amp).unsqueeze(-1)
        return data


class EIPHeadModule(GraphModuleMixin, torch.nn.Module):
    """eIP per-component quantile evidential head (DESIGN §2.2, seed 002) as a NequIP graph module.

    NOT rotation-equivariant by construction: its covariances are diagonal in the lab frame.

    Args:
        irreps_in: irreps dict of the preceding module (must hold ``field`` with l = 1)
        field: node feature field to read (default ``node_features``)
        q: quantile of the asymmetric-Laplace mixture (default 0.5)
        **head_kwargs: forwarded to :class:`e2ip_plugins.EIPHead` (``num_channels``, ``mlp_hidden``, ``eps``)
    """

    q: float
    detach_input: bool

    def __init__(
        self,
        irreps_in,
        field: str = AtomicDataDict.NODE_FEATURES_KEY,
        q: float = 0.5,
        force_rms: Optional[float] = None,  # accepted for a uniform `uq_head` interface; unused by eIP
        num_species: int = 1,  # idem
        novelty: Optional[dict] = None,  # idem: the novelty factor is an e²IP (κ) mechanism
        **head_kwargs,
    ):
        super().__init__()
        self.field = field
        self.detach_input = False
        self.q = float(q)
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[field],
            irreps_out={**_COV_OUT, K.EIP_NU_KEY: None, K.EIP_ALPHA_KEY: None, K.EIP_BETA_KEY: None},
        )
        self.head = EIPHead(self.irreps_in[field], **head_kwargs)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        out = self.head(_input(data[self.field], self.training and self.detach_input))
        tot, epi, ale = eip_covariances(out["eip_nu"], out["eip_alpha"], out["eip_beta"], self.q)
        data[K.EIP_NU_KEY] = out["eip_nu"]
        data[K.EIP_ALPHA_KEY] = out["eip_alpha"]
        data[K.EIP_BETA_KEY] = out["eip_beta"]
        return _write_covariances(data, tot, epi, ale)
