"""``e2ip-md`` in-process with a toy adapter added to the ``e2ip.calculators`` registry (suffix ``.toy``):
writes, stops at trust_hi, bad input writes nothing (issue 13)."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest

from e2ip_plugins.md import cli

from .md_toy import toy_calc, toy_molecule, toy_registry  # noqa: F401  (toy_registry: a fixture)


def _files(tmp_path, **toy):
    model = tmp_path / "m.toy"
    model.write_text(json.dumps(toy))
    start = tmp_path / "start.xyz"
    ase.io.write(start, toy_molecule())
    return str(model), str(start)


def _argv(model, start, out, *extra):
    return ["--model", model, "--structure", start, "--temperature", "900", "--steps", "40", "--timestep", "1",
            "--interval", "5", "--trust-lo", "0.05", "--seed", "1", "--out", str(out), "--no-progress", *extra]


def test_cli_runs_and_writes(tmp_path, toy_registry):
    model, start = _files(tmp_path)
    out = tmp_path / "run"
    assert cli.main(_argv(model, start, out, "--udd", "0.5", "0.1")) == 0
    frames = ase.io.read(out / "trajectory.extxyz", ":")
    assert [int(f.info["md_step"]) for f in frames] == list(range(0, 41, 5))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["completed"] and summary["steps"] == 40
    assert summary["udd"] == {"A": 0.5, "B": 0.1, "damping": None} and summary["trust_hi"] is None
    assert sum(summary["counts"].values()) == len(frames)
    n_cand = summary["counts"]["candidate"]
    assert n_cand > 0
    assert len(ase.io.read(out / "candidates.extxyz", ":")) == n_cand
    calc = toy_calc()
    for f in frames:  # the trajectory holds the model's forces, the bias separately
        a = f.copy()
        a.calc = calc
        np.testing.assert_allclose(f.get_forces(), a.get_forces(), atol=1e-5)
        assert f.arrays["udd_bias_forces"].shape == (6, 3) and f.info["udd_bias_energy"] <= 0


def test_cli_stop_at_trust_hi_exits_zero(tmp_path, toy_registry):
    model, start = _files(tmp_path)
    out = tmp_path / "run"
    assert cli.main(_argv(model, start, out, "--trust-hi", "0.06", "--steps", "400")) == 0
    summary = json.loads((out / "summary.json").read_text())
    frames = ase.io.read(out / "trajectory.extxyz", ":")
    assert summary["status"] == "stopped" and summary["stop_step"] == int(frames[-1].info["md_step"]) < 400
    assert frames[-1].arrays["forces_uncertainty"].max() >= 0.06
    assert all(f.arrays["forces_uncertainty"].max() < 0.06 for f in frames[:-1])


@pytest.mark.parametrize("extra,match", [
    (("--trust-lo", "0.5", "--trust-hi", "0.5"), "trust_lo"),
    (("--udd", "-1", "0.1"), "A"),
    (("--udd", "1", "0"), "B"),
    (("--udd-damping", "1", "1"), "--udd"),
    (("--interval", "0"), "interval"),
])
def test_cli_bad_input_writes_nothing(tmp_path, toy_registry, capsys, extra, match):
    model, start = _files(tmp_path)
    out = tmp_path / "run"
    assert cli.main(_argv(model, start, out, *extra)) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_cli_unknown_model_type_and_missing_covariance(tmp_path, toy_registry, capsys):
    model, start = _files(tmp_path, covariance=False)
    out = tmp_path / "run"
    weird = tmp_path / "model.xyz"
    weird.write_text("x")
    assert cli.main(_argv(str(weird), start, out)) == 2
    err = capsys.readouterr().err
    assert "unknown model file type" in err and ".toy" in err
    assert not out.exists()
    assert cli.main(_argv(model, start, out)) == 2  # a model without the covariance outputs
    assert "forces_uncertainty" in capsys.readouterr().err
    assert not out.exists()

