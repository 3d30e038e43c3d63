"""Fit an :class:`~e2ip_plugins.head.EvidentialHead` on a frozen backbone's cached outputs (issue 27).

With the backbone frozen, its mean forces γ_i and the head's input features h_i are fixed per atom, so they
are computed once (by the framework adapter) and the head alone is trained on the tensors
:class:`CachedAtoms` ``(features h, forces γ, ref_forces y, ptr)``, minimising the training loss of the
joint fit (:func:`e2ip_plugins.losses.evidential_force_loss`), averaged over the atoms of a batch:

    L = mean_i [ NLL_StudentT(y_i | γ_i, ν_i, κ_i, Σ₀,i) + λ (ν_i + κ_i) ‖y_i − γ_i‖² / σ_F² ],
    (ν_i, κ_i, Σ₀,i) = head(h_i).

An epoch costs one head forward/backward per atom. Batches hold ``batch_size`` whole structures, in an
order drawn from ``seed`` and the epoch number alone, so a resumed fit replays the same batches. The head
kept at the end is the one of the epoch with the lowest validation NLL (mean per atom, no regulariser; the
last epoch's without validation data). :meth:`HeadFit.state_dict` holds everything a resume needs (head,
Adam state, epoch, best head); :meth:`HeadFit.run` writes it to ``checkpoint`` after every epoch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .losses import evidential_force_loss, evidential_predictive


@contextlib.contextmanager
def replayable_script():
    """TorchScript's profiling executor specialises scripted code (e3nn's layers, in the head and the backbones)
    on the calls a process has made, with or without grad, and its graphs move results by an ulp with that
    history; the simple executor without graph optimisation gives the same numbers on every call. A scripted
    function keeps the executor of its first call in a process, so this holds where that call ran under this
    context (a fresh process per run, as on the command line); after earlier calls outside it, an ulp may differ."""
    old = torch._C._jit_set_profiling_executor(False)  # pylint: disable=protected-access
    try:
        with torch.jit.optimized_execution(False):
            yield
    finally:
        torch._C._jit_set_profiling_executor(old)  # pylint: disable=protected-access


@dataclass
class CachedAtoms:
    """Per-atom head inputs ``features`` (N, D), mean forces ``forces`` (N, 3), reference forces
    ``ref_forces`` (N, 3); ``ptr`` (S + 1,) the first atom of each of the S structures (and N)."""

    features: torch.Tensor
    forces: torch.Tensor
    ref_forces: torch.Tensor
    ptr: torch.Tensor

    @staticmethod
    def cat(parts: List["CachedAtoms"]) -> "CachedAtoms":
        """One set from per-batch parts (each ``ptr`` starting at 0)."""
        offsets, ptrs = 0, [torch.zeros(1, dtype=torch.long)]
        for p in parts:
            ptrs.append(p.ptr[1:].cpu().long() + offsets)
            offsets += int(p.ptr[-1])
        return CachedAtoms(
            torch.cat([p.features for p in parts]), torch.cat([p.forces for p in parts]),
            torch.cat([p.ref_forces for p in parts]), torch.cat(ptrs),
        )

    @property
    def num_structures(self) -> int:
        return int(self.ptr.numel()) - 1

    def structures(self, index: torch.Tensor) -> "CachedAtoms":
        """The atoms of the structures ``index`` (in that order)."""
        counts = (self.ptr[1:] - self.ptr[:-1])[index]
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
        # atom k of the selection: first atom of its structure + its offset inside it (no per-structure loop)
        atoms = torch.repeat_interleave(self.ptr[index] - ptr[:-1], counts) + torch.arange(int(ptr[-1]))
        return CachedAtoms(self.features[atoms], self.forces[atoms], self.ref_forces[atoms], ptr)


class HeadFit:
    """Adam on the head's parameters over cached atoms (module docstring)."""

    def __init__(
        self,
        head: torch.nn.Module,
        train: CachedAtoms,
        valid: Optional[CachedAtoms] = None,
        sigma_f: float = 1.0,
        reg_weight: float = 0.1,
        residual_metric: str = "euclidean",
        lr: float = 0.01,
        batch_size: int = 16,
        seed: int = 0,
    ):
        if train.num_structures == 0:
            raise ValueError("no training structures to fit the head on")
        self.head, self.train, self.valid = head, train, valid
        self.settings = dict(sigma_f=float(sigma_f), reg_weight=float(reg_weight), residual_metric=residual_metric,
                             lr=float(lr), batch_size=int(batch_size), seed=int(seed))
        self.optimizer = torch.optim.Adam(head.parameters(), lr=float(lr))
        self.epoch = 0
        self.best_nll = float("inf")
        self.best_epoch = -1
        self.best_head = copy.deepcopy(head.state_dict())
        self.history: List[Dict[str, float]] = []

    def loss(self, atoms: CachedAtoms) -> torch.Tensor:
        """Per-atom evidential loss (N,) of the head on ``atoms``."""
        s = self.settings
        return evidential_force_loss(atoms.forces, self.head(atoms.features), atoms.ref_forces, s["sigma_f"],
                                     reg_weight=s["reg_weight"], residual_metric=s["residual_metric"])

    @torch.no_grad()
    def evaluate(self, atoms: CachedAtoms, chunk: int = 65536) -> Dict[str, float]:
        """Mean per-atom ``loss`` and Student-t ``nll`` of the current head on ``atoms``."""
        loss, nll = 0.0, 0.0
        for i in range(0, atoms.features.shape[0], chunk):
            part = CachedAtoms(atoms.features[i:i + chunk], atoms.forces[i:i + chunk],
                               atoms.ref_forces[i:i + chunk], atoms.ptr)
            loss += float(self.loss(part).sum())
            nll += float(evidential_predictive(part.forces, self.head(part.features)).nll(part.ref_forces).sum())
        n = max(int(atoms.features.shape[0]), 1)
        return {"loss": loss / n, "nll": nll / n}

    def order(self, epoch: int) -> torch.Tensor:
        """Structure order of ``epoch``: a function of (seed, epoch) only, so a resume replays it."""
        g = torch.Generator().manual_seed(self.settings["seed"] * 100003 + epoch)
        return torch.randperm(self.train.num_structures, generator=g)

    def train_epoch(self) -> float:
        self.head.train()
        total, atoms_seen = 0.0, 0
        order, bs = self.order(self.epoch), self.settings["batch_size"]
        for i in range(0, order.numel(), bs):
            batch = self.train.structures(order[i:i + bs])
            per_atom = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            per_atom.mean().backward()
            self.optimizer.step()
            total += float(per_atom.detach().sum())
            atoms_seen += per_atom.numel()
        self.head.eval()
        return total / max(atoms_seen, 1)

    def run(self, max_epochs: int, checkpoint: Optional[str] = None) -> Dict[str, Any]:
        """Train until ``max_epochs`` epochs are done (counting resumed ones); load the best head.

        Runs under :func:`replayable_script`, so a resumed fit replays an uninterrupted one bit for bit.
        """
        with replayable_script():
            return self._run(max_epochs, checkpoint)

    def _run(self, max_epochs: int, checkpoint: Optional[str]) -> Dict[str, Any]:
        if self.epoch == 0 and self.valid is not None and not self.history:
            init = self.evaluate(self.valid)
            self.history.append({"epoch": -1, "valid_loss": init["loss"], "valid_nll": init["nll"]})
            logging.info("e2ip head fit: initial head: valid loss %.5f, valid NLL %.5f", init["loss"], init["nll"])
        while self.epoch < max_epochs:
            train_loss = self.train_epoch()
            row = {"epoch": self.epoch, "train_loss": train_loss}
            if self.valid is not None:
                v = self.evaluate(self.valid)
                row.update(valid_loss=v["loss"], valid_nll=v["nll"])
                score = v["nll"]
            else:
                score = -float(self.epoch)  # no validation data: keep the last epoch
            if score < self.best_nll:
                self.best_nll, self.best_epoch = score, self.epoch
                self.best_head = copy.deepcopy(self.head.state_dict())
            self.history.append(row)
            logging.info("e2ip head fit: epoch %d: train loss %.5f%s", self.epoch, train_loss,
                         f", valid loss {row['valid_loss']:.5f}, valid NLL {row['valid_nll']:.5f}"
                         if self.valid is not None else "")
            self.epoch += 1
            if checkpoint is not None:
                self.save(checkpoint)
        self.head.load_state_dict(self.best_head)
        self.head.eval()
        logging.info("e2ip head fit: kept the head of epoch %d%s", self.best_epoch,
                     f" (valid NLL {self.best_nll:.5f})" if self.valid is not None else "")
        return {"best_epoch": self.best_epoch, "best_valid_nll": self.best_nll if self.valid is not None else None,
                "history": self.history}

    def state_dict(self) -> Dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "best_nll": self.best_nll, "best_epoch": self.best_epoch, "best_head": self.best_head,
                "history": self.history, "settings": dict(self.settings)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the fit settings (σ_F, λ, lr, batch size, seed) must match."""
        changed = {k: (v, self.settings.get(k)) for k, v in state["settings"].items() if v != self.settings.get(k)}
        if changed:
            raise ValueError(f"the checkpoint was written with other settings (checkpoint, now): {changed}; "
                             "resume with the same ones, or start afresh")
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_nll, self.best_epoch = int(state["epoch"]), float(state["best_nll"]), int(state["best_epoch"])
        self.best_head, self.history = state["best_head"], list(state["history"])

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` (through a temporary file, so an interrupt leaves the last one)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
