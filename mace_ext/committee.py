"""The in-model force committee (issue 26, opt-in ``--e2ip_committee M``) on a MACE backbone: M members of
:class:`e2ip_plugins.message_committee.MessageCommittee` read the features the e²IP head reads and MACE's edges
(centre = receiver, r_neighbour − r_centre from :func:`mace_ext.geometric.edge_geometry`), and write
``e2ip_committee_forces`` (N, M, 3), the members' direct forces. Trained by ``--e2ip_committee_weight`` of
:class:`mace_ext.loss.E2IPLoss` (the core's :func:`e2ip_plugins.force_committee.committee_loss`); with
``--e2ip_committee_detach`` (default) the members' loss trains only the members. MACE's ``forces`` stay −∂E/∂r.
"""

from __future__ import annotations

from typing import Optional

import torch

from e2ip_plugins.message_committee import MessageCommittee

from .geometric import avg_num_neighbors


class NoCommittee(torch.nn.Module):
    """Placeholder without a committee (one TorchScript-compilable forward); never called."""

    def forward(self, features: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        return features


def build_committee(model: torch.nn.Module, irreps, force_rms: float, num_members: int, num_channels: int = 8,
                    seed: Optional[int] = None) -> MessageCommittee:
    """The members on ``irreps`` (the head's input) with the model's r_max and n̄; no seed: the generator draws one."""
    return MessageCommittee(irreps, float(model.r_max), num_members=num_members, num_channels=num_channels,
                            avg_num_neighbors=avg_num_neighbors(model), force_rms=force_rms, seed=seed)
