"""In-process measurements for :mod:`benchmarks.cost` (one fresh process per call, so peaks are its own).

    python -m benchmarks.common.cost_probe time  --spec spec.json   # interleaved plain/e2ip inference, median
    python -m benchmarks.common.cost_probe mem   --spec spec.json   # peak RSS of one method, one path
    python -m benchmarks.common.cost_probe train --spec spec.json   # interleaved training steps, median

Every figure is one ASE ``calculate`` (neighbour list + model + the calculator's own work, covariances
included for e2ip) or one training step (forward + loss + backward + Adam step). Loaders:

=========  ====================================================  ==============================================
path       MACE                                                  NequIP
=========  ====================================================  ==============================================
eager      ``MACECalculator`` / ``E2IPMACECalculator`` on the    ``NequIPCalculator._from_saved_model`` /
           ``.model`` files                                      ``E2IPNequIPCalculator.from_saved_model`` (ckpt)
deployed   the same calculators on ``torch.jit.load`` of the     ``NequIPCalculator.from_compiled_model`` (target
           ``_compiled.model`` files MACE's run wrote            ``ase``) / ``E2IPNequIPCalculator.`` (``e2ip_ase``)
=========  ====================================================  ==============================================

Allegro (``backbone: allegro``) is a NequIP model: NequIP's loaders, module hooks and training step.

Prints one JSON line prefixed ``COSTPROBE``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Dict, List, Tuple

from .backends import SPECIES, make_backend
from .memprobe import _peak, _reset_peak, _status


def family(backbone: str) -> str:
    """``mace`` or ``nequip``: the framework whose loaders and modules ``backbone`` uses (Allegro: NequIP's)."""
    return "mace" if backbone == "mace" else "nequip"


def setup_threads(spec: Dict[str, Any]) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))


def load(spec: Dict[str, Any], method: str, path: str):
    """An ASE calculator for ``method`` (plain | e2ip) on ``path``: eager through the benchmark's own loaders
    (:meth:`benchmarks.common.backends.Backend.load`), deployed on the compiled artefacts."""
    art, device, backbone = spec["artifacts"][method], spec["device"], family(spec["backbone"])
    if path == "eager":
        return make_backend(backbone, {"dtype": spec["dtype"]}).load(method, [art["model"]], device).calcs[0]
    if backbone == "mace":
        import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
        import torch
        from mace.calculators import MACECalculator

        from mace_ext import E2IPMACECalculator

        cls = MACECalculator if method == "plain" else E2IPMACECalculator
        return cls(models=[torch.jit.load(art["compiled"], map_location=device)], device=device,
                   default_dtype=spec["dtype"])
    from nequip.integrations.ase import NequIPCalculator

    from nequip_ext import E2IPNequIPCalculator

    cls = NequIPCalculator if method == "plain" else E2IPNequIPCalculator
    return cls.from_compiled_model(art["compiled"], device=device, **SPECIES)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def calculate(calc, atoms, device: str) -> float:
    from ase.calculators.calculator import all_changes

    _sync(device)
    t0 = time.perf_counter()
    calc.calculate(atoms, ["energy", "forces"], all_changes)
    _sync(device)
    return time.perf_counter() - t0


def interleaved(jobs: Dict[str, Any], repeats: int, device: str) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """Time each job ``repeats`` times, in the jobs' order on even rounds and reversed on odd ones (so a drift of
    the machine hits every job alike); returns (times, medians) in seconds."""
    times: Dict[str, List[float]] = {k: [] for k in jobs}
    for i in range(repeats):
        for k in (list(jobs) if i % 2 == 0 else list(jobs)[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            jobs[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times, {k: statistics.median(t) for k, t in times.items()}


def time_inference(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Both methods loaded in one process; warm-up, then ``repeats`` alternating calls; medians and ratio."""
    import ase.io

    atoms = ase.io.read(spec["structure"])
    calcs = {m: load(spec, m, spec["path"]) for m in ("plain", "e2ip")}
    for _ in range(spec.get("warmup", 1)):
        for m in calcs:
            calculate(calcs[m], atoms, spec["device"])
    assert "forces_covariance" in calcs["e2ip"].results, "the e2ip path must produce forces_covariance"
    times, med = interleaved({m: (lambda c=calcs[m]: calculate(c, atoms, spec["device"])) for m in ("plain", "e2ip")},
                             spec["repeats"], spec["device"])
    return {"atoms": len(atoms), "times_s": times, "median_s": med, "ratio": med["e2ip"] / med["plain"]}


def module_share(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Share of one e2ip ``calculate`` (eager) spent in the e²IP modules, timed inside the same calls, so it is
    immune to the drift between calls that a plain/e2ip ratio of whole calls suffers on a shared machine.
    NequIP: forward hooks on the top-level modules of the energy network, e²IP = the ``uq_*`` modules. MACE:
    e²IP = the e2ip model's forward minus its ``_e2ip_backbone_forward`` (head, novelty, covariances, σ_E)."""
    import ase.io

    atoms = ase.io.read(spec["structure"])
    calc = load(spec, "e2ip", "eager")
    spans: Dict[str, List[float]] = {}

    def timed(name):
        def pre(*_):
            _sync(spec["device"])
            spans.setdefault(name, []).append(-time.perf_counter())

        def post(*_):
            _sync(spec["device"])
            spans[name][-1] += time.perf_counter()
        return pre, post

    if family(spec["backbone"]) == "nequip":
        for name, mod in calc.model.model.func.named_children():
            pre, post = timed(name)
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
        e2ip_names = [n for n, _ in calc.model.model.func.named_children() if n.startswith("uq_")]
    else:
        model = calc.models[0]
        pre, post = timed("forward")
        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
        backbone = model._e2ip_backbone_forward
        bpre, bpost = timed("backbone")

        def wrapped(*args):
            bpre()
            try:
                return backbone(*args)
            finally:
                bpost()
        model._e2ip_backbone_forward = wrapped
        e2ip_names = []
    for _ in range(spec.get("warmup", 1)):
        calculate(calc, atoms, spec["device"])
    spans.clear()
    calls = [calculate(calc, atoms, spec["device"]) for _ in range(spec["repeats"])]
    per_call = {k: sum(v) / len(calls) for k, v in spans.items()}
    e2ip = (sum(per_call[n] for n in e2ip_names) if family(spec["backbone"]) == "nequip"
            else per_call["forward"] - per_call["backbone"])
    total = sum(calls) / len(calls)
    return {"atoms": len(atoms), "calculate_s": total, "e2ip_s": e2ip, "share": e2ip / total,
            "ratio": total / (total - e2ip), "modules_s": per_call}


def memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Peak RSS (VmHWM) increment over the post-import baseline while loading and running ``calls`` calculations
    of one method; on CUDA also ``torch.cuda.max_memory_allocated``."""
    import ase.io
    import torch

    atoms = ase.io.read(spec["structure"])
    _import_framework(spec["backbone"])  # the baseline includes the imports
    resettable = _reset_peak()
    base = _status("VmRSS") if resettable else _peak(False)
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    calc = load(spec, spec["method"], spec["path"])
    for _ in range(spec.get("calls", 2)):
        calculate(calc, atoms, spec["device"])
    peak = _peak(resettable)
    out = {"atoms": len(atoms), "baseline_mb": base, "peak_mb": peak, "increment_mb": peak - base,
           "mode": "VmHWM" if resettable else "ru_maxrss"}
    if cuda:
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _import_framework(backbone: str) -> None:
    """The packages every method's process imports (the memory baseline): the frameworks and the adapters'
    packages, not the adapters' model modules (those count towards the method that loads them)."""
    import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)

    if backbone == "mace":
        import mace.calculators  # noqa: F401
        import mace_ext  # noqa: F401
    else:
        import nequip.integrations.ase  # noqa: F401
        import nequip_ext  # noqa: F401


# ------------------------------------------------------------------------------------------- training step
def _mace_step_factory(spec, method, frames):
    import torch
    from mace import data as mdata
    from mace.modules.loss import WeightedEnergyForcesLoss
    from mace.tools import torch_geometric, utils

    from mace_ext.loss import E2IPLoss

    # .to(): e3nn 0.4.4 code-generated modules keep some constants as plain attributes that map_location misses
    model = torch.load(spec["artifacts"][method]["model"], map_location=spec["device"], weights_only=False)
    model = model.to(spec["device"])
    model.train()
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    keys = mdata.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    cfgs = [mdata.config_from_atoms(a, key_specification=keys) for a in frames]
    ads = [mdata.AtomicData.from_config(c, z_table=z_table, cutoff=float(model.r_max)) for c in cfgs]
    batch = torch_geometric.Batch.from_data_list(ads).to(spec["device"])
    loss_fn = WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=10.0)
    if method != "plain":  # mace_run_train_e2ip's defaults (mace_ext.cli): weight 1, λ 0.1
        loss_fn = E2IPLoss(loss_fn, weight=1.0, reg_weight=0.1, sigma_f=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        b = batch.to_dict()
        out = model(b, training=True, compute_force=True)
        loss = loss_fn(pred=out, ref=batch)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _nequip_step_factory(spec, method, frames):
    import torch
    from nequip.data import AtomicDataDict
    from nequip.data.ase import from_ase
    from nequip.model.saved_models.load_utils import load_saved_model
    from nequip.train import EnergyForceLoss

    from nequip_ext import EvidentialEnergyForceLoss

    calc = load(spec, method, "eager")  # for its data transforms (type mapping, neighbour list)
    model = load_saved_model(spec["artifacts"][method]["model"]).to(spec["device"])
    model.train()
    default = None
    if frames is not None:
        items = []
        for a in frames:
            d = from_ase(a, key_mapping={"REF_energy": "total_energy", "REF_forces": "forces"})
            for t in calc.transforms:
                d = t(d)
            items.append(d)
        default = AtomicDataDict.to_(AtomicDataDict.batched_from_list(items), spec["device"])
    names = list(spec["type_names"])
    coeffs = {"total_energy": 1.0, "forces": 1.0}
    if method == "plain":
        loss_fn = EnergyForceLoss(coeffs=coeffs, per_atom_energy=True, type_names=names)
    else:  # configs/nequip/e2ip.yaml: evidential 0.1, reg 0.1; allegro_e2ip.yaml also detach_mean
        loss_fn = EvidentialEnergyForceLoss(coeffs={**coeffs, "evidential": 0.1}, reg_weight=0.1, type_names=names,
                                            detach_mean=spec["backbone"] == "allegro")
    loss_fn = loss_fn.to(spec["device"])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def step(batch=None):
        batch = default if batch is None else batch
        opt.zero_grad(set_to_none=True)
        loss_fn.reset()
        out = model(dict(batch))
        loss = loss_fn(out, batch)["weighted_sum"]
        loss.backward()
        opt.step()
        return float(loss.detach())

    step.model = model
    return step


def time_training(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Training step on ``spec['batch']`` frames of the dev file, both methods in one process, interleaved."""
    import ase.io
    import torch

    torch.set_default_dtype(getattr(torch, spec["dtype"]))  # the data in the model's dtype, as the CLIs do
    frames = ase.io.read(spec["train_file"], f":{spec['batch']}")
    factory = _mace_step_factory if spec["backbone"] == "mace" else _nequip_step_factory
    steps = {m: factory(spec, m, frames) for m in ("plain", "e2ip")}
    for m in steps:
        for _ in range(spec.get("warmup", 1)):
            steps[m]()
    times, med = interleaved(steps, spec["repeats"], spec["device"])
    return {"atoms": sum(len(a) for a in frames), "frames": len(frames), "times_s": times, "median_s": med,
            "ratio": med["e2ip"] / med["plain"]}


def time_epoch(spec: Dict[str, Any]) -> Dict[str, Any]:
    """NequIP epoch (``--profile quick``): training steps over ``n_train`` frames in batches of ``batch``,
    the validation forward (with forces) over ``n_val`` frames, and for e2ip the
    :class:`nequip_ext.NoveltyFitCallback` fit at every validation, as before issue 16 (three validation passes,
    ``one_pass=False``, and the level fit's full objective ``e2ip_plugins.level._nll`` at every evaluation) and
    now (one pass, the objective with its c-independent terms hoisted). Plain / e2ip / both fits interleaved in one process, medians of
    ``repeats``; ratios of epoch time e2ip / plain with each fit."""
    import ase.io
    import torch
    from nequip.data import AtomicDataDict

    from nequip_ext.novelty import fit_model_novelty

    torch.set_default_dtype(getattr(torch, spec["dtype"]))
    frames = ase.io.read(spec["train_file"], f":{spec['n_train'] + spec['n_val']}")
    b = spec["batch"]
    parts = {}
    for m in ("plain", "e2ip"):
        calc = load(spec, m, "eager")
        items = []
        for a in frames:
            d = from_ase_ref(a)
            for t in calc.transforms:
                d = t(d)
            items.append(d)
        batches = [AtomicDataDict.to_(AtomicDataDict.batched_from_list(items[i:i + b]), spec["device"])
                   for i in range(0, len(items), b)]
        n_tr = spec["n_train"] // b
        parts[m] = (batches[:n_tr], batches[n_tr:])
    steps = {m: _nequip_step_factory(spec, m, None) for m in ("plain", "e2ip")}
    models = {m: steps[m].model for m in steps}

    def train(m):
        for batch in parts[m][0]:
            steps[m](batch)

    def validate(m):
        models[m].eval()
        for batch in parts[m][1]:
            models[m](dict(batch))
        models[m].train()

    import e2ip_plugins.level as level

    fast_objective = level._nll_of_logc

    def fit(one_pass):
        # before issue 16: three validation passes and the level fit's objective re-evaluating every term
        level._nll_of_logc = fast_objective if one_pass else (
            lambda nu, ke, q, ld: (lambda logc: level._nll(nu, ke, q, ld, logc)))
        try:
            fit_model_novelty(models["e2ip"], parts["e2ip"][0], parts["e2ip"][1], one_pass=one_pass)
        finally:
            level._nll_of_logc = fast_objective

    jobs = {"plain_train": lambda: train("plain"), "plain_val": lambda: validate("plain"),
            "e2ip_train": lambda: train("e2ip"), "e2ip_val": lambda: validate("e2ip"),
            "fit_before": lambda: fit(False), "fit_after": lambda: fit(True)}
    for f in jobs.values():
        f()
    times, med = interleaved(jobs, spec["repeats"], spec["device"])
    plain = med["plain_train"] + med["plain_val"]
    e2ip = med["e2ip_train"] + med["e2ip_val"]
    return {"n_train": spec["n_train"], "n_val": spec["n_val"], "batch": b, "times_s": times, "median_s": med,
            "ratio_before": (e2ip + med["fit_before"]) / plain, "ratio_after": (e2ip + med["fit_after"]) / plain,
            "ratio_no_fit": e2ip / plain, "fit_after_over_before": med["fit_after"] / med["fit_before"]}


def from_ase_ref(atoms):
    from nequip.data.ase import from_ase

    return from_ase(atoms, key_mapping={"REF_energy": "total_energy", "REF_forces": "forces"})


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("time", "mem", "train", "epoch", "modules"))
    p.add_argument("--spec", required=True)
    a = p.parse_args(argv)
    with open(a.spec) as f:
        spec = json.load(f)
    setup_threads(spec)
    fn = {"time": time_inference, "mem": memory, "train": time_training, "epoch": time_epoch,
          "modules": module_share}[a.what]
    print("COSTPROBE " + json.dumps(fn(spec)), flush=True)


if __name__ == "__main__":
    main()
