"""MACE energy-noise head (issue 15, ``--e2ip_energy_noise``): the deployed σ_E formula on the eager and
TorchScript models, h = ∂A/∂r in training forwards (finite differences, rotation), the loss term, old
pickles, start-up errors, and ``mace_run_train_e2ip`` end to end (.model and _compiled.model agree, the
factor k fitted on the validation energies)."""

import copy

import numpy as np
import pytest
import torch

from e2ip_plugins.energy_noise_head import NoEnergyNoiseHead, coherent_head_loss
from mace_ext import E2IPMACECalculator, attach_e2ip_head
from mace_ext.model import E2IPConfigError

from .helpers import first_molecule, random_rotation, tiny_mace
from .test_cli import _train
from .test_model import _batch


def _model(seed=0):
    torch.manual_seed(seed)
    model = attach_e2ip_head(tiny_mace(1), head="e2ip", num_channels=4, mlp_hidden=8, force_rms=1.1,
                             energy_noise={"enabled": True, "hidden": 6})
    with torch.no_grad():
        model.e2ip_energy_noise.lin2.weight.normal_(0.0, 0.5)
    return model


def _formula(out, k):
    tr = torch.diagonal(out["forces_covariance"], dim1=-2, dim2=-1).sum(-1) / 3.0
    ell, c = out["energy_noise_length"], out["energy_noise_amplitude"]
    return k * torch.sqrt((ell * ell * tr).sum() + c.sum() ** 2)


def test_eager_and_compiled_sigma_formula(f64):
    from e3nn.util import jit

    model = _model()
    model.e2ip_energy_uq.energy_noise_length.copy_(torch.tensor([0.8, 5.0]))
    out = model(_batch(first_molecule()), training=False)
    assert "energy_noise_amplitude_grad" not in out
    torch.testing.assert_close(out["energy_uncertainty"][0], _formula(out, 0.8))
    compiled = jit.compile(copy.deepcopy(model))
    for m in (model, compiled):
        calc = E2IPMACECalculator(models=[m], device="cpu", default_dtype="float64")
        a = first_molecule()
        a.calc = calc
        a.get_potential_energy()
        assert calc.results["energy_uncertainty"] == pytest.approx(float(_formula(out, 0.8).detach()), rel=1e-10)


def test_training_forward_amplitude_gradient(f64):
    model = _model(1)
    atoms = first_molecule()
    out = model(_batch(atoms), training=True)
    h = out["energy_noise_amplitude_grad"].detach()
    eps = 1e-5

    def amp(positions):
        a = atoms.copy()
        a.positions = positions
        return float(model(_batch(a), training=False)["energy_noise_amplitude"].sum())

    for i in (0, 5):
        for ax in range(3):
            p, m = atoms.positions.copy(), atoms.positions.copy()
            p[i, ax] += eps
            m[i, ax] -= eps
            assert float(h[i, ax]) == pytest.approx((amp(p) - amp(m)) / (2 * eps), rel=1e-5, abs=1e-9)
    rot = random_rotation(3)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rot.numpy().T
    hr = model(_batch(rotated), training=True)["energy_noise_amplitude_grad"].detach()
    torch.testing.assert_close(hr, h @ rot.T, rtol=1e-7, atol=1e-10)


def test_loss_adds_the_core_term(f64):
    from mace.modules.loss import WeightedEnergyForcesLoss
    from mace_ext.loss import E2IPLoss
    from mace.tools import torch_geometric

    model = _model(2)
    atoms = [first_molecule(), first_molecule()]
    atoms[1].rattle(0.05, seed=1)
    from mace import data
    from mace.tools import utils

    ads = []
    for a in atoms:
        cfg = data.config_from_atoms(a)
        ads.append(data.AtomicData.from_config(cfg, z_table=utils.AtomicNumberTable([1, 6, 8]), cutoff=4.0))
    ref = torch_geometric.Batch.from_data_list(ads)
    ref.energy = torch.tensor([-770.0, -769.5])
    ref.forces = torch.randn_like(ref.positions) * 0.3
    pred = model(ref.to_dict(), training=True)
    base = WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=10.0)
    plain = E2IPLoss(base, weight=1.0)(ref, pred, ddp=False)
    with_noise = E2IPLoss(base, weight=1.0, energy_noise_weight=0.5)(ref, pred, ddp=False)
    term = coherent_head_loss(ref.energy - pred["energy"], ref.forces - pred["forces"],
                              pred["forces_covariance_aleatoric"], pred["energy_noise_length"],
                              pred["energy_noise_amplitude"], ref.batch, 2, pred["energy_noise_amplitude_grad"])
    w = ref.weight * ref.energy_weight
    torch.testing.assert_close(with_noise - plain, 0.5 * (w * term).mean())
    # with the default detach_features the term's gradient reaches the head's weights and nothing else
    grads = torch.autograd.grad((w * term).mean(), [p for p in model.parameters() if p.requires_grad],
                                allow_unused=True, retain_graph=True)
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, g in zip(named, grads):
        if n.startswith("e2ip_energy_noise."):
            assert g is not None and float(g.abs().max()) > 0, n
        else:
            assert g is None or float(g.abs().max()) == 0.0, n
    with pytest.raises(KeyError, match="--e2ip_energy_noise"):
        E2IPLoss(base, energy_noise_weight=1.0)(ref, attach_e2ip_head(tiny_mace(1))(ref.to_dict(), training=True),
                                                ddp=False)


def test_old_pickle_gets_placeholder(f64, tmp_path):
    model = attach_e2ip_head(tiny_mace(1), head="e2ip", num_channels=4, mlp_hidden=8)
    del model._modules["e2ip_energy_noise"]
    del model.e2ip_energy_noise_enabled
    torch.save(model, tmp_path / "old.model")
    loaded = torch.load(tmp_path / "old.model", weights_only=False)
    assert isinstance(loaded.e2ip_energy_noise, NoEnergyNoiseHead) and loaded.e2ip_energy_noise_enabled is False
    out = loaded(_batch(first_molecule()), training=False)
    assert torch.isfinite(out["energy_uncertainty"]).all()


def test_detach_flag_parsed():
    from mace_ext.cli import build_parser

    base = ["--name", "x", "--train_file", "t.xyz", "--e2ip_energy_noise"]
    assert build_parser().parse_args(base).e2ip_energy_noise_detach is True
    assert build_parser().parse_args(base + ["--e2ip_energy_noise_detach", "False"]).e2ip_energy_noise_detach is False


def test_config_errors():
    with pytest.raises(E2IPConfigError, match="needs --e2ip_head e2ip"):
        attach_e2ip_head(tiny_mace(1), head="eip", energy_noise={"enabled": True})


def test_cli_end_to_end(tmp_path):
    proc, work = _train(tmp_path, "--name", "noise", "--e2ip_energy_noise", epochs=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    eager = torch.load(work / "noise.model", weights_only=False)
    k, n_fit = eager.e2ip_energy_uq.energy_noise_length.tolist()
    assert eager.e2ip_energy_noise_enabled and n_fit == 8 and k > 0 and k != 1.0
    assert eager.e2ip_energy_noise.detach_features is True  # the default of --e2ip_energy_noise_detach
    assert "e2ip: energy factor k of the energy-noise head fitted on 8 validation structures" in proc.stdout + proc.stderr
    sig = []
    for path in ("noise.model", "noise_compiled.model"):
        calc = E2IPMACECalculator(model_paths=str(work / path), device="cpu", default_dtype="float64")
        a = first_molecule()
        a.calc = calc
        a.get_potential_energy()
        sig.append(calc.results["energy_uncertainty"])
    assert np.isfinite(sig).all() and sig[1] == pytest.approx(sig[0], rel=1e-6)
    (tmp_path / "bad").mkdir()
    bad = _train(tmp_path / "bad", "--e2ip_head", "eip", "--e2ip_energy_noise")[0]
    assert bad.returncode != 0 and "--e2ip_energy_noise needs --e2ip_head e2ip" in bad.stdout + bad.stderr


def test_factor_fitted_on_validation_only(f64, tmp_path):
    """fit_energy_noise stores k̂ = sqrt(mean r_E²/(A² + Σ ℓ_i² tr U_i/3)) over exactly the given validation frames."""
    import ase.io

    from mace_ext.energy_uq import fit_energy_noise
    from mace_ext.fit_novelty import _loader

    from .helpers import DATA

    model = _model(3)
    path = str(tmp_path / "val5.xyz")
    ase.io.write(path, ase.io.read(DATA / "iso7_val.xyz", ":5"), format="extxyz")
    res = fit_energy_noise(model, [_loader(path, model, 2)])
    k = float(model.e2ip_energy_uq.energy_noise_length[0])
    assert res["structures"] == 5
    z2 = []
    model.eval()
    for at in ase.io.read(path, ":"):
        out = model(_batch(at), training=False)
        z2.append((at.info["REF_energy"] - float(out["energy"][0])) ** 2 / float(_formula(out, 1.0).detach()) ** 2)
    assert k == pytest.approx(np.sqrt(np.mean(z2)), rel=1e-8)
