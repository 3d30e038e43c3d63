"""``mace_attach_e2ip``: add the e²IP head to a trained plain MACE model, backbone frozen (issue 27).

    mace_attach_e2ip --model plain.model --train_file train.xyz --valid_file val.xyz \\
        --energy_key REF_energy --forces_key REF_forces --max_num_epochs 20 --name out --model_dir DIR

Takes a MACE or ScaleShiftMACE ``.model`` (e.g. a fine-tuned foundation model) and writes ``DIR/NAME.model``
and ``DIR/NAME_compiled.model`` with the same energies and forces plus every output of
``mace_run_train_e2ip`` models (``forces_covariance``, ``forces_uncertainty``, ``energy_uncertainty``, ...):

1. start-up checks, before anything is written (the file is an eager plain MACE/ScaleShiftMACE model; every
   element of the data files is in its z-table; every frame has the forces);
2. :func:`mace_ext.model.attach_e2ip_head` with σ_F = RMS of the training reference forces
   (:func:`mace_ext.force_scale.training_force_rms`, or ``--e2ip_force_rms``); every backbone parameter frozen;
3. one backbone pass over the training and validation structures caches each atom's mean forces γ and the
   head's input features (the backbone is frozen, so they never change), then the head alone is fitted on them
   for ``--max_num_epochs`` epochs with the per-atom evidential loss of the joint fit
   (:mod:`e2ip_plugins.head_fit`; an epoch is a head forward/backward only); the epoch with the lowest
   validation NLL is kept. The fit state goes to ``DIR/checkpoints/NAME_attach.pt`` after every epoch;
   ``--restart_latest`` resumes from it (same seed: the same head as an uninterrupted run);
4. novelty buffers, stored calibration [c, β] and energy length ℓ, as after a training
   (:func:`mace_ext.fit_novelty.fit_novelty`);
5. ``torch.save`` of the model and ``e3nn.util.jit.compile`` of a copy, as MACE's run does.

Scalar-only backbones (``max_L 0``) or ``--e2ip_geometric``: the head reads the geometric construction on the
last block's scalars (:mod:`mace_ext.geometric`, issue 28). Its edge-weight MLP keeps its seeded initialisation
(a fixed random invariant weighting: the head-only fit trains on cached features); the head learns on top of it.

Why not MACE's ``run()`` (as ``mace_run_train_e2ip --foundation_model`` does, which also trains the backbone):
with a foundation model ``run()`` rebuilds it as a new ScaleShiftMACE from its config, re-estimates E0s,
builds optimizer groups from named backbone submodules, swaps the loss at stage two, and its cuEquivariance
conversion rebuilds the model. A frozen backbone needs none of that, and each step is a way for the saved
energies and forces to drift from the user's model; here the model object is kept as it was loaded.
"""

from __future__ import annotations

import argparse
import logging
import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
from e2ip_plugins.head_fit import CachedAtoms, HeadFit, replayable_script
from mace.modules.models import MACE, ScaleShiftMACE

from .fit_novelty import fit_novelty, frames_loader, read_frames
from .force_scale import training_force_rms
from .model import E2IPMixin, attach_e2ip_head
from .train_options import add_e2ip_arguments

HEAD_OPTIONS = ("e2ip_channels", "e2ip_mlp", "e2ip_reg", "e2ip_residual_metric", "e2ip_force_rms", "e2ip_novelty",
                "e2ip_novelty_mode", "e2ip_novelty_power", "e2ip_novelty_quantile", "e2ip_geometric")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mace_attach_e2ip", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained plain MACE/ScaleShiftMACE .model (torch.save'd, eager)")
    ap.add_argument("--train_file", required=True, help="extxyz training structures (head fit, novelty moments)")
    ap.add_argument("--valid_file", required=True,
                    help="extxyz validation structures (best epoch, novelty reference, stored calibration)")
    ap.add_argument("--energy_key", default="REF_energy", help="reference energy info key (energy length fit)")
    ap.add_argument("--forces_key", default="REF_forces", help="reference forces array of the extxyz files")
    ap.add_argument("--max_num_epochs", type=int, default=20, help="head-fit epochs over the cached atoms")
    ap.add_argument("--batch_size", type=int, default=16, help="structures per batch (backbone pass and head fit)")
    ap.add_argument("--lr", type=float, default=0.01, help="Adam learning rate of the head")
    ap.add_argument("--seed", type=int, default=123, help="seed of the head's initialisation and batch order")
    ap.add_argument("--name", default=None, help="output name (default: <model stem>_e2ip)")
    ap.add_argument("--model_dir", default=".", help="output folder of NAME.model, NAME_compiled.model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--default_dtype", choices=("float64", "float32"), default=None,
                    help="dtype of the run and the saved model (default: the model's)")
    ap.add_argument("--restart_latest", action="store_true",
                    help="resume the head fit from DIR/checkpoints/NAME_attach.pt")
    return add_e2ip_arguments(ap, only=HEAD_OPTIONS)


def load_plain_model(path: str, device: str) -> torch.nn.Module:
    """The eager plain MACE model of ``path``; SystemExit naming what to change otherwise."""
    if not Path(path).is_file():
        raise SystemExit(f"--model {path}: no such file")
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # pylint: disable=broad-except
        raise SystemExit(f"--model {path}: not a torch-loadable MACE model ({type(exc).__name__}: {exc}). Pass "
                         "the .model file MACE saves (torch.save of the model object).") from exc
    if isinstance(model, torch.jit.ScriptModule):
        raise SystemExit(f"--model {path}: a TorchScript model (_compiled.model); pass the eager .model next to it")
    if isinstance(model, E2IPMixin):
        raise SystemExit(f"--model {path}: the model already carries an e2ip head; refit its novelty and "
                         "calibration with mace_fit_novelty_e2ip, or pass the plain model it was built from")
    if type(model) not in (MACE, ScaleShiftMACE):
        raise SystemExit(f"--model {path}: a {type(model).__name__}, not a MACE model; mace_attach_e2ip takes "
                         "MACE or ScaleShiftMACE .model files")
    return model


def cache_backbone(model, loader, device) -> CachedAtoms:
    """Mean forces γ and head input features of every atom, one backbone pass (detached).

    Under :func:`~e2ip_plugins.head_fit.replayable_script`, so the cache is the same in every process and a
    resumed head fit replays an uninterrupted one exactly (measured: no slower).
    """
    parts = []
    with replayable_script():
        for batch in loader:
            data = batch.to(device).to_dict()
            out = model._e2ip_backbone_forward(data, False, True, False, False, False, False, False, False, False)
            feats = model.e2ip_head_input(data, out["node_feats"])
            parts.append(CachedAtoms(feats.detach(), out["forces"].detach(), data["forces"], data["ptr"]))
    return CachedAtoms.cat(parts)


def attach(args) -> Dict[str, Any]:
    """Run steps 1-5 of the module docstring; returns the paths and the head-fit summary."""
    started = time.time()
    model = load_plain_model(args.model, args.device)
    dtype = getattr(torch, args.default_dtype or str(next(model.parameters()).dtype).replace("torch.", ""))
    torch.set_default_dtype(dtype)  # MACE's AtomicData uses the default dtype
    model = model.to(dtype)
    frames = {f: read_frames(f, model, args.forces_key) for f in (args.train_file, args.valid_file)}
    train, valid = (frames_loader(frames[f], model, args.batch_size, args.forces_key, args.energy_key)
                    for f in (args.train_file, args.valid_file))
    sigma_f = training_force_rms(args, train)
    torch.manual_seed(args.seed)
    model = attach_e2ip_head(
        model, head="e2ip", force_rms=sigma_f, num_channels=args.e2ip_channels, mlp_hidden=args.e2ip_mlp,
        novelty={"enabled": args.e2ip_novelty, "mode": args.e2ip_novelty_mode, "power": args.e2ip_novelty_power,
                 "quantile": args.e2ip_novelty_quantile},
        geometric=args.e2ip_geometric,
    )
    head_params = {id(p) for p in model.e2ip_head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    model.eval()
    name = args.name or f"{Path(args.model).stem}_e2ip"
    out_dir = Path(args.model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # everything above is checked: now the run may write
    log_file = logging.FileHandler(out_dir / f"{name}_attach.log")
    logging.getLogger().addHandler(log_file)
    try:
        return _fit_and_save(args, model, (train, valid), sigma_f, out_dir, name, started)
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()


def _fit_and_save(args, model, loaders, sigma_f: float, out_dir: Path, name: str, started: float) -> Dict[str, Any]:
    """Steps 3-5 of the module docstring on a checked model with its head attached."""
    train, valid = loaders
    ckpt = out_dir / "checkpoints" / f"{name}_attach.pt"
    device = torch.device(args.device)
    cached = [cache_backbone(model, loader, device) for loader in (train, valid)]
    logging.info("e2ip attach: cached %d training / %d validation atoms of the frozen backbone in %.1f s",
                 cached[0].features.shape[0], cached[1].features.shape[0], time.time() - started)
    fit = HeadFit(model.e2ip_head, cached[0], cached[1], sigma_f=sigma_f, reg_weight=args.e2ip_reg,
                  residual_metric=args.e2ip_residual_metric, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    if args.restart_latest and ckpt.exists():
        try:
            fit.load(str(ckpt))
        except ValueError as exc:
            raise SystemExit(f"{ckpt}: {exc}") from exc
        logging.info("e2ip attach: resumed the head fit from %s after epoch %d", ckpt, fit.epoch - 1)
    summary = fit.run(args.max_num_epochs, checkpoint=str(ckpt))
    for p in model.parameters():
        p.requires_grad_(True)  # the saved model is like any trained e2ip model
    fit_novelty(model, train, [valid], device=device)

    from e3nn.util import jit  # pylint: disable=import-outside-toplevel

    path, compiled = out_dir / f"{name}.model", out_dir / f"{name}_compiled.model"
    torch.save(model, path)
    torch.jit.save(jit.compile(deepcopy(model)), compiled)
    logging.info("e2ip attach: wrote %s and %s in %.1f s (head of epoch %d, valid NLL %.4f -> %.4f)", path, compiled,
                 time.time() - started, summary["best_epoch"], summary["history"][0].get("valid_nll", float("nan")),
                 summary["best_valid_nll"])
    return {"model": path, "compiled": compiled, "checkpoint": ckpt, "sigma_f": sigma_f, **summary}


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    attach(args)


if __name__ == "__main__":  # pragma: no cover
    main()
