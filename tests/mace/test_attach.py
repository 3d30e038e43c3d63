"""``mace_attach_e2ip`` (issue 27): the e²IP head on a trained plain MACE model, backbone frozen; and
``mace_run_train_e2ip --foundation_model <local .model>`` (fine-tuning with the head).

One tiny plain ScaleShiftMACE, trained for a few seconds on forces (module fixture), stands in for the
user's model; one attach run (in-process, ``main(argv)``) is checked for: the same energies and forces,
an untouched backbone, a trained head, SPD covariances that rotate, a TorchScript file that agrees, and
the ASE calculator. Resume and the start-up errors use their own runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from e2ip_plugins.head_fit import replayable_script
from mace_ext import E2IPMACECalculator, attach_e2ip_head
from mace_ext.attach import main
from mace_ext.fit_novelty import _loader

from .helpers import DATA, first_molecule, random_rotation, tiny_mace
from .test_cli import _train

BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Paths of a trained tiny plain ScaleShiftMACE .model (float64) and of 16 train / 8 valid frames."""
    tmp = tmp_path_factory.mktemp("plain")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    paths = {"dir": tmp, "model": tmp / "plain.model", "train": tmp / "train.xyz", "valid": tmp / "val.xyz"}
    ase.io.write(paths["train"], ase.io.read(DATA / "iso7_train.xyz", ":16"), format="extxyz")
    ase.io.write(paths["valid"], ase.io.read(DATA / "iso7_val.xyz", ":8"), format="extxyz")
    torch.manual_seed(0)
    model = tiny_mace(max_L=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):  # a few force-MSE epochs: a plain model that is not random
        for batch in _loader(str(paths["train"]), model, 8):
            data = batch.to_dict()
            loss = ((model(data, training=True)["forces"] - data["forces"]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model, paths["model"])
    torch.set_default_dtype(old)
    return paths


def _argv(plain, out, *extra, epochs=4):
    return ["--model", str(plain["model"]), "--train_file", str(plain["train"]), "--valid_file", str(plain["valid"]),
            "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--max_num_epochs", str(epochs),
            "--batch_size", "4", "--lr", "0.01", "--seed", "123", "--name", "out", "--model_dir", str(out),
            "--e2ip_channels", "4", "--e2ip_mlp", "8", *extra]


def _main(argv):
    old = torch.get_default_dtype()
    try:
        main(argv)
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def attached(plain):
    out = plain["dir"] / "attached"
    _main(_argv(plain, out))
    return out


def _outputs(model, frames_path):
    """Outputs per batch of 8, under the TorchScript settings of the cache (``replayable_script``: the default
    executor's graphs move forces by an ulp with the calls a process has made)."""
    loader = _loader(str(frames_path), model, 8)
    with replayable_script():
        return [model(b.to_dict(), training=False) for b in loader]


def test_energies_forces_and_backbone_unchanged(attached, plain, f64):
    original = torch.load(plain["model"], weights_only=False)
    model = torch.load(attached / "out.model", weights_only=False)
    assert type(model).__name__ == "E2IPScaleShiftMACE"
    for ref, out in zip(_outputs(original, plain["valid"]), _outputs(model, plain["valid"])):
        assert float((out["energy"] - ref["energy"]).abs().max()) == 0.0
        assert float((out["forces"] - ref["forces"]).abs().max()) == 0.0
        assert out["forces_covariance"] is not None
    state = model.state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(state[key], value), key
    # the head trained: the validation NLL of the kept head beats the initial head's
    history = torch.load(attached / "checkpoints" / "out_attach.pt", weights_only=False)["history"]
    assert history[0]["epoch"] == -1 and len(history) == 5
    assert min(r["valid_nll"] for r in history[1:]) < history[0]["valid_nll"] - 0.05, history
    assert (attached / "out_attach.log").read_text().count("e2ip head fit: epoch") == 4


def test_covariance_spd_rotates_and_compiled_agrees(attached, plain, f64):
    from mace import data
    from mace.tools import torch_geometric, utils

    original = torch.load(plain["model"], weights_only=False)
    eager = torch.load(attached / "out.model", weights_only=False)
    compiled = torch.jit.load(str(attached / "out_compiled.model"))
    z_table = utils.AtomicNumberTable([1, 6, 8])

    def run(model, atoms):
        ad = data.AtomicData.from_config(data.config_from_atoms(atoms), z_table=z_table, cutoff=4.0)
        return model(torch_geometric.Batch.from_data_list([ad]).to_dict(), training=False)

    mol = first_molecule()
    out = run(eager, mol)
    cov = out["forces_covariance"].detach()
    assert (torch.linalg.eigvalsh(cov) > 0).all()
    rot = random_rotation(1)
    turned = mol.copy()
    turned.positions = mol.positions @ rot.numpy().T
    cov_rot = run(eager, turned)["forces_covariance"].detach()
    torch.testing.assert_close(cov_rot, rot @ cov @ rot.T, rtol=1e-9, atol=1e-12)

    ref, got = run(original, mol), run(compiled, mol)
    for key in ("energy", "forces"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-9)
    for key in ("forces_covariance", "forces_uncertainty", "energy_uncertainty"):
        torch.testing.assert_close(got[key], out[key], rtol=1e-10, atol=1e-12)
    assert torch.equal(compiled.e2ip_novelty.novelty_calib, eager.e2ip_novelty.novelty_calib)
    assert eager.e2ip_novelty.novelty_calib[0] != 1.0  # the stored calibration was fitted

    calc = E2IPMACECalculator(model_paths=str(attached / "out.model"), device="cpu", default_dtype="float64")
    mol.calc = calc
    np.testing.assert_allclose(mol.get_forces(), ref["forces"].detach().numpy(), atol=1e-12)
    assert calc.results["forces_covariance"].shape == (19, 3, 3)


def test_resume_equals_uninterrupted(attached, plain, tmp_path):
    """2 epochs, then --restart_latest to 4: the head of the uninterrupted 4-epoch run, bit for bit. In one
    process here, whose first attach call set TorchScript's executors (fresh processes per run give the same,
    docs/attach.md; a subprocess against this process, which trained the model first, differs by an ulp)."""
    out = tmp_path / "resumed"
    _main(_argv(plain, out, epochs=2))
    assert (out / "out.model").exists() and (out / "out_compiled.model").exists()
    _main(_argv(plain, out, "--restart_latest", epochs=4))
    assert "resumed the head fit" in (out / "out_attach.log").read_text()
    full = torch.load(attached / "out.model", weights_only=False).e2ip_head.state_dict()
    resumed = torch.load(out / "out.model", weights_only=False).e2ip_head.state_dict()
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key


def _bad_model(tmp, case):
    path = tmp / "bad.model"
    torch.manual_seed(0)
    if case == "not_a_model":
        path.write_text("energy 1.0\n")
    elif case == "not_mace":
        torch.save(torch.nn.Linear(2, 2), path)
    elif case == "already_e2ip":
        torch.save(attach_e2ip_head(tiny_mace(max_L=1), num_channels=4, mlp_hidden=8), path)
    else:
        torch.save(tiny_mace(max_L=1, z=(1, 6) if case == "missing_species" else (1, 6, 8)), path)
    return path


BAD_INPUTS = [
    ("not_a_model", "not a torch-loadable MACE model"),
    ("not_mace", "a Linear, not a MACE model; mace_attach_e2ip takes MACE or ScaleShiftMACE"),
    ("already_e2ip", "already carries an e2ip head"),
    ("missing_species", "element(s) O are not among the model's elements (H, C)"),
    ("no_forces", "lack the reference forces array 'REF_forces'; name the file's forces array with --forces_key"),
]


@pytest.mark.parametrize("case, message", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_bad_inputs_exit_before_writing(plain, tmp_path, case, message, f64):
    bad = {**plain, "model": _bad_model(tmp_path, case)}
    if case == "no_forces":
        frames = ase.io.read(plain["train"], ":")
        for a in frames:
            del a.arrays["REF_forces"]
        bad["train"] = tmp_path / "noforces.xyz"
        ase.io.write(bad["train"], frames, format="extxyz")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        _main(_argv(bad, out))
    assert isinstance(exc.value.code, str) and message in exc.value.code, exc.value.code  # exit status 1
    if case in ("missing_species", "no_forces"):
        assert str(bad["train"] if case == "no_forces" else plain["train"]) in exc.value.code
    assert not out.exists()


def test_scalar_backbone_attaches(plain, tmp_path, f64):
    """A max_L 0 backbone (issue 28): the head reads the geometric construction; energies and forces unchanged."""
    torch.manual_seed(0)
    torch.save(tiny_mace(max_L=0), tmp_path / "l0.model")
    scalar = {**plain, "model": tmp_path / "l0.model"}
    out = tmp_path / "out"
    _main(_argv(scalar, out, epochs=2))
    original = torch.load(scalar["model"], weights_only=False)
    model = torch.load(out / "out.model", weights_only=False)
    assert model.e2ip_config()["geometric"] and (out / "out_compiled.model").exists()
    for ref, got in zip(_outputs(original, plain["valid"]), _outputs(model, plain["valid"])):
        assert float((got["energy"] - ref["energy"]).abs().max()) == 0.0
        assert float((got["forces"] - ref["forces"]).abs().max()) == 0.0
        assert (torch.linalg.eigvalsh(got["forces_covariance"].detach()) > 0).all()


def test_console_script_exits_nonzero_with_message(plain, tmp_path):
    """The registered entry point: a model without oxygen on data with oxygen stops with status 1."""
    bad = {**plain, "model": _bad_model(tmp_path, "missing_species")}
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "mace_attach_e2ip"), *_argv(bad, out)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "element(s) O are not among the model's elements" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("replay", [False, True], ids=["single_head", "multihead_replay"])
def test_foundation_finetune_with_head(plain, tmp_path, f64, replay):
    """mace_run_train_e2ip --foundation_model <local .model> --E0s foundation: without --pt_train_file MACE turns
    multi-head fine-tuning off by itself for a local model; with it (replay of the foundation's data as MACE's
    ``pt_head``) the model gets both heads. Either run ends with both files carrying the covariance."""
    extra = ["--multiheads_finetuning", "True", "--pt_train_file", str(plain["train"])] if replay else []
    proc, work = _train(tmp_path, "--foundation_model", str(plain["model"]), "--E0s", "foundation", *extra, epochs=1)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert ("Using multiheads finetuning mode" in proc.stdout + proc.stderr) == replay
    assert ("pt_head" in torch.load(work / "iso7_e2ip.model", weights_only=False).heads) == replay
    for name in ("iso7_e2ip.model", "iso7_e2ip_compiled.model"):
        model = torch.load(work / name, weights_only=False) if "compiled" not in name else \
            torch.jit.load(str(work / name))
        out = _outputs(model, plain["valid"])[0]
        assert out["forces_covariance"].shape == (out["forces"].shape[0], 3, 3)

