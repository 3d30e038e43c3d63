"""``al.yaml``: the active-learning configuration, read and checked before anything runs (issue 14).

Every key, with its default (paths are relative to the YAML file's directory)::

    framework: mace                 # mace | nequip: which trainer adapter (``e2ip.trainers`` entry points)
    seed: 0                         # seeds training (member k of a committee: seed + k), MD and random selection
    iterations: 2                   # label rounds; the loop trains iterations + 1 times (the last one to evaluate)
    final_train: true               # false: stop after the last labels (no final training and evaluation)
    device: cpu
    data:
      initial: initial.xyz          # labelled frames to start from (required)
      valid: val.xyz                # fixed validation set of every training (required)
      held_out: {test: test.xyz}    # name -> file; force error measured after every training (optional)
      energy_key: REF_energy        # the keys the training config reads
      forces_key: REF_forces
    train:
      config: ../configs/mace/e2ip.yaml   # the user's own training config (MACE YAML / NequIP Hydra YAML)
      args: []                      # extra CLI flags (MACE) or Hydra overrides (NequIP) for every training
      mode: scratch                 # scratch | finetune (start from the previous iteration's model)
    selector: e2ip                  # e2ip | committee | random
    committee: {size: 4, config: null, args: null}   # selector committee: K models of this config (default: train.config)
    explore:
      structures: seeds.xyz         # MD starts: every frame of this file (required)
      temperatures: [500]           # K; one Langevin run per (structure, temperature)
      steps: 200
      timestep: 0.5                 # fs
      friction: 0.01                # 1/fs
      interval: 10                  # observe (and keep as a candidate) every this many steps
      udd: null                     # {A: eV, B: eV/A}: uncertainty-driven dynamics (selector e2ip/random only)
    select:
      budget: 50                    # frames labelled per iteration (at most)
      trust_lo: {quantile: 0.9}     # eV/A, or {quantile: q}: q-quantile of max u over the validation set
      trust_hi: .inf                # eV/A, or {factor: f}: f * trust_lo; MD stops there, frames above are dropped.
                                    # Set it: without an upper edge selection lost to random (docs/active_learning.md;
                                    # the examples use DP-GEN's factor 3 with order random)
      min_distance: 0.02            # A; descriptor distance below which two selected frames are duplicates
      order: uncertainty            # candidates by decreasing max u, random (DP-GEN: uniform within the band), or
                                    # diverse (greedy max u x distance to the labelled and already chosen frames)
      stratify: none                # none: one ranking over the pool; start: the budget round-robin over the
                                    # MD starts (DP-GEN caps labels per system); run: over start x temperature
    label:
      calculator: tblite.ase:TBLite # import path "module:attribute" of an ASE calculator class (or factory)
      kwargs: {method: GFN2-xTB, verbosity: 0}
    wandb: null                     # {project: ..., name: ...}: per-iteration metrics to W&B (WANDB_MODE honoured)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict

import yaml

SELECTORS = ("e2ip", "committee", "random")
MODES = ("scratch", "finetune")


class ALConfigError(ValueError):
    """Bad active-learning input; the message says what to change."""


DEFAULTS: Dict[str, Any] = {
    "framework": "mace",
    "seed": 0,
    "iterations": 2,
    "final_train": True,
    "device": "cpu",
    "data": {"initial": None, "valid": None, "held_out": {}, "energy_key": "REF_energy", "forces_key": "REF_forces"},
    "train": {"config": None, "args": [], "mode": "scratch"},
    "selector": "e2ip",
    "committee": {"size": 4, "config": None, "args": None},
    "explore": {"structures": None, "temperatures": [500.0], "steps": 200, "timestep": 0.5, "friction": 0.01,
                "interval": 10, "udd": None},
    "select": {"budget": 50, "trust_lo": {"quantile": 0.9}, "trust_hi": math.inf, "min_distance": 0.02,
               "order": "uncertainty", "stratify": "none"},
    "label": {"calculator": None, "kwargs": {}},
    "wandb": None,
}


def _merge(defaults: Dict[str, Any], given: Dict[str, Any], where: str) -> Dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ALConfigError(f"unknown key {where}{key!r}; known: {', '.join(sorted(defaults))}")
        if isinstance(defaults[key], dict) and key not in ("held_out", "kwargs", "trust_lo") and value is not None:
            if not isinstance(value, dict):
                raise ALConfigError(f"{where}{key} must be a mapping, got {value!r}")
            out[key] = _merge(defaults[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def _path(base: Path, value, what: str, required: bool = True):
    if value is None:
        if required:
            raise ALConfigError(f"{what} is required (a file path)")
        return None
    p = Path(value)
    p = p if p.is_absolute() else (base / p)
    if not p.is_file():
        raise ALConfigError(f"{what}: no such file {p}")
    return str(p.resolve())


def _positive(value, what: str, integer: bool = False, allow_zero: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (not integer or float(value).is_integer())
    if not ok:
        raise ALConfigError(f"{what} must be a {'whole ' if integer else ''}number {'>= 0' if allow_zero else '> 0'}, "
                            f"got {value!r}")
    return int(value) if integer else float(value)


def check_band(value, what: str):
    """A band edge: a number (eV/Å; trust_hi may be inf), ``{quantile: q}`` (trust_lo) or ``{factor: f}`` (trust_hi)."""
    if isinstance(value, str) and value.strip().lower() in (".inf", "inf"):
        value = math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value) or value < 0 or (what == "select.trust_lo" and math.isinf(value)):
            raise ALConfigError(f"{what} must be a number >= 0 (eV/A), got {value}")
        return float(value)
    key = "quantile" if what == "select.trust_lo" else "factor"
    if isinstance(value, dict) and list(value) == [key]:
        v = value[key]
        good = isinstance(v, (int, float)) and (0 < v < 1 if key == "quantile" else v > 1)
        if not good:
            raise ALConfigError(f"{what}.{key} must be {'in (0, 1)' if key == 'quantile' else '> 1'}, got {v!r}")
        return {key: float(v)}
    raise ALConfigError(f"{what} must be a number (eV/A) or {{{key}: value}}, got {value!r}")


def load_config(path) -> Dict[str, Any]:
    """Read ``al.yaml``, fill the defaults, resolve paths, and check every value (:class:`ALConfigError`)."""
    path = Path(path)
    if not path.is_file():
        raise ALConfigError(f"--config {path}: no such file")
    try:
        given = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ALConfigError(f"--config {path} is not valid YAML: {err}") from err
    if not isinstance(given, dict):
        raise ALConfigError(f"--config {path} must hold a mapping of keys")
    cfg = _merge(DEFAULTS, given, "")
    base = path.resolve().parent
    if cfg["framework"] not in ("mace", "nequip"):
        raise ALConfigError(f"framework must be mace or nequip, got {cfg['framework']!r}")
    if cfg["selector"] not in SELECTORS:
        raise ALConfigError(f"selector must be one of {', '.join(SELECTORS)}, got {cfg['selector']!r}")
    cfg["seed"] = _positive(cfg["seed"], "seed", integer=True, allow_zero=True)
    cfg["iterations"] = _positive(cfg["iterations"], "iterations", integer=True, allow_zero=True)
    if not isinstance(cfg["final_train"], bool):
        raise ALConfigError(f"final_train must be true or false, got {cfg['final_train']!r}")
    if cfg["iterations"] == 0 and not cfg["final_train"]:
        raise ALConfigError("iterations: 0 with final_train: false does nothing; set iterations >= 1")
    d = cfg["data"]
    d["initial"] = _path(base, d["initial"], "data.initial")
    d["valid"] = _path(base, d["valid"], "data.valid")
    if not isinstance(d["held_out"], dict):
        raise ALConfigError("data.held_out must map a name to a file, e.g. {test: test.xyz}")
    d["held_out"] = {str(k): _path(base, v, f"data.held_out.{k}") for k, v in d["held_out"].items()}
    t = cfg["train"]
    t["config"] = _path(base, t["config"], "train.config")
    if t["mode"] not in MODES:
        raise ALConfigError(f"train.mode must be scratch or finetune, got {t['mode']!r}")
    if not isinstance(t["args"], list):
        raise ALConfigError("train.args must be a list of strings")
    t["args"] = [str(a) for a in t["args"]]
    c = cfg["committee"]
    if cfg["selector"] == "committee":
        c["size"] = _positive(c["size"], "committee.size", integer=True)
        if c["size"] < 2:
            raise ALConfigError(f"committee.size must be >= 2 (a sample covariance needs two members), got {c['size']}")
    c["config"] = _path(base, c["config"], "committee.config", required=False) or t["config"]
    c["args"] = t["args"] if c["args"] is None else [str(a) for a in c["args"]]
    e = cfg["explore"]
    e["structures"] = _path(base, e["structures"], "explore.structures")
    temps = e["temperatures"] if isinstance(e["temperatures"], list) else [e["temperatures"]]
    e["temperatures"] = [_positive(x, "explore.temperatures[...]", allow_zero=True) for x in temps]
    if not e["temperatures"]:
        raise ALConfigError("explore.temperatures must list at least one temperature (K)")
    e["steps"] = _positive(e["steps"], "explore.steps", integer=True)
    e["interval"] = _positive(e["interval"], "explore.interval", integer=True)
    e["timestep"] = _positive(e["timestep"], "explore.timestep")
    e["friction"] = _positive(e["friction"], "explore.friction", allow_zero=True)
    if e["udd"] is not None:
        if cfg["selector"] == "committee":
            raise ALConfigError("explore.udd needs the e2ip epistemic variance gradient; use selector e2ip or random, "
                                "or remove explore.udd")
        if not (isinstance(e["udd"], dict) and set(e["udd"]) == {"A", "B"}):
            raise ALConfigError(f"explore.udd must be {{A: eV, B: eV/A}}, got {e['udd']!r}")
    s = cfg["select"]
    s["budget"] = _positive(s["budget"], "select.budget", integer=True)
    s["min_distance"] = _positive(s["min_distance"], "select.min_distance", allow_zero=True)
    if s["order"] not in ("uncertainty", "random", "diverse"):
        raise ALConfigError(f"select.order must be uncertainty, random or diverse, got {s['order']!r}")
    if s["stratify"] not in ("none", "start", "run"):
        raise ALConfigError(f"select.stratify must be none, start or run, got {s['stratify']!r}")
    if s["order"] == "diverse" and s["stratify"] != "none":
        raise ALConfigError("select.order diverse already spreads the budget by distance; set select.stratify: none "
                            "with it")
    s["trust_lo"] = check_band(s["trust_lo"], "select.trust_lo")
    s["trust_hi"] = check_band(s["trust_hi"], "select.trust_hi")
    if isinstance(s["trust_lo"], float) and isinstance(s["trust_hi"], float) and not s["trust_lo"] < s["trust_hi"]:
        raise ALConfigError(f"select.trust_lo ({s['trust_lo']}) must be below select.trust_hi ({s['trust_hi']})")
    lab = cfg["label"]
    if not isinstance(lab["calculator"], str) or ":" not in lab["calculator"]:
        raise ALConfigError(f"label.calculator must be an import path 'module:Class', got {lab['calculator']!r}")
    if not isinstance(lab["kwargs"], dict):
        raise ALConfigError("label.kwargs must be a mapping")
    if cfg["wandb"] is not None and not (isinstance(cfg["wandb"], dict) and "project" in cfg["wandb"]):
        raise ALConfigError("wandb must be null or {project: ..., name: ...}")
    return cfg


def run_fingerprint(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The part of the config a resumed run must share with the run that started the work directory
    (everything but ``iterations``, ``final_train`` and ``wandb``, which may change on resume)."""
    out = copy.deepcopy(cfg)
    for key in ("iterations", "final_train", "wandb"):
        out.pop(key, None)
    return out
