"""MACE trainer adapter of ``e2ip-active-learning`` (``e2ip.trainers`` entry point ``mace``).

One model = one ``mace_run_train_e2ip --config <user yaml> ...`` run (``mace_run_train`` for committee
members whose YAML has no ``e2ip_*`` key, i.e. plain MACE), with the loop's files, seed and directories
given as flags (MACE lets flags override the YAML)::

    --name model --seed S --work_dir RUN --model_dir RUN --checkpoints_dir RUN/checkpoints
    --results_dir RUN/results --log_dir RUN/logs --train_file T --valid_file V [user args]

Fine-tuning (``train.mode: finetune``) passes the previous iteration's model as MACE's
``--foundation_model PREV --multiheads_finetuning False``: MACE starts from its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import yaml

from e2ip_plugins.active_learning.config import ALConfigError
from e2ip_plugins.active_learning.trainers import executable
from e2ip_plugins.md.registry import MDConfigError

from .md import ADAPTER as MD_ADAPTER


def _yaml(path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ALConfigError(f"MACE config {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ALConfigError(f"MACE config {path} must be a mapping of mace_run_train keys")
    return data


def _is_e2ip(path) -> bool:
    return any(str(k).startswith("e2ip_") for k in _yaml(path))


class MACETrainer:
    name = "mace"

    def check(self, config_path, committee: bool) -> None:
        data = _yaml(config_path)
        if not committee and str(data.get("e2ip_head", "e2ip")) not in ("e2ip", "eip"):
            raise ALConfigError(f"{config_path}: e2ip_head must be e2ip or eip for the e2ip selector")
        if data.get("distributed"):
            raise ALConfigError(f"{config_path}: distributed: true is not supported inside the loop; remove it")

    def command(self, config_path, train_file, valid_file, run_dir, seed: int, args: List[str],
                init_model: Optional[str], committee: bool) -> List[str]:
        run_dir = Path(run_dir)
        exe = "mace_run_train_e2ip" if (not committee or _is_e2ip(config_path)) else "mace_run_train"
        cmd = [executable(exe), "--config", str(config_path), "--name", "model", "--seed", str(seed),
               "--work_dir", str(run_dir), "--model_dir", str(run_dir), "--checkpoints_dir", str(run_dir / "checkpoints"),
               "--results_dir", str(run_dir / "results"), "--log_dir", str(run_dir / "logs"),
               "--train_file", str(train_file), "--valid_file", str(valid_file), *args]
        if init_model is not None:
            cmd += ["--foundation_model", str(init_model), "--multiheads_finetuning", "False"]
        return cmd

    def model_file(self, run_dir) -> Path:
        path = Path(run_dir) / "model.model"
        if not path.is_file():
            raise RuntimeError(f"MACE wrote no {path}; see {Path(run_dir) / 'train.log'}")
        return path

    def open(self, model_file, device: str = "cpu"):
        try:
            return MD_ADAPTER.open(model_file, device=device)
        except MDConfigError:  # a plain MACE model (committee member)
            from mace.calculators import MACECalculator

            return MACECalculator(model_paths=str(model_file), device=device, default_dtype="float64")


TRAINER = MACETrainer()

__all__ = ["MACETrainer", "TRAINER"]
