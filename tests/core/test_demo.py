"""The synthetic core self-check (``e2ip_plugins.demo``, framework-free, both environments) trains a head
that beats its untrained self and stays equivariant. ``make demo`` itself is the real NequIP job
(``nequip_ext.demo``), tested end to end in ``tests/nequip/test_nequip_demo.py``."""

import pathlib
import re

from e2ip_plugins import demo

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_demo_trained_head_beats_untrained(tmp_path, capsys):
    rows = demo.main(["--out", str(tmp_path), "--steps", "150"])
    (_, before), (_, after), (_, recal) = rows
    assert after["forces_nll"] < before["forces_nll"] - 0.5
    assert recal["forces_nll"] < after["forces_nll"] + 0.05  # scale fitted on val, evaluated on test
    out = capsys.readouterr().out
    assert "equivariance of the trained head" in out
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_make_demo_runs_the_nequip_job():
    makefile = (REPO / "Makefile").read_text()
    target = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert target, "no demo target in the Makefile"
    assert "-m nequip_ext.demo" in target.group(1) and "e2ip_plugins.demo" not in target.group(1)
