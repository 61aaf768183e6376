"""Subscriptions with real processes: many subscribers, idle CPU, killed subscribers,
filters, the timeout form, and a writer restart while a subscriber waits."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import multiprocess as mp
import psutil

import batpak_mp as bp

K = bp.Kind(1, 1)
OTHER = bp.Kind(1, 2)
CTX = mp.get_context("fork")


def _subscriber(data_dir: str, after: int, n: int, q: Any, entity: str | None = None) -> None:
    """Collect ``n`` events of kind K after ``after``; report ("ready", pid) then ("done", seqs)."""
    with bp.connect(data_dir) as s:
        sub = s.subscribe(after, kind=K, entity=entity, timeout=20)
        q.put(("ready", os.getpid()))
        seqs = []
        for ev in sub:
            assert ev.kind == K and ev.payload["i"] >= 0
            seqs.append(ev.global_sequence)
            if len(seqs) >= n:
                break
        q.put(("done", seqs))


def _expect(q: Any, tag: str, timeout: float = 20) -> Any:
    got_tag, value = q.get(timeout=timeout)
    assert got_tag == tag, (got_tag, value)
    return value


def _wait_new_writer(s: bp.Store, old_epoch: int, timeout: float = 15) -> bp.Frontier:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = s.frontier()
        if f.writer_epoch > old_epoch and f.writer_state == bp.WriterState.READY:
            return f
        time.sleep(0.02)
    raise AssertionError("the writer was not restarted")


def test_every_subscriber_process_receives_every_event(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        after = s.frontier().visible
        q = CTX.Queue()
        procs = [CTX.Process(target=_subscriber, args=(data_dir, after, 60, q)) for _ in range(4)]
        for p in procs:
            p.start()
        for _ in procs:
            _expect(q, "ready")
        seqs = []
        for i in range(30):  # singles, interleaved with events the filter drops
            seqs.append(s.append(bp.Coordinate(f"e{i % 3}", "t"), K, {"i": i}).global_sequence)
            s.append(bp.Coordinate("noise", "t"), OTHER, {"i": i})
        receipts = s.append_batch([bp.BatchItem(bp.Coordinate("b", "t"), K, {"i": i}) for i in range(30)])
        seqs += [r.global_sequence for r in receipts]
        results = [_expect(q, "done") for _ in procs]
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    assert all(r == seqs for r in results)


def _idle_subscriber(data_dir: str, q: Any) -> None:
    with bp.connect(data_dir) as s:
        sub = s.subscribe(kind=K)
        q.put(("ready", os.getpid()))
        ev = sub.next(30)
        q.put(("done", None if ev is None else ev.payload))


def test_idle_subscriber_uses_no_cpu(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    q = CTX.Queue()
    p = CTX.Process(target=_idle_subscriber, args=(data_dir, q))
    p.start()
    pid = _expect(q, "ready")
    time.sleep(0.3)  # let it settle into the wait
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(1.0)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.02, f"an idle subscriber used {used * 1000:.1f} ms of CPU in 1 s"
    with bp.connect(data_dir) as s:  # it is waiting on the subscription, not gone
        s.append(bp.Coordinate("wake", "t"), K, {"i": 7})
    assert _expect(q, "done") == {"i": 7}
    p.join(10)
    assert p.exitcode == 0


def _slow_subscriber(data_dir: str, q: Any) -> None:
    with bp.connect(data_dir) as s:
        sub = s.subscribe(0, kind=K)
        q.put(("ready", os.getpid()))
        for ev in sub:
            q.put(("got", ev.global_sequence))
            time.sleep(0.01)


def test_killed_subscriber_leaves_the_writer_serving(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    q = CTX.Queue()
    victim = CTX.Process(target=_slow_subscriber, args=(data_dir, q))
    victim.start()
    _expect(q, "ready")
    with bp.connect(data_dir) as s:
        watcher = s.subscribe(s.frontier().visible, kind=K, timeout=10)
        sent = [s.append(bp.Coordinate("k", "t"), K, {"i": i}).global_sequence for i in range(5)]
        _expect(q, "got")  # mid-iteration
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
        sent += [s.append(bp.Coordinate("k", "t"), K, {"i": i}).global_sequence for i in range(5, 10)]
        got = [next(watcher).global_sequence for _ in sent]
        assert got == sent
        f = s.frontier()
        assert f.writer_state == bp.WriterState.READY and f.writer_pid == svc.writer_pid


def test_filters_timeout_and_close(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        start = s.frontier().visible
        s.append(bp.Coordinate("a", "x"), K, {"i": 0})
        s.append(bp.Coordinate("b", "x"), OTHER, {"i": 1})
        s.append(bp.Coordinate("a", "y"), OTHER, {"i": 2})
        s.append(bp.Coordinate("c", "y"), K, {"i": 3})

        def payloads(**filters: Any) -> list[int]:
            return [ev.payload["i"] for ev in s.subscribe(start, timeout=0.2, **filters)]

        assert payloads(entity="a") == [0, 2]
        assert payloads(scope="y") == [2, 3]
        assert payloads(kind=OTHER) == [1, 2]
        assert payloads(entity="a", kind=K) == [0]
        assert payloads(entity="nobody") == []
        # the default start is the frontier: only new events
        sub = s.subscribe(kind=K)
        t0 = time.monotonic()
        assert sub.next(0.2) is None
        assert 0.15 <= time.monotonic() - t0 < 2.0
        s.append(bp.Coordinate("a", "x"), K, {"i": 4})
        ev = sub.next(5)
        assert ev is not None and ev.payload == {"i": 4}
        sub.close()
        assert sub.next(0.1) is None
        assert list(sub) == []


def test_writer_restart_while_a_subscriber_waits(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        after = s.frontier().visible
        q = CTX.Queue()
        p = CTX.Process(target=_subscriber, args=(data_dir, after, 20, q, "r"))
        p.start()
        _expect(q, "ready")
        sent = [s.append(bp.Coordinate("r", "t"), K, {"i": i}).global_sequence for i in range(10)]
        f = s.frontier()
        time.sleep(0.2)  # the subscriber has read them and waits again
        os.kill(f.writer_pid, signal.SIGKILL)
        _wait_new_writer(s, f.writer_epoch)
        sent += [s.append(bp.Coordinate("r", "t"), K, {"i": i}).global_sequence for i in range(10, 20)]
        assert _expect(q, "done") == sent
        p.join(10)
        assert p.exitcode == 0
