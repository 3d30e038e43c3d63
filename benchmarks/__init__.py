"""e2ip benchmarks: e²IP vs eIP vs deep ensembles vs the plain backbone, for MACE and NequIP.

    python -m benchmarks.run --backbone both --profile quick --data-dir ../shared/data --out bench_out

The modules at this level are the maintained entry points (``benchmarks/README.md`` lists each);
:mod:`benchmarks.common` holds what they share, :mod:`benchmarks.probes` the one-off probes whose
findings are recorded in docs/.
"""
