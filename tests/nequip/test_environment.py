"""The NequIP environment: pinned versions and the registered extension entry point."""

from importlib.metadata import entry_points, version


def test_pinned_versions():
    assert version("nequip").startswith("0.19.")
    assert version("e3nn").startswith("0.6.")


def test_extension_entry_point_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="nequip.extension")}
    assert eps.get("init_always") == "nequip_ext"
