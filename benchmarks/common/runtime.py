"""Process plumbing of ``benchmarks.run``: log lines, package versions, hardware, thread settings, and a
subprocess run that records its wall time, CPU time and peak RSS (``os.wait4``)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import REPO

VERSION_PACKAGES = {
    "common": ["python", "torch", "e3nn", "ase", "numpy", "scipy", "e2ip", "matplotlib"],
    "mace": ["mace-torch", "torch-ema"],
    "nequip": ["nequip", "lightning", "hydra-core", "torchmetrics"],
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions(backbone: str) -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in VERSION_PACKAGES["common"] + VERSION_PACKAGES.get(backbone, []):
        if name == "python":
            out[name] = platform.python_version()
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def loadavg() -> Optional[List[float]]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:  # pragma: no cover
        return None


def hardware() -> Dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover
        pass
    return {
        "cpu_model": cpu, "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem, "gpu": gpu, "platform": platform.platform(), "loadavg_start": loadavg(),
    }


def thread_env(threads: Optional[int]) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONHASHSEED"] = "0"
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
    return env


def run_logged(cmd: List[str], log_path: Path, env: Dict[str, str], cwd: Path = REPO) -> Dict[str, Any]:
    """Run ``cmd``, output to ``log_path``; wall time and the child's peak RSS (``os.wait4`` rusage)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(cwd), env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024.0}
