"""The latent-density evidence of issue 26's comparison: the shipped level with its per-species Gaussian replaced by a
per-species Gaussian mixture (:mod:`e2ip_plugins.latent_density`, K by BIC), on the e²IP runs of
:mod:`benchmarks.committee` (docs/committee.md, "The latent-density comparison", stated before it was run).

    .venv-mace/bin/python   -m benchmarks.latent_density --backbone mace   --out bc8 --seed0 10
    .venv-nequip/bin/python -m benchmarks.latent_density --backbone nequip --out bc8 --seed0 10

Per seed, on the calculator's own model: the training atoms' invariant features (a forward pre-hook on the novelty
module while the calculator runs over the training frames) → the mixture; its score replaces the Gaussian's; the
stack's own fit (MACE ``fit_novelty``, NequIP ``fit_model_novelty``) then refits s_ref, [c, β] and the energy length
on val, as training does; every set is read through the calculator. ``K1`` is the same route with K ≡ 1 (the
shipped score refitted: it must reproduce the shipped rows). Writes ``latent_<backbone>.json``: per seed the chosen
K, the BIC table and the metrics; the frame figures with block-bootstrap intervals; the default rule of
:func:`benchmarks.committee.rule` for L against the shipped level (val rows only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .common import SHARED_DATA

METHODS = {"L": (1, 2, 4, 8), "K1": (1,)}


def _novelty(model):
    from e2ip_plugins.novelty import NoveltyEvidence

    found = [m for m in model.modules() if isinstance(m, NoveltyEvidence)]
    if len(found) != 1:
        raise RuntimeError(f"expected one novelty module in the model, found {len(found)}")
    return found[0]


def _refit(backbone: str, model, files: Dict[str, str]) -> None:
    """The stack's own validation fit of the level, on ``model`` in place (module docstring)."""
    if backbone.startswith("mace"):
        import torch
        from mace_ext.fit_novelty import _loader, fit_novelty

        fit_novelty(model, _loader(files["train"], model, 10), [_loader(files["val"], model, 10)],
                    device=torch.device("cpu"))
    else:
        from nequip.nn.graph_model import R_MAX_KEY, TYPE_NAMES_KEY
        from nequip_ext.novelty import _xyz_batches, fit_model_novelty

        r_max, names = float(model.metadata[R_MAX_KEY]), str(model.metadata[TYPE_NAMES_KEY]).split(" ")
        fit_model_novelty(model, _xyz_batches(files["train"], model, r_max, names),
                          _xyz_batches(files["val"], model, r_max, names))


def run(args) -> Path:
    import ase.io
    import torch

    from e2ip_plugins.latent_density import SpeciesMixture
    from e2ip_plugins.metrics import atom_columns, frame_maxima

    from .attach import _manifest, _scores
    from .committee import bootstrap, rule, trajectories
    from .common.backends import make_backend
    from .common.evaluation import frame_index, predict_sets, read_sets
    from .common.profiles import get_profile

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    prof = get_profile("quick")
    backend_name = "mace" if args.backbone.startswith("mace") else "nequip"
    backend = make_backend(backend_name, dict(prof["backbones"][backend_name]))
    manifest = _manifest(argparse.Namespace(data_dir=args.data_dir), prof, out)
    sets = read_sets(manifest)
    frames = frame_index(sets)
    traj = {s: trajectories(Path(manifest["files"][s])) for s in sets}
    fk = manifest["data_keys"]["forces_key"]
    train = ase.io.read(manifest["files"]["train"], ":")
    s0 = prof["seed"] + args.seed0
    res: Dict[str, Any] = {"methods": {m: {} for m in METHODS}, "frames": {m: {} for m in METHODS}}
    for seed in range(s0, s0 + args.seeds):
        info = json.loads((out / args.backbone / "runs" / f"e2ip_s{seed}" / "done.json").read_text())
        for method, ks in METHODS.items():
            handle = backend.load("e2ip", [info["artifact"]], "cpu")
            calc = handle.calcs[0]
            model = calc.models[0] if backend_name == "mace" else calc.model
            nov = _novelty(model)
            seen: List[tuple] = []  # (features, species) of every training structure
            hook = nov.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach(), a[1].detach())))
            for at in train:
                backend.calculate(handle, at)
            hook.remove()
            feats, species = (torch.cat(t) for t in zip(*seen))
            mix = SpeciesMixture(nov.num_species, ks=ks, seed=seed).fit(feats, species)
            nov.score = mix.score  # the instance attribute shadows the Gaussian's method
            _refit(args.backbone, model, manifest["files"])
            preds = predict_sets(backend, handle, sets, fk)
            entry = {"deployed": _scores(preds, manifest, frames, "raw"), "K": mix.chosen,
                     "bic": mix.bic, "calib": nov.novelty_calib.tolist(), "ref": nov.novelty_ref.tolist()}
            for s, (y, m, _) in preds.items():
                entry["deployed"][s]["forces_mae"] = float((y - m).abs().mean())
                cols = atom_columns(preds[s][2], y)
                umax, emax = frame_maxima(frames[s].numpy(), cols["u"].detach().numpy(), cols["e"].detach().numpy())
                res["frames"][method].setdefault(s, []).append(bootstrap(umax, emax, traj[s]))
            res["methods"][method][f"seed{seed}"] = entry
            print(f"seed {seed} {method}: K {mix.chosen}, [c, beta] {entry['calib']}", flush=True)
    shipped = json.loads((out / f"results_committee_{args.backbone}.json").read_text())
    res["methods"]["e2ip"] = shipped["methods"]["e2ip"]
    res["rule_L"] = rule({"methods": {"e2ip": shipped["methods"]["e2ip"], "L": res["methods"]["L"]}}, "L")
    res["frames"] = {m: {s: {k: np.mean([r[k] for r in rs], axis=0).tolist() for k in rs[0]} for s, rs in by.items()}
                     for m, by in res["frames"].items()}
    path = out / f"latent_{args.backbone}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    return path


def summary(path: Path) -> str:
    """Markdown: means over seeds per set for L, K1 and the shipped rows, then the rule."""
    res = json.loads(Path(path).read_text())
    keys = ("forces_coverage_90", "rmv_rmse", "forces_ence", "u_tail", "forces_spearman")
    lines = ["| level | set | cov90 | RMV/RMSE | ENCE | u-tail | atom ρ | frame ρ [95 %] | frame AUROC [95 %] |",
             "|---" * 9 + "|"]
    for m in ("e2ip", "K1", "L"):
        runs = list(res["methods"][m].values())
        for s in runs[0]["deployed"]:
            vals = [np.mean([r["deployed"][s][k] for r in runs]) for k in keys]
            fr = res["frames"].get(m, {}).get(s)
            extra = ["—", "—"] if fr is None else [
                f"{fr[k]:.2f} [{fr[k + '_ci'][0]:.2f}, {fr[k + '_ci'][1]:.2f}]" for k in ("frame_spearman", "frame_auroc")]
            lines.append(f"| {m} | {s} | " + " | ".join(f"{v:.3f}" for v in vals) + " | " + " | ".join(extra) + " |")
    ks = {seed: r["K"] for seed, r in res["methods"]["L"].items()}
    return "\n".join(lines + ["", f"Components chosen by BIC (per species index): {ks}", "", "Rule, L:"]
                     + res["rule_L"])


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("mace", "nequip", "mace_ew10"))
    p.add_argument("--out", default="bench_committee")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--report", action="store_true", help="print the summary of latent_<backbone>.json")
    args = p.parse_args(argv)
    path = run(args) if not args.report else Path(args.out).resolve() / f"latent_{args.backbone}.json"
    print(summary(path))


if __name__ == "__main__":
    main()
