"""How the loop reaches a framework's training CLI: the ``e2ip.trainers`` entry points (DESIGN §6).

An adapter (``mace_ext.active_learning:TRAINER``, ``nequip_ext.active_learning:TRAINER``) builds the
command line of the framework's own training entry point for one model and opens the trained model as
an ASE calculator; the loop runs the command as a subprocess. Protocol::

    name: str
    check(config_path, committee: bool) -> None      # ALConfigError when the user's config cannot be used
    command(config_path, train_file, valid_file, run_dir, seed, args, init_model, committee) -> list[str]
    model_file(run_dir) -> Path                      # the trained model the command left in run_dir
    open(model_file, device, plain=False) -> ase Calculator   # e2ip covariance keys; plain=True: energy, forces
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from .config import ALConfigError

GROUP = "e2ip.trainers"


def find_trainer(framework: str):
    """The adapter registered under ``framework``; :class:`ALConfigError` if missing or not importable here."""
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    if framework not in eps:
        raise ALConfigError(f"no {GROUP} adapter named {framework!r} is installed (installed: {', '.join(sorted(eps))})")
    try:
        return eps[framework].load()
    except ImportError as err:
        raise ALConfigError(f"framework {framework!r}: {eps[framework].value} cannot be imported in this environment "
                            f"({err}); run e2ip-active-learning from the {framework} environment") from err


def executable(name: str) -> str:
    """A console script of this environment (next to its Python), else whatever ``PATH`` finds."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the training subprocess gets SIGKILL when the loop's process dies (no orphan keeps writing)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_logged(cmd: List[str], log_file: Path, cwd: Optional[str] = None) -> float:
    """Run ``cmd`` with stdout/stderr to ``log_file``; returns the CPU seconds it used (user + system,
    children included). :class:`RuntimeError` naming the log when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=os.environ.copy(),
                              preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "".join(Path(log_file).read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"training failed (exit {proc.returncode}); log {log_file}, last lines:\n{tail}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
