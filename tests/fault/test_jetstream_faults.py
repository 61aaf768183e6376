"""Faults around the JetStream bridge: the NATS server away for 10 s, a stream that
holds another store's journal, messages tampered with in the stream, and an R3 stream
on a three-node cluster losing a node (SIGKILL) mid-stream. Real nats-server processes
(tests/_nats.py). Each ends with the stream equal to the journal (exactly once, in
order, remote check clean) where the stream is the journal's, and bp.verify clean."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
import time

import pytest
from _nats import (
    assert_stream_is_journal,
    cluster_url,
    nats_cluster,
    nats_server,
    start_bridge,
    stop_bridge,
    stream_last,
    wait_status,
    wait_stream,
)
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp import jetstream
from batpak_mp._storage.osio import Disk, FaultPlan
from batpak_mp.jetstream._mapping import EXPECTED_LAST_SEQ
from batpak_mp.jetstream._nats import open_nats

NATS_DOWN_S = 10.0  # issue 16: the server away for 10 s


def _append(data_dir: str, n: int, entity: str = "acct") -> list[bp.Receipt]:
    with bp.connect(data_dir) as store:
        return [store.append(bp.Coordinate(f"{entity}:{i % 4}", "s"), bp.Kind(1, 1), {"i": i}) for i in range(n)]


def _visible(data_dir: str) -> int:
    with bp.connect(data_dir) as store:
        return store.frontier().visible


def test_nats_down_ten_seconds_and_back(tmp_path: os.PathLike[str], data_dir: str) -> None:
    with nats_server(os.fspath(tmp_path)) as ns, bp.serve(data_dir, segment_max_bytes=1 << 20):
        bridge = start_bridge(data_dir, ns.url, "F1")
        try:
            _append(data_dir, 50)
            wait_stream(ns.url, "F1", _visible(data_dir))
            ns.kill()
            down_until = time.monotonic() + NATS_DOWN_S
            while time.monotonic() < down_until:  # the store keeps taking appends; the bridge falls behind
                _append(data_dir, 5)
                time.sleep(0.5)
            wait_status(data_dir, lambda st: st["errors"] > 0 and st["lag_events"] > 0)
            ns.start()
            wait_stream(ns.url, "F1", _visible(data_dir), timeout=60)
            assert_stream_is_journal(ns.url, "F1", data_dir)
            wait_status(data_dir, lambda st: st["lag_events"] == 0 and st["state"] == "idle")
        finally:
            assert stop_bridge(bridge) == 0
    assert_verified(data_dir)


def test_stream_of_another_store_is_refused(tmp_path: os.PathLike[str], data_dir: str) -> None:
    other = os.path.join(os.fspath(tmp_path), "other")
    with nats_server(os.fspath(tmp_path)) as ns:
        with bp.serve(other, segment_max_bytes=1 << 20):
            _append(other, 10)
            bridge = start_bridge(other, ns.url, "F2")
            wait_stream(ns.url, "F2", _visible(other))
            assert stop_bridge(bridge) == 0
        before = stream_last(ns.url, "F2")
        with bp.serve(data_dir, segment_max_bytes=1 << 20):
            _append(data_dir, 10)
            bridge = subprocess.Popen([sys.executable, "-m", "batpak_mp.cli", "bridge", data_dir, "--nats", ns.url,
                                       "--stream", "F2"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = bridge.communicate(timeout=30)
            assert bridge.returncode == 2, err  # refused: a restart cannot help (WriterExit.USAGE)
            assert b"refused this journal" in err
            status = jetstream.read_status(data_dir)
            assert status is not None and status["state"] == "failed"
            assert "StreamMismatch" in status["last_error"] and "holds the journal of store" in status["last_error"]
        assert stream_last(ns.url, "F2") == before  # nothing of ours went in
        with jetstream.connect(ns.url, "F2") as remote:  # and the other store's stream still checks clean
            assert remote.frontier_sequence() == before
    assert_verified(data_dir)
    assert_verified(other)


async def _tamper(url: str, stream: str, seq: int) -> str:
    """Append a copy of message ``seq`` with one payload byte flipped, as the next message
    (headers intact, expectation met): what a forger with publish rights could do."""
    nc = await open_nats(url, reconnect=False)
    try:
        js = nc.jetstream()
        msg = await js.get_msg(stream, seq)
        assert msg.data is not None and msg.headers is not None and msg.subject is not None
        body = bytearray(msg.data)
        body[-1] ^= 0x01
        info = await js.stream_info(stream)
        headers = dict(msg.headers)
        headers[EXPECTED_LAST_SEQ] = str(info.state.last_seq)
        headers["Nats-Msg-Id"] = "forged"
        await js.publish(msg.subject, bytes(body), headers=headers)
        return str(msg.subject)
    finally:
        await nc.close()


def test_tampered_message_is_never_returned(tmp_path: os.PathLike[str], data_dir: str) -> None:
    base = os.fspath(tmp_path)
    with nats_server(base) as ns:
        with bp.serve(data_dir, segment_max_bytes=1 << 20):
            receipts = _append(data_dir, 30)
            bridge = start_bridge(data_dir, ns.url, "F3")
            wait_stream(ns.url, "F3", _visible(data_dir))
            assert stop_bridge(bridge) == 0
            assert_stream_is_journal(ns.url, "F3", data_dir)
        last = stream_last(ns.url, "F3")
        subject = asyncio.run(_tamper(ns.url, "F3", 10))
        remote = jetstream.connect(ns.url, "F3")
        try:
            with pytest.raises(bp.StreamTampered) as caught:
                remote.query_after(0, limit=1000)
            err = caught.value
            assert err.stream == "F3" and err.stream_seq == last + 1 and err.subject == subject
            assert "frame" in err.reason
            with pytest.raises(bp.StreamTampered):  # sticky: nothing is returned once the stream is known bad
                remote.get(receipts[0].event_id)
        finally:
            remote.close()
        with pytest.raises(bp.StreamTampered):  # restore refuses it too
            jetstream.restore_from_stream(ns.url, "F3", os.path.join(base, "restored"))
        # a message deleted from the middle is a gap: named, never skipped
        async def delete(seq: int) -> None:
            nc = await open_nats(ns.url, reconnect=False)
            try:
                await nc.jetstream().delete_msg("F3", seq)
            finally:
                await nc.close()

        asyncio.run(delete(5))
        with jetstream.connect(ns.url, "F3") as remote2, pytest.raises(bp.StreamTampered) as gap:
            remote2.history("acct:1")
        assert gap.value.stream_seq == 6 and "message 5 is missing" in gap.value.reason
    assert_verified(data_dir)


def test_r3_stream_rides_through_a_node_sigkill(tmp_path: os.PathLike[str], data_dir: str) -> None:
    with nats_cluster(os.fspath(tmp_path)) as nodes, bp.serve(data_dir, segment_max_bytes=1 << 20):
        url = cluster_url(nodes)
        bridge = start_bridge(data_dir, url, "F4", "--replicas", "3")
        stop = threading.Event()

        def load() -> None:
            with bp.connect(data_dir) as store:
                i = 0
                while not stop.is_set():
                    store.append(bp.Coordinate(f"r3:{i % 3}", "s"), bp.Kind(1, 1), {"i": i})
                    i += 1
                    time.sleep(0.005)

        t = threading.Thread(target=load)
        t.start()
        try:
            wait_stream(url, "F4", 50, timeout=60)
            nodes[0].kill()  # mid-stream; the stream's leader may be on it
            time.sleep(2.0)
        finally:
            stop.set()
            t.join(30)
        rest = cluster_url(nodes[1:])
        try:
            wait_stream(rest, "F4", _visible(data_dir), timeout=60)
            assert_stream_is_journal(rest, "F4", data_dir, timeout=30)  # the cluster may still be electing
        finally:
            assert stop_bridge(bridge) == 0
    assert_verified(data_dir)


def test_restore_onto_a_failing_disk_is_typed_and_never_serves_half(tmp_path: os.PathLike[str], data_dir: str) -> None:
    base = os.fspath(tmp_path)
    with nats_server(base) as ns:
        with bp.serve(data_dir, segment_max_bytes=1 << 20):
            _append(data_dir, 20)
            bridge = start_bridge(data_dir, ns.url, "F5")
            wait_stream(ns.url, "F5", _visible(data_dir))
            assert stop_bridge(bridge) == 0
        target = os.path.join(base, "restored")
        with pytest.raises(bp.DiskFull):  # the frames' write meets a full disk
            jetstream.restore_from_stream(ns.url, "F5", target,
                                          disk=Disk(FaultPlan(fail={"pwrite": (0, errno.ENOSPC)})))
        assert not os.path.exists(os.path.join(target, "durable.ckpt"))  # not recovered: nothing claims it is whole
        with pytest.raises(bp.StorageError):  # store.meta cannot be written
            jetstream.restore_from_stream(ns.url, "F5", os.path.join(base, "restored2"),
                                          disk=Disk(FaultPlan(fail={"write": (0, errno.EIO)})))
    assert_verified(data_dir)


def test_two_bridges_by_mistake_never_interleave(tmp_path: os.PathLike[str], data_dir: str) -> None:
    with nats_server(os.fspath(tmp_path)) as ns, bp.serve(data_dir, segment_max_bytes=1 << 20):
        bridges = [start_bridge(data_dir, ns.url, "F6") for _ in range(2)]
        try:
            for _ in range(10):
                _append(data_dir, 30)
                time.sleep(0.05)
            wait_stream(ns.url, "F6", _visible(data_dir))
            assert_stream_is_journal(ns.url, "F6", data_dir)  # each event once, in order, although both published
        finally:
            for b in bridges:
                assert stop_bridge(b) == 0
    assert_verified(data_dir)


def test_a_standalone_bridge_outlives_a_stop_and_a_new_serve(tmp_path: os.PathLike[str], data_dir: str) -> None:
    with nats_server(os.fspath(tmp_path)) as ns:
        with bp.serve(data_dir, segment_max_bytes=1 << 20):
            _append(data_dir, 20)
            bridge = start_bridge(data_dir, ns.url, "F7")
            wait_stream(ns.url, "F7", _visible(data_dir))
        try:  # the service stopped (its control block removed); the bridge waits for the next one
            wait_status(data_dir, lambda st: st["state"] == "waiting")
            with bp.serve(data_dir, segment_max_bytes=1 << 20):
                _append(data_dir, 20)
                wait_stream(ns.url, "F7", _visible(data_dir))
                assert_stream_is_journal(ns.url, "F7", data_dir)
        finally:
            assert stop_bridge(bridge) == 0
    assert_verified(data_dir)


def test_a_damaged_journal_frame_is_never_published(tmp_path: os.PathLike[str], data_dir: str) -> None:
    """Fail closed: the bridge publishes up to the damaged frame, then stops with exit 71
    (a restart cannot help) and says why; the stream stays a clean prefix of the journal."""
    with nats_server(os.fspath(tmp_path)) as ns, bp.serve(data_dir, segment_max_bytes=1 << 20):
        _append(data_dir, 10)
        with bp.connect(data_dir) as store:
            bad = store.append(bp.Coordinate("victim", "s"), bp.Kind(1, 1), {"mark": "MARK" * 8})
        _append(data_dir, 10)
        seg = os.path.join(data_dir, "segments", sorted(os.listdir(os.path.join(data_dir, "segments")))[-1])
        fd = os.open(seg, os.O_RDWR)
        try:  # one bit of the payload, through the page cache every reader maps
            data = os.pread(fd, 1 << 20, 0)
            at = data.index(b"MARK" * 8)
            os.pwrite(fd, bytes([data[at] ^ 0x01]), at)
        finally:
            os.close(fd)
        bridge = start_bridge(data_dir, ns.url, "F8")
        assert bridge.wait(30) == 71
        status = jetstream.read_status(data_dir)
        assert status is not None and status["state"] == "failed" and "CorruptSegment" in status["last_error"]
        assert stream_last(ns.url, "F8") == bad.global_sequence - 1
        with jetstream.connect(ns.url, "F8") as remote:
            assert remote.query_after(0, limit=1000).events[-1].global_sequence == bad.global_sequence - 1
    report = bp.verify(data_dir)  # and the local check finds the same damage
    assert not report.ok


def test_no_server_is_a_typed_error(tmp_path: os.PathLike[str]) -> None:
    with nats_server(os.fspath(tmp_path)) as ns:
        url = ns.url
    with pytest.raises(bp.StreamUnavailable):  # the server is gone: ConnectionError-derived, typed
        jetstream.connect(url, "NONE", timeout=1)
    with pytest.raises(bp.StreamUnavailable):
        jetstream.restore_from_stream(url, "NONE", os.path.join(os.fspath(tmp_path), "restored"))
    assert not os.path.exists(os.path.join(os.fspath(tmp_path), "restored"))  # nothing made before the stream answered
