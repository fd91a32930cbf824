"""The layers import only what they may (docs/ARCHITECTURE.md), read from the source with ``ast`` alone.

Every ``.py`` file of the packages is mapped to its installed module name with pyproject.toml's
``[tool.setuptools.package-dir]``, and every ``import``/``from ... import`` of a ``lorafleet`` module is collected:
module-level, function-local and ``if TYPE_CHECKING:`` imports alike (a type-only import is still a dependency of
the layer). The rules:

(a) ``lorafleet.export.formats`` imports only itself (import-closed);
(b) ``lorafleet.export.runtime`` imports only formats and runtime;
(c) ``lorafleet.export.compiler`` imports only formats, runtime and compiler;
(d) ``lorafleet.server`` imports only formats and server (no compiler, runtime or edge_client);
(e) ``lorafleet.edge_client`` imports ``lorafleet.export.*`` and edge_client only, never server;
(f) nothing in export/, server/, edge_client/ imports the orchestration (``lorafleet.fleet``, ``.federation``,
    ``.commands``, ``.cli``, ``.tasks``);
(g) every directory holding an ``__init__.py`` under the package folders is listed in ``[tool.setuptools] packages``;
(h) the module-level imports (the ones that run when a module is imported) form no cycle.

Nothing here imports the project, torch or any runtime: the test reads files.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]  # installed package -> folder in the repository
PACKAGES: list[str] = SETUPTOOLS["packages"]
TOP = "lorafleet"

# Layer names, matched by longest prefix of the module name.
FORMATS = "lorafleet.export.formats"
RUNTIME = "lorafleet.export.runtime"
COMPILER = "lorafleet.export.compiler"
EXPORT = "lorafleet.export"  # the export package's own __init__ (and anything else directly in export/)
SERVER = "lorafleet.server"
EDGE = "lorafleet.edge_client"
ORCHESTRATION = ("lorafleet.fleet", "lorafleet.federation", "lorafleet.commands", "lorafleet.cli", "lorafleet.tasks")
LIBRARIES = (FORMATS, RUNTIME, COMPILER, EXPORT, SERVER, EDGE)

# layer -> (rule, the layers it may import). The orchestration (lorafleet/) may import anything.
RULES: dict[str, tuple[str, frozenset[str]]] = {
    FORMATS: ("(a) export.formats is import-closed", frozenset({FORMATS})),
    RUNTIME: ("(b) export.runtime imports only formats and runtime", frozenset({FORMATS, RUNTIME})),
    COMPILER: ("(c) export.compiler imports only formats, runtime, compiler", frozenset({FORMATS, RUNTIME, COMPILER})),
    # export/__init__.py: "importing this package is cheap" - it may re-export formats, nothing heavier.
    EXPORT: ("export/__init__ imports only formats", frozenset({FORMATS, EXPORT})),
    SERVER: ("(d) server imports only formats and server", frozenset({FORMATS, SERVER})),
    EDGE: ("(e) edge_client imports export.* and edge_client only",
           frozenset({FORMATS, RUNTIME, COMPILER, EXPORT, EDGE})),
}

# Exceptions to RULES, each a genuine design need: (importing module, imported module) -> why.
# Keep this empty unless a layer truly cannot do without the import; a new entry is reviewed like an API change.
ALLOWED: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    """The layer a lorafleet module belongs to: the longest layer name that is a prefix of it."""
    for name in sorted((*LIBRARIES, *ORCHESTRATION), key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return TOP  # lorafleet/__init__.py, lorafleet/__main__.py: the top of the orchestration


def module_name(path: Path) -> str:
    """The installed module name of a file, mapped through package-dir exactly as setuptools maps it."""
    rel = path.relative_to(ROOT)
    best: tuple[str, Path] | None = None
    for package, folder in PACKAGE_DIR.items():
        base = Path(folder)
        if rel.parts[: len(base.parts)] == base.parts and (best is None or len(base.parts) > len(best[1].parts)):
            best = (package, base)
    assert best is not None, f"{rel}: no [tool.setuptools.package-dir] entry covers this file"
    package, base = best
    parts = list(rel.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def source_files() -> dict[str, Path]:
    """module name -> file, for every .py file under the package-dir folders."""
    files: dict[str, Path] = {}
    for folder in sorted(set(PACKAGE_DIR.values())):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(path)] = path
    return files


FILES = source_files()
MODULES = frozenset(FILES)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported lorafleet module
    path: Path
    line: int
    top_level: bool  # runs when the source module is imported (not inside a function nor under TYPE_CHECKING)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    base = source.split(".") if is_package else source.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, node: ast.stmt, top_level: bool) -> None:
        if target == TOP or target.startswith(TOP + "."):
            found.append(Import(module, target, path, node.lineno, top_level))

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, top_level)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` imports the submodule; `from pkg import name` imports pkg
                add(sub if sub in MODULES else base, node, top_level)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            top_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, False)
            for stmt in node.orelse:
                visit(stmt, top_level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, top_level)

    visit(tree, True)
    return found


IMPORTS = [imp for module, path in FILES.items() for imp in imports_of(module, path)]


def test_the_scan_sees_the_tree():
    # a guard against a scan that silently finds nothing (a wrong package-dir mapping, a renamed folder)
    for layer in LIBRARIES + ("lorafleet.fleet", "lorafleet.commands"):
        assert any(layer_of(m) == layer for m in MODULES), f"no module of {layer} found under {PACKAGE_DIR}"
    assert any(i.source.startswith(SERVER) and i.target.startswith(FORMATS) for i in IMPORTS)
    assert any(not i.top_level for i in IMPORTS), "function-local / TYPE_CHECKING imports are collected too"


@pytest.mark.parametrize("layer", list(RULES))
def test_layer_imports_only_what_it_may(layer):
    rule, may = RULES[layer]
    bad = []
    for imp in IMPORTS:
        if layer_of(imp.source) != layer:
            continue
        if layer_of(imp.target) in may or (imp.source, imp.target) in ALLOWED:
            continue
        bad.append(f"{imp.where}: {imp.source} imports {imp.target} - breaks rule {rule}")
    assert not bad, "\n".join(bad)


def test_libraries_never_import_the_orchestration():
    bad = [f"{imp.where}: {imp.source} imports {imp.target} - breaks rule (f) export/server/edge_client never "
           f"import lorafleet's orchestration {ORCHESTRATION}"
           for imp in IMPORTS
           if layer_of(imp.source) in LIBRARIES and layer_of(imp.target) in (*ORCHESTRATION, TOP)
           and (imp.source, imp.target) not in ALLOWED]
    assert not bad, "\n".join(bad)


def test_every_package_is_listed_in_pyproject():
    listed = set(PACKAGES)
    missing = []
    for folder in sorted(set(PACKAGE_DIR.values())):
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            package = module_name(init)
            if package not in listed:
                missing.append(f"{init.relative_to(ROOT)}:1: package {package} is not in pyproject.toml's "
                               f"[tool.setuptools] packages - breaks rule (g) (it would not be installed)")
    assert not missing, "\n".join(missing)
    stale = [p for p in PACKAGES if p not in MODULES or FILES[p].name != "__init__.py"]
    assert not stale, f"pyproject.toml lists packages with no __init__.py in the tree - rule (g): {stale}"


def find_cycle(edges: dict[str, dict[str, Import]]) -> list[Import] | None:
    """One import cycle of the graph as its edges, or None (iterative DFS, deterministic order)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(edges, WHITE)
    for start in sorted(edges):
        if color[start] != WHITE:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        trail: list[Import] = []  # trail[i] is the edge from stack[i] to stack[i + 1]
        color[start] = GREY
        while stack:
            node, todo = stack[-1]
            if not todo:
                color[node] = BLACK
                stack.pop()
                if trail:
                    trail.pop()
                continue
            nxt = todo.pop(0)
            edge = edges[node][nxt]
            if color.get(nxt, BLACK) == GREY:
                first = next(i for i, (n, _) in enumerate(stack) if n == nxt)
                return [*trail[first:], edge]
            if color.get(nxt, BLACK) == WHITE:
                color[nxt] = GREY
                trail.append(edge)
                stack.append((nxt, sorted(edges[nxt])))
    return None


def test_no_import_cycles_at_module_level():
    edges: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for imp in IMPORTS:
        if imp.top_level and imp.target in MODULES and imp.target != imp.source:
            edges[imp.source].setdefault(imp.target, imp)
    cycle = find_cycle(edges)
    assert cycle is None, "rule (h) no module-level import cycles; this one runs at import time:\n" + "\n".join(
        f"  {imp.where}: {imp.source} -> {imp.target}" for imp in cycle)
