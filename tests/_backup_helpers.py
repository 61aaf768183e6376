"""Helpers shared by the backup and fork tests (tests/*/test_backup*.py): filling a store
in-process with events of a known size."""

from __future__ import annotations

from conftest import SMALL

import batpak_mp as bp


def grow(path: str, n: int, start: int = 0, *, pad: int = 200, entities: int = 7) -> list[bp.Receipt]:
    """Append events ``start`` .. ``start + n - 1`` (about ``pad + 200`` bytes each) in
    batches of 100 to the store at ``path`` (an ``Engine`` with 1 MiB segments, so about
    2,600 of the default size fill a segment); their receipts. Commits end every 100
    events (and at the last)."""
    out: list[bp.Receipt] = []
    with bp.Engine.open(path, SMALL) as e:
        for i in range(start, start + n, 100):
            out += e.append_batch([bp.BatchItem(bp.Coordinate(f"user:{j % entities}", "s"), bp.Kind(1, 1),
                                                {"i": j, "pad": "x" * pad}) for j in range(i, min(start + n, i + 100))])
    return out
