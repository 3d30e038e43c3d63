"""Shared helpers for the tests that run the real ``nequip-train`` CLI in a subprocess.

Also holds :class:`TrainStartStateDump`, a tiny Lightning callback that the resume test injects into
a ``nequip-train`` run through Hydra (``_target_: tests.nequip._cli_helpers.TrainStartStateDump``;
the subprocess gets the repo root on ``PYTHONPATH``).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import struct
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import torch
from lightning.pytorch.callbacks import Callback

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "e2ip_plugins" / "data"
CONFIG_DIR = REPO / "configs" / "nequip"
UQ_NAMES = ("forces_nll", "forces_spearman", "forces_auroc", "forces_miscal_area", "forces_coverage_90", "forces_rmse")
PLOT_NAMES = ("reliability", "error_vs_uncertainty", "roc")
# tests that need a second AOTInductor compile or a whole nequip-train + nequip-compile session are opt-in
SLOW = os.environ.get("E2IP_SLOW_TESTS", "") not in ("", "0")


def data(split: str) -> str:
    return str(DATA / f"iso7_{split}.xyz")


def nequip_train(run_dir: pathlib.Path, *overrides: str, config: str = "e2ip", timeout: int = 400,
                 config_dir: pathlib.Path = CONFIG_DIR) -> subprocess.CompletedProcess:
    """Run ``nequip-train -cp <abs config_dir> -cn <config> hydra.run.dir=<run_dir> <overrides>``; assert success."""
    exe = pathlib.Path(sys.executable).parent / "nequip-train"
    cmd = [str(exe), "-cp", str(config_dir), "-cn", config, f"hydra.run.dir={run_dir}", *overrides]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    }
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-6000:]}"
    return res


def csv_last_values(run_dir: pathlib.Path) -> Dict[str, float]:
    """Last logged value of every column of the CSVLogger's metrics.csv."""
    metrics_csv = next(run_dir.glob("csv/version_*/metrics.csv"))
    vals: Dict[str, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            vals.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return vals


def model_from_checkpoint(ckpt: pathlib.Path) -> Tuple[str, str]:
    """Overrides that make a run use the weights of ``ckpt`` (NequIP's ``ModelFromCheckpoint`` builder)."""
    return (
        "~training_module.model",
        f"+training_module.model={{_target_: nequip.model.ModelFromCheckpoint, checkpoint_path: {ckpt}}}",
    )


def wandb_logger(save_dir: pathlib.Path, project: str = "e2ip-tests") -> Tuple[str, str]:
    return (
        "~trainer.logger",
        f"+trainer.logger={{_target_: lightning.pytorch.loggers.wandb.WandbLogger, project: {project}, save_dir: {save_dir}}}",
    )


# --- W&B offline run files -------------------------------------------------------------------------
# wandb >= 0.2x writes an offline run as one ``run-<id>.wandb`` file (and no files/wandb-summary.json):
# a 7-byte header (":W&B", 2-byte magic, 1-byte version) followed by LevelDB-log framed records
# (32 KiB blocks; each chunk: crc32 (4), length (2, LE), type (1: full, 2: first, 3: middle, 4: last)),
# each record a serialized ``wandb.proto.wandb_internal_pb2.Record``.
_WB_BLOCK = 32768
_WB_CHUNK_HEADER = 7


def _wandb_raw_records(path: pathlib.Path):
    buf = path.read_bytes()
    assert buf[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + _WB_CHUNK_HEADER <= len(buf):
        left = _WB_BLOCK - pos % _WB_BLOCK
        if left < _WB_CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + _WB_CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += left
            continue
        chunk = buf[pos + _WB_CHUNK_HEADER : pos + _WB_CHUNK_HEADER + length]
        pos += _WB_CHUNK_HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _item_key(item) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def read_wandb_run(save_dir: pathlib.Path) -> dict:
    """Read the single offline W&B run under ``save_dir/wandb``: its run dir, history rows and summary."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(save_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history: List[dict] = []
    summary: dict = {}
    for raw in _wandb_raw_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                summary[_item_key(i)] = json.loads(i.value_json)
    return {"run_dir": files[0].parent, "history": history, "summary": summary}


# --- resume probe ----------------------------------------------------------------------------------
class TrainStartStateDump(Callback):
    """Saves the LightningModule's full ``state_dict`` and the loop counters when training starts
    (after Lightning has restored a ``ckpt_path``), so a test can compare them with the checkpoint."""

    def __init__(self, out_file: str):
        super().__init__()
        self.out_file = out_file

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        torch.save(
            {
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)},
                "current_epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
            },
            self.out_file,
        )


def load_ckpt(path: pathlib.Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=False)


def head_state(state_dict: dict, tag: Optional[str] = "uq_head") -> Dict[str, torch.Tensor]:
    """Entries of a (Lightning) state dict whose name contains ``tag``."""
    return {k: v for k, v in state_dict.items() if tag in k}
