"""Pure modules stay pure: no OS, clock, randomness, threads or files (DESIGN.md §4).

The codecs, the value types, the commit decision logic, the wire codec and the restart
policy are tested with plain bytes and a fake clock; that holds only while none of them
imports os, mmap, posix_ipc, time, random, secrets, socket, subprocess, threading, signal,
select, fcntl or ctypes, or calls ``open()``. The check reads each module's AST, so it
sees imports inside functions too. Imports under ``if TYPE_CHECKING:`` are skipped: they
never run (``_format/frame.py`` names ``mmap.mmap`` in an annotation that way).

``KNOWN`` lists the breaches that a refactor in progress removes, one (module, name) each,
so every other import of the same module is still checked; an entry that no longer
matches fails ``test_known_breaches_still_exist`` and must be deleted.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

IMPURE_MODULES = frozenset({
    "os", "mmap", "posix_ipc", "time", "random", "secrets", "socket", "subprocess",
    "threading", "signal", "select", "fcntl", "ctypes",
})
OPEN_CALLS = frozenset({"open", "io.open", "builtins.open", "codecs.open"})

PURE_GLOBS = (
    "batpak_mp/_format/*.py",
    "batpak_mp/_prepare.py",
    "batpak_mp/_values.py",
    "batpak_mp/_errors.py",
    "batpak_mp/_gates.py",
    "batpak_mp/_ipc/wire.py",
    "supervisor/batpak_supervisor/policy.py",
    "batpak_mp/_signing.py",
    "batpak_mp/_native/_pure.py",      # the reference of the C codec's encode_group / unpack_record
    # Matched once they land (the IPC contract, the engine split, the conformance work):
    "batpak_mp/_ipc/codes.py",         # exit codes and command lines; the supervisor's policy imports it
    "batpak_mp/_storage/planning.py",  # the pure commit planning
    "batpak_mp/_storage/planning/*.py",
    "batpak_mp/_storage/config.py",
    "batpak_mp/_api.py",
    "batpak_mp/_query.py",             # the Region filter of every read
    "batpak_mp/_retention.py",         # retention rules and what they remove (issue 13)
    "batpak_mp/_iterate.py",           # the feed iterator bases (the caller passes the clock)
)
# Must exist: a rename or move must update this file rather than silently drop the check.
REQUIRED = ("batpak_mp/_format/frame.py", "batpak_mp/_prepare.py", "batpak_mp/_values.py",
            "batpak_mp/_errors.py", "batpak_mp/_gates.py", "batpak_mp/_ipc/wire.py",
            "supervisor/batpak_supervisor/policy.py")

KNOWN: dict[tuple[str, str], str] = {
    ("batpak_mp/_gates.py", "threading"):
        "TODO(lead): remove when Pipeline's ledger lock (l.433) is passed in or lives in the caller",
    ("batpak_mp/_prepare.py", "threading"):
        "TODO(lead): remove when the per-thread msgpack Packer cache leaves _prepare",
}


@dataclass(frozen=True)
class Breach:
    module: str
    line: int
    what: str  # an impure module's name, or "open()"

    def __str__(self) -> str:
        verb = "calls" if self.what.endswith("()") else "imports"
        return f"{self.module}:{self.line}: {verb} {self.what}"


def pure_modules() -> list[str]:
    found = {p.relative_to(ROOT).as_posix() for pattern in PURE_GLOBS for p in ROOT.glob(pattern)}
    return sorted(found)


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _walk_runtime(node: ast.AST) -> list[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    out: list[ast.AST] = []
    for child in ast.iter_child_nodes(node):
        if _is_type_checking_block(child):
            assert isinstance(child, ast.If)
            for other in child.orelse:
                out.append(other)
                out.extend(_walk_runtime(other))
            continue
        out.append(child)
        out.extend(_walk_runtime(child))
    return out


def breaches(module: str) -> list[Breach]:
    return breaches_in((ROOT / module).read_text(), module)


def breaches_in(source: str, module: str) -> list[Breach]:
    tree = ast.parse(source, filename=module)
    found: list[Breach] = []
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # relative: one of ours, checked by its own entry
            found.extend(Breach(module, node.lineno, top) for name in names
                         if (top := name.split(".")[0]) in IMPURE_MODULES)
        if isinstance(node, ast.Call) and _dotted(node.func) in OPEN_CALLS:
            found.append(Breach(module, node.lineno, f"{_dotted(node.func)}()"))
    return found


def test_the_pure_modules_are_all_there() -> None:
    missing = [path for path in REQUIRED if not (ROOT / path).exists()]
    assert not missing, f"pure modules moved or renamed: update PURE_GLOBS/REQUIRED in {__file__}: {missing}"
    assert len(pure_modules()) >= 10


@pytest.mark.parametrize("module", pure_modules())
def test_pure_module_has_no_os_clock_or_files(module: str) -> None:
    bad = [b for b in breaches(module) if (b.module, b.what) not in KNOWN]
    assert not bad, "pure module touches the OS, a clock, randomness or threads:\n" + "\n".join(map(str, bad))


def test_known_breaches_still_exist() -> None:
    stale = [f"{module} {what}: {why}" for (module, what), why in KNOWN.items()
             if not any(b.what == what for b in breaches(module))]
    assert not stale, "fixed: delete these KNOWN entries (and their ignore_imports in pyproject.toml):\n" + "\n".join(stale)


def test_the_scan_sees_imports_in_functions_and_open_calls() -> None:
    """The checker itself: a function-level import, a dotted import and an open() call
    are caught with their lines; a TYPE_CHECKING import is not."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import mmap\n"
        "def f():\n    import time\n    return open('x')\n"
        "import os.path\n"
        "from select import poll\n"
    )
    found = sorted(str(b) for b in breaches_in(source, "m.py"))
    assert found == ["m.py:5: imports time", "m.py:6: calls open()", "m.py:7: imports os", "m.py:8: imports select"]
