"""Probe (issue 26): does a force committee on a trained NequIP e²IP model's features follow the error out of
distribution, where the shipped level does not?

``--from-model`` evaluates instead a model trained with the in-model committee (``uq_head.committee``, the
committee trained jointly with the backbone), through the same steps 1, 3 and 4.

Members fit the reference forces (``--target forces``: direct force heads, the issue's design) or the frozen
model's residual y − γ (``--target residual``: a committee of error models around γ).

1. Loads a trained e²IP NequIP checkpoint eagerly (NequIP's ``load_saved_model``) and runs it over the
   train, val and every ``--set`` file with the checkpoint's own data pipeline, keeping per atom the node
   features the e²IP head reads (input of the last convnet, via a forward pre-hook on ``uq_head``), the
   conservative forces γ, the deployed predictive (stored calibration applied) and the reference forces.
2. Trains :class:`e2ip_plugins.force_committee.ForceCommittee` (M direct force heads) on the **frozen**
   train features with :func:`e2ip_plugins.force_committee.committee_loss` (full batch, Adam).
3. Fits one scale c on **val only**: the NLL of N(γ, U_ale + c·C), U_ale the head's aleatoric covariance
   and C the committee's sample covariance (and, for "committee alone", N(γ, c·C)).
4. Prints, per set, the DESIGN §4 metrics of the model as deployed (the shipped level), committee + head
   U_ale, and committee alone; ``--out`` writes them as JSON.

The backbone is frozen here (no joint training), so this measures the cheapest committee: a negative
result says the committee must shape the features (joint training) or read several depths; a positive
one says a frozen model can get it too (issue 27). One seed per run.

    .venv-nequip/bin/python -m benchmarks.probes.committee_frozen --model demo_out/run/best.ckpt \\
        --train e2ip_plugins/data/iso7_train.xyz --val e2ip_plugins/data/iso7_val.xyz \\
        --set test=e2ip_plugins/data/iso7_test.xyz --set ood_chem=../shared/data/iso7_dev_ood_chem.xyz \\
        --set ood_1500K=../shared/data/iso7_dev_ood_1500K.xyz --out committee_frozen.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from scipy.optimize import minimize_scalar

from benchmarks.common.evaluation import isotropic_covariance
from e2ip_plugins.force_committee import ForceCommittee, committee_covariance, committee_loss
from e2ip_plugins.metrics import UQMetricState
from e2ip_plugins.predictive import GaussianPredictive
from nequip_ext._keys import E2IP_COMMITTEE_FORCES_KEY as COMMITTEE_KEY

COLUMNS = ("forces_rmse", "forces_nll", "forces_coverage_90", "rmv_rmse", "forces_ence", "u_tail", "forces_sharpness",
           "forces_spearman", "forces_auroc", "frame_spearman", "frame_auroc")


def collect(model, loader) -> Dict[str, torch.Tensor]:
    """Per atom over one dataloader: features, γ, reference forces, frame index, deployed U_ale / predictive."""
    from nequip.data import AtomicDataDict

    from nequip_ext.train import predictive

    head = next(m for n, m in model.named_modules() if n.endswith("uq_head"))
    grabbed: List[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda mod, args: grabbed.append(args[0][mod.field].detach().clone()))
    feats, gamma, ys, frames, preds, members = [], [], [], [], [], []
    offset = 0
    try:
        for batch in loader:
            ys.append(batch[AtomicDataDict.FORCE_KEY].detach().to(torch.float64))
            frames.append(batch[AtomicDataDict.BATCH_KEY].detach() + offset)
            offset += int(batch[AtomicDataDict.NUM_NODES_KEY].shape[0])
            with torch.enable_grad():
                out = model(batch)
            out = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
            preds.append(predictive(out, dtype=torch.float64))
            gamma.append(out[AtomicDataDict.FORCE_KEY].to(torch.float64))
            feats.append(grabbed.pop().to(torch.float64))
            if COMMITTEE_KEY in out:  # a model trained with the in-model committee (uq_head.committee)
                members.append(out[COMMITTEE_KEY].to(torch.float64).reshape(len(ys[-1]), -1, 3))
    finally:
        hook.remove()
    return {"x": torch.cat(feats), "gamma": torch.cat(gamma), "y": torch.cat(ys), "frame": torch.cat(frames),
            "pred": type(preds[0]).cat(preds), "irreps": head.irreps_in[head.field],
            "members": torch.cat(members) if members else None}


def target(data: Dict, kind: str) -> torch.Tensor:
    """What the members fit: the reference forces, or the frozen model's residual y − γ."""
    return data["y"] if kind == "forces" else data["y"] - data["gamma"]


def train_committee(train: Dict, args) -> ForceCommittee:
    torch.manual_seed(args.seed)
    y = target(train, args.target)
    rms = float(y.pow(2).mean().sqrt())
    com = ForceCommittee(train["irreps"], num_members=args.members, num_channels=args.channels,
                         mlp_hidden=args.hidden, force_rms=rms, seed=args.seed).to(torch.float64)
    opt = torch.optim.Adam(com.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps, eta_min=args.lr / 20)
    for step in range(args.steps):
        opt.zero_grad()
        loss = committee_loss(com(train["x"]), y, rms, nll_weight=args.nll_weight).mean()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  step {step:5d}  loss {float(loss):.4f}", flush=True)
    return com


def members_of(com: Optional[ForceCommittee], data: Dict) -> torch.Tensor:
    """(N, M, 3) member forces: the probe's committee on the frozen features, or the model's own committee."""
    if com is None:
        return data["members"]
    with torch.no_grad():
        return com(data["x"])


def committee_predictive(data: Dict, c: float, with_head: bool) -> GaussianPredictive:
    """N(γ, U_ale + c·C) (``with_head``) or N(γ, c·C); C = ``data["C"]``, the committee covariance."""
    cov = data["C"]
    ale = data["pred"].covariance_aleatoric if with_head else 1e-8 * torch.eye(3, dtype=cov.dtype).expand_as(cov)
    return GaussianPredictive(data["gamma"], cov_epistemic=c * cov, cov_aleatoric=ale)


def fit_scale(val: Dict, with_head: bool) -> float:
    """c minimising the val NLL of N(γ, U_ale + c·C) (bounded search over log c)."""
    def nll(logc: float) -> float:
        return float(committee_predictive(val, math.exp(logc), with_head).nll(val["y"]).mean())

    return math.exp(minimize_scalar(nll, bounds=(-12.0, 12.0), method="bounded", options={"xatol": 1e-6}).x)


def spread_growth(data: Dict, names) -> Dict[str, Tuple[float, float]]:
    """Per set, (RMS spread / test's, γ's RMSE / test's); RMS spread = sqrt(mean_i tr C_i / 3) (no scale)."""
    if "test" not in names:
        return {}

    def rms(d):
        spread = float(torch.diagonal(d["C"], dim1=-2, dim2=-1).sum(-1).mean().div(3).sqrt())
        return spread, float((d["gamma"] - d["y"]).pow(2).mean().sqrt())

    s0, e0 = rms(data["test"])
    growth = {}
    for n in names:
        if n != "test":
            spread, err = rms(data[n])
            growth[n] = (spread / s0, err / e0)
    return growth


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="trained e2ip NequIP checkpoint (best.ckpt)")
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--set", action="append", default=[], help="NAME=FILE evaluated (repeatable)")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--nll-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", choices=("forces", "residual"), default="forces",
                    help="members fit the reference forces (direct force heads) or the frozen model's residual y − γ")
    ap.add_argument("--from-model", action="store_true",
                    help="evaluate the model's own committee (trained jointly with uq_head.committee) instead of "
                         "training one on its frozen features")
    ap.add_argument("--isotropic", action="store_true",
                    help="the committee covariance as (tr C / 3)·I (the ensemble reference's form) instead of the 3×3 C")
    ap.add_argument("--ensemble", nargs="+", default=None, metavar="CKPT",
                    help="a deep-ensemble reference on the same data: --model plus these checkpoints are the members "
                         "(their conservative forces γ), the mean is the members' mean")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from nequip_ext.demo import eval_loaders, load_model

    sets = dict(s.split("=", 1) for s in args.set)
    names = ["train", "val"] + list(sets)
    files = [args.train, args.val] + list(sets.values())
    model = load_model(Path(args.model))
    data = {n: collect(model, dl) for n, dl in zip(names, eval_loaders(Path(args.model), files))}
    print(f"features {data['train']['irreps']}; atoms: " + ", ".join(f"{n} {len(d['y'])}" for n, d in data.items()))
    if args.ensemble:  # members = whole models; the same files in the same order, so atoms line up
        gammas = {n: [data[n]["gamma"]] for n in names}
        for ckpt in map(Path, args.ensemble):
            other = load_model(ckpt)
            for n, dl in zip(names, eval_loaders(ckpt, files)):
                gammas[n].append(collect(other, dl)["gamma"])
        for n in names:
            data[n]["members"] = torch.stack(gammas[n], dim=1)
            data[n]["gamma"] = data[n]["members"].mean(1)
        args.from_model = True
    if args.from_model:
        if data["train"]["members"] is None:
            raise SystemExit(f"{args.model} has no in-model committee (train it with uq_head.committee.enabled: true)")
        com = None
    else:
        com = train_committee(data["train"], args)
    for name in ["val"] + list(sets):  # members and their covariance once per set
        data[name]["F"] = members_of(com, data[name])
        cov = committee_covariance(data[name]["F"])[1]
        if args.isotropic:  # (tr C / 3)·I, as the ensemble reference: a 3×3 from M ≈ 4 is near singular
            cov = isotropic_covariance(cov)
        data[name]["C"] = cov
    scales = {"committee+head": fit_scale(data["val"], True), "committee": fit_scale(data["val"], False)}
    print("val-fitted scales: " + ", ".join(f"{k} c={v:.4g}" for k, v in scales.items()))
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in ["val"] + list(sets):
        d = data[name]
        err = d["F"].mean(1) - target(d, "forces" if com is None else args.target)
        print(f"{name}: committee-mean RMSE on its target {float(err.pow(2).mean().sqrt()):.4f} "
              f"(γ's force RMSE {float((d['gamma'] - d['y']).pow(2).mean().sqrt()):.4f})")
        methods = {"shipped level": d["pred"]}
        methods.update({k: committee_predictive(d, c, k == "committee+head") for k, c in scales.items()})
        results[name] = {k: UQMetricState().update(p, d["y"], frame=d["frame"]).compute() for k, p in methods.items()}
    head = f"{'set':10s} {'method':15s}" + "".join(f"{c.replace('forces_', ''):>12s}" for c in COLUMNS)
    print(head + "\n" + "-" * len(head))
    for name, res in results.items():
        for method, m in res.items():
            print(f"{name:10s} {method:15s}" + "".join(f"{m[c]:12.3f}" for c in COLUMNS))
    growth = spread_growth(data, list(sets))
    if growth:
        print("from test to each set: committee RMS spread ×, γ's force RMSE × (a level that follows the error "
              "grows like the error)")
        for name, (spread, err) in growth.items():
            print(f"  {name:10s} spread ×{spread:.2f}   error ×{err:.2f}")
    report = {"args": vars(args), "scales": scales, "results": results, "growth": growth}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
