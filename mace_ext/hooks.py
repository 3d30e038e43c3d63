"""Every MACE name the e2ip adapter wraps, replaces, subclasses or calls into.

MACE has no plugin system (DESIGN §3), so the adapter depends on a handful of
module-level names in ``mace-torch``. They are all listed here, in one place, so
that a MACE release that moves or renames one fails loudly and early
(:func:`verify_hooks`, called by ``mace_run_train_e2ip`` at start-up and by
``tests/mace/test_hooks.py``) instead of silently training without the head.

Kinds:

- ``wrap``: replaced by a wrapper for the duration of one ``mace_run_train_e2ip``
  run (see :func:`patched`), the original is restored afterwards;
- ``subclass``: a class the adapter subclasses;
- ``call``: a function or class the adapter calls or reads.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Iterator, List, Tuple

from .errors import MACEHookError, installed_mace_version


@dataclass(frozen=True)
class Hook:
    module: str
    attr: str  # may be dotted, e.g. "MACECalculator._create_result_tensors"
    kind: str  # "wrap" | "subclass" | "call"
    why: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.attr}"


HOOKS: Tuple[Hook, ...] = (
    # --- training entry point (mace_ext.cli: train_options, train_run, uq_reports) ---
    Hook("mace.tools", "build_default_arg_parser", "call", "MACE's own parser, extended with --e2ip_* options"),
    Hook("mace.cli.run_train", "run", "call", "MACE's training driver; mace_run_train_e2ip delegates to it"),
    Hook("mace.cli.run_train", "configure_model", "wrap",
         "model construction: the evidential head is attached before optimizer/EMA/DDP are built"),
    Hook("mace.cli.run_train", "get_loss_fn", "wrap", "stage-one loss: adds the evidential force term"),
    Hook("mace.cli.run_train", "get_swa", "wrap", "stage-two (SWA) loss: adds the evidential force term"),
    Hook("mace.cli.run_train", "get_params_options", "wrap", "optimizer parameter groups: adds the head's parameters"),
    Hook("mace.tools.train", "MACELoss", "wrap", "evaluation metric: adds the UQ metrics (DESIGN §4) to MACE's"),
    Hook("mace.tools.train", "valid_err_log", "wrap", "validation logging: logs the UQ metrics (and to W&B)"),
    Hook("mace.tools.train", "evaluate", "call", "MACE's evaluation loop (builds MACELoss by its global name)"),
    Hook("mace.cli.run_train", "create_error_table", "wrap",
         "final TRAIN/VALID/TEST error tables: UQ columns next to MACE's errors, W&B <set>_final_forces_*, "
         "results/<tag>_e2ip_final.txt"),
    Hook("mace.tools.tables_utils", "evaluate", "wrap",
         "captures each set's metric dict while create_error_table runs (no second evaluation)"),
    Hook("mace.tools", "get_tag", "call", "MACE's run tag, names results/<tag>_e2ip_final.txt"),
    Hook("mace.tools", "MetricsLogger", "call", "writes results/<tag>_e2ip_final.txt (MACE's JSON-lines format)"),
    Hook("mace.cli.run_train", "jit", "call",
         "MACE writes <name>_compiled.model with jit.compile (e3nn.util.jit) and swallows errors; "
         "mace_run_train_e2ip checks the file afterwards and reports why it is missing"),
    # --- distributed training on CPU (mace_ext.train_run) ---
    Hook("mace.tools", "train", "wrap", "captures the validation loaders (novelty reference quantile)"),
    Hook("mace.tools", "CheckpointHandler", "wrap",
         "loading the final checkpoints after training also fits the novelty buffers, before the .model files are saved"),
    Hook("mace.cli.run_train", "init_distributed", "wrap",
         "--distributed --device cpu: opens a gloo process group (MACE opens one only for cuda/xpu)"),
    Hook("mace.cli.run_train", "DDP", "wrap",
         "--distributed --device cpu: drops MACE's device_ids=[local_rank], which torch refuses for CPU modules"),
    # --- model ---
    Hook("mace.modules.models", "MACE", "subclass", "E2IPMACE"),
    Hook("mace.modules.models", "ScaleShiftMACE", "subclass", "E2IPScaleShiftMACE"),
    Hook("mace.modules.models", "MACE.forward", "call",
         "E2IP forward re-declares its parameters (TorchScript needs them; checked by "
         "mace_ext.model.check_forward_signature) and calls it under another name (TorchScript has no super())"),
    Hook("mace.modules.models", "ScaleShiftMACE.forward", "call", "as MACE.forward"),
    Hook("mace.modules.loss", "reduce_loss", "call", "DDP-correct mean of the per-atom evidential loss"),
    # --- calculator ---
    Hook("mace.calculators.mace", "MACECalculator", "subclass", "E2IPMACECalculator"),
    Hook("mace.calculators.mace", "MACECalculator._create_result_tensors", "wrap",
         "overridden to allocate and capture the covariance outputs"),
    Hook("mace.calculators.mace", "MACECalculator._slice_real_outputs", "wrap",
         "overridden to strip padding atoms from the covariance outputs"),
    Hook("mace.calculators.mace", "MACECalculator.calculate", "wrap", "extended to fill the covariance results"),
    # --- evaluation script (mace_ext.eval_configs) ---
    Hook("mace.cli.eval_configs", "parse_args", "call", "MACE's eval_configs parser"),
)


def resolve(hook: Hook) -> Any:
    """Return the object a hook names, or raise :class:`MACEHookError` naming it."""
    try:
        obj: Any = importlib.import_module(hook.module)
    except ImportError as exc:
        raise MACEHookError(
            f"e2ip needs module '{hook.module}' from mace-torch (for {hook.qualname}: {hook.why}), but it "
            f"cannot be imported ({exc}). Installed mace-torch: {installed_mace_version()}; "
            "e2ip was written against mace-torch 0.3.16. Update mace_ext/hooks.py."
        ) from exc
    for part in hook.attr.split("."):
        if not hasattr(obj, part):
            raise MACEHookError(
                f"e2ip needs '{hook.qualname}' from mace-torch ({hook.kind}: {hook.why}), but "
                f"'{part}' is missing in the installed mace-torch {installed_mace_version()} "
                "(e2ip was written against 0.3.16). MACE moved or renamed it; update mace_ext/hooks.py "
                "and the adapter code that uses it."
            )
        obj = getattr(obj, part)
    return obj


def verify_hooks() -> List[str]:
    """Check every hooked MACE name exists (and MACE's forward signature is the one the E2IP
    models re-declare); return their qualified names. Raises MACEHookError."""
    for hook in HOOKS:
        resolve(hook)
    # here, not at the top: the hooks above are resolved first, so a moved MACE name is reported by name
    from .model import check_forward_signature  # pylint: disable=import-outside-toplevel

    check_forward_signature()
    return [h.qualname for h in HOOKS]


def get_hook(module: str, attr: str) -> Hook:
    for hook in HOOKS:
        if hook.module == module and hook.attr == attr:
            return hook
    raise KeyError(f"{module}.{attr} is not listed in mace_ext.hooks.HOOKS; list it there before using it")


@contextlib.contextmanager
def patched(module: str, attr: str, replacement: Any) -> Iterator[Any]:
    """Temporarily replace a listed ``wrap`` hook ``module.attr``; yields the original, restores on exit."""
    hook = get_hook(module, attr)
    if hook.kind != "wrap" or "." in attr:
        raise ValueError(f"{hook.qualname} is not a module-level 'wrap' hook")
    original = resolve(hook)
    mod = importlib.import_module(module)
    setattr(mod, attr, replacement)
    try:
        yield original
    finally:
        setattr(mod, attr, original)


__all__ = ["HOOKS", "Hook", "MACEHookError", "get_hook", "patched", "resolve", "verify_hooks"]
