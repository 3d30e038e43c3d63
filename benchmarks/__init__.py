"""e2ip benchmarks: e²IP vs eIP vs deep ensembles vs the plain backbone, for MACE and NequIP.

    python -m benchmarks.run --backbone both --profile quick --data-dir ../shared/data --out bench_out

See :mod:`benchmarks.run` for what is trained, evaluated and reported.
"""
