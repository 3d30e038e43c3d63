"""Issue-6 candidates, step 2: novelty scores x evidence maps, metrics per set (usage: README.md)."""
import sys, math, torch, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks.novelty_probe import per_species, gauss_fit, gauss_score, predictive
from e2ip_plugins.metrics import UQMetricState
from e2ip_plugins.calibration import fit_covariance_scale
torch.set_default_dtype(torch.float64)
R = torch.load(sys.argv[1], weights_only=False)
E = ["test", "ood_mol", "ood_hot"]
data = {k: {"X": v["feat"], "types": v["types"]} for k, v in R.items()}
print("feat dim", R["train"]["feat"].shape)
from benchmarks.novelty_probe import knn_fit, knn_score
SC = sys.argv[2] if len(sys.argv) > 2 else "gauss"
if SC == "gauss":  # benchmarks.novelty_probe.gauss_fit: ridge 1e-6·mean variance
    raw = per_species(gauss_fit, gauss_score, data["train"], data)
elif SC.startswith("g"):  # g<lam>: shrink (1-lam)·C + lam·diag(C)
    lam = float(SC[1:]) if len(SC) > 1 and SC != "gauss" else 1e-6
    def gfit(X):
        mu = X.mean(0); C = torch.cov((X-mu).T); C = (1-lam)*C + lam*torch.diag(torch.diagonal(C)) + 1e-9*torch.eye(C.shape[0])*torch.diagonal(C).mean()
        return mu, torch.linalg.inv(C)
    raw = per_species(gfit, gauss_score, data["train"], data)
elif SC.startswith("knn"):
    kk = int(SC[3:])
    def wfit(X):
        mu = X.mean(0); C = torch.cov((X-mu).T); C = C + 1e-3*torch.eye(C.shape[0])*torch.diagonal(C).mean()
        L = torch.linalg.cholesky(torch.linalg.inv(C))
        return mu, L, (X-mu)@L, kk
    def wscore(st, X):
        mu, L, Z, kk = st
        d = torch.cdist((X-mu)@L, Z)
        return d.topk(kk + 1, largest=False).values[:, -1] ** 2
    raw = per_species(wfit, wscore, data["train"], data)
elif SC.startswith("sknn"):
    kk = int(SC[4:])
    raw = per_species(lambda X: knn_fit(X, kk), knn_score, data["train"], data)

for k in raw: print(k, "mean s", float(raw[k].mean()), "median", float(raw[k].median()))
def metrics(mult, c):
    return {k: UQMetricState().update(predictive(R[k], mult[k] if mult else None, c), R[k]["ref"]).compute() for k in E}
def row(name, mult):
    c = fit_covariance_scale(predictive(R["val"], mult["val"] if mult else None), R["val"]["ref"])
    m = metrics(mult, c)
    u = m["test"]["forces_sharpness"]
    print(f"{name:24s} c={c:8.3g} u/u: {m['ood_mol']['forces_sharpness']/u:5.2f} {m['ood_hot']['forces_sharpness']/u:5.2f} | rho " +
      " ".join(f"{m[k]['forces_spearman']:.3f}" for k in E) + " | auc " + " ".join(f"{m[k]['forces_auroc']:.3f}" for k in E) +
      " | cov " + " ".join(f"{m[k]['forces_coverage_90']:.3f}" for k in E) + " | nll " + " ".join(f"{m[k]['forces_nll']:.3f}" for k in E))
row("head", None)
PW=[int(x) for x in (sys.argv[3] if len(sys.argv)>3 else '1,2,3,4').split(',')]
QS=[float(x) for x in (sys.argv[4] if len(sys.argv)>4 else '0.5,0.9,0.99').split(',')]
REF = sys.argv[5] if len(sys.argv) > 5 else "val"  # set whose q-quantile is s_ref (the shipped fit: val)
for q in QS:
    ref = {}
    for t in R["train"]["types"].unique():
        ref[int(t)] = raw[REF][R[REF]["types"] == t].quantile(q)
    r = {}
    for k in raw:
        r[k] = torch.ones_like(raw[k])
        for t, v in ref.items():
            m = R[k]["types"] == t
            r[k][m] = raw[k][m] / v
    print(f"q={q}: frac r>1 " + " ".join(f"{k} {float((r[k]>1).double().mean()):.3f}" for k in r) + "  mean r " + " ".join(f"{float(r[k].mean()):.2f}" for k in r))
    for p in PW:
        row(f"q{q} max(1,r)^{p}", {k: r[k].clamp(min=1.0) ** (-p) for k in r})
        row(f"q{q} r^{p}", {k: r[k] ** (-p) for k in r})
