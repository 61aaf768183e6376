"""Every OS call of the write side goes through the Disk seam (batpak_mp/_storage/osio.py).

A ``FaultPlan`` can only fail the calls that pass through ``osio.Disk``; a raw ``os.fstat``
or ``os.close`` in the engine is a call no fault test can reach. So no module of
``batpak_mp._storage`` other than ``osio`` may:
- use an attribute of ``os`` other than ``os.path.*``, ``os.fspath``, ``os.PathLike``,
  ``os.stat_result`` (a type) and the upper-case constants (``os.O_RDWR``, ``os.SEEK_SET``);
- import such a name from ``os`` (``from os import close``), or ``os`` under another name;
- import a module that talks to the OS on its own (mmap, fcntl, ctypes, shutil, ...);
- call the builtin ``open``.
The check reads the source (AST); ``test_the_checker_catches_each_kind`` shows what it catches.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

STORAGE = Path(__file__).resolve().parents[2] / "batpak_mp" / "_storage"
SEAM = "osio.py"
ALLOWED_OS_NAMES = {"path", "fspath", "PathLike", "stat_result", "sep", "curdir"}
CONSTANT = re.compile(r"[A-Z][A-Z0-9_]*\Z")  # os.O_RDWR, os.SEEK_SET, os.F_OK ...
OS_MODULES = {"mmap", "fcntl", "ctypes", "shutil", "posix", "io", "pathlib", "tempfile", "subprocess",
              "socket", "select", "signal", "resource", "posix_ipc", "glob"}


def _allowed(name: str) -> bool:
    return name in ALLOWED_OS_NAMES or bool(CONSTANT.match(name))


def raw_os_uses(source: str, filename: str = "<src>") -> list[str]:
    """Each use of the OS around the seam in ``source``, as 'line: what'."""
    tree = ast.parse(source, filename=filename)
    os_names = set()  # names bound to the os module here
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "os":
                    os_names.add(alias.asname or "os")
                    if alias.asname:
                        found.append(f"{node.lineno}: import os as {alias.asname}")
                elif top in OS_MODULES:
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if node.module == "os":
                found += [f"{node.lineno}: from os import {a.name}" for a in node.names if not _allowed(a.name)]
            elif top in OS_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in os_names
                and not _allowed(node.attr)):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append(f"{node.lineno}: open(...)")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


MODULES = sorted(p for p in STORAGE.glob("*.py") if p.name != SEAM)


def test_the_storage_package_is_found() -> None:
    names = {p.name for p in MODULES}
    assert {"engine.py", "journal.py", "planning.py", "recovery.py", "segments.py", "indexfiles.py"} <= names
    assert (STORAGE / SEAM).exists()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_os_call_around_the_seam(path: Path) -> None:
    uses = raw_os_uses(path.read_text(), str(path))
    assert not uses, f"{path.name} calls the OS around osio.Disk (add a Disk method): {uses}"


def test_the_checker_catches_each_kind() -> None:
    bad = """
import os
import os as o2
import mmap
from os import close, O_RDWR, path
from fcntl import flock
def f(fd: int, st: os.stat_result) -> None:
    os.fstat(fd)
    os.close(fd)
    o2.pread(fd, 1, 0)
    open("x")
    os.getpid()
"""
    uses = raw_os_uses(bad)
    assert [u.split(": ", 1)[1] for u in uses] == [
        "import os as o2", "import mmap", "from os import close", "from fcntl import ...",
        "os.fstat", "os.close", "o2.pread", "open(...)", "os.getpid"]
    good = """
import os
def f(d: str, st: os.stat_result) -> int:
    p = os.path.join(os.fspath(d), "x")
    return os.O_RDWR | os.O_CREAT | len(p)
"""
    assert raw_os_uses(good) == []
