"""``mace_eval_configs_e2ip``: ``mace_eval_configs`` for e2ip models, writing the covariances.

Takes MACE's ``mace_eval_configs`` arguments (``--configs``, ``--model``, ``--output``,
``--device``, ``--default_dtype``, ``--info_prefix``, ``--head``, ...; a glob or a
comma-separated list in ``--model`` gives a committee) plus:

- ``--ref_forces_key KEY``: reference forces in the input file; if given, the UQ
  metrics of DESIGN §4 are printed as JSON (and written to ``--metrics_json``).

For every structure the output extxyz holds, with ``P`` = ``--info_prefix`` (MACE's
default ``MACE_``): ``P+energy`` (info), ``P+forces`` (N,3), ``P+forces_covariance``,
``P+forces_covariance_epistemic``, ``P+forces_covariance_aleatoric`` (N,9, row-major
3×3), ``P+forces_uncertainty`` (N,) and ``P+forces_uncertainty_mean`` /
``P+forces_uncertainty_max`` (info; mean and max over atoms, DESIGN §2.5).
It evaluates structure by structure through :class:`E2IPMACECalculator`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import numpy as np
import torch

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
from e2ip_plugins import GaussianPredictive, UQMetricState

from . import hooks
from .calculator import COMMITTEE_KEY, E2IPMACECalculator
from .model import COVARIANCE_KEYS


def _extra_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--ref_forces_key", default=None)
    p.add_argument("--metrics_json", default=None)
    return p


def parse_args(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra, rest = _extra_parser().parse_known_args(argv)
    mace_parse = hooks.resolve(hooks.get_hook("mace.cli.eval_configs", "parse_args"))
    saved = sys.argv
    try:
        sys.argv = ["mace_eval_configs_e2ip", *rest]
        args = mace_parse()
    finally:
        sys.argv = saved
    for k, v in vars(extra).items():
        setattr(args, k, v)
    return args


def run(args) -> dict:
    import ase.io
    from glob import glob

    paths: List[str] = []
    for part in str(args.model).split(","):
        paths += sorted(glob(part)) or [part]
    kwargs = {"head": args.head} if getattr(args, "head", None) else {}
    calc = E2IPMACECalculator(model_paths=paths, device=args.device, default_dtype=args.default_dtype, **kwargs)
    prefix = args.info_prefix
    images = ase.io.read(args.configs, index=":")
    state = UQMetricState()
    for atoms in images:
        ref = None
        if args.ref_forces_key:
            ref = atoms.arrays.get(args.ref_forces_key)
            if ref is None and atoms.calc is not None and args.ref_forces_key == "forces":
                ref = atoms.get_forces()
        atoms.calc = calc
        atoms.info[prefix + "energy"] = atoms.get_potential_energy()
        forces = atoms.get_forces()
        atoms.arrays[prefix + "forces"] = forces
        res = calc.results
        keys = list(COVARIANCE_KEYS) + ([COMMITTEE_KEY] if COMMITTEE_KEY in res else [])
        for key in keys:
            value = np.asarray(res[key])
            atoms.arrays[prefix + key] = value.reshape(len(atoms), -1) if value.ndim == 3 else value
        u = np.asarray(res["forces_uncertainty"])
        atoms.info[prefix + "forces_uncertainty_mean"] = float(u.mean())
        atoms.info[prefix + "forces_uncertainty_max"] = float(u.max())
        if ref is not None:
            t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
            pred = GaussianPredictive(  # moment-matched Gaussian of the calculator's covariance
                mean=t(forces), cov_epistemic=t(res["forces_covariance_epistemic"]),
                cov_aleatoric=t(res["forces_covariance_aleatoric"]),
            )
            state.update(pred, t(ref))
        atoms.calc = None
    ase.io.write(args.output, images=images, format="extxyz")
    metrics = state.compute() if args.ref_forces_key else {}
    if metrics:
        print(json.dumps(metrics, indent=1))
        if args.metrics_json:
            with open(args.metrics_json, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=1)
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main()
