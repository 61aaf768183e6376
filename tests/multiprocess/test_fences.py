"""Visibility fences across processes: hidden until commit, hidden for good when
cancelled, abandoned by a dead owner or lost to a writer restart; verify accounts for
every fenced event."""

from __future__ import annotations

import os
import signal
import time

import multiprocess as mp
import pytest
from conftest import kill_writer_and_wait

import batpak_mp as bp
from batpak_mp._values import FENCE_ENTITY, SYSTEM_FENCE_CANCEL, SYSTEM_FENCE_COMMIT

K = bp.Kind(1, 1)


def _seen_by_other_process(data_dir: str, ids: list[bytes]) -> list[bool]:
    with bp.connect(data_dir) as s:
        out = []
        for i in ids:
            try:
                s.get(i)
                out.append(True)
            except bp.NotFound:
                out.append(False)
        return out


def _other(data_dir: str, ids: list[bytes]) -> list[bool]:
    with mp.get_context("fork").Pool(1) as pool:
        seen: list[bool] = pool.apply(_seen_by_other_process, (data_dir, ids))
    return seen


def test_fence_hides_until_commit(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        before = s.append(bp.Coordinate("acct", "s"), K, {"n": 0})
        with s.fence() as f:
            inside = [f.append(bp.Coordinate("acct", "s"), K, {"n": i}) for i in (1, 2)]
            inside += f.append_batch([bp.BatchItem(bp.Coordinate("other", "s"), K, {"n": 3})])
            outside = s.append(bp.Coordinate("acct", "s"), K, {"n": 4})  # not in the fence: visible now
            ids = [r.event_id for r in inside]
            assert _other(data_dir, ids) == [False, False, False]
            with pytest.raises(bp.NotFound):
                s.get(ids[0])
            assert [e.payload["n"] for e in s.history("acct")] == [0, 4]
            assert all(r.global_sequence not in {e.global_sequence for e in s.query_after(0).events} for r in inside)
            assert s.get(outside.event_id).payload == {"n": 4}
        # committed: visible to everyone, in commit order of their sequences
        assert _other(data_dir, ids) == [True, True, True]
        assert [e.payload["n"] for e in s.history("acct")] == [0, 1, 2, 4]
        assert [e.entity_clock for e in s.history("acct")] == [1, 2, 3, 4]
        commits = [e for e in s.history(FENCE_ENTITY) if e.kind == (0, SYSTEM_FENCE_COMMIT)]
        assert commits and commits[-1].payload["fence"] == f.token
        assert before.global_sequence < inside[0].global_sequence


def test_cancelled_fence_stays_hidden_and_verifies(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    with bp.connect(data_dir) as s:
        with pytest.raises(RuntimeError), s.fence() as f:
            hidden = f.append(bp.Coordinate("c", "s"), K, {"secret": 1})
            raise RuntimeError("abort the transaction")
        with pytest.raises(bp.NotFound):
            s.get(hidden.event_id)
        with pytest.raises(bp.FenceLost):
            f.append(bp.Coordinate("c", "s"), K, 2)
        later = s.append(bp.Coordinate("c", "s"), K, {"after": 1})
        assert [e.payload for e in s.history("c")] == [{"after": 1}]
        assert later.entity_clock == 2  # the chain runs through the hidden event
        cancels = [e for e in s.history(FENCE_ENTITY) if e.kind == (0, SYSTEM_FENCE_CANCEL)]
        assert cancels[-1].payload["ranges"] == [[hidden.global_sequence, hidden.global_sequence]]
    svc.stop()
    report = bp.verify(data_dir)
    assert report.ok and report.events_checked >= later.global_sequence
    assert report.events_fenced == 1


def _die_holding_a_fence(data_dir: str, q: object) -> None:
    s = bp.connect(data_dir)
    f = s.fence()
    r = f.append(bp.Coordinate("dead", "s"), K, {"x": 1})
    q.put(r.event_id)  # type: ignore[attr-defined]
    time.sleep(60)


def test_owner_death_cancels_its_fence(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_die_holding_a_fence, args=(data_dir, q))
    p.start()
    event_id = q.get(timeout=30)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    with bp.connect(data_dir) as s:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            cancels = [e for e in s.history(FENCE_ENTITY) if e.kind == (0, SYSTEM_FENCE_CANCEL)]
            if cancels:
                break
            time.sleep(0.2)
        assert cancels and "died" in cancels[-1].payload["why"]
        with pytest.raises(bp.NotFound):
            s.get(event_id)


def test_writer_restart_loses_open_fences_but_keeps_committed_ones(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    with bp.connect(data_dir) as s:
        with s.fence() as done:
            committed = done.append(bp.Coordinate("r", "s"), K, {"committed": True})
        f = s.fence()
        lost = f.append(bp.Coordinate("r", "s"), K, {"lost": True})
        kill_writer_and_wait(svc, s)
        with pytest.raises(bp.FenceLost):
            f.append(bp.Coordinate("r", "s"), K, {"after": True})
        with pytest.raises(bp.FenceLost):
            f.commit()
        assert s.get(committed.event_id).payload == {"committed": True}
        with pytest.raises(bp.NotFound):
            s.get(lost.event_id)
        assert [e.payload for e in s.history("r")] == [{"committed": True}]


def test_revealed_fences_survive_a_rotation(service: tuple[bp.Service, str]) -> None:
    """Rotation used to delete fences.tbl: new clients then failed and later reveals broke."""
    _, data_dir = service
    with bp.connect(data_dir) as s:
        with s.fence() as f:
            inside = f.append(bp.Coordinate("rot", "s"), K, {"fenced": True})
        before = s.frontier().visible
        for _ in range(3):  # > 1 MiB in all: the segment rotates
            s.append_batch([bp.BatchItem(bp.Coordinate("fill", "s"), K, b"x" * 2000) for _ in range(250)])
        assert len(os.listdir(os.path.join(data_dir, "segments"))) >= 2
        with s.fence() as g:
            second = g.append(bp.Coordinate("rot", "s"), K, {"fenced": 2})
        assert s.frontier().visible > before
    with bp.connect(data_dir) as fresh:  # a new client maps the tables after the rotation
        assert fresh.get(inside.event_id).payload == {"fenced": True}
        assert fresh.get(second.event_id).payload == {"fenced": 2}
