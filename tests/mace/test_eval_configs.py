"""mace_eval_configs_e2ip writes the covariances and UQ metrics."""

import json

import ase.io
import numpy as np
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
