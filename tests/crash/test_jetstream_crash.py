"""The bridge and the writer SIGKILLed while events flow into JetStream: after each
storm, every event is in the stream exactly once, in commit order, the remote reader's
check is clean, and the journal verifies."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from _nats import assert_stream_is_journal, nats_server, start_bridge, stop_bridge, wait_stream
from conftest import assert_verified

import batpak_mp as bp

BRIDGE_KILLS = 20  # issue 16: at 20+ random points


def _writer_load(data_dir: str, stop: threading.Event, counter: list[int]) -> None:
    with bp.connect(data_dir, timeout=30) as store:
        i = 0
        while not stop.is_set():
            store.append_batch([bp.BatchItem(bp.Coordinate(f"acct:{(i + k) % 5}", "s"), bp.Kind(1, 1), {"i": i, "k": k})
                                for k in range(3)])
            i += 1
            counter[0] += 3
            time.sleep(0.002)


def test_bridge_sigkilled_at_random_points(tmp_path: os.PathLike[str], data_dir: str) -> None:
    rng = random.Random(16)
    with nats_server(os.fspath(tmp_path)) as ns, bp.serve(data_dir, segment_max_bytes=1 << 20):
        stop, counter = threading.Event(), [0]
        load = threading.Thread(target=_writer_load, args=(data_dir, stop, counter))
        load.start()
        try:
            for _ in range(BRIDGE_KILLS):
                bridge = start_bridge(data_dir, ns.url, "CR1")
                time.sleep(rng.uniform(0.15, 0.6))  # from before its first publish to mid-window
                bridge.send_signal(signal.SIGKILL)
                bridge.wait(10)
        finally:
            stop.set()
            load.join(30)
        assert counter[0] > 0
        bridge = start_bridge(data_dir, ns.url, "CR1")
        try:
            with bp.connect(data_dir) as store:
                wait_stream(ns.url, "CR1", store.frontier().visible)
            assert_stream_is_journal(ns.url, "CR1", data_dir)
        finally:
            assert stop_bridge(bridge) == 0
    assert_verified(data_dir)


def test_writer_sigkilled_while_the_bridge_runs(tmp_path: os.PathLike[str], data_dir: str) -> None:
    with nats_server(os.fspath(tmp_path)) as ns, \
            bp.serve(data_dir, restart=bp.RestartPolicy.bounded(5, 60_000), segment_max_bytes=1 << 20) as svc:
        bridge = start_bridge(data_dir, ns.url, "CR2")
        stop, counter = threading.Event(), [0]
        load = threading.Thread(target=_writer_load, args=(data_dir, stop, counter))
        load.start()
        try:
            for _ in range(2):
                time.sleep(0.5)
                pid = svc.writer_pid
                assert pid
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while svc.writer_pid in (pid, None, 0) and time.monotonic() < deadline:
                    time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            load.join(60)
        try:
            with bp.connect(data_dir) as store:
                wait_stream(ns.url, "CR2", store.frontier().visible)
            assert_stream_is_journal(ns.url, "CR2", data_dir)
        finally:
            assert stop_bridge(bridge) == 0
    assert_verified(data_dir)
