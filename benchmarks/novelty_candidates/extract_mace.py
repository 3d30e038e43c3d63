"""Issue-6 candidates, step 1b: MACE all-block invariants, head outputs, force errors; .venv-mace (usage: README.md)."""
import sys, torch, numpy as np, ase.io
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from mace_ext.calculator import E2IPMACECalculator
from e2ip_plugins._e3nn import o3
from benchmarks.novelty_probe import invariants
torch.set_default_dtype(torch.float64)
D = sys.argv[2].rstrip("/") + "/"
calc = E2IPMACECalculator(model_paths=[sys.argv[1]], device="cpu", default_dtype="float64")
model = calc.models[0]
model.e2ip_novelty_enabled = False  # the head's own κ: the candidates apply their factor themselves
irr = [o3.Irreps(str(p.linear.irreps_out)) for p in model.products]
cap = {}
def hook(mod, inp, out):
    nf = out["node_feats"].detach().double()
    cols, off = [], 0
    for ir in irr:
        cols.append(invariants(nf[:, off:off+ir.dim], ir)); off += ir.dim
    cap["f"] = torch.cat(cols, 1)
model.register_forward_hook(hook)
zmap = {6: 0, 1: 1, 8: 2}
R = {}
for k in ["train", "val", "test", "ood_mol", "ood_hot"]:
    feats, heads, F, ref, types = [], {h: [] for h in ("nu", "kappa", "sigma0", "sigma0_inv", "sigma0_logdet")}, [], [], []
    for at in ase.io.read(D + k + ".xyz", ":"):
        r = at.arrays["REF_forces"].copy()
        at.calc = calc
        f = at.get_forces()
        feats.append(cap["f"])
        ev = calc.e2ip_evidence
        for h in heads:
            heads[h].append(torch.as_tensor(np.asarray(ev["e2ip_" + h][0])))
        F.append(torch.as_tensor(f)); ref.append(torch.as_tensor(r))
        types.append(torch.tensor([zmap[z] for z in at.numbers]))
    R[k] = dict(feat=torch.cat(feats), head={h: torch.cat(v).double() for h, v in heads.items()}, forces=torch.cat(F), ref=torch.cat(ref), types=torch.cat(types))
    print(k, R[k]["feat"].shape, {h: v.shape for h, v in R[k]["head"].items()})
torch.save(R, sys.argv[3])
