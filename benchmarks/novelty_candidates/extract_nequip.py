"""Issue-6 candidates, step 1a: NequIP head-input invariants, head outputs, force errors (usage: README.md)."""
import sys, math, time, torch, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks.novelty_probe import run_model, per_species, gauss_fit, gauss_score, predictive
from e2ip_plugins.metrics import UQMetricState
from e2ip_plugins.calibration import fit_covariance_scale
torch.set_default_dtype(torch.float64)
D = sys.argv[2].rstrip("/") + "/"
SETS = ["train", "val", "test", "ood_mol", "ood_hot"]
R = run_model(sys.argv[1], {k: D + k + ".xyz" for k in SETS}, 4.0, ["C", "H", "O"])
torch.save(R, sys.argv[3])
