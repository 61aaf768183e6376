"""Per-scope positions with visibility fences and writer restarts, on a served store.

The rule (docs/FORMAT.md §12.4): an event written in a fence takes its scope position
when the fence commits, after every event of its scope published before the commit; a
cancelled or lost fence takes none. A follower that has read through position p never
finds a new event at or below p, and positions stay gap-free. A new writer rebuilds the
same positions (they are derived from the log and the fence chain)."""

from __future__ import annotations

from conftest import kill_writer_and_wait

import batpak_mp as bp

K = bp.Kind(1, 1)
S = "app-1"


def _scope(store: bp.Store, after: int = 0) -> list[tuple[int | None, object]]:
    return [(e.scope_position, e.payload) for e in store.query_scope(S, after).events]


def test_fenced_events_take_positions_when_revealed(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    c = bp.Coordinate("agg-1", S)
    with bp.connect(data_dir) as s, bp.connect(data_dir) as follower:
        s.append(c, K, "e1")
        f = s.fence()
        x1 = f.append(c, K, "x1")
        f.append(bp.Coordinate("agg-2", S), K, "x2")
        e2 = s.append(bp.Coordinate("agg-3", S), K, "e2")
        assert x1.global_sequence < e2.global_sequence
        seen = _scope(follower)
        assert seen == [(1, "e1"), (2, "e2")]
        latest = follower.latest_in_scope(S)
        assert latest is not None and latest.scope_position == 2
        f.commit()
        # revealed above what the follower passed, in the order of the fence's ranges
        assert _scope(follower, 2) == [(3, "x1"), (4, "x2")]
        assert follower.get(x1.event_id).scope_position == 3
        # a cancelled fence takes no position: no gap
        g = s.fence()
        g.append(c, K, "never")
        g.cancel()
        s.append(c, K, "e3")
        before = _scope(follower)
        assert before == [(1, "e1"), (2, "e2"), (3, "x1"), (4, "x2"), (5, "e3")]
        # a fence left open by a writer crash takes none either; a new writer rebuilds the same positions
        h = s.fence()
        h.append(c, K, "lost")
        kill_writer_and_wait(svc, s)
        s.append(c, K, "e4")
        assert _scope(follower) == [*before, (6, "e4")]
        newest = follower.latest_in_scope(S)
        assert newest is not None and newest.payload == "e4" and newest.scope_position == 6


def test_positions_survive_a_rebuild_and_many_scopes(service: tuple[bp.Service, str]) -> None:
    """Enough scopes that the heads table is replaced by a larger one while clients read it,
    then a writer restart whose rebuild must give every event the position it had."""
    svc, data_dir = service
    with bp.connect(data_dir) as s, bp.connect(data_dir) as reader:
        for chunk in range(3):
            s.append_batch([bp.BatchItem(bp.Coordinate(f"e{i}", f"t{i % 2500}"), K, i)
                            for i in range(chunk * 2500, chunk * 2500 + 2500)])
            assert reader.latest_in_scope("t7") is not None
        newest = reader.latest_in_scope("t7")
        assert newest is not None and newest.scope_position == 3 and newest.payload == 5007
        before = {t: [(e.scope_position, e.payload) for e in reader.query_scope(f"t{t}").events] for t in (0, 7, 2499)}
        assert before[0] == [(1, 0), (2, 2500), (3, 5000)]
        kill_writer_and_wait(svc, s)
        s.append(bp.Coordinate("late", "t7"), K, "late")
        after = {t: [(e.scope_position, e.payload) for e in reader.query_scope(f"t{t}").events] for t in (0, 7, 2499)}
        assert after[0] == before[0] and after[2499] == before[2499]
        assert after[7] == [*before[7], (4, "late")]
