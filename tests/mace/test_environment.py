"""The MACE environment: pinned versions, and the core independent of import order."""

import os
import subprocess
import sys
from importlib.metadata import version

import pytest


def test_pinned_versions():
    assert version("mace-torch") == "0.3.16"
    assert version("e3nn") == "0.4.4"


@pytest.mark.parametrize("order", ["import e2ip_plugins, mace", "import mace, e2ip_plugins"])
def test_core_works_in_either_import_order(order):
    code = (
        f"{order}\n"
        "import torch\n"
        "from e2ip_plugins import EvidentialHead\n"
        "from e2ip_plugins._e3nn import o3\n"
        "torch.set_default_dtype(torch.float64)\n"
        "h = EvidentialHead('4x0e+4x1o', num_channels=4)\n"
        "torch.nn.init.normal_(h.mlp.net[-1].weight)\n"
        "x = torch.randn(3, 16); R = o3.rand_matrix()\n"
        "a = h(x)['sigma0']; b = h(x @ o3.Irreps('4x0e+4x1o').D_from_matrix(R).T)['sigma0']\n"
        "assert torch.allclose(b, R @ a @ R.T, atol=1e-12)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_core_does_not_disable_weights_only_loading():
    code = "import os, e2ip_plugins; assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
