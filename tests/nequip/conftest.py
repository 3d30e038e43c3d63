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
