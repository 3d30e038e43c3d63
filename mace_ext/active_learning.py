"""MACE trainer adapter of ``e2ip-active-learning`` (``e2ip.trainers`` entry point ``mace``).

One model = one ``mace_run_train_e2ip --config <user yaml> ...`` run (``mace_run_train`` for committee
members whose YAML has no ``e2ip_*`` key, i.e. plain MACE), with the loop's files, seed and directories
given as flags (MACE lets flags override the YAML)::

    --name model --seed S --work_dir RUN --model_dir RUN --checkpoints_dir RUN/checkpoints
    --results_dir RUN/results --log_dir RUN/logs --train_file T --valid_file V [user args]

Fine-tuning (``train.mode: finetune``) continues the previous iteration's training with MACE's own
restart: its latest checkpoint ``model_run-<seed>_epoch-<N>.pt`` (weights, EMA, optimizer and scheduler
state) is copied into the new run's checkpoint directory and the run gets ``--restart_latest
--max_num_epochs <N + 1 + max_num_epochs>``, i.e. ``max_num_epochs`` more epochs on the new training set.
(MACE's ``--foundation_model`` cannot read an e2ip model: ``extract_config_mace_model`` does not know it.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Optional

import yaml

from e2ip_plugins.active_learning.config import ALConfigError
from e2ip_plugins.active_learning.trainers import executable

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


def _max_epochs(config_path, args: List[str]) -> int:
    """``max_num_epochs`` of the run: the last ``--max_num_epochs`` flag, else the YAML's, else MACE's default."""
    value = _yaml(config_path).get("max_num_epochs", 2048)
    for i, a in enumerate(args[:-1]):
        if a == "--max_num_epochs":
            value = args[i + 1]
    return int(value)


def _copy_latest_checkpoint(src: Path, dst: Path, seed: int) -> int:
    """Copy ``model_run-<seed>_epoch-<N>.pt`` with the largest N from ``src`` to ``dst``; returns N."""
    found = []
    for p in src.glob(f"model_run-{seed}_epoch-*.pt"):
        m = re.fullmatch(rf"model_run-{seed}_epoch-(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise RuntimeError(f"fine-tuning: no MACE checkpoint model_run-{seed}_epoch-*.pt in {src} (stage-two/SWA "
                           "checkpoints are not continued; use train.mode: scratch)")
    epoch, path = max(found)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dst / path.name)
    return epoch


class MACETrainer:
    name = "mace"

    def check(self, config_path, committee: bool) -> None:
        data = _yaml(config_path)
        if not committee and str(data.get("e2ip_head", "e2ip")) not in ("e2ip", "eip"):
            raise ALConfigError(f"{config_path}: e2ip_head must be e2ip or eip for the e2ip selector")
        if data.get("swa") or data.get("stage_two"):
            raise ALConfigError(f"{config_path}: swa / stage_two is not supported inside the loop (fine-tuning continues "
                                "stage one); remove it")
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
            epochs = _max_epochs(config_path, args)
            last = _copy_latest_checkpoint(Path(init_model).parent / "checkpoints", run_dir / "checkpoints", seed)
            cmd += ["--restart_latest", "--max_num_epochs", str(last + 1 + epochs)]
        return cmd

    def model_file(self, run_dir) -> Path:
        path = Path(run_dir) / "model.model"
        if not path.is_file():
            raise RuntimeError(f"MACE wrote no {path}; see {Path(run_dir) / 'train.log'}")
        return path

    def open(self, model_file, device: str = "cpu", plain: bool = False):
        """e2ip models: ``E2IPMACECalculator`` (covariance keys); ``plain`` (committee members, which need
        only energy and forces): MACE's own calculator."""
        if not plain:
            return MD_ADAPTER.open(model_file, device=device)
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=str(model_file), device=device, default_dtype="float64")

TRAINER = MACETrainer()

__all__ = ["MACETrainer", "TRAINER"]
