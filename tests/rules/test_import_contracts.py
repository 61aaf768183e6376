"""The import-layer contracts of pyproject.toml ([tool.importlinter]) hold.

Runs ``lint-imports`` from the test's own environment, so ``pytest`` alone enforces the
layers (values -> codecs -> domain -> ipc | read -> storage -> roles), the process-role
independence, the supervisor's narrow imports and the purity of the pure modules. One more
check here that a listed contract cannot express: every ``batpak_mp`` module the supervisor
imports is under ``_ipc``, ``_values`` or ``_errors`` (so a new module is covered the day it
appears, and so is ``import batpak_mp`` itself).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
SUPERVISOR_MAY_IMPORT = ("batpak_mp._ipc", "batpak_mp._values", "batpak_mp._errors",
                         "batpak_mp._metrics")  # only with --metrics-fd: the /metrics thread (issue 14)


def test_lint_imports_keeps_every_contract() -> None:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: pip install -e '.[dev]' (import-linter)"
    # --no-cache: helpers and CI may run it at once in one tree; the graph takes under a second.
    proc = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    print(proc.stdout)
    print(proc.stderr, file=sys.stderr)
    assert proc.returncode == 0, f"lint-imports exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "0 broken" in proc.stdout


def test_supervisor_imports_only_the_ipc_contract_values_and_errors() -> None:
    graph = grimp.build_graph("batpak_supervisor", "batpak_mp", cache_dir=None)
    bad = []
    for module in sorted(graph.find_descendants("batpak_supervisor") | {"batpak_supervisor"}):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported.split(".")[0] != "batpak_mp":
                continue
            if not any(imported == ok or imported.startswith(ok + ".") for ok in SUPERVISOR_MAY_IMPORT):
                lines = [d["line_number"] for d in graph.get_import_details(importer=module, imported=imported)]
                bad.append(f"{module} -> {imported} (line {', '.join(map(str, lines))})")
    assert not bad, "the supervisor may import only " + ", ".join(SUPERVISOR_MAY_IMPORT) + ":\n" + "\n".join(bad)
