"""The metrics endpoint (``serve(metrics=...)``, ``batpak-mp serve --metrics``) and
``batpak-mp top``, against a real service: client processes append while the test
scrapes over real HTTP and parses with ``prometheus_client``'s own parser; a SIGKILLed
writer shows in the restart counter; bad and busy addresses are typed errors before
anything starts."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
from conftest import assert_verified
from prometheus_client.parser import text_string_to_metric_families

import batpak_mp as bp

EXE = str(Path(sys.executable).parent / "batpak-mp")
CLIENTS = 3
BATCHES = 30  # per client; batch i holds 1 + i % 3 events

CLIENT = r"""
import sys, batpak_mp as bp
store = bp.connect(sys.argv[1])
cid = int(sys.argv[2])
for i in range(int(sys.argv[3])):
    store.append_batch([bp.BatchItem(bp.Coordinate(f"m{cid}-{i % 4}", "metrics"), bp.Kind(1, 1), {"c": cid, "i": i, "j": j})
                        for j in range(1 + i % 3)])
store.close()
"""


def scrape(url: str) -> dict[str, float]:
    """Every sample of one scrape, by name and labels: ``name{label="v"}`` -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def histogram(m: dict[str, float], name: str) -> tuple[list[float], float, float]:
    """(cumulative bucket counts in ``le`` order, count, sum), checked consistent."""
    buckets = sorted(((float(k.split('le="')[1].rstrip('"}')), v) for k, v in m.items()
                      if k.startswith(name + "_bucket{")), key=lambda kv: kv[0])
    counts = [v for _, v in buckets]
    assert buckets[-1][0] == float("inf")
    assert counts == sorted(counts), f"{name}: cumulative buckets must not decrease: {counts}"
    assert counts[-1] == m[name + "_count"]
    return counts, m[name + "_count"], m[name + "_sum"]


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_scrape_while_clients_append(data_dir: str) -> None:
    svc = bp.serve(data_dir, metrics="127.0.0.1:0", segment_max_bytes=1 << 20)
    try:
        assert svc.metrics_url is not None and svc.metrics_url.startswith("http://127.0.0.1:")
        url = svc.metrics_url
        first = scrape(url)
        assert first["batpak_writer_up"] == 1 and first['batpak_writer_state{state="ready"}'] == 1
        assert first["batpak_appended_events_total"] == 0 and first["batpak_group_size_count"] == 0
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, data_dir, str(c), str(BATCHES)])
                 for c in range(CLIENTS)]
        seen: list[dict[str, float]] = []
        while any(p.poll() is None for p in procs):
            seen.append(scrape(url))
            time.sleep(0.02)
        assert all(p.wait() == 0 for p in procs)
        final = scrape(url)
        seen.append(final)
        events = CLIENTS * sum(1 + i % 3 for i in range(BATCHES))
        requests = CLIENTS * BATCHES
        # counters only grow while one writer serves
        for name in ("batpak_appended_events_total", "batpak_appended_bytes_total", "batpak_append_requests_total",
                     "batpak_commit_groups_total", "batpak_group_size_count", "batpak_fsync_latency_seconds_count"):
            values = [m[name] for m in seen]
            assert values == sorted(values), f"{name} went backwards: {values}"
        assert final["batpak_appended_events_total"] == events
        assert final["batpak_append_requests_total"] == requests
        payload_bytes = sum(len(msgpack.packb({"c": c, "i": i, "j": j})) for c in range(CLIENTS)
                            for i in range(BATCHES) for j in range(1 + i % 3))
        assert final["batpak_appended_bytes_total"] == payload_bytes
        # the group-size histogram is the commit groups: count = groups, sum = requests
        _, groups, size_sum = histogram(final, "batpak_group_size")
        assert groups == final["batpak_commit_groups_total"] and 1 <= groups <= requests
        assert size_sum == requests
        # every group was published (replies released): one commit latency each
        _, commits, commit_sum = histogram(final, "batpak_commit_latency_seconds")
        assert commits == groups and commit_sum > 0
        _, fsyncs, fsync_sum = histogram(final, "batpak_fsync_latency_seconds")
        assert 1 <= fsyncs <= groups and fsync_sum > 0
        assert final["batpak_visible_sequence"] == final["batpak_durable_sequence"] == events + 1  # + writer started
        assert not any(k.startswith("batpak_cursor_") for k in final)
        assert 0 <= final["batpak_queue_depth"] <= final["batpak_queue_capacity"] == 10
        assert max(m["batpak_clients"] for m in seen) >= 1
        assert final["batpak_restarts_total"] == 0 and final["batpak_dropped_messages_total"] == 0
        assert final["batpak_metrics_errors_total"] == 0
        # a durable cursor: its position is its last ack, its lag what is visible beyond it
        store = bp.connect(data_dir)
        try:
            cursor = store.cursor("billing", scope="metrics")
            acked = 0
            for _ in range(10):
                ev = cursor.next(5)
                assert ev is not None
                cursor.ack(ev)
                acked = ev.global_sequence
            visible = store.frontier().visible
            cursor.close()
        finally:
            store.close()
        m = scrape(url)
        assert m['batpak_cursor_position{cursor="billing"}'] == acked
        assert m['batpak_cursor_lag_events{cursor="billing"}'] == m["batpak_visible_sequence"] - acked > 0
        assert m["batpak_visible_sequence"] >= visible
        # top --once shows the same figures
        top = subprocess.run([EXE, "top", "--once", data_dir], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "COLUMNS": "160"})
        assert top.returncode == 0, top.stderr
        assert "ready" in top.stdout and "up" in top.stdout
        assert f"{m['batpak_appended_events_total']:,.0f} events" in top.stdout
        assert "billing" in top.stdout and f"{acked:,}" in top.stdout
        assert "10 messages" in top.stdout  # the queue's capacity
    finally:
        assert svc.stop() == 0
    with pytest.raises(OSError):  # the endpoint went with the service
        urllib.request.urlopen(url, timeout=5)
    assert_verified(data_dir)


def test_restart_counter_after_sigkill(data_dir: str) -> None:
    svc = bp.serve(data_dir, metrics="127.0.0.1:0", restart=bp.RestartPolicy.bounded(3, 60_000),
                   segment_max_bytes=1 << 20)
    try:
        assert svc.metrics_url is not None
        url = svc.metrics_url
        store = bp.connect(data_dir)
        store.append(bp.Coordinate("r", "metrics"), bp.Kind(1, 1), {"n": 1})
        before = scrape(url)
        assert before["batpak_restarts_total"] == 0 and before["batpak_writer_epoch"] == 1
        assert before["batpak_appended_events_total"] == 1
        os.kill(svc.writer_pid, signal.SIGKILL)
        wait_for(lambda: (m := scrape(url))["batpak_writer_epoch"] == 2 and m["batpak_writer_up"] == 1)
        after = scrape(url)
        assert after["batpak_restarts_total"] == 1
        assert after['batpak_writer_state{state="ready"}'] == 1
        # the new writer counts from zero (Prometheus's rate() takes the reset)
        assert after["batpak_appended_events_total"] == 0
        for n in range(2, 5):
            store.append(bp.Coordinate("r", "metrics"), bp.Kind(1, 1), {"n": n})
        assert scrape(url)["batpak_appended_events_total"] == 3
        store.close()
    finally:
        assert svc.stop() == 0
    assert_verified(data_dir)


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:http", ":9464",
                                     "::1:9464", "[nope]:1", "no-such-host.invalid:9464", 9464])
def test_a_bad_address_is_a_typed_error_naming_it(data_dir: str, address: object) -> None:
    with pytest.raises(bp.InvalidArgument) as info:
        bp.serve(data_dir, metrics=address)  # type: ignore[arg-type]
    assert info.value.name == "metrics" and info.value.value == address
    assert repr(address) in str(info.value)
    assert not os.path.exists(os.path.join(data_dir, "supervisor.lock"))  # nothing was started


def test_a_busy_port_is_a_clear_error(data_dir: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(bp.MetricsUnavailable) as info:
            bp.serve(data_dir, metrics=address)
        assert info.value.address == address and "in use" in str(info.value) and address in str(info.value)
        assert not os.path.exists(os.path.join(data_dir, "supervisor.lock"))
        # the command line says the same in one line, exit 3 (bad input: exit 2)
        p = subprocess.run([EXE, "serve", data_dir, "--metrics", address], capture_output=True, text=True, timeout=60)
        assert p.returncode == 3 and p.stderr.strip().startswith("error: ") and "in use" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([EXE, "serve", data_dir, "--metrics", "localhost"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "invalid metrics 'localhost'" in p.stderr, p.stderr


def test_cli_serve_metrics_and_top_of_an_unserved_directory(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([EXE, "serve", data_dir, "--metrics", f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{port}/metrics"))
        m = scrape(f"http://127.0.0.1:{port}/metrics")
        assert m["batpak_writer_epoch"] == 1 and m["batpak_restarts_total"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    err = proc.stderr.read() if proc.stderr else ""
    assert f"serving metrics on http://127.0.0.1:{port}/metrics" in err
    p = subprocess.run([EXE, "top", "--once", data_dir], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "no service is running" in p.stderr, p.stderr
    assert_verified(data_dir)


def _up(url: str) -> bool:
    try:
        return scrape(url)["batpak_writer_up"] == 1
    except OSError:
        return False


def test_malformed_cursor_records_are_ignored_not_fatal(data_dir: str) -> None:
    """Acks are data anyone with the store's own kinds can write: one whose position is
    not a sequence, or that names another cursor than its entity, is no position."""
    svc = bp.serve(data_dir, metrics="127.0.0.1:0", segment_max_bytes=1 << 20)
    try:
        assert svc.metrics_url is not None
        store = bp.connect(data_dir)
        ack = bp.Kind(0, 0x010)
        store.append_store_kinds([
            bp.BatchItem(bp.Coordinate("cursor:evil", "system"), ack, {"cursor": "evil", "through": "x"}),
            bp.BatchItem(bp.Coordinate("cursor:liar", "system"), ack, {"cursor": "other", "through": 1}),
            bp.BatchItem(bp.Coordinate("cursor:neg", "system"), ack, {"cursor": "neg", "through": -5}),
            bp.BatchItem(bp.Coordinate("cursor:good", "elsewhere"), ack, {"cursor": "good", "through": 1}),
            bp.BatchItem(bp.Coordinate("cursor:ok", "system"), ack, {"cursor": "ok", "through": 1}),
        ])
        store.close()
        m = scrape(svc.metrics_url)
        assert [k for k in m if k.startswith("batpak_cursor_position")] == ['batpak_cursor_position{cursor="ok"}']
        assert m["batpak_metrics_errors_total"] == 0
    finally:
        assert svc.stop() == 0
    assert_verified(data_dir)


def test_top_refreshes_in_a_terminal_and_q_quits(data_dir: str) -> None:
    svc = bp.serve(data_dir, segment_max_bytes=1 << 20)
    try:
        pid, fd = pty.fork()
        if pid == 0:  # the child: top on a terminal of its own
            os.environ["COLUMNS"] = "120"
            os.execv(EXE, [EXE, "top", data_dir, "--interval", "0.2"])
        out = b""
        deadline = time.monotonic() + 30
        while out.count(b"visible") < 2 and time.monotonic() < deadline:  # two frames at least
            if select.select([fd], [], [], 1)[0]:
                out += os.read(fd, 65536)
        assert out.count(b"visible") >= 2, out[-2000:]
        assert b"q quits" in out
        os.write(fd, b"q")
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "top did not quit on q"
            with contextlib.suppress(OSError):
                if select.select([fd], [], [], 0.1)[0]:
                    os.read(fd, 65536)
        assert os.waitstatus_to_exitcode(status) == 0
        os.close(fd)
    finally:
        assert svc.stop() == 0
    assert_verified(data_dir)


def test_a_consumer_groups_position_and_lag(data_dir: str) -> None:
    svc = bp.serve(data_dir, metrics="127.0.0.1:0", segment_max_bytes=1 << 20)
    try:
        assert svc.metrics_url is not None
        store = bp.connect(data_dir)
        for i in range(20):
            store.append(bp.Coordinate(f"job-{i}", "jobs"), bp.Kind(1, 2), {"i": i})
        group = store.cursor("workers", scope="jobs", group=True, chunk=4, ack_every=1)
        for _ in range(8):
            ev = group.next(5)
            assert ev is not None
            group.ack(ev)
        position = group.position
        group.close()
        visible = store.frontier().visible
        store.close()
        m = scrape(svc.metrics_url)
        assert 0 < m['batpak_cursor_position{cursor="group:workers"}'] == position
        assert m['batpak_cursor_lag_events{cursor="group:workers"}'] == m["batpak_visible_sequence"] - position
        assert m["batpak_visible_sequence"] >= visible
    finally:
        assert svc.stop() == 0
    assert_verified(data_dir)
