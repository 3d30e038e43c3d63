"""Graph modules wrapping the e2ip_plugins heads for NequIP (DESIGN §3, §6).

Each module reads node features that still carry l > 0 (the input of the last
NequIP convnet), runs the framework-agnostic head, and writes into the data dict:

- the raw evidence (``e2ip_nu`` … or ``eip_nu`` …),
- ``forces_covariance`` (U_tot), ``forces_covariance_epistemic``,
  ``forces_covariance_aleatoric`` (N, 3, 3) and ``forces_uncertainty`` (N,).

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
from e2ip_plugins.novelty import InvariantFeatures, NoveltyEvidence

from . import _keys as K

_COV_OUT = {
    K.FORCES_COVARIANCE_KEY: None,  # (N,3,3): Cartesian "ij=ji", registered in nequip_ext/__init__
    K.FORCES_COVARIANCE_EPISTEMIC_KEY: None,
    K.FORCES_COVARIANCE_ALEATORIC_KEY: None,
    K.FORCES_UNCERTAINTY_KEY: None,  # (N,) invariant
}


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
    """Equivariant NIW evidential head (DESIGN §2.1) as a NequIP graph module.

    Novelty-aware evidence (:mod:`e2ip_plugins.novelty`, on by default): κ is multiplied by
    min(1, s/s_ref)^(−p), s the per-species Mahalanobis distance of the invariants of the head's
    input features to the training atoms; fitted by :class:`nequip_ext.NoveltyFitCallback`
    (or ``nequip_fit_novelty_e2ip``), written as ``e2ip_novelty`` = s/s_ref.

    Args:
        irreps_in: irreps dict of the preceding module (must hold ``field`` with l > 0)
        field: node feature field to read (default ``node_features``)
        num_species: number of atom types (the model's ``type_names``)
        novelty: ``{enabled: true, power: 4.0, quantile: 0.9, jitter: 1e-6}``
        **head_kwargs: forwarded to :class:`e2ip_plugins.EvidentialHead`
            (``force_rms``, ``num_channels``, ``mlp_hidden``, ``nu_offset``, ...)
    """

    novelty_enabled: bool

    def __init__(self, irreps_in, field: str = AtomicDataDict.NODE_FEATURES_KEY, num_species: int = 1,
                 novelty: Optional[dict] = None, **head_kwargs):
        super().__init__()
        self.field = field
        nov = dict(novelty or {})
        self.novelty_enabled = bool(nov.pop("enabled", True))
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
            },
        )
        self.head = EvidentialHead(self.irreps_in[field], **head_kwargs)
        self.invariants = InvariantFeatures([str(self.irreps_in[field])])
        self.novelty = NoveltyEvidence(self.invariants.num_features, int(num_species), **nov)

    def novelty_features(self, data: AtomicDataDict.Type):
        """(invariant features (N, D), atom types (N,)) that the novelty score reads."""
        return self.invariants(data[self.field]), data[AtomicDataDict.ATOM_TYPE_KEY]

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        out = self.head(data[self.field])
        kappa = out["kappa"]
        if self.novelty_enabled:
            ratio, factor = self.novelty(
                self.invariants(data[self.field]), data[AtomicDataDict.ATOM_TYPE_KEY], self.training
            )
            kappa = kappa * factor
        else:
            ratio = torch.zeros_like(kappa)
        tot, epi, ale = niw_covariances(out["nu"], kappa, out["sigma0"])
        data[K.E2IP_NU_KEY] = out["nu"]
        data[K.E2IP_KAPPA_KEY] = kappa
        data[K.E2IP_NOVELTY_KEY] = ratio
        data[K.E2IP_SIGMA0_KEY] = out["sigma0"]
        data[K.E2IP_SIGMA0_INV_KEY] = out["sigma0_inv"]
        data[K.E2IP_SIGMA0_LOGDET_KEY] = out["sigma0_logdet"]
        return _write_covariances(data, tot, epi, ale)


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
        self.q = float(q)
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[field],
            irreps_out={**_COV_OUT, K.EIP_NU_KEY: None, K.EIP_ALPHA_KEY: None, K.EIP_BETA_KEY: None},
        )
        self.head = EIPHead(self.irreps_in[field], **head_kwargs)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        out = self.head(data[self.field])
        tot, epi, ale = eip_covariances(out["eip_nu"], out["eip_alpha"], out["eip_beta"], self.q)
        data[K.EIP_NU_KEY] = out["eip_nu"]
        data[K.EIP_ALPHA_KEY] = out["eip_alpha"]
        data[K.EIP_BETA_KEY] = out["eip_beta"]
        return _write_covariances(data, tot, epi, ale)
