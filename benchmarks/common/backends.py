"""The two backbones behind one interface: training command lines (the public CLIs), loading trained
models into their ASE calculators, and turning one calculation into forces plus an ``e2ip_plugins``
predictive.

=============  ===============================================  ==============================================
method         MACE                                             NequIP
=============  ===============================================  ==============================================
``plain``      ``mace_run_train --config                         ``nequip-train -cp benchmarks/configs
               benchmarks/configs/mace.yaml``                    -cn nequip_plain``
``e2ip``       ``mace_run_train_e2ip`` (same flags)              ``nequip-train -cp configs/nequip -cn e2ip``
               ``--e2ip_head e2ip``
``eip``        ``... --e2ip_head eip``                           ``... -cn eip``
``ensemble``   K ``plain`` runs, seeds s₀ … s₀+K−1 (member 0 is the ``plain`` run itself)
=============  ===============================================  ==============================================

Every method of one backbone gets the same backbone flags / Hydra overrides (:meth:`Backend.train_cmd`).

Evaluation (:meth:`Backend.load`, :meth:`Backend.predict`):

- MACE: ``mace.calculators.MACECalculator`` (plain), ``mace_ext.E2IPMACECalculator`` (heads; the exact
  predictive from ``calc.predictive()``), ``E2IPMACECalculator`` in committee mode for the ensemble
  (members' forces ``results["forces_comm"]`` → :func:`e2ip_plugins.ensemble_predictive`).
- NequIP: ``nequip_ext.E2IPNequIPCalculator.from_saved_model`` (heads; the exact predictive from
  ``calc.predictive()``).
  Plain models and ensemble members: NequIP 0.19.1's ``NequIPCalculator`` has no public eager loader
  (only ``from_compiled_model``), so its ``_from_saved_model`` — the same loader
  ``E2IPNequIPCalculator.from_saved_model`` calls — is used; every method is therefore timed eager.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import REPO

BENCH_CONFIGS = REPO / "benchmarks" / "configs"
METHODS = ("plain", "e2ip", "eip", "ensemble")  # what is trained, timed and loaded
# what is scored: the methods plus a diagnostic variant of the ensemble (``evaluation.isotropic``)
SCORED = METHODS + ("ensemble_iso",)
NAMES = {"plain": "plain", "e2ip": "e²IP", "eip": "eIP", "ensemble": "ensemble", "ensemble_iso": "ensemble (iso)"}


def _bin(name: str) -> str:
    """The console script ``name`` beside this interpreter (a venv), else the first one on ``PATH``."""
    import shutil

    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or str(here))


def to_float64(pred):
    """The same predictive with every tensor field in float64 on the CPU."""
    import torch

    fields = {f.name: getattr(pred, f.name) for f in dataclasses.fields(pred)}
    return dataclasses.replace(pred, **{k: v.detach().to("cpu", torch.float64) for k, v in fields.items()})


@dataclasses.dataclass
class Handle:
    """A loaded method: one calculator, or the member calculators of a NequIP ensemble."""

    method: str
    calcs: List[Any]


class Backend:
    name = ""

    def __init__(self, settings: Dict[str, Any]):
        self.s = settings  # the profile's settings for this backbone (see benchmarks.common.profiles)

    # --- training ---------------------------------------------------------------------------------
    def train_cmd(self, method: str, run_dir: Path, run_name: str, seed: int, files: Dict[str, str],
                  epochs: int, data: Dict[str, Any]) -> List[str]:
        raise NotImplementedError

    def artifact(self, run_dir: Path, run_name: str) -> Path:
        raise NotImplementedError

    def epoch_timing(self, run_dir: Path, run_name: str, seed: int, epochs: int) -> Dict[str, Optional[float]]:
        """``step_s_per_epoch`` (optimizer steps only) and ``epoch_s`` (steps + validation), from the CLI's files."""
        raise NotImplementedError

    # --- evaluation -------------------------------------------------------------------------------
    def import_framework(self) -> None:
        """Import everything loading a model needs (so memory probes can take a baseline after it)."""
        raise NotImplementedError

    def load(self, method: str, artifacts: Sequence[str], device: str) -> Handle:
        raise NotImplementedError

    def calculate(self, handle: Handle, atoms) -> None:
        """One full calculation (energy, forces and, for the heads, the covariances) on every calculator."""
        from ase.calculators.calculator import all_changes

        for calc in handle.calcs:
            calc.calculate(atoms, ["energy", "forces"], all_changes)

    def predict(self, handle: Handle, atoms):
        """(forces (N,3) float64 tensor, float64 predictive or None for ``plain``)."""
        raise NotImplementedError


# ================================================================================================ MACE
class MaceBackend(Backend):
    name = "mace"

    def train_cmd(self, method, run_dir, run_name, seed, files, epochs, data):
        s = self.s
        exe = _bin("mace_run_train" if method == "plain" else "mace_run_train_e2ip")
        cmd = [
            exe, "--config", str(BENCH_CONFIGS / "mace.yaml"),
            "--name", run_name, "--seed", str(seed), "--work_dir", str(run_dir),
            "--train_file", files["train"], "--valid_file", files["val"],
            "--max_num_epochs", str(epochs), "--device", s["device"], "--default_dtype", s["dtype"],
            "--energy_key", data["energy_key"], "--forces_key", data["forces_key"],
            "--num_channels", str(s["channels"]), "--max_L", str(s["max_L"]), "--max_ell", str(s["max_ell"]),
            "--num_interactions", str(s["layers"]), "--correlation", str(s["correlation"]),
            "--r_max", str(s["r_max"]), "--MLP_irreps", f"{s['channels']}x0e",
            "--batch_size", str(s["batch_size"]), "--valid_batch_size", str(2 * s["batch_size"]),
            "--lr", str(s["lr"]),
        ]
        if s.get("energy_weight") is not None:  # every method, plain included (benchmarks.committee mace_ew10)
            cmd += ["--energy_weight", str(s["energy_weight"])]
        if method in ("e2ip", "eip"):
            cmd += ["--e2ip_head", method, *[str(x) for x in s.get("head_flags", [])]]
        return cmd

    def artifact(self, run_dir, run_name):
        return run_dir / f"{run_name}.model"

    def epoch_timing(self, run_dir, run_name, seed, epochs):
        step: Dict[int, float] = {}
        evals: Dict[int, float] = {}
        for f in sorted((run_dir / "results").glob(f"{run_name}_run-{seed}_train.txt")):
            for line in f.read_text().splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                ep = row.get("epoch")
                if ep is None or "time" not in row:
                    continue
                if row.get("mode") == "opt":
                    step[ep] = step.get(ep, 0.0) + float(row["time"])
                elif row.get("mode") == "eval":
                    evals[ep] = evals.get(ep, 0.0) + float(row["time"])
        if not step:
            return {"step_s_per_epoch": None, "epoch_s": None, "epochs_timed": 0}
        eps = sorted(step)
        return {
            "step_s_per_epoch": float(np.mean([step[e] for e in eps])),
            "epoch_s": float(np.mean([step[e] + evals.get(e, 0.0) for e in eps])),
            "epochs_timed": len(eps),
        }

    def import_framework(self):
        import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
        import mace.calculators  # noqa: F401
        import mace_ext  # noqa: F401

    def load(self, method, artifacts, device):
        import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)

        kw = dict(device=device, default_dtype=self.s["dtype"])
        if method == "plain":
            from mace.calculators import MACECalculator

            return Handle(method, [MACECalculator(model_paths=str(artifacts[0]), **kw)])
        from mace_ext import E2IPMACECalculator

        paths = [str(a) for a in artifacts]
        return Handle(method, [E2IPMACECalculator(model_paths=paths if method == "ensemble" else paths[0], **kw)])

    def predict(self, handle, atoms):
        import torch
        from e2ip_plugins import ensemble_predictive

        self.calculate(handle, atoms)
        calc = handle.calcs[0]
        forces = torch.as_tensor(np.asarray(calc.results["forces"]), dtype=torch.float64)
        if handle.method == "plain":
            return forces, None
        if handle.method == "ensemble":
            members = torch.as_tensor(np.asarray(calc.results["forces_comm"]), dtype=torch.float64)
            return members.mean(0), ensemble_predictive(members)
        return forces, to_float64(calc.predictive())


# ============================================================================================== NequIP
# the benchmark's NequIP configs use the chemical symbols as type names (identity map)
SPECIES = {"chemical_species_to_atom_type_map": True}


class NequipBackend(Backend):
    name = "nequip"

    def overrides(self, files, epochs, seed, data) -> List[str]:
        s = self.s
        symbols = ",".join(data["elements"])
        out = [
            f"train_file={files['train']}", f"val_file={files['val']}", f"test_file={files['test']}",
            "run=[train]", f"max_epochs={epochs}", f"seed={seed}", f"chemical_symbols=[{symbols}]",
            f"cutoff_radius={s['r_max']}", f"batch_size={s['batch_size']}",
            f"trainer.accelerator={'gpu' if s['device'].startswith('cuda') else 'cpu'}",
            f"training_module.optimizer.lr={s['lr']}",
            f"training_module.model.num_features={s['channels']}",
            f"training_module.model.num_layers={s['layers']}",
            f"training_module.model.l_max={s['max_L']}",
            f"training_module.model.radial_mlp_width={s['channels']}",
            f"training_module.model.model_dtype={s['dtype']}",
        ]
        if (data["energy_key"], data["forces_key"]) != ("REF_energy", "REF_forces"):
            out.append(f"data.key_mapping={{{data['energy_key']}:total_energy,{data['forces_key']}:forces}}")
        return out

    def train_cmd(self, method, run_dir, run_name, seed, files, epochs, data):
        if method == "plain":
            cfg = ["-cp", str(BENCH_CONFIGS.relative_to(REPO)), "-cn", "nequip_plain"]
        else:
            cfg = ["-cp", "configs/nequip", "-cn", method]
        return [
            _bin("nequip-train"), *cfg, f"hydra.run.dir={run_dir}", *self.overrides(files, epochs, seed, data),
            # per-epoch timing: Lightning's SimpleProfiler (run_training_batch / run_training_epoch)
            "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
            f"+trainer.profiler.dirpath={run_dir}", "+trainer.profiler.filename=profile",
        ] + ([str(x) for x in self.s.get("head_overrides", [])] if method != "plain" else [])

    def artifact(self, run_dir, run_name):
        return run_dir / "best.ckpt"

    def epoch_timing(self, run_dir, run_name, seed, epochs):
        prof = run_dir / "fit-profile.txt"
        res = {"step_s_per_epoch": None, "epoch_s": None, "epochs_timed": 0}
        if not prof.is_file():
            return res
        rows = {}
        for line in prof.read_text().splitlines():
            parts = [p.strip() for p in line.strip().strip("|").split("|")]
            if len(parts) >= 4 and parts[0] in ("run_training_batch", "run_training_epoch"):
                rows[parts[0]] = (float(parts[1]), int(parts[2]), float(parts[3]))
        if "run_training_epoch" in rows:
            mean, n, total = rows["run_training_epoch"]
            res["epoch_s"], res["epochs_timed"] = mean, n
            if "run_training_batch" in rows:
                res["step_s_per_epoch"] = rows["run_training_batch"][2] / max(n, 1)
        return res

    def import_framework(self):
        import nequip.integrations.ase  # noqa: F401
        import nequip_ext.calculator  # noqa: F401
        import nequip_ext.model  # noqa: F401

    def load(self, method, artifacts, device):
        if method in ("e2ip", "eip"):
            from nequip_ext import E2IPNequIPCalculator

            return Handle(method, [E2IPNequIPCalculator.from_saved_model(str(artifacts[0]), device=device, **SPECIES)])
        from nequip.integrations.ase import NequIPCalculator

        # NequIP 0.19.1 has no public eager loader for plain models (see module docstring)
        return Handle(method, [NequIPCalculator._from_saved_model(str(a), device=device, **SPECIES) for a in artifacts])

    def predict(self, handle, atoms):
        import torch
        import e2ip_plugins

        self.calculate(handle, atoms)
        member_forces = [torch.as_tensor(np.asarray(c.results["forces"]), dtype=torch.float64) for c in handle.calcs]
        if handle.method == "plain":
            return member_forces[0], None
        if handle.method == "ensemble":
            members = torch.stack(member_forces)
            return members.mean(0), e2ip_plugins.ensemble_predictive(members)
        return member_forces[0], to_float64(handle.calcs[0].predictive())


BACKENDS = {"mace": MaceBackend, "nequip": NequipBackend}


def make_backend(name: str, settings: Dict[str, Any]) -> Backend:
    return BACKENDS[name](settings)
