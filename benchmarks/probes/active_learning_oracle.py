"""Would any score beat random selection in the active-learning benchmark? A one-step oracle test (issue 14).

    .venv-mace/bin/python -m benchmarks.probes.active_learning_oracle --bench al_bench --seeds 0 1

Takes iteration 0 of the finished e²IP loops of ``benchmarks.active_learning`` (``<bench>/e2ip_s<seed>``):
the model trained on the initial frames and the frames its MD explored. Every explored frame is labelled
(GFN2-xTB, as the loop would), so the true error of that model on each frame is known. Then the same
budget (``--budget``, the benchmark's 50) is taken from the same pool by

- ``e2ip max u``: the loop's own score, the frame's max u (highest first, within the loop's band);
- ``oracle max error``: the frames of largest max_i ‖ΔF_i‖ — what a perfect per-structure max-u ranking
  would pick, the best any uncertainty selector of this kind can do;
- ``oracle mean error``: the frames of largest RMS force error over the structure;
- ``random``: uniform draws (``--random-draws`` seeds);
- with ``--extra``: ``oracle least error``, the frames the model already gets most right, and a uniform draw
  within a DP-GEN-width band trust_lo ≤ max u < 3·trust_lo (``--narrow-hi``; DP-GEN's usual 0.05 / 0.15 eV/Å);

and one model per choice is trained on initial + chosen frames with the loop's own training command and
seed, then evaluated on the loop's held-out sets. If the oracles do not beat random either, the shortfall
of the uncertainty selectors is not a ranking failure of their uncertainty: labelling the frames the
model gets most wrong is not what lowers the held-out error here. Also printed: the frame-level Spearman
of max u against max error over the pool (how well the loop's score ranks the frames it chooses from).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _pool_with_errors(loop, idir: Path, label_dir: Path):
    """The explored frames that the loop's labeller labels (with the loop's own :func:`label_frames`, cached in
    ``label_dir``), their labels, and the iteration-0 model's max and RMS force error on each."""
    from e2ip_plugins.active_learning.label import failures, label_frames
    from e2ip_plugins.active_learning.steps import read_json

    pool = loop._pool(read_json(idir / "explore.done.json")["runs"])
    labelled = label_frames(pool, label_dir, loop.make_labeller, loop.cfg["data"]["energy_key"],
                            loop.cfg["data"]["forces_key"], [{} for _ in pool], log=lambda _: None)
    failed = {f["index"] for f in failures(label_dir)}
    pool = [a for i, a in enumerate(pool) if i not in failed]
    calc = loop.trainer.open(read_json(idir / "train.done.json")["models"][0], device="cpu")
    max_err, rms_err = [], []
    for atoms, lab in zip(pool, labelled):
        b = atoms.copy()
        b.calc = calc
        d = np.linalg.norm(b.get_forces() - lab.arrays[loop.cfg["data"]["forces_key"]], axis=1)
        max_err.append(float(d.max()))
        rms_err.append(float(np.sqrt(np.mean(d ** 2) / 3)))
    return pool, labelled, np.array(max_err), np.array(rms_err)


_OPEN = threading.Lock()  # trainings run in parallel subprocesses; opening a MACE model (torch.fx) is not thread-safe


def _train_and_eval(loop, frames, run_dir: Path, seed: int):
    from e2ip_plugins.active_learning.label import atomic_write_frames
    from e2ip_plugins.active_learning.steps import force_errors
    from e2ip_plugins.active_learning.trainers import run_logged

    cfg = loop.cfg
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    train_file = run_dir / "train.extxyz"
    atomic_write_frames(train_file, frames)
    member = run_dir / "member"
    member.mkdir(exist_ok=True)
    cmd = loop.trainer.command(cfg["train"]["config"], train_file, cfg["data"]["valid"], member, seed,
                               cfg["train"]["args"], None, False)
    cpu = run_logged(cmd, member / "train.log")
    with _OPEN:
        calc = loop.trainer.open(str(loop.trainer.model_file(member)), device="cpu")
        res = {name: force_errors([calc], fr, cfg["data"]["energy_key"], cfg["data"]["forces_key"])["model"]["forces_mae"]
               for name, fr in loop.held_out.items()}
    res["cpu_s"] = cpu
    done.write_text(json.dumps(res))
    return res


def run_seed(bench: Path, seed: int, args) -> dict:
    from scipy.stats import spearmanr

    from e2ip_plugins.active_learning import load_config
    from e2ip_plugins.active_learning.loop import ActiveLearningLoop
    from e2ip_plugins.active_learning.select import frame_scores
    from e2ip_plugins.active_learning.steps import read_json

    cfg = load_config(bench / "al_configs" / f"e2ip_s{seed}.yaml")
    work = bench / f"e2ip_s{seed}"
    loop = ActiveLearningLoop(cfg, work, log=lambda _: None)
    idir = work / "iter_0"
    out_dir = Path(args.out) / f"s{seed}"
    pool, labelled, max_err, rms_err = _pool_with_errors(loop, idir, out_dir / "labels")
    u = frame_scores(pool)
    bands = read_json(idir / "bands.done.json")
    band = np.flatnonzero((u >= bands["trust_lo"]) & (u < bands["trust_hi"]))
    b = args.budget
    choices = {"e2ip max u": band[np.argsort(-u[band], kind="stable")][:b],
               "oracle max error": np.argsort(-max_err, kind="stable")[:b],
               "oracle mean error": np.argsort(-rms_err, kind="stable")[:b]}
    if args.extra:
        # the frames the model already gets right, and DP-GEN's uniform draw in a narrower band
        choices["oracle least error"] = np.argsort(max_err, kind="stable")[:b]
        narrow = np.flatnonzero((u >= bands["trust_lo"]) & (u < args.narrow_hi * bands["trust_lo"]))
        for r in range(args.random_draws):
            perm = np.random.default_rng(2000 * seed + r).permutation(len(narrow))
            choices[f"band {args.narrow_hi:g}x random {r}"] = narrow[perm][:b]
    for r in range(args.random_draws):
        choices[f"random {r}"] = np.random.default_rng(1000 * seed + r).permutation(len(pool))[:b]
    initial = loop._labelled_frames(-1)
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        futs = {name: ex.submit(_train_and_eval, loop, initial + [labelled[i] for i in idx],
                                out_dir / name.replace(" ", "_"), cfg["seed"]) for name, idx in choices.items()}
        results = {name: f.result() for name, f in futs.items()}
    for name, idx in choices.items():
        results[name]["mean_max_error"] = float(max_err[idx].mean())
        results[name]["overlap_with_oracle_max"] = len(set(idx.tolist()) & set(choices["oracle max error"].tolist())) / b
    return {"pool": len(pool), "band": len(band),
            "spearman_max_u_vs_max_error": float(spearmanr(u, max_err)[0]),
            "spearman_max_u_vs_max_error_band": float(spearmanr(u[band], max_err[band])[0]) if len(band) > 2 else None,
            "results": results}


def report(per_seed: dict, args) -> str:
    sets = ("test", "ood_mol", "ood_hot")
    names = list(next(iter(per_seed.values()))["results"])
    rand = [n for n in names if n.startswith("random")]
    lines = ["# One-step selection test with oracles (issue 14)", "",
             f"Iteration 0 of the e²IP loops in `{args.bench}` (seeds {args.seeds}): the model trained on the initial "
             f"frames, its explored pool labelled in full with GFN2-xTB; {args.budget} frames chosen per rule, one model "
             "trained per choice (the loop's command and seed), force MAE (eV/Å) on the loop's held-out sets. "
             f"Random: mean over {len(rand)} draws per seed.", "",
             "| seed | pool | frame Spearman max u vs max error (pool / band) |", "|---|---|---|"]
    for s, d in per_seed.items():
        sb = d["spearman_max_u_vs_max_error_band"]
        lines.append(f"| {s} | {d['pool']} | {d['spearman_max_u_vs_max_error']:.3f} / "
                     f"{'—' if sb is None else f'{sb:.3f}'} |")
    lines += ["", "| rule | " + " | ".join(f"{x} MAE" for x in sets) + " | / random (test, ood_mol, ood_hot) | "
              "mean max error of the chosen frames | overlap with oracle max |", "|---|" + "---|" * (len(sets) + 3)]

    def mean_of(rule_names, field):
        return float(np.mean([per_seed[s]["results"][n][field] for s in per_seed for n in rule_names]))

    rmae = {x: mean_of(rand, x) for x in sets}
    band = [n for n in names if n.startswith("band ")]
    rows = [(n, [n]) for n in names if not n.startswith(("random", "band "))] + [("random", rand)]
    if band:
        rows.append((band[0].rsplit(" ", 1)[0] + " (trust_lo ≤ max u < that × trust_lo)", band))
    for label, group in rows:
        mae = {x: mean_of(group, x) for x in sets}
        lines.append(f"| {label} | " + " | ".join(f"{mae[x]:.4f}" for x in sets) + " | " +
                     ", ".join(f"{mae[x] / rmae[x]:.3f}" for x in sets) +
                     f" | {mean_of(group, 'mean_max_error'):.3f} | {mean_of(group, 'overlap_with_oracle_max'):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="output directory of benchmarks.active_learning (e2ip loops finished)")
    p.add_argument("--out", default=None, help="default: <bench>/oracle")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budget", type=int, default=50)
    p.add_argument("--random-draws", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--extra", action="store_true", help="also the least-error frames and a uniform draw in "
                   "[trust_lo, --narrow-hi x trust_lo)")
    p.add_argument("--narrow-hi", type=float, default=3.0, help="DP-GEN's usual trust_hi / trust_lo (0.05 / 0.15)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    bench = Path(args.bench).resolve()
    args.out = str(Path(args.out or bench / "oracle").resolve())
    per_seed = {s: run_seed(bench, s, args) for s in args.seeds}
    text = report(per_seed, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "oracle.md").write_text(text)
    (Path(args.out) / "oracle.json").write_text(json.dumps({"args": vars(args), "per_seed": per_seed}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
