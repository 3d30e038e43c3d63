"""The project's module graph: no import cycles, no oversized modules, a framework-free core.

Reads the source with :mod:`ast` only (imports neither mace nor nequip, so it runs in both environments).
Every import statement counts, including those inside functions, and so does ``importlib.import_module``
of a literal name. An edge goes to the most specific project module an import names: ``from pkg import
name`` reaches ``pkg.name`` when that is a module, else ``pkg`` (its ``__init__``). The parent packages
Python runs on the way are not edges: a package's ``__init__`` importing its own submodules is the usual
layout, not a cycle.
"""

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[2]
GRAPH_PACKAGES = ("e2ip_plugins", "mace_ext", "nequip_ext")
SIZE_PACKAGES = GRAPH_PACKAGES + ("hydra_plugins", "benchmarks", "tests", "tools")
MAX_LINES = 400
FRAMEWORKS = ("mace_ext", "nequip_ext", "mace", "nequip")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(packages) -> Dict[str, Path]:
    return {module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, module: str) -> List[str]:
    """Absolute dotted names every import of a file may reach, relative imports resolved: ``import a.b``
    gives ``a.b``; ``from X import n`` gives ``X.n`` (a module, or a name whose longest module prefix is X)."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")[: len(module.split(".")) - node.level + is_package] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            names.extend(prefix if alias.name == "*" else f"{prefix}.{alias.name}" for alias in node.names)
        elif _is_import_module_call(node):
            names.append(node.args[0].value)
    return names


def _is_import_module_call(node) -> bool:
    """``importlib.import_module("literal")`` (nequip_ext imports by name to keep torch.package away)."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def longest_module(name: str, modules) -> Optional[str]:
    """The longest dotted prefix of ``name`` that is one of ``modules`` (None outside the project)."""
    parts = name.split(".")
    return next((m for m in (".".join(parts[:end]) for end in range(len(parts), 0, -1)) if m in modules), None)


def project_edges(files: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> the project modules it imports."""
    return {module: {t for n in imported_names(path, module) if (t := longest_module(n, files)) not in (None, module)}
            for module, path in files.items()}


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    colour: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(edges):
        if colour.get(start) is None:
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(project_edges(source_files(GRAPH_PACKAGES)))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_400_lines():
    long = {m: n for m, p in source_files(SIZE_PACKAGES).items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_core_imports_no_framework():
    bad = {}
    for module, path in source_files(("e2ip_plugins",)).items():
        hits = sorted({n for n in imported_names(path, module) if n.split(".")[0] in FRAMEWORKS})
        if hits:
            bad[module] = hits
    assert not bad, f"e2ip_plugins must stay framework-agnostic, but imports: {bad}"


def test_graph_sees_lazy_relative_imports_and_cycles(tmp_path):
    """The checks above are not vacuous: function-level and relative imports are edges, a cycle is found."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from ..b import c\n    from . import d\n    import importlib\n"
                    "    importlib.import_module('pkg.e')\n", encoding="utf-8")
    assert imported_names(path, "pkg.sub.mod") == ["pkg.b.c", "pkg.sub.d", "importlib", "pkg.e"]
    edges = {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": set()}
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": set()}) is None
