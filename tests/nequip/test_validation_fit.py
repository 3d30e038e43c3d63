"""Issue 16: the one-pass validation fit (e2ip_plugins.validation_fit via fit_model_novelty) stores the same
novelty reference, level [c, β] and energy length as the three-pass fit, in one forward over the validation data."""

import copy

import pytest
import torch

import nequip_ext._keys as K
from nequip.data import AtomicDataDict
from nequip_ext.novelty import energy_head, fit_model_novelty, novelty_head

from .test_energy_uq import _graphs, _model


def _fitted(one_pass, model, train, val):
    m = copy.deepcopy(model)
    fit_model_novelty(m, [AtomicDataDict.batched_from_list(train)],
                      [AtomicDataDict.batched_from_list(val[:3]), AtomicDataDict.batched_from_list(val[3:])],
                      one_pass=one_pass)
    return m


def _count_forwards(model):
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, hook


def test_one_pass_equals_three_passes():
    torch.manual_seed(0)
    model = _model("e2ip")
    train, val = _graphs(6), _graphs(5)
    with torch.no_grad():  # a head whose evidence varies between atoms (fresh heads start nearly constant)
        for p in novelty_head(model).parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, p in model.named_parameters():
            if "uq_head" in name:
                p.add_(0.3 * torch.randn_like(p))
    three, one = _fitted(False, model, train, val), _fitted(True, model, train, val)
    n3, n1 = novelty_head(three).novelty, novelty_head(one).novelty
    for name in ("novelty_mean", "novelty_whiten", "novelty_ref"):
        torch.testing.assert_close(getattr(n1, name), getattr(n3, name), rtol=1e-9, atol=1e-12)
    assert float(n3.novelty_ref.min()) > 0 and float(n3.novelty_calib[0]) != 1.0  # a real fit
    torch.testing.assert_close(n1.novelty_calib, n3.novelty_calib, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(energy_head(one).energy.energy_noise_length, energy_head(three).energy.energy_noise_length,
                               rtol=1e-6, atol=1e-9)
    one.eval(), three.eval()
    batch = AtomicDataDict.batched_from_list(val)
    torch.testing.assert_close(one(dict(batch))[K.FORCES_COVARIANCE_KEY], three(dict(batch))[K.FORCES_COVARIANCE_KEY],
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("one_pass, forwards", [(True, 2), (False, 2 + 2)])
def test_validation_forwards_counted(one_pass, forwards):
    """Full forwards over the 2 validation batches: one per batch, instead of one each for the level and for ℓ
    (the reference pass, through the layers before the novelty module, is gone too)."""
    model = _model("e2ip")
    calls, hook = _count_forwards(model)
    fit_model_novelty(model, [AtomicDataDict.batched_from_list(_graphs(4))],
                      [AtomicDataDict.batched_from_list(_graphs(2)), AtomicDataDict.batched_from_list(_graphs(2))],
                      one_pass=one_pass)
    hook.remove()
    assert len(calls) == forwards


def test_post_hoc_total_covariance_equals_the_forward():
    """U_tot recomputed from one pass's columns under a stored [c, β] (β > 0) = the model's forces_covariance."""
    from e2ip_plugins.validation_fit import total_covariance

    torch.manual_seed(1)
    model = _model("e2ip")
    fit_model_novelty(model, [AtomicDataDict.batched_from_list(_graphs(6))], [AtomicDataDict.batched_from_list(_graphs(4))])
    nov = novelty_head(model).novelty
    model.eval()
    batch = AtomicDataDict.batched_from_list(_graphs(4))
    with torch.no_grad():
        nov.novelty_calib.copy_(torch.tensor([1.0, 0.0]))
    raw = model(dict(batch))  # calibration at identity: the head's own κ and Σ₀
    with torch.no_grad():
        nov.novelty_calib.copy_(torch.tensor([1.7, 0.8]))
    out = model(dict(batch))
    assert float(out[K.E2IP_NOVELTY_KEY].max()) > 0.5  # the β term is exercised
    tot = total_covariance(nov, raw[K.E2IP_NU_KEY], raw[K.E2IP_KAPPA_KEY], raw[K.E2IP_SIGMA0_KEY], raw[K.E2IP_NOVELTY_KEY])
    torch.testing.assert_close(tot, out[K.FORCES_COVARIANCE_KEY].detach().double(), rtol=1e-10, atol=1e-14)
