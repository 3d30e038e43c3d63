"""Every UQ metric against a direct numpy/scipy/sklearn computation; merge = one-shot; recalibration."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from e2ip_plugins import (
    GaussianPredictive,
    IndependentStudentTPredictive,
    UQMetricState,
    fit_covariance_scale,
    uq_metrics,
)
from e2ip_plugins.metrics import miscalibration_area

from .helpers import multivariate_t_samples, random_gaussian, random_spd, random_student_t

N = 500


def _direct_metrics(pred, y, df=None):
    """The DESIGN §4 definitions computed naively, one atom at a time."""
    mean, yv = pred.mean.numpy(), y.numpy()
    r = yv - mean
    e = np.linalg.norm(r, axis=1)
    epi, tot = pred.covariance_epistemic.numpy(), pred.covariance.numpy()
    u = np.sqrt(np.trace(epi, axis1=1, axis2=2) / 3)
    sigma = np.sqrt(np.trace(tot, axis1=1, axis2=2) / 3)
    nll, pit = [], []
    for i in range(len(e)):
        if df is None:  # Gaussian
            nll.append(-stats.multivariate_normal.logpdf(yv[i], mean[i], tot[i]))
            pit.append(stats.chi2.cdf(r[i] @ np.linalg.solve(tot[i], r[i]), 3))
        else:
            lam = tot[i] * (df[i] - 2) / df[i]
            nll.append(-stats.multivariate_t.logpdf(yv[i], mean[i], lam, df=df[i]))
            pit.append(stats.f.cdf(r[i] @ np.linalg.solve(lam, r[i]) / 3, 3, df[i]))
    pit = np.array(pit)
    grid = np.linspace(0, 1, 200001)
    ecdf = np.searchsorted(np.sort(pit), grid, side="right") / len(pit)
    order = np.argsort(sigma)
    ence_terms = []
    for idx in np.array_split(order, 10):
        rmv, rmse = np.sqrt(np.mean(sigma[idx] ** 2)), np.sqrt(np.mean(e[idx] ** 2 / 3))
        ence_terms.append(abs(rmv - rmse) / rmv)
    return {
        "forces_mae": np.mean(np.abs(r)),
        "forces_rmse": np.sqrt(np.mean(r**2)),
        "forces_nll": np.mean(nll),
        "forces_spearman": stats.spearmanr(u, e)[0],
        "forces_auroc": roc_auc_score(e > np.percentile(e, 90), u),
        "forces_coverage_50": np.mean(pit <= 0.5),
        "forces_coverage_90": np.mean(pit <= 0.9),
        "forces_miscal_area": np.trapezoid(np.abs(ecdf - grid), grid) if hasattr(np, "trapezoid") else np.trapz(np.abs(ecdf - grid), grid),
        "forces_ence": np.mean(ence_terms),
        "forces_sharpness": np.mean(u),
        "median_u": np.median(u),
        "rmv_rmse": np.sqrt(np.mean(sigma**2)) / np.sqrt(np.mean(r**2)),
        "u_tail": np.percentile(u, 99.9) / np.percentile(e / np.sqrt(3), 99.9),
    }


def _noisy_targets(pred, seed, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(pred.covariance)
    return pred.mean + noise * torch.einsum("nij,nj->ni", chol, torch.randn(pred.mean.shape, dtype=torch.float64, generator=g))


@pytest.mark.parametrize("kind", ["student_t", "gaussian"])
def test_metrics_equal_direct_computation(kind):
    pred = random_student_t(N, seed=3) if kind == "student_t" else random_gaussian(N, seed=3)
    y = _noisy_targets(pred, seed=4, noise=1.3)
    got = uq_metrics(pred, y)
    ref = _direct_metrics(pred, y, df=pred.df.numpy() if kind == "student_t" else None)
    assert set(got) == set(ref)
    for k in ref:
        tol = 2e-5 if k == "forces_miscal_area" else 1e-9
        assert got[k] == pytest.approx(ref[k], rel=tol, abs=tol), k


def test_merged_states_equal_one_shot():
    pred = random_student_t(N, seed=5)
    y = _noisy_targets(pred, seed=6)
    one_shot = uq_metrics(pred, y)
    fields = [f.name for f in dataclasses.fields(pred)]
    chunks = [slice(0, 123), slice(123, 400), slice(400, N)]
    states = []
    for sl in chunks:  # e.g. one state per DDP rank
        part = type(pred)(**{f: getattr(pred, f)[sl] for f in fields})
        states.append(UQMetricState().update(part, y[sl]))
    merged = states[0].merge(states[1]).merge(states[2]).compute()
    for k in one_shot:
        assert merged[k] == pytest.approx(one_shot[k], rel=1e-12, abs=1e-12), k


def test_miscalibration_area_exact():
    assert miscalibration_area(np.array([0.5])) == pytest.approx(0.25)  # ∫|1[p≥.5] − p|
    u = np.random.default_rng(0).uniform(size=200_000)
    assert miscalibration_area(u) < 0.005  # calibrated PIT


def test_vectorised_t_samples_follow_scipys_distribution():
    """The tests' vectorised sampler draws from scipy's multivariate t: a 1-D projection passes a KS test
    against scipy's samples (and fails against a Gaussian's)."""
    rng = np.random.default_rng(5)
    n, df = 4000, 3.5
    lam = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
    ours = multivariate_t_samples(np.ones((n, 3)), np.broadcast_to(lam, (n, 3, 3)), np.full(n, df), rng)
    ref = stats.multivariate_t(np.ones(3), lam, df=df).rvs(size=n, random_state=rng)
    gauss = rng.multivariate_normal(np.ones(3), lam, size=n)
    proj = np.array([0.6, -0.8, 0.0])
    assert stats.ks_2samp(ours @ proj, ref @ proj).pvalue > 0.01
    assert stats.ks_2samp(ref @ proj, gauss @ proj).pvalue < 0.01


def test_calibrated_predictives_cover_correctly():
    """Targets drawn from the predictive itself: coverage ≈ nominal, small miscalibration."""
    pred = random_student_t(20_000, seed=7)
    rng = np.random.default_rng(1)
    lam = (pred.scale_factor[:, None, None] * pred.sigma0).numpy()
    y = multivariate_t_samples(pred.mean.numpy(), lam, pred.df.numpy(), rng)
    m = uq_metrics(pred, torch.as_tensor(y))
    assert abs(m["forces_coverage_90"] - 0.9) < 0.015 and abs(m["forces_coverage_50"] - 0.5) < 0.015
    assert m["forces_miscal_area"] < 0.02


def test_eip_copula_pit_is_calibrated():
    n = 20_000
    g = torch.Generator().manual_seed(2)
    df = 2.5 + 10 * torch.rand(n, 3, dtype=torch.float64, generator=g)
    scale2 = 0.1 + torch.rand(n, 3, dtype=torch.float64, generator=g)
    mean = torch.randn(n, 3, dtype=torch.float64, generator=g)
    pred = IndependentStudentTPredictive(mean=mean, df=df, scale2=scale2, var_epi=0.3 * scale2)
    y = mean + torch.sqrt(scale2) * torch.as_tensor(stats.t.rvs(df.numpy(), random_state=np.random.default_rng(3)))
    m = uq_metrics(pred, y)
    assert abs(m["forces_coverage_90"] - 0.9) < 0.015 and m["forces_miscal_area"] < 0.02


@pytest.mark.parametrize("true_c", [0.2, 2.7])
def test_recalibration_recovers_known_scale(true_c):
    pred = random_gaussian(20_000, seed=8)
    y = _noisy_targets(pred, seed=9, noise=np.sqrt(true_c))
    assert fit_covariance_scale(pred, y) == pytest.approx(true_c, rel=0.04)
    pred_t = random_student_t(20_000, seed=10)
    rng = np.random.default_rng(4)
    lam = (pred_t.scale_factor[:, None, None] * pred_t.sigma0).numpy() * true_c
    yt = multivariate_t_samples(pred_t.mean.numpy(), lam, pred_t.df.numpy(), rng)
    c = fit_covariance_scale(pred_t, torch.as_tensor(yt))
    assert c == pytest.approx(true_c, rel=0.05)
    before, after = uq_metrics(pred_t, torch.as_tensor(yt)), uq_metrics(pred_t.scaled(c), torch.as_tensor(yt))
    assert after["forces_nll"] <= before["forces_nll"]
    assert abs(after["forces_coverage_90"] - 0.9) < 0.02


def test_gaussian_scaled_scales_all_covariances():
    pred = GaussianPredictive(mean=torch.zeros(3, 3, dtype=torch.float64), cov_epistemic=random_spd(3), cov_aleatoric=random_spd(3))
    s = pred.scaled(2.0)
    assert torch.allclose(s.covariance, 2 * pred.covariance)
    assert torch.allclose(s.uncertainty, np.sqrt(2) * pred.uncertainty)


def test_frame_metrics_equal_direct_computation():
    """frame_spearman / frame_auroc: per-structure max u against max error (19-atom frames)."""
    pred = random_student_t(19 * 40, seed=8)
    y = _noisy_targets(pred, seed=9, noise=1.1)
    frame = torch.arange(40).repeat_interleave(19)
    got = UQMetricState().update(pred, y, frame=frame).compute()
    u = pred.uncertainty.numpy().reshape(40, 19).max(1)
    e = torch.linalg.vector_norm(y - pred.mean, dim=1).numpy().reshape(40, 19).max(1)
    assert got["frame_spearman"] == pytest.approx(stats.spearmanr(u, e)[0], rel=1e-12)
    assert got["frame_auroc"] == pytest.approx(roc_auc_score(e > np.percentile(e, 90), u), rel=1e-12)
    assert "frame_spearman" not in uq_metrics(pred, y)  # without frame indices: atom-level metrics only
