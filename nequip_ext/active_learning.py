"""NequIP trainer adapter of ``e2ip-active-learning`` (``e2ip.trainers`` entry point ``nequip``).

One model = one ``nequip-train --config-path DIR --config-name NAME`` run of the user's Hydra YAML with::

    hydra.run.dir=RUN data.train_file_path=T data.val_file_path=V seed=S [user overrides]

so the config must use NequIP's ``ASEDataModule`` (``data.train_file_path`` / ``val_file_path``) and a
top-level ``seed`` that its model and data use (as ``configs/nequip/e2ip.yaml`` does). Fine-tuning
(``train.mode: finetune``) replaces ``training_module.model`` by NequIP's
``nequip.model.ModelFromCheckpoint`` on the previous iteration's checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import yaml

from e2ip_plugins.active_learning.config import ALConfigError
from e2ip_plugins.active_learning.trainers import executable

from .md import ADAPTER as MD_ADAPTER


class NequIPTrainer:
    name = "nequip"

    def check(self, config_path, committee: bool) -> None:
        try:
            data = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ALConfigError(f"NequIP config {config_path} is not valid YAML: {err}") from err
        if "seed" not in data:
            raise ALConfigError(f"{config_path}: needs a top-level `seed:` used by the model and data (see "
                                "configs/nequip/e2ip.yaml); the loop overrides it per model")
        dm = (data.get("data") or {})
        if "train_file_path" not in dm or "val_file_path" not in dm:
            raise ALConfigError(f"{config_path}: data must be a nequip.data.datamodule.ASEDataModule with "
                                "train_file_path and val_file_path (the loop sets both)")

    def command(self, config_path, train_file, valid_file, run_dir, seed: int, args: List[str],
                init_model: Optional[str], committee: bool) -> List[str]:
        config_path = Path(config_path).resolve()
        name = config_path.name[:-5] if config_path.name.endswith(".yaml") else config_path.stem
        cmd = [executable("nequip-train"), "--config-path", str(config_path.parent), "--config-name", name,
               f"hydra.run.dir={run_dir}", f"data.train_file_path={train_file}", f"data.val_file_path={valid_file}",
               f"seed={seed}", *args]
        if init_model is not None:
            cmd += ["~training_module.model",
                    f"+training_module.model={{_target_: nequip.model.ModelFromCheckpoint, checkpoint_path: '{init_model}'}}"]
        return cmd

    def model_file(self, run_dir) -> Path:
        run_dir = Path(run_dir)
        for name in ("best.ckpt", "last.ckpt"):
            if (run_dir / name).is_file():
                return run_dir / name
        found = sorted(run_dir.glob("*.ckpt"))
        if not found:
            raise RuntimeError(f"nequip-train wrote no checkpoint in {run_dir}; see {run_dir / 'train.log'}")
        return found[0]

    def open(self, model_file, device: str = "cpu", plain: bool = False):
        """e2ip models: ``E2IPNequIPCalculator`` (covariance keys); ``plain`` (committee members, which need
        only energy and forces): NequIP's own calculator."""
        if not plain:
            return MD_ADAPTER.open(model_file, device=device)
        from nequip.integrations.ase import NequIPCalculator

        # NequIP 0.19.1 has no public eager loader for plain models (benchmarks/README.md)
        return NequIPCalculator._from_saved_model(str(model_file), device=device, chemical_species_to_atom_type_map=True)

TRAINER = NequIPTrainer()

__all__ = ["NequIPTrainer", "TRAINER"]
