import pytest

pytest.importorskip("mace", reason="MACE adapter tests need the mace-torch environment (.venv-mace)")
