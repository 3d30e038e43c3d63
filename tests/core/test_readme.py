"""The README stays a short front door, and no relative link in it or in docs/ points nowhere.

Core-only (no mace / nequip import): runs in both test environments.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 300

# [text](target) or [text](target "title"); images ![..](..) match too. Targets without spaces.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def markdown_files():
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def relative_links(path: Path):
    """(line number, target) of every relative link outside fenced code blocks and inline code."""
    in_fence = False
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = re.sub(r"`[^`]*`", "``", line)  # links inside inline code are not links
        for m in LINK.finditer(line):
            target = m.group(1)
            if target.startswith(EXTERNAL) or target.startswith("#"):
                continue
            yield lineno, target


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move detail into docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    missing = []
    for lineno, target in relative_links(path):
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not file_part:
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            missing.append(f"{path.relative_to(ROOT)}:{lineno}: {target}")
    assert not missing, "relative links to missing files:\n" + "\n".join(missing)


def test_link_pattern():
    text = '[a](docs/x.md#y) [b](https://e.org) ![c](img.png "t") `[d](not/a/link.md)` [e](#anchor)'
    tmp = [m.group(1) for m in LINK.finditer(re.sub(r"`[^`]*`", "``", text))]
    assert tmp == ["docs/x.md#y", "https://e.org", "img.png", "#anchor"]
