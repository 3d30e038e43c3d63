"""Issue-6 candidate comparison (docs/novelty.md), step 1a: NequIP head-input invariants, head outputs, force errors.

    python benchmarks/novelty_candidates/extract_nequip.py bench_out/nequip/runs/e2ip_s0/best.ckpt bench_out/data feats_nequip.pt
    python benchmarks/novelty_candidates/extract_mace.py bench_out/mace/runs/e2ip_s0/e2ip_s0.model bench_out/data feats_mace.pt
    python benchmarks/novelty_candidates/compare.py feats_mace.pt gauss 1,2,3,4     # or knn1, knn5, sknn5, g0.01
Scores are fitted on the training atoms; the reference quantile and the recalibration scale on val.
"""
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
