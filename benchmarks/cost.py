"""Cost of the e²IP head and its uncertainty next to the plain backbone (issue 16): inference, training step,
peak memory, eager and deployed, as ratios e2ip / plain measured in the same run.

    python -m benchmarks.cost --backbone mace   --profile realistic --device cpu --dtype float32 float64 \\
        --atoms 1000 10000 --out /tmp/cost                # run each backbone with its own venv's python
    .venv-nequip/bin/python -m benchmarks.cost --backbone allegro --profile realistic --out /tmp/cost   # Allegro
    python -m benchmarks.cost --report /tmp/cost/cost_mace.json /tmp/cost/cost_nequip.json --out DIR

Models are untrained (one epoch on ``--train-frames`` frames, cost does not depend on training) and built
through the public CLIs with identical backbone flags for both methods (:class:`benchmarks.common.backends.Backend`):
``mace_run_train`` / ``mace_run_train_e2ip`` (which write ``.model`` and the TorchScript ``_compiled.model``),
``nequip-train`` with ``benchmarks/configs/nequip_plain.yaml`` / ``configs/nequip/e2ip.yaml``, then
``nequip-compile --mode aotinductor`` with target ``ase`` (plain) / ``e2ip_ase`` (e2ip). Allegro (issue 28):
NequIP's route with ``benchmarks/configs/allegro_plain.yaml`` / ``configs/nequip/allegro_e2ip.yaml`` (the
backend of :mod:`benchmarks.scalar_backbones`) and the profile's ``model`` sizes as Hydra overrides of
``training_module.model`` (the e²IP modules keep the shipped config's sizes); loaded and timed as NequIP.

Structures: a periodic box of molecules from the dev file (randomly rotated on a cubic grid, rejection at
``DMIN`` Å, liquid density ``DENSITY`` g/cm³). Inference = one ASE ``calculate`` (neighbour list included),
both methods in one process, ``--repeats`` alternating calls after a warm-up, medians. Training step =
forward + loss + backward + Adam on ``--batch`` frames. Peak memory = VmHWM increment over the post-import
baseline in a fresh process per method (:mod:`benchmarks.common.cost_probe`). A configuration that exceeds
``--time-cap`` s or ``--mem-cap-gb`` of RSS is killed and reported as not measured, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .common import REPO, SHARED_DATA
from .common.backends import _bin, make_backend
from .common.cost_report import write_report
from .common.profiles import resolve_device

DEV_FILE = SHARED_DATA / "iso7_dev_id.xyz"
DATA = {"energy_key": "REF_energy", "forces_key": "REF_forces", "elements": ["H", "C", "O"]}
DENSITY, DMIN = 1.0, 1.2

_MACE_R = dict(channels=128, max_L=1, max_ell=3, layers=2, correlation=3, r_max=5.0, batch_size=5, lr=0.01)
_NEQUIP_R = dict(channels=64, max_L=2, layers=4, r_max=5.0, batch_size=5, lr=0.01)
_MACE_Q = dict(channels=16, max_L=1, max_ell=2, layers=2, correlation=2, r_max=4.0, batch_size=5, lr=0.01)
_NEQUIP_Q = dict(channels=16, max_L=1, layers=2, r_max=4.0, batch_size=5, lr=0.01)
# a small production Allegro (issue 28's choice): 2 layers, l_max 2, 64 scalar / 16 tensor features, MLP widths
# = num_scalar_features as AllegroModel's docstring advises, depths as the configs (1); `model` = overrides of
# training_module.model in both Allegro configs
_ALLEGRO_R = dict(r_max=5.0, batch_size=5, lr=0.01, model=dict(
    l_max=2, num_layers=2, num_scalar_features=64, num_tensor_features=16, radial_chemical_embed_dim=64,
    scalar_embed_mlp_hidden_layers_width=64, allegro_mlp_hidden_layers_width=64, readout_mlp_hidden_layers_width=64))
_ALLEGRO_Q = dict(r_max=4.0, batch_size=5, lr=0.01, model={})  # the configs' own tiny model
COST_PROFILES: Dict[str, Dict[str, Any]] = {
    # the sizes: NequIP 64 features, l_max 2, 4 layers; MACE 128x0e+128x1o, max_L 1, 2 interactions, ν = 3
    "realistic": dict(backbones={"mace": _MACE_R, "nequip": _NEQUIP_R, "allegro": _ALLEGRO_R}, atoms=[1000, 10000],
                      repeats=3, train_repeats=5, batch=5, deployed_atoms=[1000, 10000]),
    # the backbones of benchmarks.common.profiles "quick" (16 channels, l <= 1, 2 layers)
    "quick": dict(backbones={"mace": _MACE_Q, "nequip": _NEQUIP_Q, "allegro": _ALLEGRO_Q}, atoms=[1000], repeats=7,
                  train_repeats=7, batch=5, deployed_atoms=[1000]),
    # seconds-scale plumbing check (tests): tiny models, ~40 atoms, no deployed path
    "smoke": dict(backbones={"mace": dict(_MACE_Q, channels=4), "nequip": dict(_NEQUIP_Q, channels=4),
                             "allegro": _ALLEGRO_Q},
                  atoms=[40], repeats=2, train_repeats=2, batch=2, deployed_atoms=[]),
}


def cost_backend(name: str, settings: Dict[str, Any]):
    """The backend that trains ``name``'s models: Allegro = :mod:`benchmarks.scalar_backbones`' (the Allegro configs)
    with ``settings['model']`` appended as ``training_module.model.<key>=<value>`` overrides."""
    if name != "allegro":
        return make_backend(name, settings)
    from .scalar_backbones import _backend

    backend = _backend("allegro", settings)
    train_cmd = backend.train_cmd
    sizes = [f"training_module.model.{k}={v}" for k, v in settings.get("model", {}).items()]
    backend.train_cmd = lambda method, *args: train_cmd(method, *args) + sizes
    return backend


def log(msg: str) -> None:
    print(f"[cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def liquid_box(molecules, n_atoms: int, density: float = DENSITY, seed: int = 0, dmin: float = DMIN,
               tries: int = 500):
    """Periodic cubic box of ≈ n_atoms atoms: whole molecules (round-robin from ``molecules``), random
    orientation and a 0.3 Å jitter around the sites of a cubic grid, at ``density`` g/cm³; each molecule
    takes the first of ``tries`` orientations whose atoms are ≥ ``dmin`` Å from every placed atom (else the
    best one). ``info['min_intermolecular_distance']`` records the closest contact."""
    from ase import Atoms
    from scipy.spatial import cKDTree
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    n_mol = max(1, round(n_atoms / len(molecules[0])))
    mass = float(np.mean([m.get_masses().sum() for m in molecules])) * n_mol
    side = (mass / 0.60221408 / density) ** (1 / 3)  # g/mol / (N_A · g/cm³) in Å³
    grid = int(np.ceil(n_mol ** (1 / 3)))
    cells = rng.permutation(grid**3)[:n_mol]
    pos, numbers, worst = np.zeros((0, 3)), [], np.inf
    for k, cell in enumerate(cells):
        mol = molecules[k % len(molecules)]
        x0 = mol.positions - mol.positions.mean(0)
        centre = side / grid * (np.array(np.unravel_index(cell, (grid,) * 3)) + 0.5)
        tree = cKDTree(pos % side, boxsize=side) if len(pos) else None
        best = (-np.inf, x0)
        for _ in range(tries):
            rot = Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix()
            x = x0 @ rot.T + centre + rng.normal(0.0, 0.3, 3)
            d = float(tree.query(x % side)[0].min()) if tree is not None else np.inf
            if d > best[0]:
                best = (d, x)
            if d >= dmin:
                break
        worst = min(worst, best[0])
        pos = np.concatenate([pos, best[1]])
        numbers.append(mol.numbers)
    atoms = Atoms(numbers=np.concatenate(numbers), positions=pos % side, cell=[side] * 3, pbc=True)
    atoms.info["min_intermolecular_distance"] = float(worst)
    return atoms


def run_capped(cmd: List[str], log_path: Path, timeout: float, mem_cap_gb: Optional[float],
               env: Dict[str, str]) -> Dict[str, Any]:
    """Run ``cmd``; kill it past ``timeout`` s or ``mem_cap_gb`` of RSS (process group). Returns rc, wall, reason."""
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        reason = None
        while proc.poll() is None:
            time.sleep(0.5)
            if time.perf_counter() - t0 > timeout:
                reason = f"exceeded the time cap of {timeout:.0f} s"
            elif mem_cap_gb and _group_rss_gb(proc.pid) > mem_cap_gb:
                reason = f"exceeded the memory cap of {mem_cap_gb:g} GB RSS"
            if reason:
                os.killpg(proc.pid, 9)
                proc.wait()
    text = log_path.read_text(errors="replace")
    res = {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "reason": reason}
    lines = [ln for ln in text.splitlines() if ln.startswith("COSTPROBE ")]
    if lines:
        res["result"] = json.loads(lines[-1][len("COSTPROBE "):])
    elif reason is None:
        res["reason"] = f"failed (rc {proc.returncode}): " + " | ".join(text.strip().splitlines()[-3:])[-400:]
    return res


def _group_rss_gb(pid: int) -> float:
    total = 0.0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.getpgid(int(p.name)) != pid:
                continue
            for line in (p / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 2**20
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total


class CostRun:
    """One backbone, one profile: builds the artefacts, then measures every configuration."""

    def __init__(self, args):
        self.a = args
        self.prof = COST_PROFILES[args.profile]
        self.out = Path(args.out) / args.backbone
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(args.device)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                    "WANDB_MODE": "disabled",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.results: Dict[str, Any] = {"backbone": args.backbone, "profile": args.profile, "device": self.device,
                                        "threads": args.threads, "settings": self.prof["backbones"][args.backbone],
                                        "head_overrides": list(args.head_override or []),
                                        "head_flags": shlex.split(args.head_flags or ""),
                                        "inference": [], "training": [], "memory": [], "build": {}}
        if self.device.startswith("cuda"):
            import torch

            self.results["device_name"] = torch.cuda.get_device_name(self.device)

    def settings(self, dtype: str) -> Dict[str, Any]:
        extra = {"head_overrides": list(self.a.head_override)} if self.a.head_override else {}
        if self.a.head_flags:
            extra["head_flags"] = shlex.split(self.a.head_flags)
        return dict(self.prof["backbones"][self.a.backbone], device=self.device, dtype=dtype, epochs=1, **extra)

    # --- artefacts ---------------------------------------------------------------------------------
    def data_files(self) -> Dict[str, str]:
        import ase.io

        d = self.out / "data"
        d.mkdir(exist_ok=True)
        frames = ase.io.read(str(self.a.dev_file), ":200")
        n = self.a.train_frames
        files = {"train": d / "train.xyz", "val": d / "val.xyz", "test": d / "val.xyz"}
        ase.io.write(files["train"], frames[:n], format="extxyz")
        ase.io.write(files["val"], frames[n: n + max(2, n // 2)], format="extxyz")
        self.frames = frames
        return {k: str(v) for k, v in files.items()}

    def build(self, dtype: str, deployed: bool) -> Dict[str, Dict[str, str]]:
        """Train plain and e2ip for one epoch through the CLIs (and compile NequIP); returns artefact paths."""
        backend = cost_backend(self.a.backbone, self.settings(dtype))
        files = self.data_files()
        arts: Dict[str, Dict[str, str]] = {}
        for method in ("plain", "e2ip"):
            run_dir = self.out / f"{dtype}_{method}"
            name = f"cost_{method}"
            art = backend.artifact(run_dir, name)
            if not art.exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                cmd = backend.train_cmd(method, run_dir, name, 0, files, 1, DATA)
                if self.a.backbone != "mace":
                    cmd = [c for c in cmd if "profiler" not in c]
                log(f"build {self.a.backbone} {dtype} {method}: train")
                r = run_capped(cmd, run_dir / "train.log", self.a.build_cap, None, self.env)
                if r["rc"] != 0 or not art.exists():
                    raise RuntimeError(f"training {method} failed ({r['reason']}); see {run_dir / 'train.log'}")
                self.results["build"][f"{dtype}_{method}_train_s"] = r["wall_s"]
            arts[method] = {"model": str(art)}
            if self.a.backbone == "mace":
                arts[method]["compiled"] = str(run_dir / f"{name}_compiled.model")
            elif deployed:
                pt2 = run_dir / f"{name}.nequip.pt2"
                if not pt2.exists():
                    target = "ase" if method == "plain" else "e2ip_ase"
                    log(f"build {self.a.backbone} {dtype} {method}: nequip-compile --target {target}")
                    cmd = [_bin("nequip-compile"), str(art), str(pt2), "--mode",
                           "aotinductor", "--device", self.device.split(":")[0], "--target", target]
                    r = run_capped(cmd, run_dir / "compile.log", self.a.build_cap, None, self.env)
                    self.results["build"][f"{dtype}_{method}_compile_s"] = r["wall_s"]
                if pt2.exists():
                    arts[method]["compiled"] = str(pt2)
        return arts

    def structure(self, n: int) -> str:
        path = self.out / "data" / f"box_{n}.xyz"
        if not path.exists():
            import ase.io

            ase.io.write(path, liquid_box(self.frames, n), format="extxyz")
        return str(path)

    # --- measurements ----------------------------------------------------------------------------------
    def probe(self, what: str, spec: Dict[str, Any], tag: str) -> Dict[str, Any]:
        spec = {**spec, "backbone": self.a.backbone, "device": self.device, "threads": self.a.threads,
                "type_names": DATA["elements"]}
        spec_path = self.out / f"spec_{tag}.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "benchmarks.common.cost_probe", what, "--spec", str(spec_path)]
        r = run_capped(cmd, self.out / f"{tag}.log", self.a.time_cap, self.a.mem_cap_gb, self.env)
        log(f"{tag}: " + (f"{r['result'].get('ratio', r['result'].get('increment_mb', r['result'].get('ratio_after')))}" if "result" in r
                          else f"not measured: {r['reason']}"))
        return r

    def run(self) -> Dict[str, Any]:
        a, prof = self.a, self.prof
        for dtype in a.dtype:
            deployed_atoms = a.deployed_atoms or prof["deployed_atoms"]
            paths = [p for p in a.paths if p == "eager" or deployed_atoms]
            arts = self.build(dtype, "deployed" in paths)
            base = {"dtype": dtype, "artifacts": arts}
            for n in (a.atoms or prof["atoms"]) if a.inference else []:
                struct = self.structure(n)
                for path in paths:
                    if path == "deployed" and ("compiled" not in arts["plain"] or "compiled" not in arts["e2ip"]
                                               or n not in deployed_atoms):
                        continue
                    tag = f"time_{dtype}_{n}_{path}"
                    r = self.probe("time", {**base, "structure": struct, "path": path, "repeats": a.repeats
                                            or prof["repeats"], "warmup": a.warmup}, tag)
                    self.results["inference"].append({"dtype": dtype, "atoms_requested": n, "path": path, **r})
                    if path == "eager" and a.modules:
                        r = self.probe("modules", {**base, "structure": struct, "path": path, "repeats": 2,
                                                   "warmup": 1}, f"modules_{dtype}_{n}")
                        self.results.setdefault("modules", []).append({"dtype": dtype, "atoms_requested": n, **r})
                    if a.memory and (a.memory_atoms is None or n in a.memory_atoms):
                        row = {"dtype": dtype, "atoms_requested": n, "path": path}
                        for m in ("plain", "e2ip"):
                            row[m] = self.probe("mem", {**base, "structure": struct, "path": path, "method": m,
                                                        "calls": 1}, f"mem_{dtype}_{n}_{path}_{m}")
                        self.results["memory"].append(row)
            if a.epoch and a.backbone == "nequip":
                r = self.probe("epoch", {**base, "train_file": str(a.dev_file), "batch": prof["batch"],
                                         "n_train": a.epoch_frames[0], "n_val": a.epoch_frames[1],
                                         "repeats": a.epoch_repeats}, f"epoch_{dtype}")
                self.results.setdefault("epoch", []).append({"dtype": dtype, **r})
            if a.training:
                r = self.probe("train", {**base, "train_file": str(a.dev_file), "batch": prof["batch"],
                                         "repeats": prof["train_repeats"], "warmup": a.warmup}, f"train_{dtype}")
                self.results["training"].append({"dtype": dtype, **r})
        path = Path(a.out) / f"cost_{a.backbone}.json"
        path.write_text(json.dumps(self.results, indent=1))
        log(f"wrote {path}")
        return self.results


def collect(run_dir: Path, backbone: str, profile: str, threads: int, device: str = "cpu") -> Dict[str, Any]:
    """Rebuild a results dict from the probe logs of a (possibly interrupted) run directory ``<out>/<backbone>``:
    every probe that finished is kept, the rest is simply absent."""
    def parse(path: Path) -> Dict[str, Any]:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("COSTPROBE ")]
        return {"result": json.loads(lines[-1][len("COSTPROBE "):])} if lines else {"reason": "interrupted"}

    res: Dict[str, Any] = {"backbone": backbone, "profile": profile, "device": device, "threads": threads,
                           "settings": COST_PROFILES[profile]["backbones"][backbone], "inference": [], "training": [],
                           "memory": [], "collected_from": str(run_dir)}
    for f in sorted(run_dir.glob("time_*.log")):
        _, dtype, n, path = f.stem.split("_")
        res["inference"].append({"dtype": dtype, "atoms_requested": int(n), "path": path, **parse(f)})
    for f in sorted(run_dir.glob("mem_*_plain.log")):
        _, dtype, n, path, _ = f.stem.split("_")
        e2ip = f.with_name(f.name.replace("_plain.log", "_e2ip.log"))
        if e2ip.exists():
            res["memory"].append({"dtype": dtype, "atoms_requested": int(n), "path": path, "plain": parse(f),
                                  "e2ip": parse(e2ip)})
    for f in sorted(run_dir.glob("train_*.log")):
        res["training"].append({"dtype": f.stem.split("_")[1], **parse(f)})
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("mace", "nequip", "allegro"))
    p.add_argument("--profile", choices=sorted(COST_PROFILES), default="realistic")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    p.add_argument("--atoms", nargs="+", type=int, default=None, help="box sizes (default: the profile's)")
    p.add_argument("--deployed-atoms", nargs="+", type=int, default=None, help="sizes for the deployed path")
    p.add_argument("--paths", nargs="+", default=["eager", "deployed"], choices=("eager", "deployed"))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method first (TorchScript's profiling "
                   "executor optimises the graph during the first two calls; CUDA initialises lazily)")
    p.add_argument("--no-inference", dest="inference", action="store_false")
    p.add_argument("--no-modules", dest="modules", action="store_false",
                   help="skip the per-module share of the e²IP modules in one eager calculate")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-atoms", nargs="+", type=int, default=None,
                   help="box sizes for the memory probes (default: every size)")
    p.add_argument("--no-training", dest="training", action="store_false")
    p.add_argument("--epoch", action="store_true", help="NequIP: time a training epoch with validation and the "
                   "NoveltyFitCallback fit, as before issue 16 (three validation passes) and now (one), one run")
    p.add_argument("--epoch-frames", nargs=2, type=int, default=[100, 40], metavar=("TRAIN", "VAL"))
    p.add_argument("--epoch-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--head-override", action="append", default=None, metavar="HYDRA",
                   help="NequIP: a Hydra override for the e2ip model only, repeatable (e.g. an opt-in "
                   "'++training_module.model.uq_head.committee={...}')")
    p.add_argument("--head-flags", default=None, metavar="FLAGS",
                   help="MACE: extra mace_run_train_e2ip flags for the e2ip model only, one quoted string "
                   "(e.g. '--e2ip_committee 4 --e2ip_committee_channels 32', the shipped config's committee)")
    p.add_argument("--time-cap", type=float, default=1200.0, help="s per measurement process")
    p.add_argument("--mem-cap-gb", type=float, default=12.0, help="RSS cap per measurement process")
    p.add_argument("--build-cap", type=float, default=1800.0, help="s per training / compile command")
    p.add_argument("--train-frames", type=int, default=6)
    p.add_argument("--dev-file", type=Path, default=DEV_FILE)
    p.add_argument("--out", default="cost_out")
    p.add_argument("--report", nargs="+", default=None, help="cost_<backbone>.json files: write report.md + cost.json")
    p.add_argument("--collect", default=None, help="run directory <out>/<backbone>: rebuild cost_<backbone>.json "
                   "from its probe logs (interrupted runs)")
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    if a.report:
        log(f"report {write_report(a.report, Path(a.out), ' '.join(sys.argv))}")
        return
    if not a.backbone:
        raise SystemExit("--backbone is required (or --report)")
    if a.head_override and a.backbone != "nequip":
        raise SystemExit("--head-override is a Hydra override of the NequIP e2ip config: use it with --backbone nequip")
    if a.head_flags and a.backbone != "mace":
        raise SystemExit("--head-flags are mace_run_train_e2ip flags: use them with --backbone mace")
    if a.collect:
        out = Path(a.out) / f"cost_{a.backbone}.json"
        out.write_text(json.dumps(collect(Path(a.collect), a.backbone, a.profile, a.threads, a.device), indent=1))
        log(f"wrote {out}")
        return
    CostRun(a).run()


if __name__ == "__main__":
    main()
