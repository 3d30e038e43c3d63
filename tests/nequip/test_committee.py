"""The opt-in in-model force committee on NequIP (``uq_head.committee``, issue 26): members rotate with the
structure, the loss term is the core's and reaches the backbone, a missing committee is named."""

import pytest
import torch
from scipy.spatial.transform import Rotation

import nequip_ext
import nequip_ext._keys as K
from nequip.data import AtomicDataDict

from e2ip_plugins.force_committee import committee_loss

from ._cli_helpers import SLOW
from .test_energy_uq import CFG, _graphs, _rotated

M = 4
HEAD = {"kind": "e2ip", "num_channels": 4, "mlp_hidden": 8, "committee": {"enabled": True, "num_members": M,
                                                                            "num_channels": 4}}


def _model():
    return nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head=HEAD)


def test_members_rotate_with_the_structure():
    m = _model()
    m.eval()
    g = _graphs(1)[0]
    f = m(dict(g))[K.E2IP_COMMITTEE_FORCES_KEY].detach()
    assert f.shape == (g[AtomicDataDict.POSITIONS_KEY].shape[0], 3 * M)
    f = f.reshape(-1, M, 3)
    assert (f[:, 1] - f[:, 0]).abs().max() > 1e-6  # members differ
    rot = torch.as_tensor(Rotation.random(random_state=2).as_matrix(), dtype=torch.float64)
    fr = m(_rotated(g, rot))[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3)
    torch.testing.assert_close(fr, f @ rot.T, rtol=1e-7, atol=1e-10)


def test_deployed_predictive_is_the_committee_level():
    """With a committee the model's covariance keys are U_ale + c·(tr Ĉ/3)·I (uq_committee_level, before
    uq_energy), and the predictive the metrics and the demo read is N(γ, U_tot) of those keys."""
    from e2ip_plugins.committee_level import committee_variance
    from e2ip_plugins.predictive import GaussianPredictive
    from nequip_ext.train import predictive

    m = _model()
    m.eval()
    names = list((m.model.func if hasattr(m, "model") else m.func)._modules)
    assert names.index("uq_committee_level") == names.index("uq_energy") - 1
    out = m(dict(_graphs(1)[0]))
    var = committee_variance(out[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3))
    torch.testing.assert_close(out[K.FORCES_COVARIANCE_EPISTEMIC_KEY].detach(), var[:, None, None] * torch.eye(3, dtype=var.dtype))
    pred = predictive(out)
    assert isinstance(pred, GaussianPredictive)
    torch.testing.assert_close(pred.covariance, out[K.FORCES_COVARIANCE_KEY])


def test_loss_term_is_the_core_loss_and_reaches_the_backbone():
    from nequip_ext.train import CommitteeLossMetric

    m = _model()
    m.train()
    batch = AtomicDataDict.batched_from_list(_graphs(2))
    pred = m(dict(batch))
    got = CommitteeLossMetric(force_rms=0.5)(pred, batch)
    members = pred[K.E2IP_COMMITTEE_FORCES_KEY].reshape(-1, M, 3)
    torch.testing.assert_close(got, committee_loss(members, batch[AtomicDataDict.FORCE_KEY], 0.5).mean())
    got.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "uq_committee" in n)
    # the committee's force loss shapes the features it reads: the convnets before it get gradient
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "convnet" in n)


def test_residual_target_is_the_core_loss_on_y_minus_detached_gamma():
    """``committee_target: residual``: the members fit y − γ with γ detached (no gradient through the forces)."""
    from nequip_ext.train import CommitteeLossMetric

    m = _model()
    m.train()
    batch = AtomicDataDict.batched_from_list(_graphs(2))
    pred = m(dict(batch))
    got = CommitteeLossMetric(force_rms=0.5, target="residual")(pred, batch)
    members = pred[K.E2IP_COMMITTEE_FORCES_KEY].reshape(-1, M, 3)
    y = batch[AtomicDataDict.FORCE_KEY] - pred[AtomicDataDict.FORCE_KEY].detach()
    torch.testing.assert_close(got, committee_loss(members, y, 0.5).mean())
    with pytest.raises(ValueError, match="committee_target"):
        CommitteeLossMetric(target="energy")


@pytest.mark.parametrize("kind", ["node", "block", "message"])
def test_detached_members_train_only_themselves(kind):
    """``committee.detach: true``: the committee term reaches every member and no backbone parameter."""
    from nequip_ext.train import CommitteeLossMetric

    m = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head=dict(HEAD, committee=dict(HEAD["committee"], kind=kind,
                                                                                    detach=True)))
    m.train()
    batch = AtomicDataDict.batched_from_list(_graphs(2))
    CommitteeLossMetric(force_rms=0.5)(m(dict(batch)), batch).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "uq_committee" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "uq_committee" not in n)


def test_nll_weight_zero_leaves_the_members_mse():
    """``committee_nll_weight: 0`` of the loss: the term is the members' mean squared error / (3σ_F²) alone."""
    from nequip_ext.train import CommitteeLossMetric

    m = _model()
    m.train()
    batch = AtomicDataDict.batched_from_list(_graphs(2))
    pred = m(dict(batch))
    got = CommitteeLossMetric(force_rms=0.5, nll_weight=0.0)(pred, batch)
    members = pred[K.E2IP_COMMITTEE_FORCES_KEY].reshape(-1, M, 3)
    y = batch[AtomicDataDict.FORCE_KEY]
    torch.testing.assert_close(got, ((members - y[:, None]) ** 2).sum(-1).mean() / (3 * 0.25))


def test_missing_committee_is_named():
    from nequip_ext.train import CommitteeLossMetric

    plain = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head={"kind": "e2ip", "num_channels": 4})
    batch = AtomicDataDict.batched_from_list(_graphs(1))
    with pytest.raises(KeyError, match="uq_head.committee.enabled"):
        CommitteeLossMetric()(plain(dict(batch)), batch)


def test_two_depth_members_rotate_and_read_the_earlier_convnet():
    """``extra_depth: 0``: members also read layer0's output (tapped into ``e2ip_committee_depth``): they still
    rotate as R F, and the earlier features reach them (their gradient is nonzero)."""
    head = dict(HEAD, committee=dict(HEAD["committee"], extra_depth=0))
    m = nequip_ext.EvidentialNequIPGNNModel(**dict(CFG, num_layers=3), uq_head=head)
    names = list(m.model.func._modules) if hasattr(m, "model") else list(m.func._modules)
    assert names.index("uq_committee_tap") == names.index("layer0_convnet") + 1
    m.eval()
    g = _graphs(1)[0]
    f = m(dict(g))[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3)
    rot = torch.as_tensor(Rotation.random(random_state=3).as_matrix(), dtype=torch.float64)
    fr = m(_rotated(g, rot))[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3)
    torch.testing.assert_close(fr, f @ rot.T, rtol=1e-7, atol=1e-10)
    seq = m.model.func if hasattr(m, "model") else m.func
    seen = {}
    m.train()  # training keeps the graph of the conservative forces (eval frees it)
    seq._modules["uq_committee"].register_forward_pre_hook(
        lambda mod, args: seen.update(depth=args[0][K.E2IP_COMMITTEE_DEPTH_KEY]))
    out = m(dict(g))[K.E2IP_COMMITTEE_FORCES_KEY]
    (grad,) = torch.autograd.grad(out.sum(), seen["depth"])
    assert grad.abs().max() > 0
    with pytest.raises(ValueError, match="extra_depth"):
        nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head=dict(HEAD, committee=dict(HEAD["committee"], extra_depth=0)))


@pytest.mark.parametrize("kind,extra", [("edge", {"mlp_hidden": 8}), ("block", {}), ("message", {})])
def test_edge_and_block_members_rotate_and_feed_the_loss(kind, extra):
    """``kind: edge`` (F_i^k = Σ_j a_ij^k r̂_ij), ``kind: block`` (each member its own interaction block and
    1o readout) and ``kind: message`` (the block idea batched): members rotate as R F, differ from each other,
    and the loss term reaches them and the backbone's convnets."""
    from nequip_ext.train import CommitteeLossMetric

    head = dict(HEAD, committee=dict(HEAD["committee"], kind=kind, **extra))
    m = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head=head)
    m.eval()
    g = _graphs(1)[0]
    f = m(dict(g))[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3)
    assert (f[:, 1] - f[:, 0]).abs().max() > 1e-6
    rot = torch.as_tensor(Rotation.random(random_state=4).as_matrix(), dtype=torch.float64)
    fr = m(_rotated(g, rot))[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3)
    torch.testing.assert_close(fr, f @ rot.T, rtol=1e-7, atol=1e-10)
    m.train()
    batch = AtomicDataDict.batched_from_list(_graphs(2))
    loss = CommitteeLossMetric(force_rms=0.5)(m(dict(batch)), batch)
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "uq_committee" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "convnet" in n)
    if kind == "message":  # every member's own slice of the stacked weights
        radial = next(g for n, g in grads.items() if n.endswith("uq_committee.committee.radial2"))
        assert all(radial[k].abs().sum() > 0 for k in range(M))
    if kind == "block":
        assert all(any(g is not None and g.abs().sum() > 0 for n, g in grads.items()
                       if f"uq_committee.members.{k}." in n) for k in range(M))
        with pytest.raises(ValueError, match="committee.kind"):
            nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head=dict(HEAD, committee=dict(HEAD["committee"],
                                                                                           kind="blocks")))


def test_edge_committee_core_matches_a_direct_sum():
    """The core module equals the docstring's sum, computed edge by edge in a Python loop (float64)."""
    import math

    from e2ip_plugins.edge_committee import EdgeForceCommittee
    from e2ip_plugins.geometric_features import bessel_basis, polynomial_envelope

    torch.manual_seed(0)
    n, f_dim, e = 5, 3, 12
    mod = EdgeForceCommittee(f_dim, r_max=3.0, num_members=3, mlp_hidden=4, avg_num_neighbors=4.0, force_rms=0.7,
                             seed=1).double()
    h = torch.randn(n, f_dim, dtype=torch.float64)
    centre, neigh = torch.randint(0, n, (e,)), torch.randint(0, n, (e,))
    vec = torch.randn(e, 3, dtype=torch.float64)
    got = mod(h, centre, neigh, vec)
    want = torch.zeros(n, 3, 3, dtype=torch.float64)
    for k in range(3):
        for ed in range(e):
            r = vec[ed].norm()
            x = torch.cat([h[centre[ed]], h[neigh[ed]], bessel_basis(r.reshape(1), mod.freqs.double(), 3.0)[0]])
            a = torch.nn.functional.silu(x @ mod.w1[k] + mod.b1[k]) @ mod.w2[k] + mod.b2[k]
            env = polynomial_envelope(r.reshape(1), 3.0)[0]
            want[centre[ed], k] += 0.7 / math.sqrt(4.0) * a * env * vec[ed] / r
    torch.testing.assert_close(got, want)


# --- the committee's deployed level (nequip_ext.committee_level): fitted by nequip-train, applied on every path ---

COMMITTEE_OVERRIDES = (
    "++training_module.model.uq_head.committee={enabled: true, kind: message, num_members: 4, num_channels: 4, "
    "detach: true}", "++training_module.loss.coeffs.committee=0.01", "++training_module.loss.committee_nll_weight=0.0")


def train_and_package(d, overrides):
    """``nequip-train -cn e2ip`` with ``overrides`` (1 epoch, float64) in ``d / "train"`` and ``nequip-package
    build``: {"dir", "ckpt", "package"}."""
    import subprocess
    import sys
    from pathlib import Path

    from ._cli_helpers import DATA, nequip_train

    nequip_train(d / "train", "run=[train]", "max_epochs=1", f"train_file={DATA / 'iso7_val.xyz'}",
                 f"val_file={DATA / 'iso7_val.xyz'}", f"test_file={DATA / 'iso7_test.xyz'}",
                 "training_module.model.model_dtype=float64", *overrides)
    ckpt, pkg = d / "train" / "best.ckpt", d / "model.nequip.zip"
    res = subprocess.run([str(Path(sys.executable).parent / "nequip-package"), "build", str(ckpt), str(pkg)], cwd=d,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"dir": d, "ckpt": ckpt, "package": pkg}


@pytest.fixture(scope="module")
def committee_run(tmp_path_factory):
    """The opt-in message committee, trained and packaged (:func:`train_and_package`)."""
    return train_and_package(tmp_path_factory.mktemp("committee"), COMMITTEE_OVERRIDES)


def _committee_results(calc, atoms):
    import numpy as np

    a = atoms.copy()
    a.calc = calc
    a.get_potential_energy()
    return {k: np.array(v, dtype=np.float64) for k, v in calc.results.items()}


def checkpoint_and_package(run):
    """({"checkpoint", "package"}: E2IPNequIPCalculator, a test molecule, the checkpoint model's committee level)."""
    import ase.io

    from nequip_ext import E2IPNequIPCalculator
    from nequip_ext.committee_level import committee_level

    from ._cli_helpers import DATA

    kw = dict(device="cpu", chemical_species_to_atom_type_map=True)
    calcs = {"checkpoint": E2IPNequIPCalculator.from_saved_model(run["ckpt"], **kw),
             "package": E2IPNequIPCalculator.from_saved_model(run["package"], **kw)}
    return calcs, ase.io.read(DATA / "iso7_test.xyz", 0), committee_level(calcs["checkpoint"].model)


def test_committee_level_fitted_by_nequip_train_and_applied_by_every_output_path(committee_run):
    """nequip-train fitted the committee's scale c on validation (it equals the core fit on the checkpoint's own
    validation forward); checkpoint and package calculators report U_epi = c·(tr Ĉ/3)·I of the members,
    U_tot = U_ale + U_epi and u = sqrt(tr U_epi/3); with c = 1, U_epi scales by 1/c and U_ale is unchanged."""
    import numpy as np

    from e2ip_plugins.committee_level import committee_variance

    sd = torch.load(committee_run["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    (c,) = [float(v) for k, v in sd.items() if k.endswith("uq_committee_level.level.committee_scale")]
    (fitted,) = [bool(v) for k, v in sd.items() if k.endswith("uq_committee_level.level.committee_scale_fitted")]
    assert fitted and c > 0 and c != 1.0
    calcs, mol, level = checkpoint_and_package(committee_run)
    members = {}
    level.register_forward_pre_hook(lambda mod, args: members.update(
        f=args[0][K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, 4, 3)))
    res, preds = {}, {}
    for name, calc in calcs.items():
        res[name] = _committee_results(calc, mol)
        preds[name] = calc.predictive()  # the exact predictive a user (and benchmarks.*) reads: the same level
    want = c * committee_variance(members["f"]).numpy()
    for name, pred in preds.items():
        np.testing.assert_allclose(pred.covariance.numpy(), res[name][K.FORCES_COVARIANCE_KEY], rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(pred.uncertainty.numpy(), res[name][K.FORCES_UNCERTAINTY_KEY], rtol=1e-9,
                                   err_msg=name)
    for name, r in res.items():
        np.testing.assert_allclose(r[K.FORCES_COVARIANCE_EPISTEMIC_KEY], want[:, None, None] * np.eye(3), rtol=1e-9,
                                   atol=1e-15, err_msg=name)
        np.testing.assert_allclose(r[K.FORCES_COVARIANCE_KEY], r[K.FORCES_COVARIANCE_ALEATORIC_KEY]
                                   + r[K.FORCES_COVARIANCE_EPISTEMIC_KEY], rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(r[K.FORCES_UNCERTAINTY_KEY], np.sqrt(want), rtol=1e-9, err_msg=name)
        assert (np.linalg.eigvalsh(r[K.FORCES_COVARIANCE_KEY]) > 0).all()
    saved = level.level.committee_scale.clone()
    try:
        level.level.committee_scale.fill_(1.0)
        calcs["checkpoint"].reset()
        raw = _committee_results(calcs["checkpoint"], mol)
    finally:
        level.level.committee_scale.copy_(saved)
    np.testing.assert_allclose(res["checkpoint"][K.FORCES_COVARIANCE_EPISTEMIC_KEY],
                               c * raw[K.FORCES_COVARIANCE_EPISTEMIC_KEY], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(res["checkpoint"][K.FORCES_COVARIANCE_ALEATORIC_KEY],
                               raw[K.FORCES_COVARIANCE_ALEATORIC_KEY], rtol=1e-12)


def test_committee_scale_refit_equals_the_core_fit_on_validation(committee_run):
    """``fit_model_novelty`` (what NoveltyFitCallback and nequip_fit_novelty_e2ip call) stores the core's
    :func:`fit_committee_scale` on the validation forward, and the energy length is refitted after it."""
    from e2ip_plugins.committee_level import fit_committee_scale
    from nequip_ext.committee_level import committee_level
    from nequip_ext.novelty import _xyz_batches, energy_head, fit_model_novelty, validation_outputs
    from nequip.model.saved_models.load_utils import load_saved_model

    from ._cli_helpers import DATA

    model = load_saved_model(str(committee_run["ckpt"]))
    level = committee_level(model)
    from nequip.nn.graph_model import R_MAX_KEY, TYPE_NAMES_KEY

    r_max, types = float(model.metadata[R_MAX_KEY]), str(model.metadata[TYPE_NAMES_KEY]).split(" ")
    batches = list(_xyz_batches(str(DATA / "iso7_val.xyz"), model, r_max, types))
    level.level.committee_scale.fill_(1.0)
    energy_head(model).energy.energy_noise_length[0] = 0.123
    fit_model_novelty(model, list(_xyz_batches(str(DATA / "iso7_train.xyz"), model, r_max, types))[:4],
                      batches)
    model.eval()
    cols = [(d[AtomicDataDict.FORCE_KEY], o[AtomicDataDict.FORCE_KEY].detach(), o[K.FORCES_COVARIANCE_ALEATORIC_KEY].detach(),
             o[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, 4, 3)) for d, o in validation_outputs(model, batches)]
    y, gamma, ale, members = (torch.cat(c) for c in zip(*cols))
    assert float(level.level.committee_scale) == pytest.approx(fit_committee_scale(gamma, y, ale, members), rel=1e-6)
    assert energy_head(model).energy.length != pytest.approx(0.123)
    # nequip_fit_novelty_e2ip (fit_checkpoint) writes the committee's scale into the checkpoint it saves
    from nequip_ext.novelty import fit_checkpoint

    out = committee_run["dir"] / "refit.ckpt"
    fit_checkpoint(str(committee_run["ckpt"]), str(DATA / "iso7_val.xyz"), str(DATA / "iso7_val.xyz"), out=str(out))
    refit = load_saved_model(str(out)).eval()
    stored = float(committee_level(refit).level.committee_scale)
    cols = [(d[AtomicDataDict.FORCE_KEY], o[AtomicDataDict.FORCE_KEY].detach(), o[K.FORCES_COVARIANCE_ALEATORIC_KEY].detach(),
             o[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, 4, 3)) for d, o in validation_outputs(refit, batches)]
    y, gamma, ale, members = (torch.cat(c) for c in zip(*cols))
    assert stored != 1.0 and stored == pytest.approx(fit_committee_scale(gamma, y, ale, members), rel=1e-6)


@pytest.mark.skipif(not SLOW, reason="a third AOTInductor compile (1.5-4 min): set E2IP_SLOW_TESTS=1")
def test_committee_level_applied_by_the_aoti_e2ip_ase_target(committee_run):
    """``nequip-compile --mode aotinductor --target e2ip_ase`` of the committee model reports the checkpoint's
    covariances (the stored committee scale included)."""
    assert_aoti_matches_checkpoint(committee_run)


def assert_aoti_matches_checkpoint(run):
    """``nequip-compile --mode aotinductor --target e2ip_ase`` of ``run``'s package reports its checkpoint's
    covariances and u."""
    import subprocess
    import sys
    from pathlib import Path

    import ase.io
    import numpy as np

    from nequip_ext import E2IPNequIPCalculator

    from ._cli_helpers import DATA

    pt2 = run["dir"] / "model.nequip.pt2"
    res = subprocess.run([str(Path(sys.executable).parent / "nequip-compile"), str(run["package"]), str(pt2),
                          "--mode", "aotinductor", "--device", "cpu", "--target", "e2ip_ase"], cwd=run["dir"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    kw = dict(device="cpu", chemical_species_to_atom_type_map=True)
    mol = ase.io.read(DATA / "iso7_test.xyz", 0)
    want = _committee_results(E2IPNequIPCalculator.from_saved_model(run["ckpt"], **kw), mol)
    got = _committee_results(E2IPNequIPCalculator.from_compiled_model(pt2, **kw), mol)
    for k in (K.FORCES_COVARIANCE_KEY, K.FORCES_COVARIANCE_EPISTEMIC_KEY, K.FORCES_UNCERTAINTY_KEY):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-8, atol=1e-12 * np.abs(want[k]).max(), err_msg=k)

