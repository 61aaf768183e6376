"""Cursors, reactors, causal links, projections with snapshots, and payload upcasters,
against a real service with real processes (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import multiprocess as mp
import pytest

import batpak_mp as bp
from batpak_mp._replay import EventFilter, snapshot_path

K = bp.Kind(1, 1)  # source events
R = bp.Kind(1, 2)  # reactions
CTX = mp.get_context("fork")


def _expect(q: Any, tag: str, timeout: float = 30) -> Any:
    got_tag, value = q.get(timeout=timeout)
    assert got_tag == tag, (got_tag, value)
    return value


def _wait_new_writer(s: bp.Store, old_epoch: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = s.frontier()
        if f.writer_epoch > old_epoch and f.writer_state == bp.WriterState.READY:
            return
        time.sleep(0.02)
    raise AssertionError("the writer was not restarted")


def _append_sources(s: bp.Store, n: int, start: int = 0) -> list[bp.Receipt]:
    return [s.append(bp.Coordinate(f"src{i % 3}", "t"), K, {"i": i}) for i in range(start, start + n)]


# -- cursors ---------------------------------------------------------------------------------


def _consume_then_die(data_dir: str, ack_upto: int, die_after: int, q: Any) -> None:
    """Ack the first ``ack_upto`` events, take ``die_after`` in all, then SIGKILL itself."""
    with bp.connect(data_dir) as s:
        cur = s.cursor("billing", kind=K, timeout=10)
        for n, ev in enumerate(cur, 1):
            if n <= ack_upto:
                cur.ack(ev)
            q.put(("got", ev.global_sequence))
            if n == die_after:
                q.close()
                q.join_thread()  # the queue's feeder thread has sent everything
                os.kill(os.getpid(), signal.SIGKILL)


def _consume(data_dir: str, n: int, q: Any) -> None:
    with bp.connect(data_dir) as s:
        cur = s.cursor("billing", kind=K, timeout=10)
        q.put(("position", cur.position))
        seqs = []
        for ev in cur:
            seqs.append(ev.global_sequence)
            cur.ack(ev)
            if len(seqs) == n:
                break
        q.put(("done", seqs))


def test_cursor_killed_before_ack_resumes_at_least_once(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        sent = [r.global_sequence for r in _append_sources(s, 10)]
        q = CTX.Queue()
        p = CTX.Process(target=_consume_then_die, args=(data_dir, 4, 7, q))
        p.start()
        got = [_expect(q, "got") for _ in range(7)]
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        assert got == sent[:7]
        p2 = CTX.Process(target=_consume, args=(data_dir, 6, q))
        p2.start()
        assert _expect(q, "position") == sent[3]  # the last acknowledged event
        assert _expect(q, "done") == sent[4:]  # 5..7 again (unacknowledged), then the rest: no gap
        p2.join(10)
        assert p2.exitcode == 0
        # everything acknowledged: a new cursor of that name has nothing to deliver
        assert list(s.cursor("billing", kind=K, timeout=0.2)) == []


def test_cursor_acks_are_monotonic_and_not_delivered_to_itself(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        sent = [r.global_sequence for r in _append_sources(s, 5)]
        cur = s.cursor("all", timeout=0.2)  # no filter: would see its own acks if they were delivered
        seen = []
        for ev in cur:
            seen.append(ev.global_sequence)
            cur.ack(ev)
        assert seen == sent  # the writer's own start event is a system event: skipped too
        assert cur.position == sent[-1]
        assert cur.next(0.2) is None  # its five ack events were not delivered
        cur.ack_through(sent[1])  # backwards: a no-op
        assert cur.position == sent[-1]
        with pytest.raises(bp.InvalidArgument):
            cur.ack_through(s.frontier().visible + 100)
        again = s.cursor("all", timeout=0.2)
        assert again.position == sent[-1] and list(again) == []
        acks = s.history("cursor:all")
        assert [e.payload["through"] for e in acks] == sent
        assert all(e.kind == bp.Kind(0, 0x10) and e.scope == "system" for e in acks)
        # a cursor asked for system events sees them (another cursor's acks included)
        sys_cur = s.cursor("audit", include_system=True, timeout=0.2)
        assert {ev.kind.category for ev in sys_cur} == {0, 1}
        # "from now": starts at the frontier, and a restart keeps that start
        now = s.cursor("late", start_after=None, timeout=0.2)
        pos = now.position
        assert pos == s.frontier().visible - 1  # its own start record is the newest event
        _append_sources(s, 1, 100)
        assert [ev.payload["i"] for ev in s.cursor("late", timeout=0.2)] == [100]
        rew = s.cursor("rew", kind=K, timeout=0.2)
        first = [ev.global_sequence for ev in rew]
        rew.rewind()
        assert [ev.global_sequence for ev in rew] == first


# -- reactors --------------------------------------------------------------------------------


def _double(ev: bp.Event) -> list[Any]:
    return [(bp.Coordinate("out", "t"), R, {"double": ev.payload["i"] * 2})]


def _reactions_by_cause(s: bp.Store) -> Counter[bytes]:
    causes: Counter[bytes] = Counter()
    after = 0
    while True:
        page = s.query_after(after, limit=1000, kind=R)
        for ev in page.events:
            assert ev.causation_id is not None
            causes[ev.causation_id] += 1
        if len(page.events) < 1000:
            return causes
        after = page.next_after


def test_reactions_carry_their_cause_and_caused_by_lists_them(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        src = _append_sources(s, 4)
        fan = s.react("fan", lambda ev: [bp.BatchItem(bp.Coordinate("out", "t"), R, {"n": n}) for n in range(3)]
                      if ev.payload["i"] % 2 == 0 else None, kind=K)
        assert fan.run_once() == 4
        for r in src:
            effects = s.caused_by(r.event_id)
            if s.get(r.event_id).payload["i"] % 2:
                assert effects == []
                continue
            assert [e.payload["n"] for e in effects] == [0, 1, 2]
            assert all(e.causation_id == r.event_id and e.correlation_id == r.event_id for e in effects)
        assert len(s.caused_by(src[0].event_id, limit=2)) == 2
        assert s.caused_by(src[0].event_id, within=1) == []  # the effects are further away than that
        assert fan.cursor.position == src[-1].global_sequence


def test_a_rerun_of_the_handler_writes_nothing_new(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        src = _append_sources(s, 5)
        calls: Counter[int] = Counter()

        def handler(ev: bp.Event) -> list[Any]:
            calls[ev.global_sequence] += 1
            return _double(ev)

        # two reactors of the same name, both opened before either commits: the second is a
        # process that crashed after its batch committed and runs the same events again
        first = s.react("dbl", handler, kind=K)
        second = s.react("dbl", handler, kind=K)
        assert first.run_once() == 5
        assert second.run_once() == 5
        assert set(calls.values()) == {2}
        causes = _reactions_by_cause(s)
        assert causes == Counter({r.event_id: 1 for r in src})
        assert second.cursor.position == first.cursor.position == src[-1].global_sequence


def _react_and_die(data_dir: str, q: Any) -> None:
    """A reactor process killed inside its handler (after computing the reaction, before
    the batch is appended)."""
    with bp.connect(data_dir) as s:
        def handler(ev: bp.Event) -> list[Any]:
            out = _double(ev)
            if ev.payload["i"] == 2:
                q.put(("dying", ev.global_sequence))
                q.close()
                q.join_thread()
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        s.react("crashy", handler, kind=K).run(timeout=10)


def test_crash_in_the_handler_reruns_it_without_double_fire(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        src = _append_sources(s, 5)
        q = CTX.Queue()
        p = CTX.Process(target=_react_and_die, args=(data_dir, q))
        p.start()
        assert _expect(q, "dying") == src[2].global_sequence
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        assert _reactions_by_cause(s) == Counter({r.event_id: 1 for r in src[:2]})
        again = s.react("crashy", _double, kind=K)
        assert again.run_once() == 3
        assert _reactions_by_cause(s) == Counter({r.event_id: 1 for r in src})


def test_a_raising_handler_backs_off_and_is_not_acknowledged(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        ok = _append_sources(s, 1)[0]
        bad = s.append(bp.Coordinate("src0", "t"), K, {"i": -1})
        calls: list[float] = []
        reported: list[tuple[int, str]] = []

        def handler(ev: bp.Event) -> list[Any]:
            if ev.payload["i"] < 0:
                calls.append(time.monotonic())
                raise RuntimeError("boom")
            return _double(ev)

        r = s.react("flaky", handler, kind=K, max_failures=100,
                    on_error=lambda ev, exc: reported.append((ev.global_sequence, str(exc))))
        t0 = time.monotonic()
        assert r.run(timeout=1.0) == 1
        assert 0.95 <= time.monotonic() - t0 < 2.0
        # 0.1 s doubling: attempts at about 0, 0.1, 0.3, 0.7 s - a few calls, not a spin
        assert 3 <= len(calls) <= 6, len(calls)
        assert reported == [(bad.global_sequence, "boom")] * len(calls)
        assert [(f.sequence, f.attempt) for f in r.errors] == [(bad.global_sequence, n) for n in range(1, len(calls) + 1)]
        assert isinstance(r.errors[-1].error, RuntimeError)
        assert r.cursor.position == ok.global_sequence  # the failing event is not acknowledged
        assert s.cursor("reactor:flaky", kind=K).position == ok.global_sequence  # in the journal too
        assert s.caused_by(bad.event_id) == []

        # max_failures consecutive failures -> ReactorError; the event stays unacknowledged
        quick = s.react("quick", handler, kind=K, max_failures=3, backoff=0.01, max_backoff=0.02)
        with pytest.raises(bp.ReactorError) as ei:
            quick.run(timeout=5)
        assert (ei.value.reactor, ei.value.sequence, ei.value.failures) == ("quick", bad.global_sequence, 3)
        assert isinstance(ei.value.cause, RuntimeError)
        assert quick.cursor.position == ok.global_sequence

        # the handler recovers: the same event is retried and handled once
        handler_fixed = {"fixed": False}

        def sometimes(ev: bp.Event) -> list[Any]:
            if ev.payload["i"] < 0 and not handler_fixed["fixed"]:
                handler_fixed["fixed"] = True
                raise RuntimeError("once")
            return _double(ev)

        recovering = s.react("recovering", sometimes, kind=K, backoff=0.01)
        assert recovering.run(timeout=0.5) == 2
        assert len(s.caused_by(bad.event_id)) == 1 and len(recovering.errors) == 1

        # a reaction that cannot be appended counts as a handler failure
        reserved = s.react("reserved", lambda ev: [(bp.Coordinate("x", "t"), bp.Kind(0, 0x10), {})], kind=K,
                           max_failures=1)
        with pytest.raises(bp.ReactorError) as ei2:
            reserved.run(timeout=2)
        assert isinstance(ei2.value.cause, bp.ReservedKind)


def _slow_double(ev: bp.Event) -> list[Any]:
    time.sleep(0.005)  # so that the writer is killed while the reactor still has work in flight
    return _double(ev)


def _reactor_process(data_dir: str, n: int, q: Any) -> None:
    with bp.connect(data_dir) as s:
        r = s.react("restart", _slow_double, kind=K)
        q.put(("ready", os.getpid()))
        q.put(("done", r.run(timeout=25, max_events=n)))


def test_writer_restart_while_a_reactor_runs(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    n = 40
    with bp.connect(data_dir) as s:
        q = CTX.Queue()
        p = CTX.Process(target=_reactor_process, args=(data_dir, n, q))
        p.start()
        _expect(q, "ready")
        src = _append_sources(s, n // 2)
        deadline = time.monotonic() + 10
        while s.cursor("reactor:restart", kind=K).position < src[5].global_sequence and time.monotonic() < deadline:
            time.sleep(0.01)
        f = s.frontier()
        os.kill(f.writer_pid, signal.SIGKILL)  # the reactor has work in flight
        position_at_kill = s.cursor("reactor:restart", kind=K).position
        _wait_new_writer(s, f.writer_epoch)
        src += _append_sources(s, n - n // 2, n // 2)
        assert _expect(q, "done") == n
        p.join(10)
        assert p.exitcode == 0
        assert _reactions_by_cause(s) == Counter({r.event_id: 1 for r in src})  # no gap, no duplicate
        assert s.cursor("reactor:restart", kind=K).position == src[-1].global_sequence
        assert position_at_kill < src[n // 2 - 1].global_sequence  # it was killed mid-way


# -- projections -----------------------------------------------------------------------------


class Totals:
    """Sum of payload["i"] per entity; counts its apply calls."""

    name = "totals"
    version = 1
    initial: Any = dict

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, state: dict[str, int], event: bp.Event) -> dict[str, int]:
        self.applied += 1
        state[event.entity] = state.get(event.entity, 0) + event.payload["i"]
        return state


class TotalsV2(Totals):
    version = 2


def _expected_totals(payloads: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for entity, i in payloads:
        out[entity] = out.get(entity, 0) + i
    return out


def test_projection_folds_and_caches(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        _append_sources(s, 30)
        s.append(bp.Coordinate("src0", "u"), R, {"i": 1000})
        rows = [(f"src{i % 3}", i) for i in range(30)]
        assert s.project(Totals(), kind=K) == _expected_totals(rows)
        assert s.project(Totals()) == _expected_totals([*rows, ("src0", 1000)])  # system events skipped
        assert s.project(Totals(), entity="src1") == _expected_totals([r for r in rows if r[0] == "src1"])
        assert s.project(Totals(), entity="src0", scope="u") == {"src0": 1000}
        assert s.project(Totals(), entity="src0", kind=K) == _expected_totals([r for r in rows if r[0] == "src0"])
        assert s.project(Totals(), entity="nobody") == {}

        p = Totals()
        first = s.project_if_changed(p, kind=K)
        assert p.applied == 30
        t0 = time.perf_counter()
        for _ in range(1000):
            assert s.project_if_changed(p, kind=K) is first
        per_call = (time.perf_counter() - t0) / 1000
        assert p.applied == 30 and per_call < 200e-6, per_call
        _append_sources(s, 3, 30)
        assert s.project_if_changed(p, kind=K) == _expected_totals([(f"src{i % 3}", i) for i in range(33)])
        assert p.applied == 33  # only the new events were folded in
        s.append(bp.Coordinate("elsewhere", "t"), R, {"i": 1})
        assert s.project_if_changed(p, kind=K) is first and p.applied == 33

        # one entity: appends to other entities do not fold anything
        pe = Totals()
        one = s.project_if_changed(pe, entity="src2")
        applied = pe.applied
        s.append(bp.Coordinate("src1", "t"), K, {"i": 5})
        assert s.project_if_changed(pe, entity="src2") is one and pe.applied == applied
        s.append(bp.Coordinate("src2", "t"), K, {"i": 5})
        assert s.project_if_changed(pe, entity="src2")["src2"] == one["src2"] and pe.applied == applied + 1

        # a failing apply leaves no half-applied state in the cache
        class Boom(Totals):
            name = "boom"
            fail = False

            def apply(self, state: dict[str, int], event: bp.Event) -> dict[str, int]:
                if self.fail:
                    raise ValueError("bad event")
                return super().apply(state, event)

        b = Boom()
        before = dict(s.project_if_changed(b, kind=K))
        b.fail = True
        _append_sources(s, 1, 50)
        with pytest.raises(ValueError):
            s.project_if_changed(b, kind=K)
        b.fail = False
        assert s.project_if_changed(b, kind=K) == _expected_totals([*before.items(), ("src2", 50)])


def test_projection_snapshots(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        _append_sources(s, 20)
        rows = [(f"src{i % 3}", i) for i in range(20)]
        p = Totals()
        assert s.project(p, kind=K, snapshot=True, snapshot_every=1) == _expected_totals(rows)
        path = snapshot_path(data_dir, p, EventFilter(kind=K))
        assert os.path.exists(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n]

        _append_sources(s, 2, 20)
        rows += [("src2", 20), ("src0", 21)]
        p2 = Totals()
        assert s.project(p2, kind=K, snapshot=True, snapshot_every=1) == _expected_totals(rows)
        assert p2.applied == 2  # started from the snapshot
        p3 = Totals()
        assert s.project_if_changed(p3, kind=K, snapshot=True) == _expected_totals(rows) and p3.applied == 0

        # another version: the snapshot is ignored, the state rebuilt from zero
        v2 = TotalsV2()
        assert s.project(v2, kind=K, snapshot=True) == _expected_totals(rows) and v2.applied == 22
        # other filters: another file
        pe = Totals()
        assert s.project(pe, entity="src0", snapshot=True, snapshot_every=1) == _expected_totals(
            [r for r in rows if r[0] == "src0"])
        pe2 = Totals()
        s.append(bp.Coordinate("src0", "t"), K, {"i": 1})
        assert s.project(pe2, entity="src0", snapshot=True)["src0"] == sum(i for e, i in rows if e == "src0") + 1
        assert pe2.applied == 1
        rows.append(("src0", 1))

        # damage: a flipped byte, or a snapshot whose anchor is not this journal's -> rebuild
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as out:
            out.write(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
        p4 = Totals()
        assert s.project(p4, kind=K, snapshot=True) == _expected_totals(rows) and p4.applied == 23
        doc = msgpack.unpackb(data[40:], raw=False, strict_map_key=False)
        doc["anchor_hash"] = bytes(32)
        doc["state"] = {"src0": -1}  # a wrong state that must never be used
        _write_snapshot(path, doc)
        p5 = Totals()
        assert s.project(p5, kind=K, snapshot=True, snapshot_every=10**6) == _expected_totals(rows)
        assert p5.applied == 23
        doc["position"] = s.frontier().visible + 10  # ahead of the journal
        _write_snapshot(path, doc)
        assert s.project(Totals(), kind=K, snapshot=True, snapshot_every=10**6) == _expected_totals(rows)

        class Unpackable(Totals):
            name = "unpackable"
            initial = set

            def apply(self, state: Any, event: bp.Event) -> Any:
                state.add(event.global_sequence)
                return state

        with pytest.raises(bp.InvalidArgument):
            s.project(Unpackable(), kind=K, snapshot=True, snapshot_every=1)


def _write_snapshot(path: str, doc: dict[str, Any]) -> None:
    import hashlib

    body = msgpack.packb(doc, use_bin_type=True)
    with open(path, "wb") as f:
        f.write(b"BPSNAP01" + hashlib.blake2b(body, digest_size=32).digest() + body)


# -- payload versions ------------------------------------------------------------------------

V = bp.Kind(2, 9)


@pytest.fixture
def registry() -> Iterator[None]:
    yield
    bp.unregister_payload(V)


def test_upcasters_and_future_versions(service: tuple[bp.Service, str], registry: None) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        c = bp.Coordinate("user:1", "t")
        old = s.append(c, V, {"name": "Ada Lovelace"})  # unregistered: stored as version 0
        bp.register_payload(V, 1)
        v1 = s.append(c, V, {"name": "Alan Turing"})
        assert s.get(old.event_id).payload_version == 0 and s.get(v1.event_id).payload_version == 1

        def split(p: dict[str, Any]) -> dict[str, Any]:
            first, _, last = p["name"].partition(" ")
            return {"first": first, "last": last}

        bp.register_payload(V, 2, upcasters={1: split})
        v2 = s.append(c, V, {"first": "Grace", "last": "Hopper"})
        batch = s.append_batch([bp.BatchItem(c, V, {"first": "Edsger", "last": "Dijkstra"})])
        explicit = s.append(c, V, {"name": "Kurt Goedel"}, payload_version=1)
        stored = s.get(v1.event_id).payload_bytes
        assert [e.payload for e in s.history("user:1")] == [
            {"first": "Ada", "last": "Lovelace"}, {"first": "Alan", "last": "Turing"},
            {"first": "Grace", "last": "Hopper"}, {"first": "Edsger", "last": "Dijkstra"},
            {"first": "Kurt", "last": "Goedel"}]
        assert [s.get(r.event_id).payload_version for r in (v2, batch[0], explicit)] == [2, 2, 1]
        assert s.get(v1.event_id).payload_bytes == stored == msgpack.packb({"name": "Alan Turing"})

        future = s.append(c, V, {"first": "X", "last": "Y", "middle": "Z"}, payload_version=3)
        with pytest.raises(bp.FutureVersion) as ei:
            _ = s.get(future.event_id).payload
        assert (tuple(ei.value.kind), ei.value.stored, ei.value.known) == ((2, 9), 3, 2)
        bp.unregister_payload(V)  # unregistered kinds read as stored
        assert s.get(future.event_id).payload == {"first": "X", "last": "Y", "middle": "Z"}
        assert s.get(v1.event_id).payload == {"name": "Alan Turing"}
        assert s.append(c, V, 1).global_sequence and s.history("user:1")[-1].payload_version == 0

    with pytest.raises(bp.InvalidArgument):
        bp.register_payload(V, 3, upcasters={1: split})  # no upcaster for 2
    with pytest.raises(bp.InvalidArgument):
        bp.register_payload(V, 0)
    with pytest.raises(bp.ReservedKind):
        bp.register_payload(bp.Kind(0, 1), 2, upcasters={1: split})


# -- visibility fences -----------------------------------------------------------------------


def test_an_uncommitted_fence_at_an_entity_head_is_stepped_over(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        c = bp.Coordinate("fx", "t")
        s.append(c, K, {"i": 1})
        p = Totals()
        assert s.project_if_changed(p, entity="fx") == {"fx": 1}
        f = s.fence()
        f.append(c, K, {"i": 2})  # the entity's newest event is hidden
        assert s.project_if_changed(p, entity="fx") == {"fx": 1}
        assert s.project(Totals(), entity="fx", snapshot=True, snapshot_every=1) == {"fx": 1}
        f.commit()
        assert s.project_if_changed(p, entity="fx") == {"fx": 3}
        assert s.project(Totals(), entity="fx", snapshot=True) == {"fx": 3}


def test_events_revealed_after_consumers_passed_them_still_reach_them(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        cur = s.cursor("fenced", kind=K, timeout=0.2)
        p = Totals()
        s.append(bp.Coordinate("a", "t"), K, {"i": 1})
        f = s.fence()
        f.append(bp.Coordinate("b", "t"), K, {"i": 2})
        s.append(bp.Coordinate("a", "t"), K, {"i": 3})
        assert [ev.payload["i"] for ev in cur] == [1, 3]
        assert s.project_if_changed(p, kind=K) == {"a": 4}
        f.commit()
        assert s.project_if_changed(p, kind=K) == s.project(Totals(), kind=K) == {"a": 4, "b": 2}
        assert [ev.payload["i"] for ev in cur] == [2]


def test_snapshot_sweep_leaves_odd_temporary_names_alone(service: tuple[bp.Service, str]) -> None:
    """The sweep of dead writers' snapshot temporaries parses the pid strictly: a
    superscript digit (str.isdigit() is true, int() fails), a number too big for
    os.kill, or a dead pid's file next to them must not stop a snapshot being written."""
    _, data_dir = service
    with bp.connect(data_dir) as s:
        _append_sources(s, 5)
        p = Totals()
        s.project(p, kind=K, snapshot=True, snapshot_every=1)
        path = snapshot_path(data_dir, p, EventFilter(kind=K))
        folder = os.path.dirname(path)
        odd = [f"{os.path.basename(path)}.tmp-\u00b2-ab", f"{os.path.basename(path)}.tmp-{10**30}-ab"]
        dead = f"{os.path.basename(path)}.tmp-4194304-ab"  # above any live pid here: swept
        for name in [*odd, dead]:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"x")
        _append_sources(s, 1, 5)
        p2 = Totals()
        s.project(p2, kind=K, snapshot=True, snapshot_every=1)  # raised ValueError / OverflowError before
        left = sorted(n for n in os.listdir(folder) if ".tmp-" in n)
        assert left == sorted(odd), left
