"""The NequIP environment: pinned versions and the registered extension entry point."""

from importlib.metadata import entry_points, version


def test_pinned_versions():
    assert version("nequip").startswith("0.19.")
    assert version("e3nn").startswith("0.6.")


def test_extension_entry_point_registered():
    # several packages may register `init_always` (nequip-allegro does: "allegro"); `import nequip` loads each
    init_always = [ep.value for ep in entry_points(group="nequip.extension") if ep.name == "init_always"]
    assert "nequip_ext" in init_always and "allegro" in init_always
