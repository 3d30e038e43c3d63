"""``mace_fit_novelty_e2ip``: fit the novelty evidence and the stored calibration of an E2IP MACE model.

    mace_fit_novelty_e2ip --model run/iso7_e2ip.model --train_file train.xyz --valid_file val.xyz \\
        --forces_key REF_forces --output iso7_e2ip_fitted.model

One pass over the training structures (per-element feature moments), one over the
validation structures (reference quantile), one full forward over the validation structures
with their reference forces (``--forces_key``) for the stored calibration [c, β]
(:mod:`e2ip_plugins.level`) and, with ``--e2ip_committee``, one for the committee's stored scale
(:mod:`e2ip_plugins.committee_level`), and one with their reference energies (``--energy_key``) for the stored
energy length of ``energy_uncertainty`` (:mod:`mace_ext.energy_uq`), as ``mace_run_train_e2ip`` does after training; writes the
``.model`` and, like MACE's run, a TorchScript ``<output>_compiled.model``.
"""

from __future__ import annotations

import argparse
import logging
from copy import deepcopy
from pathlib import Path
from typing import List, Optional

import torch

from e2ip_plugins import novelty as core_novelty
from e2ip_plugins.committee_level import fit_committee_scale, fit_scaled_level
from e2ip_plugins.level import fit_stored_level

from .energy_uq import fit_energy_noise
from .model import E2IPMixin
from .validation_columns import committee_columns, level_columns


def fit_novelty(model: torch.nn.Module, train_loader, valid_loaders=None, device=None) -> bool:
    """Fit the novelty buffers and the stored calibration [c, β] of an E2IP model in place.

    One pass over ``train_loader`` (feature moments), one over the validation loaders (reference
    quantile), then one full forward over the validation loaders (reference forces ``forces`` of
    MACE's batches) to fit [c, β] by NLL (:func:`e2ip_plugins.level.fit_stored_level`). Runs on every
    rank under DDP (moments summed, validation columns gathered). Returns False if the model has no
    novelty-enabled head.
    """
    if not isinstance(model, E2IPMixin):
        return False
    if not model.e2ip_novelty_enabled:
        if valid_loaders:  # no force level to fit, but the committee's scale and the energy length still are
            _fit_committee(model, valid_loaders, device or next(model.parameters()).device)
            fit_energy_noise(model, valid_loaders, device)
        return False
    ref = next(model.parameters())
    device = device or ref.device
    was_training = model.training
    model.eval()

    def features(loaders):
        with torch.no_grad():
            for loader in loaders:
                for batch in loader:
                    data = batch.to(device).to_dict()
                    out = model._e2ip_backbone_forward(data, False, False, False, False, False, False, False, False, False)
                    yield model.e2ip_invariants(out["node_feats"]), torch.argmax(data["node_attrs"], dim=-1)

    core_novelty.fit_novelty(
        model.e2ip_novelty, features([train_loader]), features(valid_loaders) if valid_loaders else None
    )
    logging.info(
        "e2ip: novelty fitted on the training and validation sets; reference s_ref per element = %s",
        [round(float(v), 3) for v in model.e2ip_novelty.novelty_ref],
    )
    if valid_loaders:
        res = fit_stored_level(model.e2ip_novelty, level_columns(model, valid_loaders, device))
        logging.info("e2ip: stored calibration fitted on %d validation atoms: c = %.4g, beta = %.4g "
                     "(val NLL %.4f, head alone %.4f)", int(res["atoms"]), res["c"], res["beta"], res["nll"],
                     res["nll_head"])
        _fit_committee(model, valid_loaders, device)  # before the energy length (σ_E reads U_tot)
        fit_energy_noise(model, valid_loaders, device)
    else:
        logging.warning("e2ip: no validation data: the stored calibration stays at c = 1, beta = 0")
    model.train(was_training)
    return True


def _fit_committee(model: torch.nn.Module, valid_loaders, device) -> None:
    """With ``--e2ip_committee`` (issue 26): fit and store the committee's scale c on the validation forward."""
    if not model.e2ip_committee_enabled:
        return
    was_training = model.training
    model.eval()
    level = model.e2ip_committee_level
    if level.scale_head:  # the head's U_epi times the members' local spread ratio
        s_ref, c = fit_scaled_level(*committee_columns(model, valid_loaders, device))
        level.set_scale(c, spread_ref=s_ref)
    else:
        s_ref, c = None, fit_committee_scale(*committee_columns(model, valid_loaders, device))
        level.set_scale(c)
    model.train(was_training)
    logging.info("e2ip: the in-model committee's level (%s) fitted on validation: c = %.4g%s",
                 "scaled" if level.scale_head else "spread", c, "" if s_ref is None else f", s_ref = {s_ref:.4g}")


def read_frames(path: str, model, forces_key: str = "REF_forces") -> list:
    """The extxyz frames of ``path``, checked: each carries ``forces_key`` and only elements the model knows."""
    import ase.io
    from ase.data import chemical_symbols

    try:
        frames = ase.io.read(path, ":")
    except Exception as exc:  # pylint: disable=broad-except
        raise SystemExit(f"{path}: cannot be read as extxyz structures ({type(exc).__name__}: {exc})") from exc
    missing = [i for i, a in enumerate(frames) if forces_key not in a.arrays]
    if missing:
        raise SystemExit(f"{path}: frames {missing[:5]} lack the reference forces array '{forces_key}'; "
                         "name the file's forces array with --forces_key")
    known = {int(z) for z in model.atomic_numbers}
    unknown = sorted({int(z) for a in frames for z in a.numbers} - known)
    if unknown:
        raise SystemExit(
            f"{path}: element(s) {', '.join(chemical_symbols[z] for z in unknown)} are not among the model's "
            f"elements ({', '.join(chemical_symbols[z] for z in sorted(known))}); the model has no embedding for "
            "them: drop those structures, or use a model trained with them")
    return frames


def frames_loader(frames, model, batch_size: int, forces_key: str = "REF_forces", energy_key: str = "REF_energy"):
    """A MACE data loader (unshuffled, the model's z-table and cutoff) over ASE frames."""
    from mace import data
    from mace.tools import torch_geometric, utils

    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    keys = data.KeySpecification(info_keys={"energy": energy_key}, arrays_keys={"forces": forces_key})
    configs = [data.config_from_atoms(a, key_specification=keys) for a in frames]
    items = [data.AtomicData.from_config(c, z_table=z_table, cutoff=float(model.r_max)) for c in configs]
    return torch_geometric.dataloader.DataLoader(items, batch_size=batch_size, shuffle=False)


def _loader(path: str, model, batch_size: int, forces_key: str = "REF_forces", energy_key: str = "REF_energy"):
    return frames_loader(read_frames(path, model, forces_key), model, batch_size, forces_key, energy_key)


def main(argv: Optional[List[str]] = None) -> None:
    from e3nn.util import jit

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="E2IP MACE .model file (eager, as saved by mace_run_train_e2ip)")
    ap.add_argument("--train_file", required=True, help="extxyz training structures")
    ap.add_argument("--valid_file", default=None, help="extxyz validation structures (reference quantile)")
    ap.add_argument("--output", default=None, help="output .model (default: overwrite --model)")
    ap.add_argument("--forces_key", default="REF_forces", help="reference forces array of the extxyz files")
    ap.add_argument("--energy_key", default="REF_energy", help="reference energy info key (energy length scale)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = torch.load(args.model, map_location=args.device, weights_only=False)
    torch.set_default_dtype(next(model.parameters()).dtype)  # MACE's AtomicData uses the default dtype
    if not isinstance(model, E2IPMixin) or not model.e2ip_novelty_enabled:
        raise SystemExit(f"{args.model}: not an E2IP model with the e2ip head and novelty enabled")
    train = _loader(args.train_file, model, args.batch_size, args.forces_key, args.energy_key)
    valid = [_loader(args.valid_file, model, args.batch_size, args.forces_key, args.energy_key)] if args.valid_file else []
    fit_novelty(model, train, valid, device=torch.device(args.device))
    out = Path(args.output or args.model)
    torch.save(model, out)
    compiled = out.with_name(out.stem + "_compiled.model")
    torch.jit.save(jit.compile(deepcopy(model)), compiled)
    print(f"novelty fitted: s_ref per element {model.e2ip_novelty.novelty_ref.tolist()}; stored calibration "
          f"[c, beta] = {model.e2ip_novelty.novelty_calib.tolist()}; energy length scale = "
          f"{float(model.e2ip_energy_uq.energy_noise_length[0]):.5g} A; wrote {out} and {compiled}")


if __name__ == "__main__":
    main()
