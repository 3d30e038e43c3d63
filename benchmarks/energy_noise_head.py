"""Energy-noise head (issue 15): accuracy cost of training with the coherent likelihood, and its energy UQ.

    .venv-nequip/bin/python -m benchmarks.energy_noise_head --backbone nequip --bench /tmp/bn --work /tmp/enh
    .venv-mace/bin/python -m benchmarks.energy_noise_head --backbone mace --bench /tmp/bn --work /tmp/enh

``--bench``: output folder of ``python -m benchmarks.run`` (its ``data/`` splits and ``<backbone>/settings.json``,
the quick profile). For every seed, two e²IP models are trained with the framework's own entry point
(``nequip-train`` / ``mace_run_train_e2ip``) at identical settings, data and seed:

- ``base``: the shipped e²IP configuration (``energy_uncertainty`` = the §4 approximation);
- ``head``: the same plus the energy-noise head and its coherent loss term with weight ``--weight`` W
  (default 0.001, the shipped one; NequIP ``uq_head.energy_noise.enabled=true`` and
  ``loss.coeffs.energy_noise=W``; MACE ``--e2ip_energy_noise --e2ip_energy_noise_weight W``), with detached
  head features (the default; ``--no_detach``: trained through the backbone, run names ``nd_head_*``).

``--energy_weight X`` sets both variants' energy loss weight (NequIP ``coeffs.total_energy``, MACE
``--energy_weight``; run names ``ewX_*``) and ``--epochs E`` their epochs (``epE_*``): a profile whose
energies are fitted better than the quick profile's. Column ``offset_share``: the share of Σr² carried
by per-molecule mean residuals (1: every structure of a molecule is off by one constant).

Both store their energy factor fitted on ``val`` at the end of training (as deployed). Every structure of
val, test (ID), ood_mol and ood_hot is evaluated through the ASE calculator: force MAE (components),
energy MAE, and the energy metrics of ``energy_uq_metrics`` for ``energy_uncertainty`` as deployed.
Also reported (not deployed): the 90 % / 50 % coverage if the stored ML factor were replaced by a quantile
factor q = q₀.₉(|r|/σ on val)/1.645 (columns ``q_cov90``, ``q_cov50``), to show why it is not used.
A trained run is reused (``done.json``); nothing is fitted on test or OOD data.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .common.backends import make_backend
from .common.runtime import run_logged

SETS = ("val", "test", "ood_mol", "ood_hot")
VARIANTS = ("base", "head")


def head_settings(backbone: str, weight: float, variant: str = "head", energy_weight: float = 0.0,
                  detach: bool = True) -> dict:
    """Extra options of one variant; ``energy_weight`` > 0 sets the energy loss weight of both variants;
    ``detach=False`` trains the head through the backbone (``detach_features: false``)."""
    if backbone == "nequip":
        extra = [f"training_module.loss.coeffs.total_energy={energy_weight}"] if energy_weight else []
        if variant == "head":
            extra += ["++training_module.model.uq_head.energy_noise.enabled=true",
                      f"++training_module.model.uq_head.energy_noise.detach_features={str(detach).lower()}",
                      f"++training_module.loss.coeffs.energy_noise={weight}"]
        return {"head_overrides": extra}
    extra = ["--energy_weight", str(energy_weight)] if energy_weight else []
    if variant == "head":
        extra += ["--e2ip_energy_noise", "--e2ip_energy_noise_weight", str(weight),
                  "--e2ip_energy_noise_detach", str(detach)]
    return {"head_flags": extra}


def _train(backbone: str, settings: dict, variant: str, seed: int, bench: Path, work: Path, weight: float,
           energy_weight: float = 0.0, detach: bool = True) -> Path:
    s = dict(settings, **head_settings(backbone, weight, variant, energy_weight, detach))
    backend = make_backend(backbone, s)
    name = f"{variant}_w{weight:g}_s{seed}" if variant == "head" else f"{variant}_s{seed}"
    if energy_weight:
        name = f"ew{energy_weight:g}_{name}"
    if variant == "head" and not detach:
        name = f"nd_{name}"
    if settings.get("epochs_override"):
        name = f"ep{settings['epochs']}_{name}"
    run_dir = work / backbone / name
    done = run_dir / "done.json"
    if done.is_file():
        return Path(json.loads(done.read_text())["artifact"])
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {k: str(bench / "data" / f"{k}.xyz") for k in ("train", "val", "test")}
    data = {"energy_key": "REF_energy", "forces_key": "REF_forces", "elements": ["C", "H", "O"]}
    cmd = backend.train_cmd("e2ip", run_dir, name, seed, files, settings["epochs"], data)
    res = run_logged(cmd, run_dir / "train.out", dict(os.environ))
    if res["rc"] != 0:
        raise RuntimeError(f"training failed ({res['rc']}): see {run_dir / 'train.out'}")
    art = backend.artifact(run_dir, name)
    done.write_text(json.dumps({"artifact": str(art), "wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
                                "command": " ".join(map(str, cmd))}, indent=1))
    return art


def _calculator(backbone: str, settings: dict, artifact: Path):
    if backbone == "mace":
        import e2ip_plugins  # noqa: F401
        from mace_ext import E2IPMACECalculator

        return E2IPMACECalculator(model_paths=str(artifact), device="cpu", default_dtype=settings["dtype"])
    from nequip_ext import E2IPNequIPCalculator

    return E2IPNequIPCalculator.from_saved_model(str(artifact), device="cpu", chemical_species_to_atom_type_map=True)


def _evaluate(calc, frames) -> Dict[str, float]:
    from e2ip_plugins.energy_noise import energy_uq_metrics

    r_e, sig, df, e_pred, f_pred = [], [], [], [], []
    for at in frames:
        a = at.copy()
        a.calc = calc
        e = a.get_potential_energy()
        r_e.append(float(at.info["REF_energy"]) - e)
        sig.append(float(calc.results["energy_uncertainty"]))
        df.append(np.abs(np.asarray(calc.results["forces"]) - at.arrays["REF_forces"]).reshape(-1))
        e_pred.append(float(e))
        f_pred.append(np.asarray(calc.results["forces"], dtype=np.float64))
    out = energy_uq_metrics(np.asarray(r_e), np.asarray(sig))
    out["_pred"] = (e_pred, f_pred)  # for the committee rows; dropped before the JSON
    out["offset_share"] = _offset_share(np.asarray(r_e), frames)
    out["forces_mae"] = float(np.concatenate(df).mean())
    out["abs_r_over_sigma"] = (np.abs(r_e) / np.asarray(sig)).tolist()
    return out


def _committee(members: List[Dict], frames: Dict) -> Dict[str, Dict[str, float]]:
    """K members' (energies, forces) per set → mean prediction and σ = c·std_k(E) (1/(K−1)), c fitted by ML
    on val only (c² = mean over val of r²/std²): the recalibrated committee of §9, same metrics."""
    import torch

    from e2ip_plugins.energy_noise import committee_energy, energy_uq_metrics, fit_variance_scale

    stats = {}
    for s in SETS:
        mean, var, _, _ = committee_energy(torch.tensor([m[s]["_pred"][0] for m in members], dtype=torch.float64))
        f = np.asarray([np.stack(m[s]["_pred"][1]) for m in members])  # (K, S, N, 3)
        ref_e = np.asarray([float(at.info["REF_energy"]) for at in frames[s]])
        ref_f = np.stack([at.arrays["REF_forces"] for at in frames[s]])
        stats[s] = (ref_e - mean.numpy(), np.sqrt(var.numpy()), float(np.abs(f.mean(0) - ref_f).mean()))
    r, sd, _ = stats["val"]
    c = float(np.sqrt(fit_variance_scale(torch.from_numpy(r), torch.from_numpy(sd ** 2))))
    out = {}
    for s, (r, sd, fmae) in stats.items():
        out[s] = energy_uq_metrics(r, c * sd)
        out[s].update(forces_mae=fmae, offset_share=_offset_share(r, frames[s]),
                      recal_factor=c)
        out[s]["q_cov90"], out[s]["q_cov50"] = float("nan"), float("nan")  # not computed for the committee
    return out


def _offset_share(residual: np.ndarray, frames) -> float:
    """Share of Σ r² carried by the per-molecule (``info['smiles']``) mean residuals: Σ_m n_m r̄_m² / Σ r²
    (1: every structure of a molecule is off by one constant, so no per-structure σ can make |r|/σ half-normal)."""
    mol = np.asarray([at.info.get("smiles", "") for at in frames])
    between = sum(float((mol == m).sum()) * float(residual[mol == m].mean()) ** 2 for m in np.unique(mol))
    return between / float((residual ** 2).sum())


def _quantile_factor_coverage(per_set: Dict) -> None:
    """Adds ``q_cov90``/``q_cov50`` per set: coverage with σ·q, q = q₀.₉(|r|/σ on val)/z₀.₉₅ (val only)."""
    from scipy import stats

    z90, z50 = stats.norm.ppf(0.95), stats.norm.ppf(0.75)
    q = float(np.quantile(per_set["val"]["abs_r_over_sigma"], 0.9)) / z90
    for s in SETS:
        a = np.asarray(per_set[s].pop("abs_r_over_sigma")) / q
        per_set[s]["q_cov90"], per_set[s]["q_cov50"] = float(np.mean(a <= z90)), float(np.mean(a <= z50))


def _markdown(backbone: str, res: Dict, seeds: List[int], committee: Optional[Dict] = None, committee_k: int = 0) -> str:
    cols = [("forces_mae", "force MAE eV/Å"), ("energy_mae", "energy MAE eV"), ("energy_spearman", "Spearman σ_E"),
            ("energy_auroc", "AUROC"), ("energy_coverage_90", "cov90"), ("energy_nll", "energy NLL"),
            ("energy_sharpness", "mean σ_E eV"), ("energy_coverage_50", "cov50"),
            ("q_cov90", "cov90 (val-quantile factor)"), ("q_cov50", "cov50 (val-quantile factor)"),
            ("offset_share", "per-molecule offset share of Σr²")]
    lines = [f"### {backbone} (seeds {seeds}; mean over seeds)", "",
             "| variant | set | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for v in VARIANTS:
        for s in SETS:
            lines.append(f"| {v} | {s} | " + " | ".join(
                f"{np.mean([res[v][seed][s][k] for seed in seeds]):.4f}" for k, _ in cols) + " |")
    if committee:
        for s in SETS:
            lines.append(f"| committee of {committee_k} base models (σ recal. on val) | {s} | " + " | ".join(
                f"{committee[s][k]:.4f}" for k, _ in cols) + " |")
    lines += ["", "| set | force MAE head/base | energy MAE head/base |", "|---|---|---|"]
    for s in SETS:
        ratio = [np.mean([res['head'][seed][s][k] for seed in seeds]) / np.mean([res['base'][seed][s][k] for seed in seeds])
                 for k in ("forces_mae", "energy_mae")]
        lines.append(f"| {s} | {ratio[0]:.3f} | {ratio[1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=("mace", "nequip"), required=True)
    ap.add_argument("--bench", type=Path, default=Path("/tmp/bn"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/enh"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--weight", type=float, default=0.001, help="weight of the coherent loss term (default: the shipped one)")
    ap.add_argument("--energy_weight", type=float, default=0.0,
                    help="energy loss weight of both variants (NequIP coeffs.total_energy, MACE --energy_weight); "
                         "0 keeps the shipped config's")
    ap.add_argument("--no_detach", action="store_true",
                    help="train the head through the backbone (detach_features false; the first version)")
    ap.add_argument("--epochs", type=int, default=0, help="training epochs of both variants (0: the profile's)")
    ap.add_argument("--ensemble_seeds", type=int, nargs="*", default=[],
                    help="extra base seeds: the base models of --seeds and these form a committee whose energy "
                         "std (recalibrated on val) is reported next to the head")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/reports/energy_uq"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ase.io

    settings = json.loads((args.bench / args.backbone / "settings.json").read_text())
    if args.epochs:
        settings.update(epochs=args.epochs, epochs_override=True)
    frames = {s: ase.io.read(args.bench / "data" / f"{s}.xyz", ":") for s in SETS}
    res: Dict = {v: {} for v in VARIANTS}
    cost: Dict = {v: {} for v in VARIANTS}
    for seed in args.seeds:
        for v in VARIANTS:
            art = _train(args.backbone, settings, v, seed, args.bench, args.work, args.weight, args.energy_weight,
                         not args.no_detach)
            cost[v][seed] = json.loads((art.parent / "done.json").read_text())
            calc = _calculator(args.backbone, settings, art)
            res[v][seed] = {s: _evaluate(calc, frames[s]) for s in SETS}
            _quantile_factor_coverage(res[v][seed])
    committee, members = None, [res["base"][seed] for seed in args.seeds]
    for seed in args.ensemble_seeds:
        art = _train(args.backbone, settings, "base", seed, args.bench, args.work, args.weight, args.energy_weight)
        members.append({s: _evaluate(_calculator(args.backbone, settings, art), frames[s]) for s in SETS})
    if args.ensemble_seeds:
        committee = _committee(members, frames)
    for m in members + [res["head"][seed] for seed in args.seeds]:
        for s in SETS:
            m[s].pop("_pred", None)
    md = (f"Energy-noise loss weight: {args.weight:g}; energy loss weight: {args.energy_weight or 'the config default'}; "
          f"head features {'attached (trained through the backbone)' if args.no_detach else 'detached'}\n\n") + _markdown(
        args.backbone, res, args.seeds, committee, len(members))
    md += "\nTraining CPU s (head/base): " + ", ".join(
        f"s{seed}: {cost['head'][seed]['cpu_s']:.0f}/{cost['base'][seed]['cpu_s']:.0f}" for seed in args.seeds) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.backbone}_w{args.weight:g}" + (f"_ew{args.energy_weight:g}" if args.energy_weight else "") \
        + (f"_ep{args.epochs}" if args.epochs else "") + ("_nodetach" if args.no_detach else "")
    (args.out / f"energy_noise_head_{tag}.json").write_text(json.dumps({"metrics": res, "cost": cost, "committee": committee,
                                                                                 "settings": settings, "weight": args.weight},
                                                                      indent=1))
    (args.out / f"energy_noise_head_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
