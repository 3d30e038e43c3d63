"""mace_eval_configs_e2ip writes the covariances and UQ metrics."""

import json

import ase.io
import numpy as np
import pytest
import torch

from mace_ext import attach_e2ip_head
from mace_ext.eval_configs import main

from .helpers import DATA, tiny_mace


def test_eval_configs(f64, tmp_path):
    torch.manual_seed(0)
    model_path = tmp_path / "m.model"
    torch.save(attach_e2ip_head(tiny_mace(1), num_channels=4, mlp_hidden=8), model_path)
    configs = tmp_path / "in.xyz"
    ase.io.write(configs, ase.io.read(DATA / "iso7_val.xyz", index=":3"), format="extxyz")
    out, metrics = tmp_path / "out.xyz", tmp_path / "metrics.json"
    main(["--configs", str(configs), "--model", str(model_path), "--output", str(out), "--device", "cpu",
          "--default_dtype", "float64", "--ref_forces_key", "REF_forces", "--metrics_json", str(metrics)])
    images = ase.io.read(out, index=":")
    assert len(images) == 3
    cov = images[0].arrays["MACE_forces_covariance"].reshape(-1, 3, 3)
    assert cov.shape == (19, 3, 3) and (np.linalg.eigvalsh(cov) > 0).all()
    assert images[0].arrays["MACE_forces_uncertainty"].shape == (19,)
    assert "MACE_forces_uncertainty_max" in images[0].info
    m = json.loads(metrics.read_text())
    assert np.isfinite(m["forces_nll"]) and "forces_auroc" in m



def _perturbed_model(tmp_path, head):
    torch.manual_seed(1)
    model = attach_e2ip_head(tiny_mace(1), head=head, num_channels=4, mlp_hidden=8, quantile=0.5)
    with torch.no_grad():  # move off the zero-initialised last layer: anisotropic, atom-dependent evidence
        for p in model.e2ip_head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path / f"{head}.model"
    torch.save(model, path)
    return path


def _printed_json(text):
    start = text.index("\n{\n") + 1 if not text.startswith("{") else 0
    return json.loads(text[start:text.index("\n}", start) + 2])


@pytest.mark.parametrize("head", ["e2ip", "eip"])
def test_eval_configs_nll_is_exact_student_t(f64, tmp_path, capsys, head):
    """The printed forces_nll is the exact predictive's, recomputed with scipy from the written output."""
    from scipy import stats

    configs = tmp_path / "in.xyz"
    ase.io.write(configs, ase.io.read(DATA / "iso7_val.xyz", index=":2"), format="extxyz")
    out = tmp_path / "out.xyz"
    capsys.readouterr()
    main(["--configs", str(configs), "--model", str(_perturbed_model(tmp_path, head)), "--output", str(out),
          "--device", "cpu", "--default_dtype", "float64", "--ref_forces_key", "REF_forces"])
    printed = _printed_json(capsys.readouterr().out)
    logp = []
    for atoms in ase.io.read(out, index=":"):
        forces, ref = atoms.arrays["MACE_forces"], atoms.arrays["REF_forces"]
        if head == "e2ip":
            nu, kappa = atoms.arrays["MACE_e2ip_nu"], atoms.arrays["MACE_e2ip_kappa"]
            sigma0 = atoms.arrays["MACE_e2ip_sigma0"].reshape(-1, 3, 3)
            df = nu - 2.0  # nu' = nu - d + 1
            for i in range(len(atoms)):  # Student-t: location = forces, shape nu(1+kappa)/(kappa nu') Sigma0
                shape = nu[i] * (1 + kappa[i]) / (kappa[i] * df[i]) * sigma0[i]
                logp.append(stats.multivariate_t(loc=forces[i], shape=shape, df=df[i]).logpdf(ref[i]))
            # the written total covariance is that Student-t's covariance
            shape_all = (nu * (1 + kappa) / (kappa * df))[:, None, None] * sigma0
            np.testing.assert_allclose(atoms.arrays["MACE_forces_covariance"].reshape(-1, 3, 3),
                                       (df / (df - 2))[:, None, None] * shape_all, rtol=1e-6, atol=1e-7)
        else:  # seed 002 eq. 8: per component t, df 2 alpha, loc gamma + tau z (tau = 0 at q = 0.5),
            # scale^2 = Omega / (2 nu alpha)
            nu, alpha, beta = (atoms.arrays[f"MACE_eip_{k}"] for k in ("nu", "alpha", "beta"))
            z = beta / (alpha - 1)
            omega = 4 * beta * (1 + 8.0 * nu * z)  # omega = 2/(q(1-q)) = 8 at q = 0.5
            scale = np.sqrt(omega / (2 * nu * alpha))
            logp += list(stats.t(df=2 * alpha, loc=forces, scale=scale).logpdf(ref).sum(-1))
    assert printed["predictive"] == ("StudentTPredictive" if head == "e2ip" else "IndependentStudentTPredictive")
    assert len(logp) == 38
    # ASE's extxyz writer keeps 8 decimals; the Gaussian approximation of the same covariance differs by >> 1e-6
    assert printed["forces_nll"] == pytest.approx(-np.mean(logp), rel=1e-6)
