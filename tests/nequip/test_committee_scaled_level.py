"""NequIP's opt-in scaled-head committee level (``uq_head.committee.level: scaled``, issue 26): U_epi is the head's
U_epi times the members' local spread ratio, with (s_ref, c) the core's fit on the validation forward."""

import pytest
import torch

import nequip_ext
import nequip_ext._keys as K
from nequip.data import AtomicDataDict

from ._cli_helpers import SLOW
from .test_committee import COMMITTEE_OVERRIDES, HEAD, M, _committee_results, assert_aoti_matches_checkpoint, \
    checkpoint_and_package, train_and_package
from .test_energy_uq import CFG, _graphs


def test_scaled_level_option_is_the_head_times_the_local_spread_ratio_and_is_fitted():
    """``uq_head.committee.level: scaled`` (opt-in on NequIP): U_epi = c·(s̃/s_ref)·U_epi,head with the head's U_epi
    of the same model without the level, s̃ the members' spread averaged over the edges; ``fit_model_committee``
    stores the core's (s_ref, c); an unknown level is named."""
    from e2ip_plugins.committee_level import committee_variance, fit_scaled_level, local_spread
    from nequip_ext.committee_level import committee_level
    from nequip_ext.novelty import fit_model_committee

    head = dict(HEAD, committee=dict(HEAD["committee"], level="scaled"))
    m = nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head=head)
    m.eval()
    level = committee_level(m)
    assert level.level.scale_head
    batches = [AtomicDataDict.batched_from_list(_graphs(2)) for _ in range(2)]
    for b in batches:
        b[AtomicDataDict.FORCE_KEY] = torch.randn_like(b[AtomicDataDict.POSITIONS_KEY]) * 0.5
    fit_model_committee(m, batches)
    c, s_ref = float(level.level.committee_scale), float(level.level.spread_ref)
    assert bool(level.level.committee_scale_fitted) and c != 1.0 and s_ref != 1.0
    g = dict(_graphs(1)[0])
    out = m(dict(g))
    level.level.scale_head = False  # the same model, the head's own U_epi kept: read it through a pre-hook
    heads = []
    hook = level.register_forward_pre_hook(lambda mod, args: heads.append(args[0][K.FORCES_COVARIANCE_EPISTEMIC_KEY].detach()))
    m(dict(g))
    hook.remove()
    level.level.scale_head = True
    edges = out[AtomicDataDict.EDGE_INDEX_KEY]
    spread = local_spread(committee_variance(out[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3)), edges[0], edges[1])
    torch.testing.assert_close(out[K.FORCES_COVARIANCE_EPISTEMIC_KEY].detach(), c * (spread / s_ref)[:, None, None] * heads[0])
    # the stored constants are the core's fit on the validation columns (head's U_epi read with the level off)
    cols = []
    level.level.scale_head = False
    hook = level.register_forward_pre_hook(lambda mod, args: heads.append(args[0][K.FORCES_COVARIANCE_EPISTEMIC_KEY].detach()))
    with torch.enable_grad():
        for b in batches:
            o = m(dict(b))
            e = o[AtomicDataDict.EDGE_INDEX_KEY]
            s = local_spread(committee_variance(o[K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3)), e[0], e[1])
            cols.append((o[AtomicDataDict.FORCE_KEY].detach(), b[AtomicDataDict.FORCE_KEY],
                         o[K.FORCES_COVARIANCE_ALEATORIC_KEY].detach(), heads[-1], s))
    hook.remove()
    level.level.scale_head = True
    assert fit_scaled_level(*(torch.cat(c) for c in zip(*cols))) == pytest.approx((s_ref, c), rel=1e-6)
    with pytest.raises(ValueError, match="spread or scaled"):
        nequip_ext.EvidentialNequIPGNNModel(**CFG, uq_head=dict(HEAD, committee=dict(HEAD["committee"], level="x")))


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    """The message committee with ``level: scaled``, trained by ``nequip-train`` and packaged."""
    member = COMMITTEE_OVERRIDES[0].replace("detach: true}", "detach: true, level: scaled}")
    assert member != COMMITTEE_OVERRIDES[0]
    return train_and_package(tmp_path_factory.mktemp("scaled"), (member,) + tuple(COMMITTEE_OVERRIDES[1:]))


def test_scaled_level_fitted_by_nequip_train_and_applied_by_checkpoint_and_package(scaled_run):
    """nequip-train stores (s_ref, c); the checkpoint and package calculators report U_epi = c·(s̃/s_ref)·U_epi,head,
    U_tot = U_ale + U_epi (SPD), u = sqrt(tr U_epi/3), and ``predictive()`` reads the same covariance."""
    import numpy as np

    from e2ip_plugins.committee_level import committee_variance, local_spread

    sd = torch.load(scaled_run["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    stored = {n: float(v) for k, v in sd.items() for n in ("committee_scale", "spread_ref", "committee_scale_fitted")
              if k.endswith(f"uq_committee_level.level.{n}")}
    c, s_ref = stored["committee_scale"], stored["spread_ref"]
    assert stored["committee_scale_fitted"] and c > 0 and c != 1.0 and s_ref > 0 and s_ref != 1.0
    calcs, mol, level = checkpoint_and_package(scaled_run)
    seen = {}
    level.register_forward_pre_hook(lambda mod, args: seen.update(
        f=args[0][K.E2IP_COMMITTEE_FORCES_KEY].detach().reshape(-1, M, 3),
        head=args[0][K.FORCES_COVARIANCE_EPISTEMIC_KEY].detach(), edges=args[0][AtomicDataDict.EDGE_INDEX_KEY]))
    res = {name: _committee_results(calc, mol) for name, calc in calcs.items()}
    spread = local_spread(committee_variance(seen["f"]), seen["edges"][0], seen["edges"][1])
    want = (c * (spread / s_ref)[:, None, None] * seen["head"]).numpy()
    for name, r in res.items():
        pred = calcs[name].predictive()
        np.testing.assert_allclose(r[K.FORCES_COVARIANCE_EPISTEMIC_KEY], want, rtol=1e-9, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(r[K.FORCES_COVARIANCE_KEY], r[K.FORCES_COVARIANCE_ALEATORIC_KEY] + want,
                                   rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(r[K.FORCES_UNCERTAINTY_KEY], np.sqrt(np.trace(want, axis1=1, axis2=2) / 3),
                                   rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(pred.covariance.numpy(), r[K.FORCES_COVARIANCE_KEY], rtol=1e-9, err_msg=name)
        assert (np.linalg.eigvalsh(r[K.FORCES_COVARIANCE_KEY]) > 0).all()


@pytest.mark.skipif(not SLOW, reason="an AOTInductor compile (1.5-4 min): set E2IP_SLOW_TESTS=1")
def test_scaled_level_applied_by_the_aoti_e2ip_ase_target(scaled_run):
    """``nequip-compile --mode aotinductor --target e2ip_ase`` of the scaled-level model reports the checkpoint's
    covariances and u (the level reads the edges inside the compiled graph)."""
    assert_aoti_matches_checkpoint(scaled_run)
