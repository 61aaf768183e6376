"""The ``batpak-mp`` command line, run as a user runs it: the real executable in a
subprocess, against a real service (``bp.serve``) or a stopped store, checking output,
``--json`` documents, one-line errors and the documented exit codes (0 ok, 1 a check
found problems, 2 bad usage or input, 3 the store could not be used)."""

from __future__ import annotations

import itertools
import json
import os
import pty
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import batpak_mp as bp

EXE = str(Path(sys.executable).parent / "batpak-mp")
K = bp.Kind(3, 9)


def run(*args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, input=input)


def one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The process failed with ``code`` and exactly one line on stderr, no traceback."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def as_json(p: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[bp.Service, str]]:
    """One service for the module's tests (each uses its own entities); stopped at the
    end, and the directory must verify."""
    assert os.access(EXE, os.X_OK), f"{EXE} is not installed (pip install -e .)"
    data_dir = str(tmp_path_factory.mktemp("cli") / "data")
    svc = bp.serve(data_dir, segment_max_bytes=1 << 20)
    try:
        yield svc, data_dir
    finally:
        assert svc.stop() == 0
        assert bp.verify(data_dir).ok


@pytest.fixture
def offline_store(tmp_path: Path) -> str:
    """A store with five events and no service running."""
    data_dir = str(tmp_path / "offline")
    with bp.Engine.open(data_dir, bp.EngineConfig(segment_max_bytes=1 << 20)) as engine:
        for i in range(5):
            engine.append(bp.Coordinate("off:1", "s"), K, {"i": i})
    return data_dir


# ---- the group -------------------------------------------------------------------------
def test_help_lists_every_command_and_the_exit_codes() -> None:
    p = run("--help")
    assert p.returncode == 0
    for command in ("serve", "status", "append", "get", "history", "tail", "verify", "inspect", "drill", "demo",
                    "bench"):
        assert f"  {command} " in p.stdout, command
    assert "Exit codes:" in p.stdout and "--debug" in p.stdout
    assert run("--version").stdout.startswith("batpak-mp ")
    one_line_error(run("no-such-command"), 2, "No such command")
    one_line_error(run("get"), 2, "Missing argument")


# ---- status ----------------------------------------------------------------------------
def test_status_of_a_running_service(served: tuple[bp.Service, str]) -> None:
    svc, data_dir = served
    doc = as_json(run("status", data_dir, "--json"))
    assert doc["running"] is True and doc["state"] == "ready"
    assert doc["writer_pid"] == svc.writer_pid and doc["supervisor_pid"] == svc.supervisor_pid
    assert doc["writer_alive"] and doc["supervisor_alive"]
    assert doc["visible"] >= 1 and doc["durable"] == doc["visible"]
    assert doc["writer_epoch"] == 1 and doc["restarts"] == 0
    assert doc["dropped_messages"] == 0 and doc["reason"] is None
    assert {"clients", "heartbeat_age_s", "writer_uptime_s"} <= set(doc)
    text = run("status", data_dir)
    assert text.returncode == 0 and "state        ready" in text.stdout
    assert f"pid {svc.writer_pid}" in text.stdout


def test_status_without_a_service(offline_store: str, tmp_path: Path) -> None:
    one_line_error(run("status", offline_store), 3, "no service is running", "checkpoint")
    p = run("status", offline_store, "--json")
    assert p.returncode == 3 and json.loads(p.stdout)["running"] is False
    one_line_error(run("status", str(tmp_path / "nothing-here")), 2, "not a batpak-mp data directory")
    assert bp.verify(offline_store).ok


# ---- append and get ---------------------------------------------------------------------
def test_append_then_get(served: tuple[bp.Service, str]) -> None:
    _, data_dir = served
    payload = {"x": 10, "name": "alice", "tags": [1, 2]}
    r = as_json(run("append", data_dir, "player:alice", "room:1", "--kind", "3:9", "--payload", json.dumps(payload),
                    "--json"))
    assert r["entity"] == "player:alice" and r["scope"] == "room:1" and r["entity_clock"] == 1
    assert r["durable"] is True and len(bytes.fromhex(r["event_id"])) == 16
    assert len(bytes.fromhex(r["event_hash"])) == 32 and r["prev_hash"] == "00" * 32
    ev = as_json(run("get", data_dir, r["event_id"], "--json"))
    assert ev["payload"] == payload and ev["kind"] == "3:9" and ev["global_sequence"] == r["global_sequence"]
    assert ev["event_hash"] == r["event_hash"] and ev["entity"] == "player:alice"
    text = run("get", data_dir, r["event_id"])
    assert text.returncode == 0 and r["event_id"] in text.stdout and '"name": "alice"' in text.stdout
    # the payload from stdin, an idempotency key, and the same receipt again for the same key
    first = as_json(run("append", data_dir, "player:alice", "room:1", "--kind", "0x3:9", "--payload", "-",
                        "--key", "k-1", "--json", input="[1, 2]"))
    again = as_json(run("append", data_dir, "player:alice", "room:1", "--kind", "3:9", "--payload", "[1, 2]",
                        "--key", "k-1", "--json"))
    assert first == again and first["entity_clock"] == 2
    with bp.connect(data_dir) as store:
        assert store.get(bytes.fromhex(first["event_id"])).payload == [1, 2]
    human = run("append", data_dir, "player:alice", "room:1", "--kind", "3:9", "--payload", "null",
                "--expected-clock", "2")
    assert human.returncode == 0 and "appended sequence" in human.stdout and "clock 3" in human.stdout


def test_append_and_get_errors(served: tuple[bp.Service, str], offline_store: str) -> None:
    _, data_dir = served
    base = ["append", data_dir, "err:1", "s"]
    one_line_error(run(*base, "--kind", "3-9", "--payload", "{}"), 2, "--kind", "CAT:TYPE")
    one_line_error(run(*base, "--kind", "3:99999", "--payload", "{}"), 2, "--kind")
    one_line_error(run(*base, "--kind", "0:1", "--payload", "{}"), 2, "reserved")
    one_line_error(run(*base, "--kind", "3:9", "--payload", "{nope"), 2, "not valid JSON")
    one_line_error(run("append", data_dir, "", "s", "--kind", "3:9", "--payload", "1"), 2, "entity")
    one_line_error(run(*base, "--kind", "3:9", "--payload", "1", "--expected-clock", "5"), 1, "expected clock 5")
    one_line_error(run("append", offline_store, "a", "s", "--kind", "3:9", "--payload", "1"), 3, "no service")
    one_line_error(run("get", data_dir, "00" * 16), 2, "not found")
    one_line_error(run("get", data_dir, "xyz"), 2, "not an event id")
    # --debug (before the command) shows the traceback instead of one line
    debug = run("--debug", "get", data_dir, "00" * 16)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "NotFound" in debug.stderr


# ---- history ---------------------------------------------------------------------------
def test_history(served: tuple[bp.Service, str]) -> None:
    _, data_dir = served
    with bp.connect(data_dir) as store:
        receipts = [store.append(bp.Coordinate("hist:1", "s"), K, {"n": n}) for n in range(5)]
    events = as_json(run("history", data_dir, "hist:1", "--json"))
    assert [e["event_id"] for e in events] == [r.event_id.hex() for r in receipts]
    assert [e["entity_clock"] for e in events] == [1, 2, 3, 4, 5]
    page = as_json(run("history", data_dir, "hist:1", "--after-clock", "2", "--limit", "2", "--json"))
    assert [e["payload"] for e in page] == [{"n": 2}, {"n": 3}]
    text = run("history", data_dir, "hist:1")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 5 and "hist:1 @ s" in text.stdout
    assert as_json(run("history", data_dir, "hist:nobody", "--json")) == []
    one_line_error(run("history", data_dir, "hist:1", "--limit", "0"), 2, "--limit")


# ---- tail ------------------------------------------------------------------------------
def test_tail(served: tuple[bp.Service, str]) -> None:
    _, data_dir = served
    with bp.connect(data_dir) as store:
        receipts = [store.append(bp.Coordinate(f"tail:{n % 2}", "tail"), bp.Kind(4, n % 2), n) for n in range(6)]
        visible = store.frontier().visible
    newest = [json.loads(line) for line in run("tail", data_dir, "--limit", "3", "--json").stdout.splitlines()]
    assert [e["global_sequence"] for e in newest] == [visible - 2, visible - 1, visible]
    after = receipts[0].global_sequence - 1
    p = run("tail", data_dir, "--after", str(after), "--limit", "4", "--json")
    assert [json.loads(line)["payload"] for line in p.stdout.splitlines()] == [0, 1, 2, 3]
    p = run("tail", data_dir, "--after", str(after), "--entity", "tail:1", "--json")
    assert [json.loads(line)["payload"] for line in p.stdout.splitlines()] == [1, 3, 5]
    p = run("tail", data_dir, "--kind", "4:0", "--limit", "2", "--json")
    assert [json.loads(line)["payload"] for line in p.stdout.splitlines()] == [2, 4]
    text = run("tail", data_dir, "--after", str(after), "--scope", "tail")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 6
    assert text.stdout.split()[0] == str(receipts[0].global_sequence)  # each line starts with its sequence
    one_line_error(run("tail", data_dir, "--kind", "four"), 2, "--kind")


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


@pytest.mark.parametrize("subscribe", [True, False], ids=["subscribe", "polling"])
def test_tail_follow_prints_new_events_until_sigint(served: tuple[bp.Service, str], subscribe: bool) -> None:
    _, data_dir = served
    entity = f"follow:{subscribe}"
    with bp.connect(data_dir) as store:
        start = store.frontier().visible
        args = ["tail", data_dir, "--follow", "--json", "--after", str(start), "--entity", entity]
        if subscribe:
            cmd = [EXE, *args]
        else:  # the fallback for a Store without subscribe(): poll the frontier
            code = ("import sys; from batpak_mp import _client\n"
                    "if hasattr(_client.Store, 'subscribe'): del _client.Store.subscribe\n"
                    "from batpak_mp.cli import main; main(sys.argv[1:])")
            cmd = [sys.executable, "-c", code, *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines = _lines(proc)
            time.sleep(0.3)
            receipts = [store.append(bp.Coordinate(entity, "s"), K, {"n": n}) for n in range(3)]
            got = [json.loads(lines.get(timeout=15)) for _ in range(3)]
            assert [e["event_id"] for e in got] == [r.event_id.hex() for r in receipts]
            assert [e["payload"] for e in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=15) == 0
            assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_tail_follow_stops_on_sigterm_and_needs_the_service(served: tuple[bp.Service, str],
                                                             offline_store: str) -> None:
    _, data_dir = served
    proc = subprocess.Popen([EXE, "tail", data_dir, "-f", "--after", "0", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(_lines(proc).get(timeout=15))  # the backlog starts at sequence 1
        assert first["global_sequence"] == 1 and first["kind"] == "0:1"  # the writer's start, a system event
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    one_line_error(run("tail", offline_store, "--follow"), 3, "no service")


# ---- reads without a service ------------------------------------------------------------------
def test_reads_work_offline(offline_store: str) -> None:
    events = as_json(run("history", offline_store, "off:1", "--json"))
    assert [e["payload"] for e in events] == [{"i": i} for i in range(5)]
    ev = as_json(run("get", offline_store, events[2]["event_id"], "--json"))
    assert ev["payload"] == {"i": 2}
    p = run("tail", offline_store, "--after", "0", "--json")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 5 and p.stderr == ""
    one_line_error(run("get", offline_store, "00" * 16), 2, "not found")
    assert bp.verify(offline_store).ok


# ---- verify ----------------------------------------------------------------------------
def test_verify_ok_problems_and_a_clean_json_under_a_terminal(served: tuple[bp.Service, str],
                                                              offline_store: str) -> None:
    _, data_dir = served
    doc = as_json(run("verify", data_dir, "--json"))
    assert doc["ok"] is True and doc["events_checked"] >= 1 and doc["problems"] == []
    assert run("verify", data_dir).stdout.startswith("ok: ")
    # stderr a terminal: the progress bar goes there (forced at once), stdout stays JSON
    master, slave = pty.openpty()
    try:
        p = subprocess.run([EXE, "verify", offline_store, "--json", "--progress-after", "0"], stdout=subprocess.PIPE,
                           stderr=slave, text=True, timeout=60)
        os.close(slave)
        slave = -1
        assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True
        shown = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        assert b"verifying 1 segment" in shown
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    # one changed payload byte: verify finds it and exits 1
    seg = os.path.join(offline_store, "segments", "000000000001.seg")
    with open(seg, "r+b") as f:
        f.seek(64)
        frame_len = int.from_bytes(f.read(4), "little")
        f.seek(64 + frame_len - 1)
        byte = f.read(1)[0]
        f.seek(64 + frame_len - 1)
        f.write(bytes([byte ^ 0x01]))
    bad = as_json(run("verify", offline_store, "--json"), code=1)
    assert bad["ok"] is False and bad["problems"]
    assert run("verify", offline_store).returncode == 1
    frame = as_json(run("inspect", offline_store, "--segment", "1", "--count", "1", "--json"))["positions"][0]
    assert frame["status"] == "bad" and frame["fields"]["crc_ok"] is False and frame["fields"]["global_sequence"] == 1


# ---- inspect ---------------------------------------------------------------------------
def test_inspect_segments_footers_and_frames(served: tuple[bp.Service, str], tmp_path: Path) -> None:
    svc, data_dir = served
    with bp.connect(data_dir) as store:
        blob = "x" * 4096
        for b in range(3):  # ~1.2 MiB: the 1 MiB segment rotates at least once
            store.append_batch([bp.BatchItem(bp.Coordinate(f"big:{b}", "s"), K, {"b": blob, "i": i})
                                for i in range(100)])
        visible = store.frontier().visible
    doc = as_json(run("inspect", data_dir, "--json"))
    segments = doc["segments"]
    assert len(segments) >= 2 and doc["meta"]["ok"] is True
    assert doc["writer_lock"] == {"pid": svc.writer_pid, "alive": True}  # read, never locked
    sealed, active = segments[0], segments[-1]
    assert sealed["state"] == "sealed" and sealed["footer_ok"] is True and sealed["first_seq"] == 1
    assert sealed["footer_offset"] == sealed["data_end"] and sealed["frames"] == sealed["last_seq"]
    assert active["state"] == "active" and active["tail"] == "clean" and active["last_seq"] == visible
    assert sum(s["frames"] for s in segments) == visible
    assert all(s["first_seq"] == prev["last_seq"] + 1 for prev, s in itertools.pairwise(segments))
    assert any(f["name"] == "records.idx" for f in doc["index_files"])
    text = run("inspect", data_dir)
    assert text.returncode == 0 and "sealed" in text.stdout and "active" in text.stdout
    # frames from the start of segment 1: header fields, checks, entity, payload preview
    frames = as_json(run("inspect", data_dir, "--segment", "1", "--count", "2", "--json"))
    first, second = frames["positions"]
    assert first["offset"] == 64 and first["status"] == "ok" and first["next_offset"] == second["offset"]
    assert first["fields"]["crc_ok"] and first["fields"]["hash_ok"] and first["fields"]["global_sequence"] == 1
    assert first["fields"]["entity"] == "writer" and first["fields"]["flag_names"] == ["COMMIT_END"]
    assert second["fields"]["global_sequence"] == 2
    # the seal footer, at the offset the listing gave
    footer = as_json(run("inspect", data_dir, "--segment", "1", "--offset", str(sealed["footer_offset"]), "--json"))
    pos = footer["positions"]
    assert pos[0]["what"] == "footer" and pos[0]["fields"]["ok"] is True and len(pos) == 1
    assert pos[0]["fields"]["count"] == sealed["frames"]
    text = run("inspect", data_dir, "--segment", "1", "--offset", "0x40", "--count", "1")
    assert text.returncode == 0 and "@64: frame, ok" in text.stdout and "entity 'writer'" in text.stdout
    one_line_error(run("inspect", data_dir, "--segment", "999"), 2, "no such segment")
    one_line_error(run("inspect", data_dir, "--offset", "64"), 2, "--offset needs --segment")
    one_line_error(run("inspect", data_dir, "--segment", "1", "--offset", str(1 << 40)), 2, "outside the segment")
    one_line_error(run("inspect", str(tmp_path)), 2, "not a batpak-mp data directory")
    assert run("status", data_dir, "--json").returncode == 0  # the writer never noticed


# ---- serve, demo, bench -----------------------------------------------------------------------
def test_serve_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "served")
    proc = subprocess.Popen([EXE, "serve", data_dir, "--segment-max-bytes", str(1 << 20)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while '"state": "ready"' not in run("status", data_dir, "--json").stdout:  # not merely starting
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not become ready"
            time.sleep(0.1)
        r = as_json(run("append", data_dir, "s:1", "s", "--kind", "3:9", "--payload", "1", "--json"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    one_line_error(run("status", data_dir), 3, "no service is running")
    assert as_json(run("get", data_dir, r["event_id"], "--json"))["payload"] == 1
    assert bp.verify(data_dir).ok


def test_demo(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "demo")
    p = run("demo", data_dir, "--workers", "2", "--seconds", "1.5", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "clean" in p.stdout and "SIGKILL" in p.stdout + p.stderr
    assert bp.verify(data_dir).ok


def test_bench(tmp_path: Path) -> None:
    tools = Path(bp.__file__).parents[1] / "tools"
    if not (tools / "bench_engine.py").is_file():
        pytest.skip("not a source checkout")
    # the engine suite only: bench_service.py has no --dir, it writes under the checkout's
    # bench-data/, which a concurrent run of the suite would share
    p = run("bench", "--quick", "--suite", "engine", "--engine-args",
            f"--events 300 --reads 100 --opens 1 --backends batpak --dir {tmp_path}", timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "batpak-mp engine benchmark" in p.stdout and "bench_engine.py --quick --events 300" in p.stderr
    one_line_error(run("bench", "--tools-dir", str(tmp_path / "none")), 2, "not found")
    rejected = run("bench", "--suite", "engine", "--engine-args", "--no-such-option")  # argparse's usage error
    assert rejected.returncode == 2 and rejected.stderr.splitlines()[-1] == "error: bench_engine.py exited with code 2"


def test_reset_ipc_refuses_a_live_service_and_clears_a_dead_one(tmp_path: Path) -> None:
    import signal
    import time

    data = str(tmp_path / "reset")
    svc = bp.serve(data, segment_max_bytes=1 << 20)
    try:
        live = run("reset-ipc", data, "--yes")
        assert live.returncode == 3 and len(live.stderr.strip().splitlines()) == 1
        os.kill(svc.supervisor_pid, signal.SIGKILL)  # the writer follows it; the IPC stays behind
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and run("reset-ipc", data, "--yes").returncode == 3:
            time.sleep(0.2)
        dry = run("reset-ipc", data)
        assert dry.returncode in (0, 1)
    finally:
        svc._proc.wait(10)
    done = run("reset-ipc", data, "--yes")
    assert done.returncode == 0, done.stderr
    assert run("status", data).returncode == 3  # no control block any more
    assert bp.verify(data).ok


def test_serve_tells_systemd_when_it_is_ready(tmp_path: Path) -> None:
    """Under systemd Type=notify, `serve` sends READY=1 once the writer serves and
    STOPPING=1 when asked to stop (a datagram socket stands in for systemd)."""
    import signal
    import socket

    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    data = str(tmp_path / "notified")
    proc = subprocess.Popen([EXE, "serve", data], env={**os.environ, "NOTIFY_SOCKET": sock_path},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1") and "serving" in ready
        with bp.connect(data) as s:  # READY means clients can use it
            assert s.append(bp.Coordinate("n", "s"), bp.Kind(1, 1), 1).global_sequence > 0
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert bp.verify(data).ok
