"""The shape of the package: its public face, its import graph, its class sizes, its headers.

- ``batpak_mp.__all__`` is explicit, sorted, importable, holds every public name of
  DESIGN.md §1, and holds nothing from outside the package; every public name the
  package namespace binds is listed (a re-export is on purpose or not at all).
- No module imports a private name (``from X import _name``) of another layer's module.
- No import cycle among the modules of batpak_mp and batpak_supervisor (imports inside
  functions and under TYPE_CHECKING count: a type-only cycle still ties two modules).
- No class over 400 lines.
- Every module opens with a docstring saying what it owns and what it must not import.

Known breaches a refactor in progress removes are listed with a ``TODO(lead)`` reason;
an entry that no longer matches fails its ``*_still_needed`` test and must be deleted.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import batpak_mp as bp

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = {"batpak_mp": ROOT / "batpak_mp", "batpak_supervisor": ROOT / "supervisor" / "batpak_supervisor"}

MAX_CLASS_LINES = 400
LONG_CLASSES: dict[str, str] = {
}
# Cycles known today, as the set of modules in them.
KNOWN_CYCLES: dict[frozenset[str], str] = {}
# Modules whose header does not yet say what they must not import (xfail, strict).
HEADERS_MISSING: dict[str, str] = {}

DESIGN_PUBLIC_NAMES = (
    "Coordinate", "Kind", "serve", "connect", "RestartPolicy", "Receipt", "Event", "Page",
    "Frontier", "BatchItem", "verify", "VerifyReport", "Engine", "EngineConfig", "Store", "Service",
)
# DESIGN.md §1 "Errors": each error and the built-in it is mixed in with.
DESIGN_ERRORS: dict[str, type[BaseException] | None] = {
    "BatpakError": Exception,
    "InvalidCoordinate": ValueError,
    "InvalidKind": ValueError,
    "ReservedKind": ValueError,
    "PayloadTooLarge": ValueError,
    "ConcurrencyConflict": None,
    "NotFound": KeyError,
    "StoreLocked": None,
    "WriterUnavailable": ConnectionError,
    "WriterTimeout": TimeoutError,
    "CorruptSegment": None,
    "FutureFormat": None,
    "ProtocolError": None,
    "StoreClosed": None,
}


# -- the modules, parsed once --------------------------------------------------------------

@dataclass(frozen=True)
class Module:
    name: str  # dotted: batpak_mp._format.frame
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def _load() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for top, folder in SOURCE_ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            modules[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    return modules


MODULES = _load()


def layer(module: str) -> str:
    """``_format``, ``_ipc``, ``_read``, ``_storage``, a top-level module of batpak_mp (each
    role and value module is its own layer), or the supervisor package."""
    parts = module.split(".")
    if parts[0] != "batpak_mp":
        return parts[0]
    return parts[1] if len(parts) > 1 else "batpak_mp"


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the dotted module imported from (absolute)
    names: tuple[str, ...]  # for ``from target import a, b``; () for ``import target``
    line: int


def imports_of(module: Module) -> Iterator[Import]:
    """Every import statement in the module, at any depth (functions, TYPE_CHECKING)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module.name, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield Import(module.name, target, tuple(a.name for a in node.names), node.lineno)


def _internal(name: str) -> str | None:
    """The module of ours ``name`` refers to: itself, or its nearest known ancestor."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported: first line}, over our modules only."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for module in MODULES.values():
        for imp in imports_of(module):
            targets = [imp.target] if not imp.names else [
                f"{imp.target}.{n}" if f"{imp.target}.{n}" in MODULES else imp.target for n in imp.names]
            for target in targets:
                found = _internal(target)
                if found is not None and found != module.name:
                    graph[module.name].setdefault(found, imp.line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_cycle_path(graph, set(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_path(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """One cycle through the component, from its smallest member back to it (BFS)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if succ in component and succ not in parents:
                    parents[succ] = node
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _show_cycle(graph: dict[str, dict[str, int]], path: list[str]) -> str:
    return " -> ".join(f"{a} (l.{graph[a][b]})" for a, b in itertools.pairwise(path)) + f" -> {path[-1]}"


# -- public exports --------------------------------------------------------------------

def test_all_is_explicit_sorted_and_unique() -> None:
    assert isinstance(bp.__all__, list)
    assert len(set(bp.__all__)) == len(bp.__all__), "duplicates in batpak_mp.__all__"
    assert bp.__all__ == sorted(bp.__all__), "keep batpak_mp.__all__ sorted"


def test_every_exported_name_is_importable() -> None:
    missing = [name for name in bp.__all__ if not hasattr(bp, name)]
    assert not missing, f"in __all__ but not importable from batpak_mp: {missing}"


def test_every_public_name_of_the_design_is_exported() -> None:
    missing = [name for name in (*DESIGN_PUBLIC_NAMES, *DESIGN_ERRORS) if name not in bp.__all__]
    assert not missing, f"DESIGN.md §1 names missing from batpak_mp.__all__: {missing}"


def test_the_errors_form_one_hierarchy_mixed_with_the_builtins() -> None:
    for name, builtin in DESIGN_ERRORS.items():
        cls = getattr(bp, name)
        assert issubclass(cls, bp.BatpakError), name
        if builtin is not None:
            assert issubclass(cls, builtin), f"{name} should also be a {builtin.__name__}"


def test_exports_are_ours_and_every_public_binding_is_exported() -> None:
    foreign = [f"{name} (from {obj.__module__})" for name in bp.__all__
               if (obj := getattr(bp, name)) is not None and (inspect.isclass(obj) or inspect.isfunction(obj))
               and not obj.__module__.startswith("batpak_mp.")]
    assert not foreign, f"__all__ re-exports objects defined outside batpak_mp: {foreign}"
    unlisted = [name for name, obj in vars(bp).items()
                if not name.startswith("_") and name not in bp.__all__
                and not isinstance(obj, types.ModuleType) and type(obj).__module__ != "__future__"]
    assert not unlisted, f"public names bound in batpak_mp but not in __all__ (export them or hide them): {unlisted}"


# -- imports ------------------------------------------------------------------------------

def private_cross_layer_imports(modules: Iterable[Module]) -> list[str]:
    bad = []
    for module in modules:
        for imp in imports_of(module):
            source = _internal(imp.target)
            if source is None or layer(source) == layer(module.name):
                continue
            for name in imp.names:
                private = name.startswith("_") and not name.startswith("__")
                if private and f"{imp.target}.{name}" not in MODULES:  # a private submodule is fine
                    bad.append(f"{module.rel}:{imp.line}: from {imp.target} import {name}")
    return bad


def test_no_module_imports_a_private_name_of_another_layer() -> None:
    bad = private_cross_layer_imports(MODULES.values())
    assert not bad, "private names imported across layers (make them public in their module or move them):\n" + "\n".join(bad)


def test_the_private_name_check_sees_relative_and_nested_imports() -> None:
    source = (
        "from ._storage.engine import _poison, Engine\n"   # another layer, private: caught
        "from . import _values\n"                          # a private module: fine
        "from .writer import _drain\n"                     # same layer (the writer itself): fine
        "def f():\n    from ._format.frame import _HDR\n"  # inside a function: caught
    )
    fake = Module("batpak_mp.writer", ROOT / "batpak_mp" / "writer.py", ast.parse(source))
    assert private_cross_layer_imports([fake]) == [
        "batpak_mp/writer.py:1: from batpak_mp._storage.engine import _poison",
        "batpak_mp/writer.py:5: from batpak_mp._format.frame import _HDR",
    ]


def test_no_import_cycle() -> None:
    graph = import_graph()
    found = [path for path in cycles(graph) if frozenset(path) not in KNOWN_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(_show_cycle(graph, path) for path in found)


def test_known_cycles_still_needed() -> None:
    present = {frozenset(path) for path in cycles(import_graph())}
    stale = [f"{sorted(c)}: {why}" for c, why in KNOWN_CYCLES.items() if c not in present]
    assert not stale, f"cycles gone: delete them from KNOWN_CYCLES: {stale}"


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "batpak_mp._format.frame" in graph["batpak_mp._ipc.wire"]  # from .._format.frame import ...
    assert "batpak_mp._errors" in graph["batpak_mp._values"]
    assert cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c", "a"]]


# -- classes and headers ------------------------------------------------------------------

def _class_sizes() -> list[tuple[str, str, int]]:
    sizes = []
    for module in MODULES.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                sizes.append((f"{module.rel}:{node.lineno}", node.name, node.end_lineno - node.lineno + 1))
    return sizes


def test_no_class_over_400_lines() -> None:
    long = [f"{where}: class {name} is {n} lines" for where, name, n in _class_sizes()
            if n > MAX_CLASS_LINES and name not in LONG_CLASSES]
    assert not long, f"classes over {MAX_CLASS_LINES} lines (split them along their seams):\n" + "\n".join(long)


def test_long_classes_allowlist_still_needed() -> None:
    long = {name for _, name, n in _class_sizes() if n > MAX_CLASS_LINES}
    stale = [f"{name}: {why}" for name, why in LONG_CLASSES.items() if name not in long]
    assert not stale, f"no longer over {MAX_CLASS_LINES} lines: delete from LONG_CLASSES: {stale}"


def _header_marks() -> list[object]:
    marks: list[object] = []
    for name in sorted(MODULES):
        if name in HEADERS_MISSING:
            marks.append(pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=HEADERS_MISSING[name])))
        else:
            marks.append(name)
    return marks


@pytest.mark.parametrize("name", _header_marks())
def test_module_header_says_what_it_owns_and_must_not_import(name: str) -> None:
    module = MODULES[name]
    doc = ast.get_docstring(module.tree)
    assert doc, f"{module.rel}: no module docstring"
    if module.path.stem in ("__init__", "__main__"):
        return
    text = " ".join(doc.split()).lower()
    assert "owns" in text, f"{module.rel}: the header does not say what the module owns ('Owns: ...')"
    assert "must not import" in text or "never imports" in text, \
        f"{module.rel}: the header does not say what the module must not import ('Must not import ...')"


def test_headers_missing_names_real_modules() -> None:
    unknown = sorted(set(HEADERS_MISSING) - set(MODULES))
    assert not unknown, f"HEADERS_MISSING lists modules that no longer exist: {unknown}"
