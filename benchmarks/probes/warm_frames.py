"""Warm frames of the training molecules: a validation set that contains a thermal shift (issue 12 probe).

    .venv-mace/bin/python -m benchmarks.probes.warm_frames --train /tmp/bn/data/train.xyz --factor 1.5 \\
        --frames 20 --out /tmp/bn/warm750.xyz

For each molecule (``smiles``) of the training split, GFN2-xTB Langevin MD (the labeller of the active
learning loop, ``tblite.ase:TBLite``, driven by ``e2ip-md``'s seeded :func:`e2ip_plugins.md.cli.langevin`;
0.5 fs and the friction of ``../shared/tools/make_xtb_data.py``, 0.02 in ASE units) starts from the
molecule's first training frame at ``factor`` × its training temperature, equilibrates 200 steps and keeps
one frame every 20 steps.
It reads only the training split, so what a fit on these frames chooses is chosen on training-side
data; the benchmark's 1200 K file is never read. Needs the ``xtb`` extra (tblite).
"""

from __future__ import annotations

import argparse


def warm_frames(train_file: str, factor: float, n_frames: int, seed: int = 100, stride: int = 20):
    import ase.io
    from ase import Atoms, units

    from e2ip_plugins.active_learning.label import load_labeller
    from e2ip_plugins.md.cli import langevin

    xtb = load_labeller("tblite.ase:TBLite", {"method": "GFN2-xTB", "verbosity": 0})

    first = {}
    for at in ase.io.read(train_file, ":"):
        first.setdefault(at.info["smiles"], at)
    out = []
    for i, (smiles, at0) in enumerate(sorted(first.items())):
        temp = factor * float(at0.info["temperature"])
        atoms = Atoms(at0.get_chemical_symbols(), positions=at0.get_positions())
        dyn = langevin(atoms, xtb(), temp, 0.5, 0.02 * units.fs, seed + i)
        dyn.run(200)
        for _ in range(n_frames):
            dyn.run(stride)
            frame = Atoms(atoms.get_chemical_symbols(), positions=atoms.get_positions())
            frame.info.update(REF_energy=float(atoms.get_potential_energy()), config_type=f"warm{temp:.0f}",
                              smiles=smiles, temperature=temp)
            frame.arrays["REF_forces"] = atoms.get_forces().copy()
            out.append(frame)
    return out


def main(argv=None):
    import ase.io

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="training split (extxyz with smiles and temperature per frame)")
    ap.add_argument("--factor", type=float, default=1.5, help="temperature over the training temperature")
    ap.add_argument("--frames", type=int, default=20, help="frames per molecule")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    frames = warm_frames(args.train, args.factor, args.frames)
    ase.io.write(args.out, frames)
    print(f"{len(frames)} frames -> {args.out}")


if __name__ == "__main__":
    main()
