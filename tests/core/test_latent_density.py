"""Per-species Gaussian mixture of latent features (e2ip_plugins.latent_density): EM, BIC, the score s."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from e2ip_plugins.latent_density import SpeciesMixture, bic, fit_mixture
from e2ip_plugins.novelty import NoveltyEvidence, fit_novelty


def _clusters(n, d, centers, seed):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d))
    cov = a @ a.T / d + 0.2 * np.eye(d)
    return torch.tensor(np.concatenate([g.multivariate_normal(c, cov, size=n) for c in centers]))


def test_one_component_is_the_shipped_mahalanobis_score():
    d = 4
    x = _clusters(600, d, [np.zeros(d)], 0)
    xv = _clusters(200, d, [np.ones(d)], 1)
    sp, spv = torch.zeros(len(x), dtype=torch.long), torch.zeros(len(xv), dtype=torch.long)
    shipped = NoveltyEvidence(d, 1, jitter=0.0).double()
    fit_novelty(shipped, [(x, sp)], [(xv, spv)])
    mix = SpeciesMixture(1, ks=(1,), jitter=0.0).fit(x, sp)
    # the same Gaussian: the mixture's ML covariance divides by n, the shipped one by n − 1
    np.testing.assert_allclose(mix.score(xv, spv).numpy(), shipped.score(xv, spv).numpy() * len(x) / (len(x) - 1),
                               rtol=1e-8)


def test_log_density_and_score_against_scipy():
    d = 3
    x = _clusters(300, d, [np.zeros(d), 6 * np.ones(d)], 2)
    sp = torch.zeros(len(x), dtype=torch.long)
    mix = SpeciesMixture(1, ks=(2,), jitter=0.0).fit(x, sp)
    f = mix.components[0]
    covs = [(lk @ lk.T).numpy() for lk in f["chol"]]
    xt = _clusters(50, d, [3 * np.ones(d)], 3)
    dens = sum(float(w) * multivariate_normal(m.numpy(), c).pdf(xt.numpy())
               for w, m, c in zip(f["weights"], f["means"], covs))
    np.testing.assert_allclose(mix.log_density(xt, 0).numpy(), np.log(dens), rtol=1e-9)
    peak = max(np.log(float(w)) + multivariate_normal(m.numpy(), c).logpdf(m.numpy())
               for w, m, c in zip(f["weights"], f["means"], covs))
    np.testing.assert_allclose(mix.score(xt, torch.zeros(50, dtype=torch.long)).numpy(),
                               np.maximum(0.0, -2 * np.log(dens) + 2 * peak), rtol=1e-9)


def test_bic_picks_the_number_of_clusters_and_em_is_monotone():
    d = 2
    one = _clusters(400, d, [np.zeros(d)], 4)
    two = _clusters(400, d, [np.zeros(d), 8 * np.ones(d)], 5)
    x = torch.cat([one, two])
    sp = torch.cat([torch.zeros(len(one)), torch.ones(len(two))]).long()
    mix = SpeciesMixture(2, ks=(1, 2, 4), jitter=0.0).fit(x, sp)
    assert mix.chosen == {0: 1, 1: 2}
    h = np.array(fit_mixture(two, 4, seed=0, jitter=0.0)["history"])
    assert np.all(np.diff(h) >= -1e-8 * abs(h[-1]))
    assert bic(-100.0, 2, 3, 50) == pytest.approx(200.0 + (1 + 6 + 12) * np.log(50))


def test_scores_grow_away_from_the_training_clusters_and_absent_species_score_zero():
    d = 3
    x = _clusters(500, d, [np.zeros(d), 6 * np.ones(d)], 6)
    mix = SpeciesMixture(3, ks=(1, 2)).fit(x, torch.zeros(len(x), dtype=torch.long))
    near = torch.zeros(1, d, dtype=torch.float32)
    far = torch.full((1, d), 30.0, dtype=torch.float32)
    s = mix.score(torch.cat([near, far, far]), torch.tensor([0, 0, 2]))
    assert s.dtype == torch.float32 and s[1] > 50 * max(float(s[0]), 1.0) and s[2] == 0.0


def test_nan_features_are_named():
    x = torch.randn(50, 3, dtype=torch.float64)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SpeciesMixture(1).fit(x, torch.zeros(50, dtype=torch.long))
