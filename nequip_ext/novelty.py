"""Fitting the novelty-aware evidence and the stored calibration of NequIP e²IP models
(:mod:`e2ip_plugins.novelty`, :mod:`e2ip_plugins.level`).

- :class:`NoveltyFitCallback` (in the shipped configs): at the start of every validation
  epoch, while NequIP's EMA weights are swapped in (the weights that are validated,
  checkpointed and tested), one no-grad pass over the training data (up to the novelty
  module after the last convnet: the readout is skipped) fits the per-species moments, then ONE full
  forward over the validation data (reference forces and energies) gives the reference quantile, the
  stored calibration [c, β] and the stored energy length ℓ of ``energy_uncertainty``
  (:mod:`e2ip_plugins.validation_fit`; before issue 16 these took a feature pass and two full forwards,
  still used for ``power`` novelty and by ``one_pass=False``; models without novelty fit ℓ only, with one
  forward). Lightning's ``ModelCheckpoint`` saves at the end of
  validation, so every checkpoint (``best.ckpt`` used by the test run, ``last.ckpt`` for
  resuming) carries buffers fitted on its own weights.
- With ``uq_head.committee`` (issue 26) the committee's stored scale is fitted last, on the same validation data,
  and ℓ refitted (:mod:`nequip_ext.committee_level`).
- ``nequip_fit_novelty_e2ip --ckpt best.ckpt --train train.xyz --val val.xyz``:
  the same fit for an existing checkpoint, written to ``--out`` (default: in place).
"""

from __future__ import annotations

import argparse
from typing import Iterable, Iterator, List, Optional

import torch
from lightning.pytorch.callbacks import Callback

from e2ip_plugins.committee_level import committee_variance, fit_committee_scale, fit_scaled_level, local_spread
from e2ip_plugins.energy_uq import fit_energy_length
from e2ip_plugins.level import fit_stored_level
from e2ip_plugins.novelty import NoveltyFitter, fit_novelty
from e2ip_plugins.validation_fit import fit_from_columns, prepare_one_pass, supports_one_pass

from .committee_level import committee_level
from .model import COMMITTEE_LEVEL_NAME, ENERGY_MODULE_NAME, NOVELTY_MODULE_NAME


def novelty_head(model: torch.nn.Module):
    """The model's :class:`~nequip_ext.nn.E2IPNoveltyModule` (None if novelty is off or the head is eIP)."""
    from .nn import E2IPNoveltyModule

    for mod in model.modules():
        if isinstance(mod, E2IPNoveltyModule):
            return mod
    return None


def energy_head(model: torch.nn.Module):
    """The model's :class:`~nequip_ext.nn.E2IPEnergyUncertaintyModule` or
    :class:`~nequip_ext.nn.E2IPEnergyNoiseModule` (None for models built before issue 15)."""
    from .nn import E2IPEnergyNoiseModule, E2IPEnergyUncertaintyModule

    for mod in model.modules():
        if isinstance(mod, (E2IPEnergyUncertaintyModule, E2IPEnergyNoiseModule)):
            return mod
    return None


def has_noise_head(module: torch.nn.Module) -> bool:
    from .nn import E2IPEnergyNoiseModule

    return isinstance(module, E2IPEnergyNoiseModule)


def _layers_before_head(model: torch.nn.Module) -> List[torch.nn.Module]:
    # the SequentialGraphNetwork holding the novelty module (matched by its child, not its class: a backbone
    # loaded from a package has the package's own nequip classes, nequip_ext.attach)
    for mod in model.modules():
        if NOVELTY_MODULE_NAME in mod._modules:
            names = list(mod._modules)
            return [mod._modules[n] for n in names[: names.index(NOVELTY_MODULE_NAME)]]
    raise ValueError(f"no SequentialGraphNetwork with a {NOVELTY_MODULE_NAME} module found in the model")


@torch.no_grad()
def head_features(model: torch.nn.Module, batches: Iterable[dict], device=None):
    """Yield (invariant features, atom types) of each batch, running the layers before the novelty module only."""
    head = novelty_head(model)
    layers = _layers_before_head(model)
    ref = next(model.parameters())
    device = device or ref.device
    fields = getattr(model, "model_input_fields", None)
    for batch in batches:
        data = {k: v.to(device) for k, v in batch.items() if fields is None or k in fields}
        data = {k: (v.to(ref.dtype) if torch.is_floating_point(v) else v) for k, v in data.items()}
        for layer in layers:
            data = layer(data)
        yield head.novelty_features(data)


def fit_model_novelty(model: torch.nn.Module, train_batches, val_batches=None, one_pass: bool = True) -> bool:
    """Fit the novelty buffers and the stored calibration [c, β] of ``model`` in place (the
    calibration needs ``val_batches`` with reference forces; without them it stays [1, 0]).

    ``one_pass`` (default, ``linear`` novelty): one forward over the validation data gives the
    reference, the level and the energy length (:mod:`e2ip_plugins.validation_fit`); otherwise (or in
    ``power`` mode) one feature pass for the reference and a full forward each for the level and ℓ.
    Returns False if the model has no novelty-enabled head."""
    head = novelty_head(model)
    was_training = model.training
    model.eval()
    if isinstance(val_batches, Iterator):
        val_batches = list(val_batches)  # a one-shot iterator is read several times (quantile, level, energy)
    if head is not None and val_batches is not None and one_pass and supports_one_pass(head.novelty):
        fitter = NoveltyFitter(head.novelty)
        for feats, species in head_features(model, train_batches):
            fitter.add_train(feats, species)
        fitter.finish_moments()
        prepare_one_pass(head.novelty, fitter)
        energy = energy_head(model)
        one_pass_energy = energy is not None and not has_noise_head(energy)
        fit_from_columns(head.novelty, fitter, list(one_pass_columns(model, val_batches, one_pass_energy)),
                         energy.energy if one_pass_energy else None)
        if energy is not None and not one_pass_energy:  # the head's ℓ_i, c_i are not in the columns: own pass
            fit_energy_length(energy.energy, energy_columns(model, val_batches))
        _fit_committee(model, val_batches)
        model.train(was_training)
        return True
    if head is not None:
        val = head_features(model, val_batches) if val_batches is not None else None
        fit_novelty(head.novelty, head_features(model, train_batches), val)
        if val_batches is not None:
            fit_stored_level(head.novelty, level_columns(model, val_batches))
    if val_batches is not None and energy_head(model) is not None:
        fit_energy_length(energy_head(model).energy, energy_columns(model, val_batches))  # after the level
    if val_batches is not None:
        _fit_committee(model, val_batches)
    model.train(was_training)
    return head is not None


def fit_model_committee(model: torch.nn.Module, val_batches: Iterable[dict]) -> Optional[float]:
    """Fit and store the committee's scale c on validation batches (one full forward); returns c (None: no
    committee). The caller refits the energy length afterwards."""
    from nequip.data import AtomicDataDict

    from . import _keys as K

    level = committee_level(model)
    if level is None:
        return None
    scaled = level.level.scale_head
    seen: list = []  # scaled form: the head's U_epi and the edges as the level module reads them

    def keep(mod, args):
        seen.append((args[0][K.FORCES_COVARIANCE_EPISTEMIC_KEY].detach(), args[0][AtomicDataDict.EDGE_INDEX_KEY]))

    hook = level.register_forward_pre_hook(keep) if scaled else None
    cols = {"gamma": [], "y": [], "ale": [], "members": [], "head": [], "spread": []}
    try:
        for data, out in validation_outputs(model, val_batches):
            gamma = out[AtomicDataDict.FORCE_KEY].detach()
            cols["gamma"].append(gamma)
            cols["y"].append(data[AtomicDataDict.FORCE_KEY].to(gamma.dtype))
            cols["ale"].append(out[K.FORCES_COVARIANCE_ALEATORIC_KEY].detach())
            members = out[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(gamma.shape[0], -1, 3)
            cols["members"].append(members)
            if scaled:
                head, edges = seen.pop()
                cols["head"].append(head)
                cols["spread"].append(local_spread(committee_variance(members), edges[0], edges[1]))
    finally:
        if hook is not None:
            hook.remove()
    if scaled:
        s_ref, c = fit_scaled_level(*(torch.cat(cols[k]) for k in ("gamma", "y", "ale", "head", "spread")))
        level.level.set_scale(c, spread_ref=s_ref)
    else:
        c = fit_committee_scale(*(torch.cat(cols[k]) for k in ("gamma", "y", "ale", "members")))
        level.level.set_scale(c)
    return c


def _fit_committee(model: torch.nn.Module, val_batches) -> None:
    """With ``uq_head.committee``: the committee's stored scale on validation, then ℓ again (σ_E reads U_tot)."""
    if fit_model_committee(model, val_batches) is not None and energy_head(model) is not None:
        fit_energy_length(energy_head(model).energy, energy_columns(model, val_batches))


def validation_outputs(model: torch.nn.Module, batches: Iterable[dict], device=None):
    """Yield ``(data, output)`` of one full forward (forces through autograd) per validation batch."""
    device = device or next(model.parameters()).device
    for batch in batches:
        data = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode(False), torch.enable_grad():
            out = model(dict(data))
        yield data, out


def energy_columns(model: torch.nn.Module, batches: Iterable[dict], device=None):
    """Yield per-frame validation energy residuals and the variance the stored factor scales: (σ_E/k)², i.e.
    Σ_i tr U_tot,i/3, or A² + Σ_i ℓ_i² tr U_tot,i/3 with an energy-noise head (batches without energies skipped)."""
    from nequip.data import AtomicDataDict

    from . import _keys as K

    k = energy_head(model).energy.length
    batches = (b for b in batches if AtomicDataDict.TOTAL_ENERGY_KEY in b)
    for data, out in validation_outputs(model, batches, device):
        e = out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().reshape(-1)
        sigma = out[K.ENERGY_UNCERTAINTY_KEY].detach().reshape(-1).to(torch.float64)
        yield {"energy_residual": data[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1).to(e.dtype) - e,
               "force_var": (sigma / k) ** 2}


def _atom_columns(data: dict, out: dict) -> dict:
    """Per-atom evidence, residual y − γ, novelty output, frame index and species of one forward."""
    from nequip.data import AtomicDataDict

    from . import _keys as K

    forces = out[AtomicDataDict.FORCE_KEY]
    cols = {
        "nu": out[K.E2IP_NU_KEY], "kappa": out[K.E2IP_KAPPA_KEY], "sigma0": out[K.E2IP_SIGMA0_KEY],
        "sigma0_inv": out[K.E2IP_SIGMA0_INV_KEY], "sigma0_logdet": out[K.E2IP_SIGMA0_LOGDET_KEY],
        "residual": data[AtomicDataDict.FORCE_KEY].to(forces.dtype) - forces, "ratio": out[K.E2IP_NOVELTY_KEY],
        "frame": out[AtomicDataDict.BATCH_KEY], "species": out[AtomicDataDict.ATOM_TYPE_KEY],
    }
    return {k: v.detach() for k, v in cols.items()}


def level_columns(model: torch.nn.Module, batches: Iterable[dict], device=None):
    """Yield the per-atom validation columns of :func:`e2ip_plugins.level.fit_stored_level` (full forward)."""
    for data, out in validation_outputs(model, batches, device):
        yield _atom_columns(data, out)


def one_pass_columns(model: torch.nn.Module, batches: Iterable[dict], energies: bool = True, device=None):
    """Yield the per-batch columns of :func:`e2ip_plugins.validation_fit.fit_from_columns` (one full forward
    per batch, made after :func:`~e2ip_plugins.validation_fit.prepare_one_pass`: the novelty output is s_i)."""
    from nequip.data import AtomicDataDict

    for data, out in validation_outputs(model, batches, device):
        cols = _atom_columns(data, out)
        cols["score"] = cols.pop("ratio")
        num = AtomicDataDict.num_frames(out)
        has_energy = energies and AtomicDataDict.TOTAL_ENERGY_KEY in data
        e = out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().reshape(-1)
        cols["energy_residual"] = (data[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1).to(e.dtype) - e) if has_energy \
            else torch.zeros_like(e)
        cols["has_energy"] = torch.full((num,), bool(has_energy), dtype=torch.bool)
        cols["num_frames"] = num
        yield cols


class NoveltyFitCallback(Callback):
    """Lightning callback: refit the novelty buffers at the start of validation epochs (module docstring).

    Args:
        every_n_epochs: refit at every n-th validation and at the last epoch (the buffers of
            skipped epochs stay from the last fit)
    """

    def __init__(self, every_n_epochs: int = 1):
        super().__init__()
        self.every_n_epochs = int(every_n_epochs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.current_epoch % self.every_n_epochs != 0 and trainer.current_epoch + 1 < (trainer.max_epochs or 0):
            return
        dm = trainer.datamodule
        for model in pl_module.model.values():
            val = dm.val_dataloader()
            val = val if isinstance(val, (list, tuple)) else [val]
            fit_model_novelty(model, dm.train_dataloader(), val[0])


# ------------------------------------------------------------------ command for existing checkpoints
def _xyz_batches(path: str, model, r_max: float, type_names: List[str], batch_size: int = 16,
                 forces_key: str = "REF_forces", energy_key: str = "REF_energy"):
    import ase.io
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=type_names)
    frames = ase.io.read(path, ":")
    missing = [i for i, a in enumerate(frames) if forces_key not in a.arrays and a.calc is None]
    if missing:
        raise ValueError(f"{path}: frames {missing[:5]} lack the reference forces '{forces_key}' (--forces-key)")
    mapping = {forces_key: AtomicDataDict.FORCE_KEY} if forces_key != AtomicDataDict.FORCE_KEY else {}
    if energy_key != AtomicDataDict.TOTAL_ENERGY_KEY:
        mapping[energy_key] = AtomicDataDict.TOTAL_ENERGY_KEY  # reference energies: the stored energy length
    for i in range(0, len(frames), batch_size):
        graphs = [compute_neighborlist_(mapper(from_ase(a, key_mapping=mapping, include_keys=[forces_key, energy_key])), r_max=r_max)
                  for a in frames[i : i + batch_size]]
        yield AtomicDataDict.batched_from_list(graphs)


def fit_checkpoint(ckpt: str, train: str, val: Optional[str], out: Optional[str] = None,
                   forces_key: str = "REF_forces", energy_key: str = "REF_energy") -> dict:
    """Fit the novelty buffers of a NequIP checkpoint on extxyz files and write them into ``out``."""
    from nequip.model.saved_models.load_utils import load_saved_model
    from nequip.utils.global_state import set_global_state

    set_global_state(allow_tf32=False)
    model = load_saved_model(ckpt).eval()
    from nequip.nn.graph_model import R_MAX_KEY, TYPE_NAMES_KEY

    r_max = float(model.metadata[R_MAX_KEY])
    type_names = str(model.metadata[TYPE_NAMES_KEY]).split(" ")
    if not fit_model_novelty(
        model, _xyz_batches(train, model, r_max, type_names, forces_key=forces_key),
        _xyz_batches(val, model, r_max, type_names, forces_key=forces_key, energy_key=energy_key) if val else None
    ):
        raise ValueError(f"{ckpt}: the model has no e2ip head with novelty enabled (uq_head.novelty.enabled)")
    head = novelty_head(model)
    buffers = {n: b for n, b in head.novelty.named_buffers()}  # includes novelty_calib
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = state["state_dict"]
    written = 0
    for key in list(sd):
        for name, value in buffers.items():
            if key.endswith(f"{NOVELTY_MODULE_NAME}.novelty.{name}"):
                sd[key] = value.detach().to(sd[key].dtype).clone()
                written += 1
    if written == 0:
        # a checkpoint from before the novelty module existed: its buffers are added next to the head
        for pre in {k.split(".uq_head.")[0] + f".{NOVELTY_MODULE_NAME}.novelty." for k in sd if ".uq_head." in k}:
            for name, value in buffers.items():
                sd[pre + name] = value.detach().clone()
                written += 1
    if written == 0:
        raise KeyError(f"{ckpt}: no e2ip head in the checkpoint state dict")
    energy = energy_head(model)
    if energy is not None:  # issue 15: the stored energy length (added if the checkpoint predates it)
        key = f"{ENERGY_MODULE_NAME}.energy.energy_noise_length"
        targets = [k for k in sd if k.endswith(key)] or [k.split(".uq_head.")[0] + "." + key for k in sd if ".uq_head." in k]
        for k in set(targets):
            sd[k] = energy.energy.energy_noise_length.detach().clone()
    level = committee_level(model)
    if level is not None:  # issue 26: the committee's stored scale (added if the checkpoint predates it)
        for name, value in level.level.named_buffers():
            key = f"{COMMITTEE_LEVEL_NAME}.level.{name}"
            targets = [k for k in sd if k.endswith(key)] or [k.split(".uq_head.")[0] + "." + key for k in sd
                                                             if ".uq_head." in k]
            for k in set(targets):
                sd[k] = value.detach().clone()
    torch.save(state, out or ckpt)
    return {"ref": head.novelty.novelty_ref.tolist(), "calib": head.novelty.novelty_calib.tolist(),
            "written": written, "type_names": type_names,
            "energy_length": energy.energy.length if energy is not None else float("nan")}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Fit the e2ip novelty evidence and stored calibration of a NequIP checkpoint.")
    ap.add_argument("--ckpt", required=True, help="NequIP checkpoint (.ckpt) of an e2ip model")
    ap.add_argument("--train", required=True, help="extxyz file of the training structures")
    ap.add_argument("--val", default=None, help="extxyz file of the validation structures (reference quantile)")
    ap.add_argument("--out", default=None, help="output checkpoint (default: overwrite --ckpt)")
    ap.add_argument("--forces-key", default="REF_forces", help="reference forces array of the extxyz files")
    ap.add_argument("--energy-key", default="REF_energy", help="reference energy info key (energy length scale)")
    args = ap.parse_args(argv)
    res = fit_checkpoint(args.ckpt, args.train, args.val, args.out, args.forces_key, args.energy_key)
    print(f"novelty fitted for types {res['type_names']}: s_ref = {[round(v, 3) for v in res['ref']]}, "
          f"stored calibration [c, beta] = {[round(v, 5) for v in res['calib']]}; "
          f"energy length scale = {res['energy_length']:.5g} A; "
          f"wrote {res['written']} buffers to {args.out or args.ckpt}")


if __name__ == "__main__":
    main()
