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
``P+forces_uncertainty_max`` (info; mean and max over atoms, DESIGN §2.5). With one
model it also writes the raw evidence: ``P+e2ip_nu``, ``P+e2ip_kappa`` (N,) and
``P+e2ip_sigma0`` (N,9) for an ``e2ip`` head, ``P+eip_nu``, ``P+eip_alpha``,
``P+eip_beta`` (N,3) for ``eip``.
It evaluates structure by structure through :class:`E2IPMACECalculator`.

Metrics use the exact predictive (one model): the multivariate Student-t
(``e2ip_plugins.StudentTPredictive``: df ν−2, location = forces, scale
ν(1+κ)/(κ(ν−2))·Σ₀) for ``e2ip``, the per-component Student-t
(``IndependentStudentTPredictive``) for ``eip``. A committee's predictive is a mixture;
for K > 1 models the metrics use the moment-matched Gaussian of the committee
covariances (``GaussianPredictive``), as stated in the printed ``predictive`` entry.
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
from .outputs import COVARIANCE_KEYS

#: raw evidence written per atom (single model); Σ₀⁻¹ and log|Σ₀| follow from Σ₀
WRITTEN_EVIDENCE = ("e2ip_nu", "e2ip_kappa", "e2ip_sigma0", "eip_nu", "eip_alpha", "eip_beta")


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
    kind = None
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
        exact = calc.num_models == 1 and calc.has_head
        if exact:
            for key, value in calc.e2ip_evidence.items():
                if key in WRITTEN_EVIDENCE:
                    atoms.arrays[prefix + key] = value[0].reshape(len(atoms), -1) if value.ndim == 4 else value[0]
        u = np.asarray(res["forces_uncertainty"])
        atoms.info[prefix + "forces_uncertainty_mean"] = float(u.mean())
        atoms.info[prefix + "forces_uncertainty_max"] = float(u.max())
        if ref is not None:
            t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
            if exact:
                pred = calc.predictive()
                kind = type(pred).__name__
            else:  # committee: moment-matched Gaussian of the combined covariance
                pred = GaussianPredictive(
                    mean=t(forces), cov_epistemic=t(res["forces_covariance_epistemic"]),
                    cov_aleatoric=t(res["forces_covariance_aleatoric"]),
                )
                kind = "GaussianPredictive (committee, moment-matched)"
            state.update(pred, t(ref))
        atoms.calc = None
    ase.io.write(args.output, images=images, format="extxyz")
    metrics = state.compute() if args.ref_forces_key else {}
    if metrics:
        metrics["predictive"] = kind
        print(json.dumps(metrics, indent=1))
        if args.metrics_json:
            with open(args.metrics_json, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=1)
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main()
