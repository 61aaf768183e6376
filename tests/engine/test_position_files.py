"""positions.idx and scopeheads.idx at engine open: kept when they are this store's and
through the log, rebuilt (the same positions) when missing, foreign or behind."""

from __future__ import annotations

import os

from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.tables import POSITIONS_FILE, SCOPE_HEADS_FILE, skip_position, walk_to_position

K = bp.Kind(1, 1)


def _all_positions(engine: bp.Engine, scopes: list[str]) -> dict[str, list[tuple[int | None, object]]]:
    return {s: [(e.scope_position, e.payload) for e in engine.query_scope(s).events] for s in scopes}


def _rebuilt(engine: bp.Engine) -> bool:
    return bool(engine._index.positions.rebuilt)


def test_kept_when_current_rebuilt_when_missing_or_behind(data_dir: str) -> None:
    scopes = [f"s{i}" for i in range(5)]
    with bp.Engine.open(data_dir, SMALL) as e:
        e.append_batch([bp.BatchItem(bp.Coordinate(f"e{i % 7}", scopes[i % 5]), K, i) for i in range(200)])
        want = _all_positions(e, scopes)
    assert want["s0"][:3] == [(1, 0), (2, 5), (3, 10)] and len(want["s4"]) == 40
    with bp.Engine.open(data_dir, SMALL) as e:
        assert not _rebuilt(e) and _all_positions(e, scopes) == want
    idx = os.path.join(data_dir, "index")
    for name in (POSITIONS_FILE, SCOPE_HEADS_FILE):
        os.unlink(os.path.join(idx, name))
        with bp.Engine.open(data_dir, SMALL) as e:
            assert _rebuilt(e) and _all_positions(e, scopes) == want
    # behind the log (a watermark short of the frontier): rebuilt
    with open(os.path.join(idx, POSITIONS_FILE), "r+b") as f:
        f.seek(24)
        f.write((5).to_bytes(8, "little"))
    with bp.Engine.open(data_dir, SMALL) as e:
        assert _rebuilt(e) and _all_positions(e, scopes) == want
        e.append(bp.Coordinate("late", "s0"), K, "late")
        assert _all_positions(e, scopes)["s0"][-1] == (41, "late")
    assert_verified(data_dir)


def test_skip_links_reach_every_position_in_few_steps() -> None:
    n = 70_000
    entries = {p: (p, p - 1, skip_position(p)) for p in range(1, n + 1)}  # sequence == position here
    worst = 0
    for target in [*range(1, 300), *range(n - 300, n + 1), 4096, 4097, 65_535, 65_536, 12_345]:
        steps = 0

        def entry(seq: int) -> tuple[int, int, int]:
            nonlocal steps
            steps += 1
            return entries[seq]

        assert walk_to_position(entry, n, n, target) == target
        worst = max(worst, steps)
    assert worst < 100  # O(log n): a walk one by one would take up to 70,000
    assert walk_to_position(lambda seq: (0, 0, 0), 10, 10, 3) == 0  # a stale entry: the caller refreshes
