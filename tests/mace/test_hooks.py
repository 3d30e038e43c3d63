"""Every MACE name the adapter depends on exists (fails loudly when MACE moves one)."""

import importlib

import pytest

from mace_ext import hooks


def test_all_hooks_present():
    names = hooks.verify_hooks()
    assert "mace.cli.run_train.configure_model" in names
    assert "mace.cli.run_train.get_swa" in names
    assert len(names) == len(hooks.HOOKS)


def test_missing_hook_names_the_symbol():
    fake = hooks.Hook("mace.cli.run_train", "no_such_function", "wrap", "test")
    with pytest.raises(hooks.MACEHookError, match=r"mace\.cli\.run_train\.no_such_function"):
        hooks.resolve(fake)
    with pytest.raises(hooks.MACEHookError, match="mace.nowhere"):
        hooks.resolve(hooks.Hook("mace.nowhere", "x", "call", "test"))


def test_patched_restores_original():
    mod = importlib.import_module("mace.cli.run_train")
    original = mod.get_loss_fn
    with pytest.raises(RuntimeError):
        with hooks.patched("mace.cli.run_train", "get_loss_fn", lambda *a: None) as orig:
            assert orig is original and mod.get_loss_fn is not original
            raise RuntimeError
    assert mod.get_loss_fn is original
    with pytest.raises(KeyError):
        with hooks.patched("mace.cli.run_train", "run_unlisted", None):
            pass


def test_forward_signature_is_checked(monkeypatch):
    """The E2IP models re-declare MACE's forward parameters (TorchScript); a mismatch must stop start-up."""
    from mace_ext import model

    model.check_forward_signature()  # the installed MACE matches
    monkeypatch.setattr(model, "FORWARD_PARAMS", model.FORWARD_PARAMS[:-1])
    with pytest.raises(hooks.MACEHookError, match="forward"):
        hooks.verify_hooks()


def test_new_wrap_hooks_listed():
    names = hooks.verify_hooks()
    for name in ("mace.cli.run_train.create_error_table", "mace.cli.run_train.init_distributed",
                 "mace.cli.run_train.DDP", "mace.tools.tables_utils.evaluate"):
        assert name in names
