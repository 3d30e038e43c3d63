"""Peak memory of one method at inference, in a fresh process (so the numbers are that method's alone).

    python -m benchmarks.common.memprobe --backbone mace --method e2ip --settings s.json --artifacts a.model \
        --structures small.xyz large.xyz

Linux peak resident set size ``VmHWM`` (``/proc/self/status``), with the peak reset
(``echo 5 > /proc/self/clear_refs``) after the imports and again before each structure, so that

- ``baseline_mb``: RSS after importing torch, the framework and e2ip (before any model);
- ``load``: peak RSS while loading the model(s), and its increment over the baseline;
- ``infer[n_atoms]``: peak RSS during ``calls`` calculations on that structure, and its increment
  over the baseline (model weights + activations + the calculator's work).

Without ``clear_refs`` (non-Linux) it falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
which is a whole-process peak since start (``mode`` says which). On CUDA also
``torch.cuda.max_memory_allocated`` per structure. Prints one JSON line prefixed ``MEMPROBE``.
"""

from __future__ import annotations

import argparse
import json
import resource


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak(resettable: bool) -> float:
    return _status("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--settings", required=True, help="JSON file with the backbone settings")
    p.add_argument("--artifacts", nargs="+", required=True)
    p.add_argument("--structures", nargs="+", required=True)
    p.add_argument("--calls", type=int, default=2)
    a = p.parse_args(argv)

    import ase.io
    import torch

    from .backends import make_backend

    with open(a.settings) as f:
        settings = json.load(f)
    backend = make_backend(a.backbone, settings)
    backend.import_framework()
    structures = [ase.io.read(path) for path in a.structures]
    cuda = settings["device"].startswith("cuda")

    resettable = _reset_peak()
    base = _status("VmRSS") if resettable else _peak(False)
    handle = backend.load(a.method, a.artifacts, settings["device"])
    load_peak = _peak(resettable)
    out = {
        "method": a.method,
        "mode": "VmHWM reset by /proc/self/clear_refs" if resettable else "ru_maxrss since process start",
        "baseline_mb": base,
        "load": {"peak_mb": load_peak, "increment_mb": load_peak - base},
        "infer": {},
    }
    for atoms in structures:
        _reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(a.calls):
            backend.calculate(handle, atoms)
        peak = _peak(resettable)
        entry = {"peak_mb": peak, "increment_mb": peak - base}
        if cuda:
            entry["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["infer"][str(len(atoms))] = entry
    print("MEMPROBE " + json.dumps(out))


if __name__ == "__main__":
    main()
