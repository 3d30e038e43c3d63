"""Choose the novelty ridge exponent k of δ_z = max(10⁻⁶, (D/n_z)^k) by validation NLL (issue 12).

    .venv-mace/bin/python -m benchmarks.probes.level_ridge --model <bench>/mace/runs/e2ip_s0/e2ip_s0.model --split-dir <bench>/data

For each k the novelty moments are refitted on the training split, s_ref and the stored calibration
[c, β] on the validation split (the same code as training), and the fitted validation NLL is printed.
Rule: the k with the lowest validation NLL. The test and OOD files are not read.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

POWERS = (2.0, 4.0, 6.0, 8.0, 1e9)


def main(argv=None):
    from mace_ext.fit_novelty import _loader
    from mace_ext.model import level_columns

    from e2ip_plugins.level import fit_stored_level
    from e2ip_plugins.novelty import fit_novelty

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="MACE e2ip .model")
    ap.add_argument("--split-dir", required=True, help="folder with train.xyz and val.xyz")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = torch.load(args.model, map_location="cpu", weights_only=False).eval()
    torch.set_default_dtype(next(base.parameters()).dtype)
    train = _loader(str(Path(args.split_dir) / "train.xyz"), base, 16)
    val = _loader(str(Path(args.split_dir) / "val.xyz"), base, 16)
    rows = []
    for k in POWERS:
        model = copy.deepcopy(base)
        model.e2ip_novelty.ridge_power = k

        def feats(loader):
            with torch.no_grad():
                for b in loader:
                    d = b.to_dict()
                    out = model._e2ip_backbone_forward(d, False, False, False, False, False, False, False, False, False)
                    yield model.e2ip_invariants(out["node_feats"]), torch.argmax(d["node_attrs"], dim=-1)

        fit_novelty(model.e2ip_novelty, feats(train), feats(val))
        res = fit_stored_level(model.e2ip_novelty, level_columns(model, [val], torch.device("cpu")))
        rows.append((k, res["nll"], res["c"], res["beta"]))
        print(f"k = {k:g}: val NLL {res['nll']:.5f}  c {res['c']:.4g}  beta {res['beta']:.4g}", flush=True)
    best = min(rows, key=lambda r: r[1])
    print(f"lowest validation NLL: k = {best[0]:g}")


if __name__ == "__main__":
    main()
