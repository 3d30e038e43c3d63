"""Fixtures for the NequIP adapter tests.

Re-exports NequIP's unit-test fixtures (molecules, atomic_batch, Cu_bulk, model_dtype, ...) so that
``nequip.utils.unittests`` model test mixins can be subclassed here, and runs this directory with
float64 as the default dtype (NequIP's suite only tests model dtypes under a float64 default).
"""

import pytest
import torch

pytest.importorskip("nequip")

from nequip.utils.global_state import set_global_state  # noqa: E402
from nequip.utils.unittests.conftest import *  # noqa: E402,F401,F403


@pytest.fixture(scope="session", autouse=True)
def default_dtype():
    """Override of NequIP's fixture: float64 default for the session part that runs these tests."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    set_global_state(allow_tf32=False)
    yield torch.get_default_dtype()
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def trained_float64(tmp_path_factory):
    """One float64 e²IP model shared by the deployment and MD tests: ``nequip-train -cn e2ip`` (the shipped
    config, 1 epoch on ``iso7_val.xyz``) and ``nequip-package build`` of its best checkpoint.

    {"dir", "ckpt", "package"}; tests must not modify these files."""
    import subprocess
    import sys
    from pathlib import Path

    from ._cli_helpers import DATA, nequip_train

    d = tmp_path_factory.mktemp("trained_float64")
    nequip_train(d / "train", "run=[train]", "max_epochs=1", f"train_file={DATA / 'iso7_val.xyz'}",
                 f"val_file={DATA / 'iso7_val.xyz'}", f"test_file={DATA / 'iso7_test.xyz'}",
                 "training_module.model.model_dtype=float64")
    ckpt = d / "train" / "best.ckpt"
    assert ckpt.is_file()
    pkg = d / "model.nequip.zip"
    res = subprocess.run([str(Path(sys.executable).parent / "nequip-package"), "build", str(ckpt), str(pkg)], cwd=d,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"dir": d, "ckpt": ckpt, "package": pkg}
