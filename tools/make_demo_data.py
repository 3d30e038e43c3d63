"""Cut the shipped demo subset out of ../shared/data (run once; the output is committed).

Per in-distribution isomer (400 frames, one MD trajectory each) frames are split in
time blocks so no test frame has training neighbours: train = frames [0, 200) every
4th, val = [220, 300) every 4th, test = [320, 400) every 4th. OOD files: every 5th
frame of the unseen molecules, every 4th of the 1200 K trajectories.
"""

import argparse
from pathlib import Path

from ase.io import read, write


def by_isomer(frames):
    groups = {}
    for f in frames:
        groups.setdefault(f.info.get("smiles"), []).append(f)
    return groups


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "e2ip_plugins" / "data"))
    a = p.parse_args()
    src, out = Path(a.src), Path(a.out)
    iid = by_isomer(read(src / "iso7_dev_id.xyz", ":"))
    split = {"train": (0, 200, 4), "val": (220, 300, 4), "test": (320, 400, 4)}
    for name, (lo, hi, step) in split.items():
        frames = [f for traj in iid.values() for f in traj[lo:hi:step]]
        write(out / f"iso7_{name}.xyz", frames, format="extxyz")
    mol = [f for traj in by_isomer(read(src / "iso7_dev_ood_mol.xyz", ":")).values() for f in traj[::5]]
    hot = [f for traj in by_isomer(read(src / "iso7_dev_ood_hot.xyz", ":")).values() for f in traj[::4]]
    write(out / "iso7_ood_mol.xyz", mol, format="extxyz")
    write(out / "iso7_ood_hot.xyz", hot, format="extxyz")


if __name__ == "__main__":
    main()
