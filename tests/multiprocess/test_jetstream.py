"""The JetStream adapter end to end with real processes: a served store, a real
nats-server (tests/_nats.py), the bridge as its own process (alone, and run by the
supervisor beside the writer), the remote reader, and restore-from-stream into a new
directory that verifies and accepts every original receipt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from _nats import (
    assert_stream_is_journal,
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

ODD_ENTITIES = ("user:alice", "tenant.a*b>c", "ünï cödé", "a~2e")  # dots, wildcards, spaces, non-ASCII, our escape


def _append_some(data_dir: str, n: int, tag: str = "", pad: int = 0) -> list[bp.Receipt]:
    with bp.connect(data_dir) as store:
        out = [store.append(bp.Coordinate(ODD_ENTITIES[i % len(ODD_ENTITIES)], "s"), bp.Kind(1, 2),
                            {"i": i, "t": tag, "pad": "p" * pad}) for i in range(n)]
        out += store.append_batch([bp.BatchItem(bp.Coordinate(f"batch:{i % 3}", "s"), bp.Kind(1, 3), {"b": i})
                                   for i in range(20)])
        return out


def test_bridge_remote_reader_and_restore(tmp_path: os.PathLike[str], data_dir: str) -> None:
    base = os.fspath(tmp_path)
    with nats_server(base) as ns:
        with bp.serve(data_dir, segment_max_bytes=1 << 20):
            receipts = _append_some(data_dir, 240, pad=6000)  # 1.4 MiB: the journal and the restore rotate segments
            with bp.connect(data_dir) as store:
                fence_events = []
                with store.fence() as f:  # fenced events: hidden until the commit, then shown
                    fence_events.append(f.append(bp.Coordinate("fenced", "s"), bp.Kind(1, 4), {"f": 1}))
                visible = store.frontier().visible
            bridge = start_bridge(data_dir, ns.url, "JS1")
            try:
                wait_stream(ns.url, "JS1", visible)
                n = assert_stream_is_journal(ns.url, "JS1", data_dir)
                status = wait_status(data_dir, lambda st: st["published_through"] == n and st["state"] == "idle")
                assert status["stream"] == "JS1" and status["errors"] == 0 and status["lag_events"] == 0
                with jetstream.connect(ns.url, "JS1") as remote:
                    assert all(remote.verify_receipt(r) for r in receipts + fence_events)
                    forged = receipts[5]._replace(event_hash=bytes(32))
                    assert not remote.verify_receipt(forged)
                    for entity in ODD_ENTITIES:
                        hist = remote.history(entity)
                        assert [e.entity_clock for e in hist] == list(range(1, len(hist) + 1))
                        chain = list(remote.walk_ancestors(hist[-1].event_id))
                        assert [e.event_id for e in chain] == [e.event_id for e in reversed(hist)]
                    assert remote.get(fence_events[0].event_id).payload == {"f": 1}
                    with pytest.raises(bp.NotFound):
                        remote.get(bytes(8) + (10 ** 6).to_bytes(8, "big"))
                    page = remote.query_after(0, limit=10, entity="user:alice")
                    assert all(e.coordinate.entity == "user:alice" for e in page.events) and len(page.events) == 10
                    # a subscriber sees new events as the bridge publishes them
                    sub = remote.subscribe(entity="live")
                    with bp.connect(data_dir) as store:
                        r = store.append(bp.Coordinate("live", "s"), bp.Kind(1, 5), {"x": 1})
                    ev = sub.next(timeout=10)
                    assert ev is not None and ev.event_id == r.event_id
                    sub.close()
            finally:
                assert stop_bridge(bridge) == 0
            with bp.connect(data_dir) as store:
                last = store.frontier().visible
            assert stream_last(ns.url, "JS1") == last  # a stopped bridge drained what was visible
        assert_verified(data_dir)
        # disaster recovery: a new directory from the stream alone
        restored = os.path.join(base, "restored")
        report = jetstream.restore_from_stream(ns.url, "JS1", restored, segment_max_bytes=1 << 20)
        assert report.events == stream_last(ns.url, "JS1") and report.dropped_tail == 0 and report.segments >= 2
        assert_verified(restored)
        original = bp.verify(data_dir)
        with bp.serve(restored, segment_max_bytes=1 << 20), bp.connect(restored) as store:
            assert all(store.verify_receipt(r) for r in receipts + fence_events + [r])
            assert store.query_after(report.events - 1, limit=1).events[0].event_hash \
                == jetstream.connect(ns.url, "JS1").query_after(report.events - 1, limit=1).events[0].event_hash
        assert original.events_checked <= bp.verify(restored).events_checked
        with pytest.raises(bp.InvalidArgument):  # never into a directory that holds anything
            jetstream.restore_from_stream(ns.url, "JS1", restored)
        # the same from the command line, which verifies what it restored
        out = subprocess.run([sys.executable, "-m", "batpak_mp.cli", "restore-from-stream", ns.url, "JS1",
                              os.path.join(base, "restored-cli"), "--segment-max-bytes", str(1 << 20), "--json"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["verify_ok"] and doc["events"] == report.events and doc["store_id"] == report.store_id
        out = subprocess.run([sys.executable, "-m", "batpak_mp.cli", "restore-from-stream", ns.url, "NO_SUCH",
                              os.path.join(base, "restored-none")], capture_output=True, text=True)
        assert out.returncode == 2 and "no such stream" in out.stderr


def test_serve_runs_the_bridge_under_the_restart_policy(tmp_path: os.PathLike[str], data_dir: str) -> None:
    base = os.fspath(tmp_path)
    with nats_server(base) as ns:
        serve = subprocess.Popen([sys.executable, "-m", "batpak_mp.cli", "serve", data_dir, "--restart", "bounded:5:60000",
                                  "--segment-max-bytes", str(1 << 20), "--bridge", ns.url, "--bridge-stream", "JS2"],
                                 stdin=subprocess.DEVNULL)
        try:
            status = wait_status(data_dir, lambda st: st["state"] in ("idle", "publishing"), timeout=30)
            _append_some(data_dir, 40)
            with bp.connect(data_dir) as store:
                wait_stream(ns.url, "JS2", store.frontier().visible)
            # the bridge killed: the supervisor starts another, which resumes from the stream
            first_pid = status["pid"]
            os.kill(first_pid, signal.SIGKILL)
            _append_some(data_dir, 40, "after")
            with bp.connect(data_dir) as store:
                wait_stream(ns.url, "JS2", store.frontier().visible)
            wait_status(data_dir, lambda st: st["pid"] != first_pid and st["lag_events"] == 0)
            out = subprocess.run([sys.executable, "-m", "batpak_mp.cli", "status", data_dir, "--json"],
                                 capture_output=True, text=True, check=True)
            doc = json.loads(out.stdout)
            assert doc["bridge"]["stream"] == "JS2" and doc["bridge"]["lag_events"] == 0
            assert_stream_is_journal(ns.url, "JS2", data_dir)
        finally:
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(30) == 0
        final = jetstream.read_status(data_dir)
        assert final is not None and final["state"] == "stopped"
        assert_verified(data_dir)
