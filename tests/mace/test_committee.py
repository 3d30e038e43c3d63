"""The opt-in in-model force committee on MACE (``--e2ip_committee M``, mace_ext.committee, issue 26): members
rotate and permute with the structure, compiled = eager, old pickles load, the loss term is the core's and (detached)
trains only the members, bad options are named."""

from copy import deepcopy

import numpy as np
import pytest
import torch

from e2ip_plugins.force_committee import committee_loss
from mace import data
from mace.modules.loss import WeightedEnergyForcesLoss
from mace.tools import torch_geometric, utils
from mace_ext.committee import NoCommittee
from mace_ext.errors import E2IPConfigError
from mace_ext.loss import E2IPLoss
from mace_ext.model import attach_e2ip_head

from .helpers import Z, first_molecule, random_rotation, tiny_mace

M = 4


def _batch(atoms_list):
    ads = [data.AtomicData.from_config(data.config_from_atoms(a), z_table=utils.AtomicNumberTable(Z), cutoff=4.0)
           for a in atoms_list]
    return torch_geometric.Batch.from_data_list(ads)


def _model(max_L=1, seed=0, **committee):
    torch.manual_seed(seed)
    return attach_e2ip_head(tiny_mace(max_L), force_rms=1.1, num_channels=4, mlp_hidden=8,
                            committee=dict(num_members=M, num_channels=3, seed=seed, **committee))


@pytest.mark.parametrize("max_L", [1, 0])
def test_members_rotate_and_permute_with_the_structure(f64, max_L):
    model = _model(max_L)
    assert model.e2ip_config()["committee_members"] == M
    mol = first_molecule()
    f = model(_batch([mol]).to_dict())["e2ip_committee_forces"].detach()
    assert f.shape == (len(mol), M, 3) and (f[:, 1] - f[:, 0]).abs().max() > 1e-6
    rot = random_rotation(3)
    turned = mol.copy()
    turned.positions = mol.positions @ rot.numpy().T
    torch.testing.assert_close(model(_batch([turned]).to_dict())["e2ip_committee_forces"].detach(), f @ rot.T,
                               rtol=1e-9, atol=1e-12)
    perm = np.random.default_rng(0).permutation(len(mol))
    torch.testing.assert_close(model(_batch([mol[perm]]).to_dict())["e2ip_committee_forces"].detach(), f[perm],
                               rtol=1e-9, atol=1e-12)


def test_compiled_equals_eager_and_old_pickles_load(f64, tmp_path):
    from e3nn.util import jit

    model = _model()
    batch = _batch([first_molecule()]).to_dict()
    ref = model(batch)
    got = jit.compile(deepcopy(model))(batch)
    for key in ("e2ip_committee_forces", "forces", "forces_covariance"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-10, msg=key)
    old = attach_e2ip_head(tiny_mace(1), num_channels=4, mlp_hidden=8)  # no committee asked: no output key
    assert "e2ip_committee_forces" not in old(batch)
    del old._modules["e2ip_committee"]  # a .model pickled before issue 26's committee
    del old.e2ip_committee_enabled, old.e2ip_committee_detach
    torch.save(old, tmp_path / "old.model")
    loaded = torch.load(tmp_path / "old.model", weights_only=False)
    assert isinstance(loaded.e2ip_committee, NoCommittee) and loaded.e2ip_config()["committee_members"] == 0
    assert "e2ip_committee_forces" not in loaded(batch)


def test_calculator_predictive_is_the_committee_level(f64, tmp_path):
    """``E2IPMACECalculator.predictive()`` of a committee model is N(γ, U_tot) of the level: its covariance and u
    are the calculator's ``forces_covariance`` / ``forces_uncertainty`` (not the head's Student-t)."""
    from e2ip_plugins.predictive import GaussianPredictive
    from mace_ext import E2IPMACECalculator

    model = _model()
    model.e2ip_committee_level.committee_scale.fill_(2.5)
    torch.save(model, tmp_path / "c.model")
    calc = E2IPMACECalculator(model_paths=str(tmp_path / "c.model"), device="cpu", default_dtype="float64")
    atoms = first_molecule()
    atoms.calc = calc
    atoms.get_forces()
    pred = calc.predictive()
    assert isinstance(pred, GaussianPredictive)
    np.testing.assert_allclose(pred.covariance.numpy(), calc.results["forces_covariance"], rtol=1e-9)
    np.testing.assert_allclose(pred.uncertainty.numpy(), calc.results["forces_uncertainty"], rtol=1e-9)
    np.testing.assert_allclose(pred.mean.numpy(), calc.results["forces"], rtol=1e-12)


@pytest.mark.parametrize("detach", [True, False])
def test_loss_term_is_the_core_loss_and_detached_trains_only_the_members(f64, detach):
    model = _model(detach=detach)
    atoms = [first_molecule(), first_molecule()]
    atoms[1].rattle(0.05, seed=1)
    ref = _batch(atoms)
    ref.forces = torch.randn_like(ref.positions) * 0.3
    pred = model(ref.to_dict(), training=True)
    base = WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=10.0)
    plain = E2IPLoss(base, weight=1.0, sigma_f=0.8)(ref, pred, ddp=False)
    with_c = E2IPLoss(base, weight=1.0, sigma_f=0.8, committee_weight=0.5, committee_nll_weight=0.3)(ref, pred,
                                                                                                      ddp=False)
    term = committee_loss(pred["e2ip_committee_forces"], ref.forces, 0.8, nll_weight=0.3)
    torch.testing.assert_close(with_c - plain, 0.5 * term.mean())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(term.mean(), [p for _, p in named], allow_unused=True)
    reached = {n for (n, _), g in zip(named, grads) if g is not None and float(g.abs().max()) > 0}
    assert any(n.startswith("e2ip_committee.") for n in reached)
    backbone = {n for n in reached if not n.startswith("e2ip_")}
    assert (not backbone) if detach else backbone  # detached: the members only; joint: the backbone too
    with pytest.raises(KeyError, match="--e2ip_committee"):
        E2IPLoss(base, committee_weight=1.0)(ref, attach_e2ip_head(tiny_mace(1))(ref.to_dict(), training=True),
                                             ddp=False)


def test_bad_options_are_named():
    from mace_ext.train_options import build_parser, check_e2ip_args

    for flags in (["--e2ip_committee", "1"], ["--e2ip_committee", "4", "--e2ip_committee_weight", "0"]):
        args = build_parser().parse_args(["--name", "x", "--train_file", "t.xyz", *flags])
        with pytest.raises(E2IPConfigError, match="--e2ip_committee"):
            check_e2ip_args(args)
    with pytest.raises(E2IPConfigError, match="committee"):
        attach_e2ip_head(tiny_mace(1), committee={"num_members": 1})


def test_deployed_level_is_the_scaled_member_spread_and_fit_novelty_fits_it(f64):
    """With a committee and ``level: spread``, U_epi = c·(tr Ĉ/3)·I of the members, U_tot = U_ale + U_epi, u = sqrt(tr U_epi/3);
    ``fit_novelty`` (run by mace_run_train_e2ip and mace_fit_novelty_e2ip) stores the core's fit of c on the
    validation forward; compiled = eager with the stored scale."""
    from e3nn.util import jit

    from e2ip_plugins.committee_level import committee_variance, fit_committee_scale
    from e2ip_plugins.predictive import GaussianPredictive
    from mace_ext.fit_novelty import fit_novelty, frames_loader, read_frames
    from mace_ext.outputs import predictive_from_output
    from mace_ext.validation_columns import committee_columns

    from .helpers import DATA

    model = _model(level="spread")
    train = frames_loader(read_frames(str(DATA / "iso7_train.xyz"), model)[:8], model, 4)
    val = frames_loader(read_frames(str(DATA / "iso7_val.xyz"), model)[:8], model, 4)
    assert not bool(model.e2ip_committee_level.committee_scale_fitted)
    fit_novelty(model, train, [val])
    c = float(model.e2ip_committee_level.committee_scale)
    assert bool(model.e2ip_committee_level.committee_scale_fitted) and c != 1.0
    model.e2ip_committee_level.committee_scale.fill_(1.0)
    assert fit_committee_scale(*committee_columns(model, [val], "cpu")) == pytest.approx(c, rel=1e-6)
    model.e2ip_committee_level.committee_scale.fill_(c)
    batch = _batch([first_molecule()]).to_dict()
    out = model(batch)
    var = c * committee_variance(out["e2ip_committee_forces"].detach())
    torch.testing.assert_close(out["forces_covariance_epistemic"].detach(), var[:, None, None] * torch.eye(3))
    torch.testing.assert_close(out["forces_covariance"], out["forces_covariance_aleatoric"] + out["forces_covariance_epistemic"])
    torch.testing.assert_close(out["forces_uncertainty"].detach(), var.sqrt())
    pred = predictive_from_output(out, forces=out["forces"])  # what the eval metrics read: N(γ, U_tot)
    assert isinstance(pred, GaussianPredictive)
    torch.testing.assert_close(pred.covariance, out["forces_covariance"])
    got = jit.compile(deepcopy(model))(batch)
    for key in ("forces_covariance", "forces_uncertainty", "energy_uncertainty"):
        torch.testing.assert_close(got[key], out[key], rtol=0, atol=1e-10, msg=key)


def test_committee_scale_fitted_without_novelty(f64):
    """``--e2ip_novelty false`` with a committee: ``fit_novelty`` still fits and stores the committee's scale."""
    from mace_ext.fit_novelty import fit_novelty, frames_loader, read_frames

    from .helpers import DATA

    torch.manual_seed(0)
    model = attach_e2ip_head(tiny_mace(1), force_rms=1.1, num_channels=4, mlp_hidden=8, novelty={"enabled": False},
                             committee=dict(num_members=M, num_channels=3, seed=0))
    val = frames_loader(read_frames(str(DATA / "iso7_val.xyz"), model)[:8], model, 4)
    assert not fit_novelty(model, None, [val])
    assert bool(model.e2ip_committee_level.committee_scale_fitted)


def test_scaled_level_is_the_default_and_fit_novelty_fits_it(f64):
    """The default level (``--e2ip_committee_level scaled``): U_epi = c·(s̃/s_ref)·U_epi,head with s̃ the members'
    spread averaged over each atom and its edges; ``fit_novelty`` stores the core's (s_ref, c) of the validation
    forward; compiled = eager; an unknown level is named."""
    from e3nn.util import jit

    from e2ip_plugins.committee_level import committee_variance, fit_scaled_level, local_spread
    from mace_ext.fit_novelty import fit_novelty, frames_loader, read_frames
    from mace_ext.geometric import edge_geometry
    from mace_ext.train_options import build_parser
    from mace_ext.validation_columns import committee_columns, head_epistemic

    from .helpers import DATA

    assert build_parser().parse_args(["--name", "x", "--train_file", "t.xyz"]).e2ip_committee_level == "scaled"
    model = _model()
    assert model.e2ip_committee_level.scale_head
    train = frames_loader(read_frames(str(DATA / "iso7_train.xyz"), model)[:8], model, 4)
    val = frames_loader(read_frames(str(DATA / "iso7_val.xyz"), model)[:8], model, 4)
    fit_novelty(model, train, [val])
    level = model.e2ip_committee_level
    c, s_ref = float(level.committee_scale), float(level.spread_ref)
    assert bool(level.committee_scale_fitted) and c != 1.0 and s_ref != 1.0
    assert fit_scaled_level(*committee_columns(model, [val], "cpu")) == pytest.approx((s_ref, c), rel=1e-6)
    batch = _batch([first_molecule()]).to_dict()
    out = model(batch)
    center, neighbor, _ = edge_geometry(batch)
    ratio = local_spread(committee_variance(out["e2ip_committee_forces"].detach()), center, neighbor) / s_ref
    torch.testing.assert_close(out["forces_covariance_epistemic"].detach(),
                               c * ratio[:, None, None] * head_epistemic(model, out).detach())
    torch.testing.assert_close(out["forces_covariance"], out["forces_covariance_aleatoric"] + out["forces_covariance_epistemic"])
    got = jit.compile(deepcopy(model))(batch)
    for key in ("forces_covariance", "forces_uncertainty", "energy_uncertainty"):
        torch.testing.assert_close(got[key], out[key], rtol=0, atol=1e-10, msg=key)
    with pytest.raises(E2IPConfigError, match="'scaled' or 'spread'"):
        _model(level="both")
