"""One-off probes whose findings are recorded in docs/ (see benchmarks/README.md, "probes/"); kept runnable as
``python -m benchmarks.probes.<name>``, not part of ``make bench``."""
