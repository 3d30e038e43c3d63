"""The real ``mace_run_train_e2ip`` console script (subprocess) on the shipped data.

One tiny training per head (module-scoped fixture) is checked for: the head trained,
UQ metrics in MACE's results file, the final error tables with UQ columns, and the
TorchScript ``_compiled.model`` reproducing the eager ``.model``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from .helpers import DATA, REPO

SCRIPT = Path(sys.executable).parent / "mace_run_train_e2ip"


def _subset(tmp_path, name, n):
    path = tmp_path / f"{name}.xyz"
    ase.io.write(path, ase.io.read(DATA / f"iso7_{name}.xyz", index=f":{n}"), format="extxyz")
    return str(path)


def _train(tmp_path, *extra, config="configs/mace/e2ip.yaml", epochs=1):
    work = tmp_path / "work"
    cmd = [
        str(SCRIPT), "--config", config,
        "--train_file", _subset(tmp_path, "train", 16), "--valid_file", _subset(tmp_path, "val", 8),
        "--test_file", _subset(tmp_path, "test", 4), "--work_dir", str(work),
        "--max_num_epochs", str(epochs), "--batch_size", "8", "--valid_batch_size", "8", *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return proc, work


def _results(work, pattern="*_train.txt"):
    rows = []
    for f in (work / "results").glob(pattern):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


@pytest.fixture(scope="module", params=[("configs/mace/e2ip.yaml", "e2ip"), ("configs/mace/eip.yaml", "eip")],
                ids=["e2ip", "eip"])
def trained(request, tmp_path_factory):
    """(proc, work dir, head) of one tiny 1-epoch run with train/valid/test files."""
    config, head = request.param
    tmp_path = tmp_path_factory.mktemp(f"run_{head}")
    proc, work = _train(tmp_path, config=config, epochs=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc, work, head


def test_cli_trains_and_saves(trained):
    proc, work, head = trained
    log = proc.stdout + proc.stderr
    assert "optimizer group 'e2ip_head'" in log
    models = list(work.glob("*.model"))
    assert models, log[-3000:]
    model = torch.load([m for m in models if "compiled" not in m.name][0], weights_only=False)
    assert model.e2ip_head_type == head
    # the head's last layer starts at exactly zero; training must have moved it
    last = model.e2ip_head.mlp.net[-1].weight
    assert last.abs().max() > 0
    # UQ metrics reached MACE's results file next to its own errors
    evals = [r for r in _results(work) if r.get("mode") == "eval"]
    assert evals and "rmse_f" in evals[-1] and np.isfinite(evals[-1]["forces_nll"])
    assert "forces_spearman" in evals[-1] and "forces_coverage_90" in evals[-1]
    # MACE's initial evaluation (epoch None) is the untrained model: training lowered the force NLL
    assert evals[0]["epoch"] is None and len(evals) >= 2
    assert evals[-1]["forces_nll"] < evals[0]["forces_nll"], [(r["epoch"], r["forces_nll"]) for r in evals]


UQ_COLUMNS = ("forces_nll", "forces_spearman", "forces_auroc", "forces_miscal_area", "forces_coverage_90",
              "forces_sharpness / meV / A")


def _log_tables(log):
    """{title: (header cells, [row cells])} of the PrettyTables MACE logs after 'Error-table on ...'."""
    tables, lines = {}, log.splitlines()
    for i, line in enumerate(lines):
        if "Error-table on" not in line:
            continue
        block = []
        for row in lines[i + 1:]:
            if not row.startswith(("+", "|")):
                break
            if row.startswith("|"):
                block.append([c.strip() for c in row.strip().strip("|").split("|")])
        tables[line.split("Error-table on ")[1].rstrip(":")] = (block[0], block[1:])
    return tables


def test_final_tables_report_uq(trained):
    """MACE's end-of-training TRAIN/VALID and TEST tables carry the DESIGN §4 UQ columns, finite."""
    proc, work, _ = trained
    tables = _log_tables(proc.stdout + proc.stderr)
    assert set(tables) == {"TRAIN and VALID", "TEST"}, list(tables)
    expected_rows = {"TRAIN and VALID": {"train_Default", "valid_Default"}, "TEST": None}
    for title, (header, rows) in tables.items():
        assert header[:3] == ["config_type", "RMSE E / meV / atom", "RMSE F / meV / A"]  # MACE's columns stay
        for col in UQ_COLUMNS:
            assert col in header, (title, header)
        assert rows and (expected_rows[title] is None or {r[0] for r in rows} == expected_rows[title])
        for row in rows:
            values = {h: float(v) for h, v in zip(header[1:], row[1:])}
            assert all(np.isfinite(values[c]) for c in UQ_COLUMNS), (title, row)
            assert 0.0 <= values["forces_coverage_90"] <= 1.0 and values["forces_sharpness / meV / A"] > 0
    # the same numbers, full precision, in results/<tag>_e2ip_final.txt
    final = {r["set"]: r for r in _results(work, "*_e2ip_final.txt")}
    assert set(final) >= {"train_Default", "valid_Default"} and len(final) == 3
    header, rows = tables["TRAIN and VALID"]
    valid = dict(zip(header, [r for r in rows if r[0] == "valid_Default"][0]))
    assert float(valid["forces_nll"]) == pytest.approx(final["valid_Default"]["forces_nll"], abs=1e-4)
    assert float(valid["RMSE F / meV / A"]) == pytest.approx(1e3 * final["valid_Default"]["rmse_f"], abs=0.1)
    assert final["valid_Default"]["stage"] == 1 and final["valid_Default"]["mode"] == "final"


def test_compiled_model_matches_eager(trained, f64):
    """MACE's run wrote <name>_compiled.model (TorchScript); it reproduces the eager .model, covariances included."""
    from mace import data
    from mace.tools import torch_geometric, utils
    from mace_ext.model import COVARIANCE_KEYS, EVIDENCE_KEYS

    from .helpers import first_molecule

    proc, work, head = trained
    compiled_path = work / "iso7_e2ip_compiled.model" if head == "e2ip" else work / "iso7_eip_compiled.model"
    assert compiled_path.exists(), sorted(p.name for p in work.iterdir())
    assert "TorchScript model with the covariance outputs" in proc.stdout + proc.stderr
    eager = torch.load(str(compiled_path).replace("_compiled", ""), weights_only=False)
    compiled = torch.jit.load(str(compiled_path))
    assert isinstance(compiled, torch.jit.ScriptModule)

    z_table = utils.AtomicNumberTable([int(z) for z in eager.atomic_numbers])
    r_max = float(eager.r_max)

    def batch():
        cfg = data.config_from_atoms(first_molecule())
        ad = data.AtomicData.from_config(cfg, z_table=z_table, cutoff=r_max)
        return torch_geometric.Batch.from_data_list([ad]).to_dict()

    ref = eager(batch(), training=False)
    out = compiled(batch(), training=False)
    keys = ("energy", "forces") + COVARIANCE_KEYS + tuple(EVIDENCE_KEYS[head])
    for key in keys:
        assert out[key] is not None, key
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12, msg=key)
    assert out["forces_covariance"].shape == (19, 3, 3)
    # loadable without the plugin (a LAMMPS/C++ or plain-torch user has no mace_ext)
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
            "assert 'mace_ext' not in sys.modules and 'mace' not in sys.modules; print(m.original_name)")
    res = subprocess.run([sys.executable, "-c", code, str(compiled_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "E2IPScaleShiftMACE" in res.stdout, res.stderr[-2000:]


def test_novelty_fitted_and_raises_u_on_stretched_bond(trained, f64):
    """The run fitted the novelty buffers before saving: the .model and the TorchScript _compiled.model carry
    them (identical outputs), and an H pulled to 2.2 Å from its carbon gets s/s_ref > 1 and a larger U_epi
    than every atom of the unstretched molecule."""
    from mace import data
    from mace.tools import torch_geometric, utils

    from e2ip_plugins.demo_data import stretched_bond

    from .helpers import first_molecule

    proc, work, head = trained
    name = "iso7_e2ip" if head == "e2ip" else "iso7_eip"
    eager = torch.load(str(work / f"{name}.model"), weights_only=False)
    if head == "eip":
        assert not eager.e2ip_novelty_enabled and not eager.e2ip_novelty.is_fitted
        return
    assert "e2ip: novelty fitted on" in proc.stdout + proc.stderr
    assert torch.all(eager.e2ip_novelty.novelty_ref > 0), eager.e2ip_novelty.novelty_ref
    compiled = torch.jit.load(str(work / f"{name}_compiled.model"))
    z_table = utils.AtomicNumberTable([int(z) for z in eager.atomic_numbers])

    def run(model, atoms):
        ad = data.AtomicData.from_config(data.config_from_atoms(atoms), z_table=z_table, cutoff=float(eager.r_max))
        return model(torch_geometric.Batch.from_data_list([ad]).to_dict(), training=False)

    mol = first_molecule()
    far = stretched_bond(mol, 2.2)
    h = far.info["stretched_atom"]
    ref, out = run(eager, far), run(compiled, far)
    for key in ("e2ip_novelty", "e2ip_kappa", "forces_covariance_epistemic", "forces_uncertainty"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12, msg=key)
    u0 = run(eager, mol)["forces_uncertainty"]
    assert float(ref["e2ip_novelty"][h]) > 1.0
    assert float(ref["forces_uncertainty"][h]) > 2.0 * float(u0.max())


def test_cli_stage_two_restart_and_wandb_offline(tmp_path):
    """Stage two keeps the evidential loss; --restart_latest resumes; UQ metrics reach W&B (offline)."""
    wandb = pytest.importorskip("wandb")
    extra = ["--swa", "--start_swa", "1", "--wandb", "--wandb_project", "e2ip-test", "--wandb_dir", str(tmp_path)]
    proc, work = _train(tmp_path, *extra, epochs=2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "e2ip: stage-two loss: E2IPLoss" in log
    assert list(work.glob("*_stagetwo.model"))
    assert (work / "iso7_e2ip_stagetwo_compiled.model").exists()  # TorchScript export of the stage-two model
    # the head is still trained at stage two: its weights moved between the stage-one and stage-two models
    stage1 = torch.load(work / "iso7_e2ip.model", weights_only=False).e2ip_head.state_dict()
    stage2 = torch.load(work / "iso7_e2ip_stagetwo.model", weights_only=False).e2ip_head.state_dict()
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1 if stage1[k].is_floating_point())
    # final tables of both stages, UQ included
    stages = {(r["stage"], r["set"]) for r in _results(work, "*_e2ip_final.txt")}
    assert {(1, "valid_Default"), (2, "valid_Default")} <= stages
    # W&B offline run files hold the UQ metrics next to MACE's valid_rmse_f (per epoch and final)
    history = list(tmp_path.rglob("offline-run-*/files/wandb-summary.json")) + list(tmp_path.rglob("offline-run-*/*.wandb"))
    assert history, "no offline W&B run written"
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("offline-run-*/*.wandb"))
    assert b"valid_forces_nll" in blob and b"valid_rmse_f" in blob
    assert b"valid_Default_final_forces_nll" in blob and b"valid_Default_final_rmse_f" in blob

    proc2, _ = _train(tmp_path, "--restart_latest", epochs=3)
    log2 = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, log2[-4000:]
    assert "Loading checkpoint" in log2 and "Epoch 2:" in log2 and "Epoch 0:" not in log2


def test_stored_calibration_fitted_on_validation_and_applied(trained, f64, tmp_path):
    """The run stored [c, β] fitted on the validation file: refitting the saved model with
    ``mace_fit_novelty_e2ip`` on the same train / valid files alone (no test data) reproduces it, and the
    eager model, its ``_compiled.model`` and ``E2IPMACECalculator`` report c × the covariances of the same
    model at c = 1, with the per-structure max / mean of u."""
    import copy

    from mace_ext import E2IPMACECalculator

    from .helpers import first_molecule

    proc, work, head = trained
    if head != "e2ip":
        return
    model_path = work / "iso7_e2ip.model"
    eager = torch.load(str(model_path), weights_only=False)
    c, beta = eager.e2ip_novelty.novelty_calib.tolist()
    assert c > 0 and c != 1.0 and beta >= 0.0
    assert "e2ip: stored calibration fitted on" in proc.stdout + proc.stderr
    # the constants come from the train / valid files only
    refit = tmp_path / "refit.model"
    run_dir = work.parent
    cmd = [str(Path(sys.executable).parent / "mace_fit_novelty_e2ip"), "--model", str(model_path),
           "--train_file", str(run_dir / "train.xyz"), "--valid_file", str(run_dir / "val.xyz"),
           "--output", str(refit), "--forces_key", "REF_forces"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    again = torch.load(str(refit), weights_only=False).e2ip_novelty
    np.testing.assert_allclose(again.novelty_ref.numpy(), eager.e2ip_novelty.novelty_ref.numpy(), rtol=1e-4)
    np.testing.assert_allclose(again.novelty_calib.numpy(), [c, beta], rtol=1e-3, atol=1e-8)
    # every output path applies the stored c
    raw_model = copy.deepcopy(eager)
    raw_model.e2ip_novelty.novelty_calib.copy_(torch.tensor([1.0, beta]))
    mol = first_molecule()

    def results(models):
        calc = E2IPMACECalculator(models=models, device="cpu", default_dtype="float64")
        atoms = mol.copy()
        atoms.calc = calc
        atoms.get_forces()
        return dict(calc.results), calc

    raw, _ = results([raw_model])
    for name, models in (("eager", [eager]), ("compiled", [torch.jit.load(str(work / "iso7_e2ip_compiled.model"))])):
        got, calc = results(models)
        for k in ("forces_covariance", "forces_covariance_epistemic", "forces_covariance_aleatoric"):
            np.testing.assert_allclose(got[k], c * raw[k], rtol=1e-8, atol=1e-14, err_msg=(name, k))
        np.testing.assert_allclose(got["forces_uncertainty"], np.sqrt(c) * raw["forces_uncertainty"], rtol=1e-8)
        u = got["forces_uncertainty"]
        assert got["forces_uncertainty_max"] == pytest.approx(u.max()) and got["forces_uncertainty_mean"] == pytest.approx(u.mean())
        assert {"forces_uncertainty_max", "forces_uncertainty_mean"} <= set(calc.implemented_properties)


def test_energy_length_fitted_on_validation_and_in_compiled(trained, f64):
    """(issue 15) the run stored ℓ fitted on the 8 validation structures (after the force level); the eager
    .model and its _compiled.model report the same energy_uncertainty = ℓ·sqrt(Σ tr U_tot/3)."""
    from mace_ext import E2IPMACECalculator

    from .helpers import first_molecule

    proc, work, head = trained
    name = "iso7_e2ip" if head == "e2ip" else "iso7_eip"
    eager = torch.load(str(work / f"{name}.model"), weights_only=False)
    ell, n_fit = eager.e2ip_energy_uq.energy_noise_length.tolist()
    assert n_fit == 8 and ell > 0 and ell != pytest.approx(0.1)
    assert "e2ip: energy length scale l (A) fitted on 8 validation structures" in proc.stdout + proc.stderr
    values = []
    for models in ([eager], [torch.jit.load(str(work / f"{name}_compiled.model"))]):
        calc = E2IPMACECalculator(models=models, device="cpu", default_dtype="float64")
        atoms = first_molecule()
        atoms.calc = calc
        atoms.get_potential_energy()
        tr = np.trace(calc.results["forces_covariance"], axis1=-2, axis2=-1).sum() / 3.0
        assert calc.results["energy_uncertainty"] == pytest.approx(ell * np.sqrt(tr), rel=1e-6)
        values.append(calc.results["energy_uncertainty"])
    assert values[1] == pytest.approx(values[0], rel=1e-8)
