"""Energy uncertainty on the development data (issue 15): e²IP's ``energy_uncertainty`` vs a deep ensemble.

    .venv-mace/bin/python -m benchmarks.energy_uq --backbone mace --bench /tmp/bn --out benchmarks/reports/energy_uq
    .venv-nequip/bin/python -m benchmarks.energy_uq --backbone nequip --bench /tmp/bn --out benchmarks/reports/energy_uq

``--bench`` is the output folder of ``python -m benchmarks.run`` (its ``data/`` splits and the trained
``runs/e2ip_s0`` and ``runs/plain_s{0..3}``). Steps:

1. the e²IP model's stored energy length ℓ is (re)fitted on ``data/val.xyz`` only, with the deployed fit
   (MACE ``mace_ext.energy_uq.fit_energy_noise``, NequIP ``nequip_ext.novelty.energy_columns`` +
   ``fit_energy_length``: the same calls ``mace_run_train_e2ip`` / ``NoveltyFitCallback`` make);
   bench models trained before issue 15 thereby get the value a new training would store;
2. every structure of val, test (ID), ood_mol and ood_hot is evaluated through the ASE calculator
   (``E2IPMACECalculator`` / ``E2IPNequIPCalculator``): energy and ``energy_uncertainty`` as deployed;
3. the 4 plain members: energy std σ_ens = sqrt(Var_k E_k) (1/(K−1)); "recal" multiplies it by
   sqrt(ĉ), ĉ = mean(r_E²/σ²) on val (``fit_variance_scale``); each method is scored on its own
   residuals (e²IP energy vs reference; ensemble mean vs reference);
4. also reported: the e²IP variant built from U_epi instead of U_tot (scale fitted on val the same way),
   to show which part of the force covariance carries the energy-error ranking.

Metrics (``e2ip_plugins.energy_noise.energy_uq_metrics``): Spearman of σ vs |r|, AUROC of σ for the
top-10 % |r| of the set, coverage of the central 90 % / 50 % Gaussian interval, Gaussian NLL, MAE, and
the mean and standard deviation of the residual r = E_ref − E (a large mean = a systematic offset that
no per-structure σ can rank).
Nothing is fitted on test or OOD data.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

SETS = ("val", "test", "ood_mol", "ood_hot")
K_MEMBERS = 4


def _frames(bench: Path, name: str):
    import ase.io

    return ase.io.read(bench / "data" / f"{name}.xyz", ":")


def _eval(calcs, frames) -> Dict[str, np.ndarray]:
    """Per structure: reference energy, energy of each calculator, its energy_uncertainty (if any) and
    Σ_i tr U/3 of the total / epistemic force covariance (if any)."""
    cols: Dict[str, List] = {"ref": [], "energy": [], "sigma": [], "vtot": [], "vepi": []}
    for at in frames:
        cols["ref"].append(float(at.info["REF_energy"]))
        es, sig, vt, ve = [], [], [], []
        for calc in calcs:
            a = at.copy()
            a.calc = calc
            es.append(a.get_potential_energy())
            r = calc.results
            sig.append(float(r.get("energy_uncertainty", np.nan)))
            vt.append(float(np.trace(r["forces_covariance"], axis1=-2, axis2=-1).sum() / 3) if "forces_covariance" in r else np.nan)
            ve.append(float(np.trace(r["forces_covariance_epistemic"], axis1=-2, axis2=-1).sum() / 3)
                      if "forces_covariance_epistemic" in r else np.nan)
        cols["energy"].append(es)
        cols["sigma"].append(sig)
        cols["vtot"].append(vt)
        cols["vepi"].append(ve)
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}


def _load_mace(bench: Path):
    import torch

    import e2ip_plugins  # noqa: F401
    from mace_ext import E2IPMACECalculator
    from mace_ext.energy_uq import fit_energy_noise
    from mace_ext.fit_novelty import _loader

    settings = json.loads((bench / "mace" / "settings.json").read_text())
    dtype = settings.get("dtype", "float64")
    torch.set_default_dtype(getattr(torch, dtype))
    runs = bench / "mace" / "runs"
    model = torch.load(runs / "e2ip_s0" / "e2ip_s0.model", map_location="cpu", weights_only=False)
    fit = fit_energy_noise(model, [_loader(str(bench / "data" / "val.xyz"), model, 10)], torch.device("cpu"))
    e2ip = E2IPMACECalculator(models=[model], device="cpu", default_dtype=dtype)
    ens = E2IPMACECalculator(model_paths=[str(runs / f"plain_s{k}" / f"plain_s{k}.model") for k in range(K_MEMBERS)],
                             device="cpu", default_dtype=dtype)
    return [e2ip], [ens], fit


def _load_nequip(bench: Path):
    from nequip.integrations.ase import NequIPCalculator
    from nequip.nn.graph_model import R_MAX_KEY, TYPE_NAMES_KEY

    from e2ip_plugins.energy_uq import fit_energy_length
    from nequip_ext import E2IPNequIPCalculator
    from nequip_ext.novelty import _xyz_batches, energy_columns, energy_head

    runs = bench / "nequip" / "runs"
    kw = dict(device="cpu", chemical_species_to_atom_type_map=True)
    e2ip = E2IPNequIPCalculator.from_saved_model(str(runs / "e2ip_s0" / "best.ckpt"), **kw)
    model = e2ip.model
    inner = [m for m in model.modules() if hasattr(m, "metadata")] or [model]
    meta = getattr(model, "metadata", None) or inner[0].metadata
    type_names = str(meta[TYPE_NAMES_KEY]).split(" ")
    model.eval()
    fit = fit_energy_length(energy_head(model).energy, energy_columns(
        model, _xyz_batches(str(bench / "data" / "val.xyz"), model, float(meta[R_MAX_KEY]), type_names)))
    members = [NequIPCalculator._from_saved_model(str(runs / f"plain_s{k}" / "best.ckpt"), **kw) for k in range(K_MEMBERS)]
    return [e2ip], members, fit


def _rows(res) -> Dict[str, Dict[str, Dict[str, float]]]:
    from e2ip_plugins.energy_noise import energy_uq_metrics, fit_variance_scale
    import torch

    def scale(r, s):
        return fit_variance_scale(torch.as_tensor(r), torch.as_tensor(s * s))

    e2, en = res["e2ip"], res["ensemble"]
    r_e2 = {s: e2[s]["ref"] - e2[s]["energy"][:, 0] for s in SETS}
    sig_e2 = {s: e2[s]["sigma"][:, 0] for s in SETS}
    sig_epi = {s: np.sqrt(e2[s]["vepi"][:, 0]) for s in SETS}
    r_en = {s: en[s]["ref"] - en[s]["energy"].mean(1) for s in SETS}
    sig_en = {s: en[s]["energy"].std(1, ddof=1) for s in SETS}
    c_en, c_epi = scale(r_en["val"], sig_en["val"]), scale(r_e2["val"], sig_epi["val"])
    methods = {
        "e2ip energy_uncertainty (as deployed, U_tot, l fitted on val)": (r_e2, sig_e2),
        "e2ip from U_epi (scale fitted on val)": (r_e2, {s: np.sqrt(c_epi) * v for s, v in sig_epi.items()}),
        "ensemble std (raw)": (r_en, sig_en),
        "ensemble std (recal on val)": (r_en, {s: np.sqrt(c_en) * v for s, v in sig_en.items()}),
    }
    out = {m: {s: {**energy_uq_metrics(r[s], sg[s]), "energy_bias": float(np.mean(r[s])),
                   "energy_residual_std": float(np.std(r[s]))} for s in SETS} for m, (r, sg) in methods.items()}
    return out, {"ensemble_recal_factor_c": c_en, "e2ip_epi_factor_c": c_epi}


def _markdown(backbone, rows, info) -> str:
    cols = [("energy_spearman", "Spearman"), ("energy_auroc", "AUROC top10%"), ("energy_coverage_90", "cov90"),
            ("energy_coverage_50", "cov50"), ("energy_nll", "NLL"), ("energy_mae", "MAE eV"),
            ("energy_bias", "mean r eV"), ("energy_residual_std", "std r eV"),
            ("energy_sharpness", "mean sigma eV")]
    lines = [f"### {backbone}", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    lines.append("| method | set | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for m, per_set in rows.items():
        for s in SETS:
            lines.append(f"| {m} | {s} | " + " | ".join(f"{per_set[s][k]:.3f}" for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=("mace", "nequip"), required=True)
    ap.add_argument("--bench", type=Path, default=Path("/tmp/bn"), help="output folder of benchmarks.run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/reports/energy_uq"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    frames = {s: _frames(args.bench, s) for s in SETS}
    loader = _load_mace if args.backbone == "mace" else _load_nequip
    e2ip_calcs, ens_calcs, fit = loader(args.bench)
    res = {"e2ip": {}, "ensemble": {}}
    for s in SETS:
        res["e2ip"][s] = _eval(e2ip_calcs, frames[s])
        # MACE: one committee calculator (members' energies in energy_comm); NequIP: one calculator per member
        res["ensemble"][s] = _eval_members(ens_calcs, frames[s]) if len(ens_calcs) == 1 else _eval(ens_calcs, frames[s])
    rows, info = _rows(res)
    info = {"stored energy length l (A), fitted on val": round(fit["length"], 5),
            "val structures": int(fit["structures"]),
            **{k: round(v, 4) for k, v in info.items()},
            "structures per set": {s: len(frames[s]) for s in SETS}, "wall_s": round(time.time() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"energy_uq_{args.backbone}.json").write_text(json.dumps({"info": info, "metrics": rows}, indent=1))
    md = _markdown(args.backbone, rows, info)
    (args.out / f"energy_uq_{args.backbone}.md").write_text(md)
    print(md)


def _eval_members(calcs, frames) -> Dict[str, np.ndarray]:
    """A MACE committee calculator: the members' energies (``energy_comm``) per structure."""
    ref, energies = [], []
    for at in frames:
        a = at.copy()
        a.calc = calcs[0]
        a.get_potential_energy()
        ref.append(float(at.info["REF_energy"]))
        energies.append(np.asarray(calcs[0].results["energy_comm"], dtype=np.float64))
    return {"ref": np.asarray(ref), "energy": np.asarray(energies)}


if __name__ == "__main__":
    main()
