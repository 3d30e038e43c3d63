"""The in-model committee's deployed level on NequIP (issue 26, :mod:`e2ip_plugins.committee_level`).

With ``uq_head.committee`` enabled, :class:`E2IPCommitteeLevelModule` (``uq_committee_level``, after the head's
covariances, before ``uq_energy``) rewrites the covariance keys: U_epi = c·(tr Ĉ/3)·I from the members' spread,
U_tot = U_ale + U_epi, u = sqrt(tr U_epi/3), with c a stored buffer. So the checkpoint, ``nequip-package``, the
AOTI ``e2ip_ase`` target, the calculators, ``e2ip-md`` and ``e2ip-active-learning`` all read the committee's level.
:func:`nequip_ext.novelty.fit_model_committee` fits c on validation data (called by :func:`nequip_ext.novelty.fit_model_novelty`, so
by ``NoveltyFitCallback`` at every validation and by ``nequip_fit_novelty_e2ip``), then refits the energy length ℓ
(``energy_uncertainty`` reads U_tot). ``uq_head.committee.level: scaled`` (opt-in on NequIP; MACE's default) deploys
the scaled-head form instead: U_epi = c·(s̃/s_ref)·U_epi,head, with the head's U_epi read from the covariance keys the
head wrote and s̃ the members' spread averaged over each atom's edges.
"""

from __future__ import annotations

from typing import Optional

import torch

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from e2ip_plugins.committee_level import CommitteeLevel

from . import _keys as K
from .nn import _COV_OUT, _write_covariances


class E2IPCommitteeLevelModule(GraphModuleMixin, torch.nn.Module):
    """Reads ``e2ip_committee_forces`` (N, 3M) and ``forces_covariance_aleatoric``; writes the covariance keys
    and ``forces_uncertainty`` of :class:`e2ip_plugins.committee_level.CommitteeLevel` (stored scale c)."""

    def __init__(self, irreps_in, scale_head: bool = False):
        super().__init__()
        required = [K.E2IP_COMMITTEE_FORCES_KEY, K.FORCES_COVARIANCE_ALEATORIC_KEY]
        if scale_head:
            required.append(K.FORCES_COVARIANCE_EPISTEMIC_KEY)
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=required, irreps_out=dict(_COV_OUT))
        self.level = CommitteeLevel(scale_head=scale_head)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the committee had a deployed level: unfitted scale (c = 1)
        for name, buf in self.level.named_buffers():
            state_dict.setdefault(prefix + "level." + name, buf.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        members = data[K.E2IP_COMMITTEE_FORCES_KEY]
        members = members.reshape(members.shape[0], -1, 3)
        ale = data[K.FORCES_COVARIANCE_ALEATORIC_KEY]
        if self.level.scale_head:  # the head's U_epi (written by the head's covariance module) × the spread ratio
            edges = data[AtomicDataDict.EDGE_INDEX_KEY]
            tot, epi = self.level(members, ale, data[K.FORCES_COVARIANCE_EPISTEMIC_KEY], edges[0], edges[1])
        else:
            tot, epi = self.level(members, ale)
        return _write_covariances(data, tot, epi, ale)


def committee_level(model: torch.nn.Module) -> Optional[E2IPCommitteeLevelModule]:
    """The model's committee level module (None without ``uq_head.committee``)."""
    for mod in model.modules():
        if isinstance(mod, E2IPCommitteeLevelModule):
            return mod
    return None
