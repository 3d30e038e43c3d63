"""Plot data against direct computations, and the PNG files."""

import numpy as np
from sklearn.metrics import auc, roc_curve

from e2ip_plugins.plots import reliability_curve, roc_points, write_uq_plots


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=400), 1)  # with ties
    labels = rng.uniform(size=400) < 0.2
    fpr, tpr = roc_points(scores, labels)
    f_ref, t_ref, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f_ref)
    np.testing.assert_allclose(tpr, t_ref)
    assert auc(fpr, tpr) > 0  # a proper curve from (0,0) to (1,1)
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0


def test_reliability_curve_is_ecdf():
    pit = np.array([0.1, 0.4, 0.4, 0.9])
    p, f = reliability_curve(pit, n=11)
    assert f[0] == 0 and f[-1] == 1
    assert f[1] == 0.25 and f[4] == 0.75 and f[9] == 1.0


def test_pngs_written(tmp_path):
    rng = np.random.default_rng(1)
    u = rng.lognormal(size=500)
    cols = {"u": u, "e": u * rng.lognormal(size=500), "pit": rng.uniform(size=500)}
    paths = write_uq_plots(cols, tmp_path, prefix="test0_")
    assert set(paths) == {"reliability", "error_vs_uncertainty", "roc"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
