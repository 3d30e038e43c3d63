"""``AttachedE2IPModel``: the e²IP head on a NequIP model the user already has (issue 27, docs/attach.md).

A model builder for ``training_module.model`` of ``nequip-train``::

    model:
      _target_: nequip_ext.AttachedE2IPModel
      package_path: /abs/plain.nequip.zip        # or checkpoint_path: /abs/best.ckpt (exactly one)
      freeze_backbone: true
      seed: ${seed}
      type_names: ${model_type_names}             # optional: checked against the backbone's
      uq_head: {kind: e2ip, num_channels: 16, mlp_hidden: 32, force_rms: ${training_data_stats:forces_rms},
                novelty: {enabled: true, mode: linear, quantile: 0.99}}

It loads the plain model with NequIP's own :func:`~nequip.model.ModelFromPackage` /
:func:`~nequip.model.ModelFromCheckpoint` (a ``GraphModel`` around ``ForceStressOutput(SequentialGraphNetwork)``),
inserts the head with :func:`nequip_ext.model.attach_uq_head` (before the last convnet, as in
:func:`~nequip_ext.EvidentialNequIPGNNModel`) and, with ``freeze_backbone``, turns ``requires_grad`` off on
every backbone parameter. NequIP rebuilds a checkpoint's model by calling its builder again
(``ModelFromCheckpoint``, ``nequip-package build``, ``nequip-compile``), so the freezing holds after every reload;
like NequIP's own loaders, that rebuild reads the original package / checkpoint file at the path given here.
Energies and forces are the backbone's, bit for bit: the head only reads the features and adds fields.
Scalar backbones (NequIP ``l_max: 0``, Allegro; issue 28) get the geometric l = 1 / l = 2 features of
:mod:`nequip_ext.geometric` (``uq_geometric``, trained and frozen-or-not with the head) in front of the head.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Any, Dict, List, Optional

import torch

from .geometric import GEOMETRIC_MODULE_NAME, uq_site
from .model import (COMMITTEE_MODULE_NAME, ENERGY_MODULE_NAME, HEAD_MODULE_NAME, NOVELTY_MODULE_NAME,
                    _is_energy_model, attach_uq_head)

UQ_MODULE_NAMES = (GEOMETRIC_MODULE_NAME, HEAD_MODULE_NAME, NOVELTY_MODULE_NAME, ENERGY_MODULE_NAME,
                   COMMITTEE_MODULE_NAME)


def _check_paths(package_path: Optional[str], checkpoint_path: Optional[str]) -> str:
    given = [p for p in (package_path, checkpoint_path) if p]
    if len(given) != 1:
        raise ValueError("AttachedE2IPModel needs exactly one of `package_path` (a `nequip-package build` .nequip.zip) "
                         f"and `checkpoint_path` (a nequip-train .ckpt); got package_path={package_path!r}, "
                         f"checkpoint_path={checkpoint_path!r}")
    path = str(given[0])
    if not os.path.isfile(path):
        raise ValueError(f"AttachedE2IPModel: no file at {path!r} (use an absolute path: NequIP reloads it from there "
                         "whenever the attach checkpoint is loaded)")
    return path


def _check_model_file(package_path: Optional[str], path: str) -> None:
    """Fail early, naming the argument, when the file is not a NequIP package / checkpoint."""
    if package_path:
        ok = path.endswith(".nequip.zip") and zipfile.is_zipfile(path)
        if ok:
            with zipfile.ZipFile(path) as zf:
                ok = any(n.endswith("model/package_metadata.txt") for n in zf.namelist())
        if not ok:
            raise ValueError(f"package_path {path!r} is not a NequIP package (make one with `nequip-package build "
                             "best.ckpt out.nequip.zip`; the name must end in .nequip.zip); for a .ckpt use "
                             "checkpoint_path")
        return
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: no second full read
        ok = "_target_" in ckpt["hyper_parameters"]["info_dict"]["training_module"]
    except Exception as err:  # anything torch.load or the lookup raises means: not a nequip-train checkpoint
        raise ValueError(f"checkpoint_path {path!r} is not a nequip-train checkpoint (.ckpt with the training_module "
                         f"in its hyper_parameters): {type(err).__name__}: {err}") from err
    if not ok:
        raise ValueError(f"checkpoint_path {path!r} is not a nequip-train checkpoint")


def package_version_mismatch(path: str) -> Dict[str, tuple]:
    """``{library: (in the package, here)}`` for ``nequip`` / ``e3nn`` versions that differ. ``nequip-package build``
    of an attach checkpoint re-exports the backbone's classes from the package's own sources next to the head's
    (NequIP's route for ``ModelFromPackage`` models), so both versions end up in one package."""
    from nequip.model.saved_models.package import _get_package_metadata
    from nequip.utils.versions import get_current_code_versions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packaged = _get_package_metadata(torch.package.PackageImporter(path)).get("versions", {})
    here = get_current_code_versions(verbose=False)
    return {k: (packaged[k], here[k]) for k in ("nequip", "e3nn")
            if k in packaged and k in here and packaged[k] != here[k]}


def _load(package_path: Optional[str], path: str, compile_mode: str):
    from nequip.model import ModelFromCheckpoint, ModelFromPackage

    mismatch = package_version_mismatch(path) if package_path else {}
    if mismatch:
        warnings.warn(f"{path} was packaged with other versions {mismatch} (package, here): training works, but "
                      "`nequip-package build` of the attach checkpoint mixes both versions; if it fails, install the "
                      "package's versions or attach to a nequip-train checkpoint of the backbone (checkpoint_path)")
    models = (ModelFromPackage if package_path else ModelFromCheckpoint)(path, compile_mode=compile_mode)
    if not isinstance(models, torch.nn.ModuleDict):
        return models
    if len(models) != 1:
        raise ValueError(f"{path!r} holds {len(models)} models ({list(models)}); AttachedE2IPModel takes one")
    return next(iter(models.values()))


def check_backbone(graph_model, source: str = "the model") -> None:
    """Raise ``ValueError`` unless ``graph_model`` is a NequIP energy model the head can be attached to."""
    energy = getattr(graph_model, "model", None)
    if not _is_energy_model(energy):
        raise ValueError(f"{source}: expected a NequIP GraphModel around ForceStressOutput(SequentialGraphNetwork) "
                         f"(e.g. nequip.model.NequIPGNNModel), got {type(energy).__name__} inside "
                         f"{type(graph_model).__name__}")
    seq = energy.func
    present = [n for n in UQ_MODULE_NAMES if n in seq._modules]
    if present:
        raise ValueError(f"{source} already has an e2ip head ({present}): fine-tune it with nequip.model."
                         "ModelFromCheckpoint / ModelFromPackage as training_module.model instead of attaching another")
    try:
        uq_site(seq)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def check_type_names(graph_model, type_names: Optional[List[str]], source: str) -> None:
    """The data's type names (``type_names`` of the config) must be the backbone's, in the same order."""
    if type_names is None:
        return
    have = list(graph_model.type_names)
    if list(type_names) != have:
        missing = [t for t in type_names if t not in have]
        raise ValueError(
            f"type_names {list(type_names)} of the config do not match the backbone's {have} from {source}"
            + (f": {missing} are not in the model (a model predicts only the types it was trained on)" if missing
               else ": same names, other order (atom types would index the wrong embeddings)")
            + f"; set model_type_names to {have} (for a package: ${{type_names_from_package:{source}}})")


def _default_force_rms(seq) -> Optional[float]:
    """RMS of the backbone's per-type energy scales (NequIP's configs set them to the training force RMS)."""
    mod = seq._modules.get("per_type_energy_scale_shift")
    scales = getattr(mod, "scales", None)
    if scales is None or not torch.is_tensor(scales) or scales.numel() == 0:
        return None
    return float(scales.detach().double().pow(2).mean().sqrt())


def head_parameters(graph_model) -> Dict[str, torch.nn.Parameter]:
    """Parameters of the ``uq_*`` modules (everything else is the backbone)."""
    seq = graph_model.model.func
    return {f"{n}.{pn}": p for n in UQ_MODULE_NAMES if n in seq._modules
            for pn, p in seq._modules[n].named_parameters()}


def freeze_backbone_(graph_model) -> int:
    """``requires_grad = False`` on every parameter outside the ``uq_*`` modules, and ``detach_input`` on the
    ``uq_*`` modules (in training they read detached features: the head's loss does no backward pass through the
    frozen backbone to the positions); returns how many parameters were frozen."""
    head = {id(p) for p in head_parameters(graph_model).values()}
    frozen = [p for p in graph_model.parameters() if id(p) not in head]
    for p in frozen:
        p.requires_grad_(False)
    seq = graph_model.model.func
    for name in UQ_MODULE_NAMES:
        if hasattr(seq._modules.get(name), "detach_input"):
            seq._modules[name].detach_input = True
    return len(frozen)


class AttachDataCheck:
    """Data transform (first in ``data.transforms`` of ``configs/nequip/attach_e2ip.yaml``): stops the run while the
    training statistics are computed, before the model is built or anything is written, with what to change, on a
    frame whose species the config does not map to a model type, or a frame without reference forces.

    Args:
        chemical_symbols: the species the config maps to the model's types (``${chemical_symbols}``)
        require_forces: reference forces needed (the head is trained on force residuals)
    """

    def __init__(self, chemical_symbols: List[str], require_forces: bool = True):
        from ase.data import atomic_numbers

        self.chemical_symbols = list(chemical_symbols)
        self.allowed = {int(atomic_numbers[s]) for s in self.chemical_symbols if s in atomic_numbers}
        self.require_forces = bool(require_forces)

    def __call__(self, data):
        from ase.data import chemical_symbols
        from nequip.data import AtomicDataDict

        z = data.get(AtomicDataDict.ATOMIC_NUMBERS_KEY, None)
        if z is not None and self.allowed:
            unknown = sorted({int(v) for v in z.reshape(-1).tolist()} - self.allowed)
            if unknown:
                raise ValueError(
                    f"the data holds {[chemical_symbols[v] for v in unknown]}, which the backbone has no type for (its "
                    f"types: {self.chemical_symbols}): a model predicts only the species it was trained on; drop those "
                    "frames, or attach the head to a backbone trained on them")
        if self.require_forces and AtomicDataDict.FORCE_KEY not in data:
            raise ValueError(
                "a frame of the data has no reference forces: the e2ip head is trained and calibrated on force "
                "residuals; map your file's forces array to `forces` in data.key_mapping (e.g. REF_forces: forces)")
        return data


def AttachedE2IPModel(
    package_path: Optional[str] = None,
    checkpoint_path: Optional[str] = None,
    uq_head: Optional[Dict[str, Any]] = None,
    freeze_backbone: bool = True,
    seed: int = 0,
    type_names: Optional[List[str]] = None,
    compile_mode: str = "eager",
):
    """A plain NequIP model (package or checkpoint) with the e²IP head attached (module docstring).

    Args:
        package_path: ``nequip-package build`` file (``.nequip.zip``); or
        checkpoint_path: ``nequip-train`` checkpoint (``.ckpt``) — exactly one of the two, absolute path
        uq_head: as for :func:`~nequip_ext.EvidentialNequIPGNNModel` (``force_rms`` defaults to the RMS of the
            backbone's per-type energy scales)
        freeze_backbone: train the ``uq_*`` modules only (default); false: fine-tune everything
        seed: seed of the head's initialisation
        type_names: the config's type names, checked against the backbone's (same names, same order)
        compile_mode: ``eager`` or ``compile`` (passed to NequIP's loader)

    Raises:
        ValueError: not exactly one path, a file that is not a NequIP model, a backbone with fewer than 2 convnets
            (and not Allegro), a backbone that already has a head, mismatched type names.
    """
    from lightning.pytorch.utilities.seed import isolate_rng
    from nequip.utils import torch_default_dtype

    path = _check_paths(package_path, checkpoint_path)
    _check_model_file(package_path, path)
    graph_model = _load(package_path, path, compile_mode)
    check_backbone(graph_model, path)
    check_type_names(graph_model, type_names, path)
    seq = graph_model.model.func
    cfg = dict(uq_head or {})
    if cfg.get("kind", "e2ip") == "e2ip" and cfg.get("force_rms", None) is None:
        cfg["force_rms"] = _default_force_rms(seq)
    with torch_default_dtype(graph_model.model_dtype), isolate_rng():
        torch.manual_seed(int(seed))
        energy = attach_uq_head(graph_model.model, cfg, num_species=len(graph_model.type_names),
                                r_max=float(graph_model.metadata["r_max"]))
    graph_model.model = energy
    graph_model.irreps_out = dict(energy.irreps_out)
    if freeze_backbone:
        freeze_backbone_(graph_model)
    return graph_model
