"""Backups of a served store with real clients appending, a writer SIGKILLed and
restarted in the middle of one, and restore into the path of a live or killed service:
every event acknowledged before the backup is in it, the copy serves as it is with every
receipt verifying, and the CLI commands give one-line typed errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import multiprocess as mp
import pytest
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp._ipc.names import control_name

K = bp.Kind(1, 1)
EXE = os.path.join(os.path.dirname(sys.executable), "batpak-mp")


def _appender(data_dir: str, cid: int, stop: Any, out: Any) -> None:
    """Append single events until ``stop`` is set; report how many were acknowledged."""
    n = 0
    try:
        with bp.connect(data_dir, timeout=60) as s:
            while not stop.is_set():
                s.append(bp.Coordinate(f"client:{cid}", "load"), K, {"c": cid, "n": n, "pad": "p" * 200})
                n += 1
        out.put((cid, n))
    except BaseException as exc:  # report, never hang the parent
        out.put((cid, repr(exc)))


class Appenders:
    def __init__(self, data_dir: str, count: int) -> None:
        ctx = mp.get_context("fork")
        self.stop = ctx.Event()
        self.out = ctx.Queue()
        self.procs = [ctx.Process(target=_appender, args=(data_dir, c, self.stop, self.out)) for c in range(count)]
        for p in self.procs:
            p.start()

    def finish(self) -> dict[int, Any]:
        self.stop.set()
        results = dict(self.out.get(timeout=120) for _ in self.procs)
        for p in self.procs:
            p.join(30)
        return results


def seed(store: bp.Store, n: int, tag: str) -> list[bp.Receipt]:
    out: list[bp.Receipt] = []
    for i in range(0, n, 100):
        out += store.append_batch([bp.BatchItem(bp.Coordinate(f"{tag}:{j % 13}", "seed"), K, {"j": j, "pad": "s" * 300})
                                   for j in range(i, min(n, i + 100))])
    return out


@pytest.fixture
def served(tmp_path: os.PathLike[str]) -> Iterator[tuple[bp.Service, str]]:
    data_dir = os.path.join(tmp_path, "data")
    svc = bp.serve(data_dir, restart=bp.RestartPolicy.bounded(5, 60_000), segment_max_bytes=1 << 20)
    try:
        yield svc, data_dir
    finally:
        assert svc.stop() == 0
    assert_verified(data_dir)


def wait_ready(svc: bp.Service, old_pid: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = svc.status()
        if status["state"] == "ready" and status["writer_pid"] not in (0, old_pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"the writer did not come back: {svc.status()}")


def test_backup_while_clients_append_then_serve_the_copy(served: tuple[bp.Service, str],
                                                         tmp_path: os.PathLike[str]) -> None:
    _, data_dir = served
    dest = os.path.join(tmp_path, "backup")
    with bp.connect(data_dir) as store:
        receipts = seed(store, 4000, "seed")
    load = Appenders(data_dir, 3)
    try:
        time.sleep(0.3)  # the clients are appending
        report = bp.backup(data_dir, dest)
        again = bp.backup(data_dir, dest)  # incremental, still under load
    finally:
        results = load.finish()
    assert all(isinstance(n, int) and n > 0 for n in results.values()), results
    assert report.last_sequence >= receipts[-1].global_sequence
    assert again.incremental and again.last_sequence >= report.last_sequence and again.files_reused >= 1
    assert_verified(dest)
    with bp.serve(dest, segment_max_bytes=1 << 20) as copy, bp.connect(dest) as store:  # a backup serves as it is
        assert store.frontier().visible > again.last_sequence  # its writer recorded its start after them
        assert all(store.verify_receipt(r) for r in receipts)
        store.append(bp.Coordinate("after", "restore"), K, {"ok": True})
        assert copy.status()["state"] == "ready"
    assert_verified(dest)


def test_backup_rides_through_a_writer_killed_and_restarted(served: tuple[bp.Service, str],
                                                            tmp_path: os.PathLike[str]) -> None:
    svc, data_dir = served
    dest = os.path.join(tmp_path, "backup")
    with bp.connect(data_dir) as store:
        receipts = seed(store, 9000, "seed")  # about four 1 MiB segments: several files to copy
    load = Appenders(data_dir, 2)
    killed: list[int] = []

    def kill_the_writer(done: int, total: int) -> None:
        if not killed:  # after the first chunk: mid-copy
            pid = svc.writer_pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            wait_ready(svc, pid)  # the rest of the copy runs beside the new writer

    try:
        report = bp.backup(data_dir, dest, progress=kill_the_writer)
    finally:
        results = load.finish()
    assert killed and svc.status()["restarts"] >= 1
    assert all(isinstance(n, int) for n in results.values()), results  # the clients rode through the restart
    assert report.last_sequence >= receipts[-1].global_sequence
    assert_verified(dest)
    with bp.serve(dest, segment_max_bytes=1 << 20), bp.connect(dest) as store:
        assert all(store.verify_receipt(r) for r in receipts[::50])
    after = bp.backup(data_dir, dest)  # and the next one, with the writer serving again
    assert after.incremental and after.last_sequence > report.last_sequence
    assert_verified(dest)


def test_restore_refuses_a_served_directory_and_clears_a_dead_ones_ipc(tmp_path: os.PathLike[str]) -> None:
    data_dir, dest = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "backup")
    svc = bp.serve(data_dir, segment_max_bytes=1 << 20)
    try:
        with bp.connect(data_dir) as store:
            kept = seed(store, 1500, "kept")
            report = bp.backup(data_dir, dest)
            lost = seed(store, 700, "lost")  # acknowledged after the backup: the old control block's durable floor
        with pytest.raises(bp.AlreadyServed, match="being served"):
            bp.restore(dest, data_dir)
        with pytest.raises(bp.StoreLocked):  # the base class, for callers that catch any lock
            bp.restore(dest, data_dir, force=True)
        os.kill(svc.supervisor_pid, signal.SIGKILL)  # the writer follows it; its IPC stays behind
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                restored = bp.restore(dest, data_dir)
                break
            except bp.StoreLocked:
                time.sleep(0.1)  # the writer is still draining
        else:
            raise AssertionError("the killed service's writer never let go of its lock")
    finally:
        svc._proc.wait(30)
    assert os.path.exists(os.path.join("/dev/shm", control_name(data_dir)[1:])) is False  # stale IPC cleared
    assert restored.last_sequence == report.last_sequence and restored.previous is not None
    assert_verified(data_dir)
    with bp.serve(data_dir, segment_max_bytes=1 << 20), bp.connect(data_dir) as store:
        # without the cleared control block the writer would refuse: "log ends below the durable floor"
        assert all(store.verify_receipt(r) for r in kept)
        assert not store.verify_receipt(lost[-1])
    assert_verified(data_dir)
    assert_verified(dest)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)


def test_cli_backup_fork_restore(served: tuple[bp.Service, str], tmp_path: os.PathLike[str]) -> None:
    _, data_dir = served
    with bp.connect(data_dir) as store:
        receipts = seed(store, 4000, "cli")  # two 1 MiB segments: the second backup reuses the sealed one
    dest, fork_dir = os.path.join(tmp_path, "b"), os.path.join(tmp_path, "f")
    p = run("backup", data_dir, dest, "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["last_sequence"] >= receipts[-1].global_sequence and doc["incremental"] is False
    assert p.stderr == ""  # no progress bar: stderr is not a terminal
    text = run("backup", data_dir, dest)
    assert text.returncode == 0 and "reused from the previous backup" in text.stdout
    second = json.loads(run("backup", data_dir, dest, "--json").stdout)
    assert second["incremental"] is True and second["files_reused"] >= 1
    f = run("fork", data_dir, fork_dir, "--at", str(receipts[499].global_sequence), "--json")
    assert f.returncode == 0, f.stderr
    assert json.loads(f.stdout)["fork_sequence"] == receipts[499].global_sequence
    refused = run("restore", dest, data_dir)  # served: exit 3, one line
    assert refused.returncode == 3 and refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
    inside = run("backup", data_dir, os.path.join(data_dir, "x"))
    assert inside.returncode == 2 and "inside the data directory" in inside.stderr
    bad_at = run("fork", data_dir, os.path.join(tmp_path, "f2"), "--at", str(receipts[0].global_sequence))
    assert bad_at.returncode == 2 and "inside a batch" in bad_at.stderr
    restored = os.path.join(tmp_path, "r")
    r = run("restore", dest, restored, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["last_sequence"] == second["last_sequence"]
    for path in (dest, fork_dir, restored):
        assert_verified(path)


def test_cli_backup_shows_progress_when_stderr_is_a_terminal(served: tuple[bp.Service, str],
                                                             tmp_path: os.PathLike[str]) -> None:
    import pty

    _, data_dir = served
    with bp.connect(data_dir) as store:
        seed(store, 3000, "bar")
    main, tty = pty.openpty()
    try:
        p = subprocess.run([EXE, "backup", data_dir, os.path.join(tmp_path, "b"), "--json"], stdout=subprocess.PIPE,
                           stderr=tty, text=True, timeout=120, env={**os.environ, "COLUMNS": "120"})
        os.close(tty)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
    assert p.returncode == 0
    assert json.loads(p.stdout)["last_sequence"] >= 3000  # stdout stays clean JSON
    assert b"backup" in shown and b"\x1b[" in shown  # the bar, drawn on the terminal
