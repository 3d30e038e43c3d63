"""The foundation demo trains a head that beats its untrained self and stays equivariant."""

from e2ip_plugins import demo


def test_demo_trained_head_beats_untrained(tmp_path, capsys):
    rows = demo.main(["--out", str(tmp_path), "--steps", "150"])
    (_, before), (_, after), (_, recal) = rows
    assert after["forces_nll"] < before["forces_nll"] - 0.5
    assert recal["forces_nll"] < after["forces_nll"] + 0.05  # scale fitted on val, evaluated on test
    out = capsys.readouterr().out
    assert "equivariance of the trained head" in out
    assert len(list(tmp_path.glob("*.png"))) == 3
