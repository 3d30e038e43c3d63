"""Stored calibration [c, β] (e2ip_plugins.level): NLL consistency, recovery of known constants, buffer write."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip_plugins import StudentTPredictive
from e2ip_plugins.head_covariance import niw_covariances
from e2ip_plugins.level import _nll, fit_level, fit_stored_level, scale_sigma0
from e2ip_plugins.novelty import NoveltyEvidence


def _random_spd(n, g):
    a = g.normal(size=(n, 3, 3))
    return np.einsum("nij,nkj->nik", a, a) / 3 + 0.2 * np.eye(3)


def _synthetic(n, c_true, beta_true, seed):
    """Atoms whose errors follow the Student-t of the linear map with known (c, β)."""
    g = np.random.default_rng(seed)
    nu = 5.0 + g.uniform(0, 5, n)
    kappa = g.uniform(0.3, 3.0, n)
    sigma0 = _random_spd(n, g) * 0.01
    ratio = g.exponential(1.0, n) * (g.uniform(size=n) < 0.8)
    k_eff = kappa / (1 + beta_true * kappa * ratio)
    df = nu - 2
    lam = (c_true * nu * (1 + k_eff) / (k_eff * df))[:, None, None] * sigma0
    res = np.stack([stats.multivariate_t(np.zeros(3), lam[i], df=df[i]).rvs(random_state=g) for i in range(n)])
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    sig = t(sigma0)
    return t(nu), t(kappa), sig, torch.linalg.inv(sig), torch.logdet(sig), t(res), t(ratio)


def test_level_nll_is_the_student_t_nll():
    nu, kappa, sigma0, sigma0_inv, logdet, res, ratio = _synthetic(50, 1.0, 0.0, 0)
    beta, c = 0.7, 1.9
    k_eff = kappa / (1 + beta * kappa * ratio)
    pred = StudentTPredictive(mean=torch.zeros_like(res), nu=nu, kappa=k_eff, sigma0=sigma0, sigma0_inv=sigma0_inv,
                              sigma0_logdet=logdet).scaled(c)
    quad0 = torch.einsum("ni,nij,nj->n", res, sigma0_inv, res).numpy()
    assert _nll(nu.numpy(), k_eff.numpy(), quad0, logdet.numpy(), math.log(c)) == pytest.approx(
        float(pred.nll(res).mean()), rel=1e-12)


def test_fit_level_recovers_known_constants():
    nu, kappa, _, sigma0_inv, logdet, res, ratio = _synthetic(4000, 2.0, 0.8, 1)
    c, beta, info = fit_level(nu, kappa, sigma0_inv, logdet, res, ratio)
    assert c == pytest.approx(2.0, rel=0.08)
    assert beta == pytest.approx(0.8, rel=0.25)
    assert info["nll"] < info["nll_head"]
    # no novelty signal in the data: β stays near 0 and c is found alone
    nu, kappa, _, sigma0_inv, logdet, res, ratio = _synthetic(3000, 0.5, 0.0, 2)
    c0, beta0, _ = fit_level(nu, kappa, sigma0_inv, logdet, res, ratio)
    assert c0 == pytest.approx(0.5, rel=0.08)
    assert float((beta0 * ratio).mean()) < 0.1 * float((1 / kappa).mean())


def test_fit_stored_level_resets_then_writes_the_buffer_and_scales_all_covariances():
    nu, kappa, sigma0, sigma0_inv, logdet, res, ratio = _synthetic(600, 1.5, 0.5, 3)
    mod = NoveltyEvidence(2, 1).double()
    mod.novelty_calib.copy_(torch.tensor([9.0, 9.0]))
    seen = []

    def batches():
        for i in range(0, 600, 200):
            seen.append(mod.novelty_calib.tolist())  # the model runs at identity calibration during the fit
            yield {"nu": nu[i:i + 200], "kappa": kappa[i:i + 200], "sigma0_inv": sigma0_inv[i:i + 200],
                   "sigma0_logdet": logdet[i:i + 200], "residual": res[i:i + 200], "ratio": ratio[i:i + 200]}

    out = fit_stored_level(mod, batches())
    assert seen == [[1.0, 0.0]] * 3
    c, beta = mod.novelty_calib.tolist()
    assert (c, beta) == (pytest.approx(out["c"]), pytest.approx(out["beta"]))
    assert (c, beta) == tuple(pytest.approx(v) for v in fit_level(nu, kappa, sigma0_inv, logdet, res, ratio)[:2])
    # Σ₀ → cΣ₀ multiplies U_tot, U_epi, U_ale by c
    s, s_inv, ld = scale_sigma0(sigma0, sigma0_inv, logdet, torch.tensor(c, dtype=torch.float64))
    for a, b in zip(niw_covariances(nu, kappa, s), niw_covariances(nu, kappa, sigma0)):
        torch.testing.assert_close(a, c * b)
    torch.testing.assert_close(s @ s_inv, torch.eye(3, dtype=torch.float64).expand(600, 3, 3))
    torch.testing.assert_close(ld, torch.logdet(s))
    with pytest.raises(ValueError, match="validation atoms"):
        fit_stored_level(mod, iter([]))


def test_nll_of_logc_equals_the_full_student_t_nll():
    """The fit's inner objective (c-independent terms hoisted, issue 16) is the Student-t NLL of _nll."""
    import numpy as np

    from e2ip_plugins.level import _nll, _nll_of_logc

    rng = np.random.default_rng(3)
    n = 500
    nu, ke, quad0, logdet0 = 4.5 + rng.gamma(2, 2, n), rng.gamma(1, 1, n) + 1e-3, rng.gamma(1, 3, n), rng.normal(0, 1, n)
    f = _nll_of_logc(nu, ke, quad0, logdet0)
    for logc in (-6.0, -0.7, 0.0, 1.3, 9.0):
        assert abs(f(logc) - _nll(nu, ke, quad0, logdet0, logc)) < 1e-10


def test_frontier_scale_at_which_an_atom_is_covered_matches_the_metric_coverage():
    """benchmarks.probes.level_frontier sets c from per-atom 'covered from this scale on' values; at that c the
    cov90 of UQMetricState (PIT of the scaled Student-t) must equal the targeted fraction."""
    from benchmarks.probes.level_frontier import covered_scale, predictive
    from e2ip_plugins.metrics import UQMetricState

    nu, kappa, sigma0, sigma0_inv, logdet, res, ratio = _synthetic(400, 0.8, 2.0, 3)
    cs = {"nu": nu, "kappa": kappa, "sigma0": sigma0, "sigma0_inv": sigma0_inv, "sigma0_logdet": logdet,
          "residual": res, "ratio": ratio}
    for beta, a, gamma in ((0.0, 1.0, 0.0), (5.0, 3.0, 0.5)):
        scales = covered_scale(cs, beta, a, gamma)
        for target in (0.5, 0.9):
            c = float(np.quantile(scales, target, method="inverted_cdf")) * (1 + 1e-9)  # the boundary atom inside
            m = UQMetricState().update(predictive(cs, c, beta, a, gamma), res).compute()
            assert m["forces_coverage_90"] == pytest.approx(np.mean(scales <= c), abs=1e-12)
            assert m["forces_coverage_90"] == pytest.approx(target, abs=1.0 / 400)


def test_tail_shape_picks_the_shift_that_matches_gaussian_residuals():
    """benchmarks.common.tail_shape: residuals drawn from N(0, Σ₀·s) under a predictive with ν = 5 (t₃ tails):
    the validation-NLL refit chooses a large ν shift, and there the 90 % coverage of a fresh draw is 0.90 ± 0.02,
    where the unshifted, NLL-scaled predictive over-covers."""
    from benchmarks.common.tail_shape import nu_shift_table

    n = 2000

    def draw(seed):
        g = np.random.default_rng(seed)
        sig = torch.tensor(_random_spd(n, g), dtype=torch.float64)
        z = torch.tensor(g.normal(size=(n, 3)), dtype=torch.float64)
        y = torch.einsum("nij,nj->ni", torch.linalg.cholesky(sig), z)
        nu, kappa = torch.full((n,), 5.0, dtype=torch.float64), torch.full((n,), 0.5, dtype=torch.float64)
        pred = StudentTPredictive(mean=torch.zeros(n, 3, dtype=torch.float64), nu=nu, kappa=kappa, sigma0=sig,
                                  sigma0_inv=torch.linalg.inv(sig), sigma0_logdet=torch.logdet(sig))
        return y, pred.mean, pred

    t = nu_shift_table({"val": draw(1), "test": draw(2)}, shifts=(0.0, 4.0, 50.0))
    assert t["best"] == 50.0
    rows = {r["shift"]: r for r in t["rows"]}
    assert rows[0.0]["sets"]["test"]["cov90"] > 0.93
    assert abs(rows[50.0]["sets"]["test"]["cov90"] - 0.90) < 0.02
    assert rows[50.0]["val_nll"] < rows[0.0]["val_nll"]
