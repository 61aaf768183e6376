"""The writer service with real processes, real POSIX queues and shared memory."""

from __future__ import annotations

import os
import re
import signal
import time

import multiprocess as mp
import posix_ipc
import pytest

import batpak_mp as bp
from batpak_mp._ipc import wire as W
from batpak_mp._ipc.names import request_queue_name

K = bp.Kind(1, 1)


def _worker_append(data_dir: str, wid: int, n: int) -> list[tuple[int, bytes]]:
    out = []
    with bp.connect(data_dir) as s:
        for i in range(n):
            r = s.append(bp.Coordinate(f"w{wid}", "t"), K, {"w": wid, "i": i})
            ev = s.get(r.event_id)
            assert ev.payload == {"w": wid, "i": i}
            out.append((r.global_sequence, r.event_hash))
    return out


def test_round_trip_api(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    with bp.connect(data_dir) as s:
        c = bp.Coordinate("player:alice", "room:dungeon")
        r = s.append(c, bp.Kind(1, 7), {"x": 10, "y": 20})
        assert r.durable and r.entity == "player:alice"
        assert s.get(r.event_id).payload == {"x": 10, "y": 20}
        r2 = s.append(c, bp.Kind(1, 7), {"x": 11}, expected_clock=1, idempotency_key="k")
        assert s.append(c, bp.Kind(1, 7), {"x": 11}, expected_clock=1, idempotency_key="k") == r2._replace(
            deduplicated=True)
        with pytest.raises(bp.ConcurrencyConflict) as ei:
            s.append(c, bp.Kind(1, 7), {}, expected_clock=0)
        assert (ei.value.expected, ei.value.actual) == (0, 2)
        with pytest.raises(bp.ReservedKind):
            s.append(c, bp.Kind(0, 1), {})
        assert [e.global_sequence for e in s.history("player:alice")] == [r.global_sequence, r2.global_sequence]
        assert [e.event_id for e in s.walk_ancestors(r2.event_id)] == [r2.event_id, r.event_id]
        page = s.query_after(0, limit=100, entity="player:alice")
        assert [e.event_id for e in page.events] == [r.event_id, r2.event_id]
        assert s.verify_receipt(r2)
        f = s.frontier()
        assert f.visible >= r2.global_sequence and f.durable == f.visible
        assert f.writer_state == bp.WriterState.READY and f.writer_pid == svc.writer_pid
        s.wait_for_durable(r2.global_sequence, 1.0)
        with pytest.raises(bp.NotFound):
            s.get(bytes(16))
        batch = s.append_batch([bp.BatchItem(bp.Coordinate(f"e{i}", "s"), K, i) for i in range(5)])
        assert [b.global_sequence for b in batch] == list(range(batch[0].global_sequence, batch[0].global_sequence + 5))
    with pytest.raises(bp.StoreClosed):
        s.get(r.event_id)


def test_many_processes_append_concurrently(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with mp.get_context("fork").Pool(8) as pool:
        results = pool.starmap(_worker_append, [(data_dir, w, 40) for w in range(8)])
    seqs = sorted(seq for res in results for seq, _ in res)
    assert len(seqs) == len(set(seqs)) == 320
    with bp.connect(data_dir) as s:
        for w in range(8):
            hist = s.history(f"w{w}")
            assert [e.payload["i"] for e in hist] == list(range(40))


@pytest.mark.parametrize("size", [8191, 8192, 8193, 16 * 1024 * 1024 - 16])
def test_payload_sizes(service: tuple[bp.Service, str], size: int) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        payload = b"\xab" * size
        r = s.append(bp.Coordinate("big", "s"), K, payload)
        assert s.get(r.event_id).payload == payload
        with pytest.raises(bp.PayloadTooLarge):
            s.append(bp.Coordinate("big", "s"), K, b"x" * (16 * 1024 * 1024 + 1))


def test_batch_of_ten_thousand(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        items = [bp.BatchItem(bp.Coordinate(f"e{i % 97}", "s"), K, {"i": i}) for i in range(10_000)]
        receipts = s.append_batch(items)
        assert len(receipts) == 10_000
        first = receipts[0].global_sequence
        assert [r.global_sequence for r in receipts] == list(range(first, first + 10_000))
        assert s.get(receipts[-1].event_id).payload == {"i": 9999}


def test_hostile_messages_are_dropped_and_counted(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    q = posix_ipc.MessageQueue(request_queue_name(data_dir))
    import msgpack

    junk = [
        os.urandom(100), b"", b"\x93\x01\x02", msgpack.packb([99, os.getpid(), "/x", 1]),
        msgpack.packb([1, os.getpid(), "/etc/passwd", 1]), msgpack.packb([1, -5, "/bpmp-", 1]),
        msgpack.packb([1, os.getpid(), q.name + "-c1-nonexistent", 1]), b"\xff" * W.MAX_MESSAGE,
    ]
    with bp.connect(data_dir) as s:
        before = s._control.read().dropped_messages
        for m in junk:
            q.send(m, 2)
        r = s.append(bp.Coordinate("after", "junk"), K, 1)
        assert s.get(r.event_id).payload == 1
        deadline = time.monotonic() + 5
        while s._control.read().dropped_messages < before + len(junk) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s._control.read().dropped_messages >= before + len(junk)
        with pytest.raises(ValueError):  # longer than the queue's message size: the kernel refuses it at send
            q.send(b"\xff" * (W.MAX_MESSAGE + 1), 2)
        assert s.append(bp.Coordinate("after", "junk"), K, 2).entity_clock == 2
    q.close()


def test_garbage_request_in_area_gets_protocol_error(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service

    with bp.connect(data_dir) as s:
        s.append(bp.Coordinate("x", "y"), K, 1)  # creates the area
        area = s._channel.idle_areas()[-1]  # the pool's area that carried it
        for body in (b"\x00\x00\x00\x05hello", W.LEN.pack(7) + b"\x94\x01\x01\x00\xc0" + b"zz",
                     W.LEN.pack(10**6)):
            area.mm[: W.BODY_AT + len(body)] = W.REPLY_TO.pack(0) + body
            s._channel.queue.send(W.encode_message(W.Message(W.WIRE_VERSION, os.getpid(), area.name, 1)), 2)
            deadline = time.monotonic() + 5
            while not area.replied(1) and time.monotonic() < deadline:
                area.bell.wait(area.bell.value, 0.05)
            reply = area.reply()
            assert reply.status == W.STATUS_ERROR and reply.data[0] == "ProtocolError"
        assert s.append(bp.Coordinate("x", "y"), K, 2).entity_clock == 2


def _child_killed_mid_batch(data_dir: str) -> None:
    s = bp.connect(data_dir)
    s.append_batch([bp.BatchItem(bp.Coordinate("victim", "s"), K, b"y" * 1000) for _ in range(5000)])


def test_client_killed_mid_request(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    ctx = mp.get_context("fork")
    for delay in (0.0, 0.02, 0.08):
        p = ctx.Process(target=_child_killed_mid_batch, args=(data_dir,))
        p.start()
        time.sleep(0.15 + delay)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    with bp.connect(data_dir, timeout=10) as s:
        r = s.append(bp.Coordinate("alive", "s"), K, 1)  # the writer is not blocked
        hist = s.history("victim")
        assert len(hist) % 5000 == 0  # whole batches only
        assert s.get(r.event_id).payload == 1
        # the dead clients' areas are reclaimed by the writer's sweep (every 5 s)
        pattern = re.compile(re.escape(s._channel.prefix[1:]) + r"-c(\d+)-")

        def dead() -> list[str]:
            return [n for n in os.listdir("/dev/shm")
                    if (m := pattern.search(n)) and int(m.group(1)) != os.getpid()]

        deadline = time.monotonic() + 12
        while dead() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dead() == []


def test_full_queue_times_out_instead_of_hanging(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    s = bp.connect(data_dir, timeout=0.5)
    s.append(bp.Coordinate("q", "s"), K, 0)
    q = posix_ipc.MessageQueue(request_queue_name(data_dir))
    os.kill(svc.writer_pid, signal.SIGSTOP)
    try:
        for _ in range(10):  # fill the kernel queue (msg_max = 10) with junk the writer drops
            q.send(b"junk", 1)
        t = time.monotonic()
        with pytest.raises(bp.WriterTimeout):
            s.append(bp.Coordinate("q", "s"), K, 1)
        assert time.monotonic() - t < 2
    finally:
        os.kill(svc.writer_pid, signal.SIGCONT)
    s.timeout = 10
    assert s.append(bp.Coordinate("q", "s"), K, 2).entity_clock >= 2
    s.close()
    q.close()


def _hammer_reader(data_dir: str, seconds: float, out: list[int]) -> list[int]:
    seen = []
    with bp.connect(data_dir) as s:
        deadline = time.monotonic() + seconds
        after = 0
        while time.monotonic() < deadline:
            vis = s.frontier().visible
            page = s.query_after(after, limit=100_000)
            for e in page.events:
                assert e.global_sequence <= max(vis, page.next_after)
            if page.events:
                seqs = [e.global_sequence for e in page.events]
                assert seqs == list(range(after + 1, after + 1 + len(seqs)))
                after = page.next_after
                seen.append(after)
    return seen


def test_reader_never_sees_past_visible_during_large_batches(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        pending = pool.apply_async(_hammer_reader, (data_dir, 3.0, []))
        ends = set()
        with bp.connect(data_dir) as s:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                rs = s.append_batch([bp.BatchItem(bp.Coordinate(f"b{i % 7}", "s"), K, b"z" * 300) for i in range(2000)])
                ends.add(rs[-1].global_sequence)
        seen = pending.get(30)
    # every position a reader stopped at is the end of a whole commit: never half a batch
    assert seen and all(x in ends or x < min(ends) for x in seen)


def _forked_child(store: bp.Store, n: int, conn: object) -> None:
    pid = os.getpid()
    try:
        receipts = [store.append(bp.Coordinate(f"fork{pid}", "s"), K, {"pid": pid, "i": i}) for i in range(n)]
        ok = all(store.get(r.event_id).payload == {"pid": pid, "i": i} for i, r in enumerate(receipts))
        os.write(conn, b"ok" if ok else b"bad")  # type: ignore[arg-type]
    except BaseException as exc:
        os.write(conn, repr(exc).encode()[:200])  # type: ignore[arg-type]
    finally:
        os._exit(0)


def test_store_connected_before_fork(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    store = bp.connect(data_dir)
    store.append(bp.Coordinate("parent", "s"), K, 0)
    children = []
    for _ in range(4):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _forked_child(store, 25, w)
        os.close(w)
        children.append((pid, r))
    for pid, r in children:
        assert os.read(r, 300) == b"ok"
        os.waitpid(pid, 0)
        os.close(r)
    assert store.append(bp.Coordinate("parent", "s"), K, 1).entity_clock == 2
    for pid, _ in children:
        assert [e.payload["i"] for e in store.history(f"fork{pid}")] == list(range(25))
    store.close()
