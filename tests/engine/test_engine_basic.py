"""The engine API in one process: append, read, guards, idempotency, reopen."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp

C = bp.Coordinate("player:alice", "room:dungeon")
K = bp.Kind(1, 7)


def test_append_get_history_walk(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        r1 = e.append(C, K, {"x": 10, "y": 20})
        r2 = e.append(C, K, {"x": 11}, expected_clock=1)
        assert (r1.global_sequence, r2.global_sequence) == (1, 2)
        assert (r1.entity_clock, r2.entity_clock) == (1, 2)
        assert r1.durable and r2.prev_hash == r1.event_hash and r1.prev_hash == bytes(32)
        ev = e.get(r1.event_id)
        assert ev.payload == {"x": 10, "y": 20} and ev.coordinate == C and ev.kind == K
        assert [x.global_sequence for x in e.history("player:alice")] == [1, 2]
        assert [x.global_sequence for x in e.walk_ancestors(r2.event_id)] == [2, 1]
        assert e.verify_receipt(r2)
        assert not e.verify_receipt(r2._replace(event_hash=bytes(32)))
        page = e.query_after(0, limit=1)
        assert [x.global_sequence for x in page.events] == [1] and page.next_after == 1
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert_verified(data_dir)


def test_guards(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        e.append(C, K, 1)
        with pytest.raises(bp.ConcurrencyConflict) as ci:
            e.append(C, K, 2, expected_clock=0)
        assert (ci.value.expected, ci.value.actual) == (0, 1)
        with pytest.raises(bp.ReservedKind):
            e.append(C, bp.Kind(0, 1), 1)
        with pytest.raises(bp.ReservedKind):
            e.append(C, bp.Kind(0xD, 1), 1)
        with pytest.raises(bp.InvalidKind):
            e.append(C, bp.Kind(16, 1), 1)
        with pytest.raises(bp.InvalidCoordinate):
            bp.Coordinate("", "s")
        with pytest.raises(bp.InvalidCoordinate):
            bp.Coordinate("a\nb", "s")
        with pytest.raises(bp.InvalidCoordinate):
            bp.Coordinate("x" * 1025, "s")
        with pytest.raises(bp.NotFound):
            e.get(bytes(16))
        assert e.visible == 1
    assert_verified(data_dir)


def test_idempotency_before_clock(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        r = e.append(C, K, {"a": 1}, idempotency_key="order-1", expected_clock=0)
        again = e.append(C, K, {"a": 1}, idempotency_key="order-1", expected_clock=0)
        assert again == r._replace(deduplicated=True) and e.visible == 1
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e.append(C, K, {"a": 1}, idempotency_key="order-1", expected_clock=0) == r._replace(deduplicated=True)
        assert e.visible == 1
    assert_verified(data_dir)


def test_second_owner_is_locked_out(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL):
        with pytest.raises(bp.StoreLocked) as ei:
            bp.Engine.open(data_dir, SMALL)
        assert ei.value.holder_pid == os.getpid()


def test_rotation_reopen_and_batches(data_dir: str) -> None:
    receipts = []
    with bp.Engine.open(data_dir, SMALL) as e:
        for i in range(60):
            items = [bp.BatchItem(bp.Coordinate(f"e{j % 7}", "s"), bp.Kind(2, 1), {"i": i, "pad": "x" * 300})
                     for j in range(50)]
            receipts += e.append_batch(items)
        assert e._seg is not None and e._seg.segment_id >= 2
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e.visible == 3000
        for r in receipts[::97]:
            assert e.verify_receipt(r)
        hist = e.history("e3")
        assert [h.entity_clock for h in hist] == list(range(1, len(hist) + 1))
        assert len(e.history("e3", after_clock=10, limit=5)) == 5
        assert e.history("e3", after_clock=10, limit=5)[0].entity_clock == 11
        seen, after = 0, 0
        while True:
            page = e.query_after(after, limit=700, entity="e3")
            if not page.events:
                break
            seen += len(page.events)
            after = page.next_after
        assert seen == len(hist)
    assert_verified(data_dir)
