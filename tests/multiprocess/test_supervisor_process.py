"""Integration tests of the supervisor with REAL processes: ``python -m batpak_supervisor``
running the real writer (``python -m batpak_mp.writer``) on a temporary data directory.

Owns: the supervisor's process contract: explicit readiness (its ``--ready-fd`` line),
restart after SIGKILL, restart of a hung (SIGSTOPped) writer, policy exhaustion (FAILED
+ reason + exit 3), fail-closed writer exits, graceful stop on SIGTERM/SIGINT (exit 0,
writer gone), a stop during the restart delay, one supervisor per data directory, and
orphan prevention (a SIGKILLed supervisor's writer exits by itself).
Every test ends with ``bp.verify`` on the directory, and a finalizer kills whatever is
left and unlinks the directory's IPC objects. No mocks, no fake writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import batpak_mp as bp
from batpak_mp._ipc.control import ControlBlock, ControlSnapshot
from batpak_mp._service import cleanup_ipc  # queue, control block and client areas
from batpak_mp._values import WriterState

WRITER_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "batpak_mp", "writer.py")
pytestmark = pytest.mark.skipif(not os.path.exists(WRITER_PY), reason="writer not built yet")

READY_S = 30.0  # a writer start imports the engine and recovers: seconds at most on a busy box
SMALL_SEGMENTS = ["--segment-max-bytes", str(1 << 20)]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_until(what: str, cond: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Served:
    """One supervisor process under test, with its log and the writers it was seen to run."""

    def __init__(self, data_dir: str, log_path: str) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer_pids: set[int] = set()
        self._ready_r = -1
        self._block: ControlBlock | None = None

    def start(self, restart: str = "bounded:5:60000", *options: str, writer_args: tuple[str, ...] = tuple(SMALL_SEGMENTS),
              ) -> subprocess.Popen[bytes]:
        r, w = os.pipe()
        cmd = [sys.executable, "-m", "batpak_supervisor", self.data_dir, "--restart", restart,
               "--ready-fd", str(w), *options, "--", *writer_args]
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=log)
            finally:
                os.close(w)
        self._ready_r = r
        return self.proc

    def ready_line(self, timeout: float = READY_S) -> str:
        """The supervisor's one line on its ready fd ('' if it closed the fd without one)."""
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no ready line within {timeout} s; log:\n{self.log()}"
            if not select.select([self._ready_r], [], [], left)[0]:
                continue
            chunk = os.read(self._ready_r, 4096)
            if not chunk:
                break
            buf += chunk
        os.close(self._ready_r)
        self._ready_r = -1
        return buf.decode().strip()

    def wait_ready(self) -> int:
        line = self.ready_line()
        assert line.startswith("ready "), f"{line!r}; log:\n{self.log()}"
        pid = int(line.split()[1])
        self.writer_pids.add(pid)
        return pid

    def control(self) -> ControlSnapshot:
        if self._block is None:
            self._block = ControlBlock.attach(self.data_dir)
        return self._block.read()

    def ready_writer(self, not_pid: int = 0, timeout: float = READY_S) -> ControlSnapshot:
        """Wait until a writer other than ``not_pid`` is READY in the control block."""
        def check() -> ControlSnapshot | None:
            s = self.control()
            if s.state == WriterState.READY and s.writer_pid not in (0, not_pid) and _alive(s.writer_pid):
                return s
            return None
        snap: ControlSnapshot = _wait_until(f"a ready writer other than {not_pid}; log:\n{self.log()}", check, timeout)
        self.writer_pids.add(snap.writer_pid)
        return snap

    def exit_code(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout} s; log:\n{self.log()}") from None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def cleanup(self) -> None:
        if self._ready_r >= 0:
            os.close(self._ready_r)
        if self._block is not None:
            self._block.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.writer_pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if any("batpak_mp.writer" in part for part in p.cmdline()):
                    p.kill()
        cleanup_ipc(self.data_dir)


@pytest.fixture
def served(data_dir: str, tmp_path: Any) -> Iterator[Served]:
    s = Served(data_dir, os.path.join(os.fspath(tmp_path), "supervisor.log"))
    try:
        yield s
    finally:
        s.cleanup()


def assert_verified(data_dir: str) -> None:
    report = bp.verify(data_dir)
    assert report.ok, report.problems


# ---- readiness and a clean stop -------------------------------------------------------------
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_control_block_and_graceful_stop(served: Served, stop_signal: int) -> None:
    proc = served.start("once")
    pid = served.wait_ready()
    snap = served.control()
    assert (snap.writer_pid, snap.supervisor_pid, snap.state, snap.restarts) == (pid, proc.pid, WriterState.READY, 0)
    assert snap.writer_epoch >= 1 and snap.reason == ""
    assert psutil.Process(pid).ppid() == proc.pid

    proc.send_signal(stop_signal)
    assert served.exit_code() == 0
    assert not _alive(pid)
    snap = served.control()
    assert snap.state == WriterState.STOPPED and snap.writer_pid == 0
    log = served.log()
    assert f"started writer pid {pid}" in log and f"writer pid {pid} exited with code 0" in log
    assert_verified(served.data_dir)


def test_stop_keeps_acknowledged_events(served: Served) -> None:
    served.start("once")
    served.wait_ready()
    coord = bp.Coordinate("player:alice", "room:dungeon")
    with bp.connect(served.data_dir, timeout=20) as store:
        receipts = [store.append(coord, bp.Kind(1, 7), {"n": i}) for i in range(50)]
    assert served.proc is not None
    served.proc.send_signal(signal.SIGTERM)
    assert served.exit_code() == 0
    report = bp.verify(served.data_dir)
    assert report.ok, report.problems
    assert report.events_checked >= len(receipts)


# ---- restarts ----------------------------------------------------------------------------
def test_sigkilled_writer_is_restarted_and_counted(served: Served) -> None:
    proc = served.start("bounded:3:60000")
    first = served.wait_ready()
    epoch = served.control().writer_epoch
    os.kill(first, signal.SIGKILL)
    snap = served.ready_writer(not_pid=first)
    assert snap.restarts == 1 and snap.writer_epoch == epoch + 1 and snap.supervisor_pid == proc.pid
    assert psutil.Process(snap.writer_pid).ppid() == proc.pid
    assert not _alive(first)  # reaped, not a zombie
    assert "restart 1 of 3 within 60000 ms" in served.log()

    os.kill(snap.writer_pid, signal.SIGKILL)
    second = served.ready_writer(not_pid=snap.writer_pid)
    assert second.restarts == 2 and second.writer_epoch == epoch + 2

    proc.send_signal(signal.SIGTERM)
    assert served.exit_code() == 0
    assert_verified(served.data_dir)


def test_clients_are_served_after_a_restart(served: Served) -> None:
    served.start("bounded:3:60000")
    first = served.wait_ready()
    coord = bp.Coordinate("player:bob", "room:hall")
    with bp.connect(served.data_dir, timeout=30) as store:
        before = store.append(coord, bp.Kind(1, 1), {"n": 1})
        os.kill(first, signal.SIGKILL)
        after = store.append(coord, bp.Kind(1, 1), {"n": 2})
        assert after.global_sequence > before.global_sequence and after.entity_clock == before.entity_clock + 1
        assert store.get(after.event_id).payload == {"n": 2}
        assert served.control().restarts == 1
    assert served.proc is not None
    served.proc.send_signal(signal.SIGTERM)
    assert served.exit_code() == 0
    assert_verified(served.data_dir)


def test_bounded_policy_exhausted_fails_with_reason(served: Served) -> None:
    proc = served.start("bounded:1:60000")
    first = served.wait_ready()
    os.kill(first, signal.SIGKILL)
    second = served.ready_writer(not_pid=first).writer_pid
    os.kill(second, signal.SIGKILL)
    assert served.exit_code() == 3
    snap = served.control()
    assert snap.state == WriterState.FAILED and snap.restarts == 1 and snap.writer_pid == 0
    assert "bounded:1:60000 exhausted" in snap.reason and "signal 9" in snap.reason
    assert not _alive(second)
    assert f"failed: {snap.reason}" in served.log()
    assert proc.returncode == 3
    assert_verified(served.data_dir)


def test_once_policy_allows_one_restart(served: Served) -> None:
    served.start("once")
    first = served.wait_ready()
    os.kill(first, signal.SIGKILL)
    second = served.ready_writer(not_pid=first).writer_pid
    os.kill(second, signal.SIGKILL)
    assert served.exit_code() == 3
    snap = served.control()
    assert snap.state == WriterState.FAILED and "once exhausted" in snap.reason and snap.restarts == 1
    assert_verified(served.data_dir)


def test_hung_writer_is_killed_and_restarted(served: Served) -> None:
    proc = served.start("bounded:2:60000", "--hang-timeout-ms", "1000")
    first = served.wait_ready()
    time.sleep(0.3)  # a few heartbeats
    os.kill(first, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        snap = served.ready_writer(not_pid=first)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGCONT)
    assert time.monotonic() - stopped_at >= 1.0  # not before the hang timeout
    assert snap.restarts == 1 and not _alive(first)
    assert f"writer pid {first} hung" in served.log()

    proc.send_signal(signal.SIGTERM)
    assert served.exit_code() == 0
    assert_verified(served.data_dir)


def test_stop_during_restart_delay_exits_at_once(served: Served) -> None:
    proc = served.start("bounded:3:60000", "--restart-delay-ms", "20000")
    first = served.wait_ready()
    os.kill(first, signal.SIGKILL)
    _wait_until("the restart to be scheduled", lambda: "restarting writer" in served.log())
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert served.exit_code(timeout=5) == 0
    assert time.monotonic() - t0 < 5
    snap = served.control()
    assert snap.state == WriterState.STOPPED and snap.writer_pid == 0 and snap.restarts == 1
    assert_verified(served.data_dir)


# ---- fail-closed exits and ownership ----------------------------------------------------------
def test_writer_usage_error_is_terminal(served: Served) -> None:
    served.start("bounded:5:60000", writer_args=("--sync", "sometimes"))
    line = served.ready_line()
    assert line.startswith("failed ") and "exit 2" in line
    assert served.exit_code() == 3
    snap = served.control()
    assert snap.state == WriterState.FAILED and snap.restarts == 0 and "exit 2" in snap.reason
    assert served.log().count("started writer pid") == 1


def test_second_supervisor_is_refused_and_touches_nothing(served: Served, tmp_path: Any) -> None:
    proc = served.start("once")
    pid = served.wait_ready()
    before = served.control()
    other = Served(served.data_dir, os.path.join(os.fspath(tmp_path), "other.log"))
    try:
        other.start("once")
        line = other.ready_line()
        assert line.startswith("failed ") and "already supervised" in line and str(proc.pid) in line
        assert other.exit_code() == 4
    finally:
        if other.proc is not None and other.proc.poll() is None:
            other.proc.kill()
            other.proc.wait()
    after = served.control()
    assert (after.supervisor_pid, after.writer_pid, after.state, after.writer_epoch) == (
        proc.pid, pid, WriterState.READY, before.writer_epoch)
    proc.send_signal(signal.SIGTERM)
    assert served.exit_code() == 0
    assert_verified(served.data_dir)


def test_directory_locked_by_a_foreign_writer_is_refused(served: Served) -> None:
    """A live process holding the writer lock owns the directory: the supervisor gives up
    after a short wait (exit 4) without writing to the control block."""
    os.makedirs(served.data_dir, mode=0o700)
    fd = os.open(os.path.join(served.data_dir, "writer.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        served.start("bounded:5:60000")
        line = served.ready_line(timeout=20)
        assert line.startswith("failed ") and "live writer" in line and str(os.getpid()) in line
        assert served.exit_code() == 4
    finally:
        os.close(fd)
    with pytest.raises(bp.WriterUnavailable):
        ControlBlock.attach(served.data_dir)  # never created: nothing of the owner's was touched
    assert "started writer" not in served.log()


# ---- orphan prevention ------------------------------------------------------------------------
_PR_SET_CHILD_SUBREAPER = 36


@pytest.mark.skipif(sys.platform != "linux", reason="uses a Linux child subreaper to reap the orphan")
def test_writer_exits_when_its_supervisor_is_killed(served: Served) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # adopt the orphan ourselves, so we can reap it and read its exit status
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        proc = served.start("bounded:5:60000")
        pid = served.wait_ready()
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        status = None
        while status is None and time.monotonic() < deadline:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            else:
                time.sleep(0.02)
        assert status is not None, "the writer outlived its supervisor by 10 s"
        assert os.waitstatus_to_exitcode(status) == 0  # it drained and stopped cleanly
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert_verified(served.data_dir)


def test_corruption_found_at_recovery_is_terminal(served: Served, tmp_path: Any) -> None:
    """Damage below the durable end makes the writer exit 71: the supervisor does not
    restart it blindly, it fails with the reason (and verify finds the same damage)."""
    proc = served.start("once")
    served.wait_ready()
    coord = bp.Coordinate("player:carol", "room:vault")
    with bp.connect(served.data_dir, timeout=20) as store:
        for i in range(20):
            store.append(coord, bp.Kind(1, 2), {"n": i, "pad": "x" * 100})
    proc.send_signal(signal.SIGTERM)
    assert served.exit_code() == 0
    assert_verified(served.data_dir)
    seg_dir = os.path.join(served.data_dir, "segments")
    segment = os.path.join(seg_dir, sorted(os.listdir(seg_dir))[0])
    with open(segment, "r+b") as f:
        f.seek(64 + 60)  # inside the first frame, far below the durable end
        byte = f.read(1)
        f.seek(64 + 60)
        f.write(bytes([byte[0] ^ 0xFF]))

    again = Served(served.data_dir, os.path.join(os.fspath(tmp_path), "again.log"))
    try:
        again.start("bounded:5:60000")
        line = again.ready_line()
        assert line.startswith("failed ") and "exit 71" in line, f"{line!r}; log:\n{again.log()}"
        assert again.exit_code() == 3
        snap = again.control()
        assert snap.state == WriterState.FAILED and "corruption" in snap.reason and snap.restarts == 0
        assert again.log().count("started writer pid") == 1
    finally:
        again.cleanup()
    assert not bp.verify(served.data_dir).ok  # the damage is reported, never skipped


# ---- the command line ---------------------------------------------------------------------------
def test_command_line_parsing() -> None:
    from batpak_supervisor.__main__ import parse

    cfg = parse(["d", "--restart", "bounded:3:500", "--hang-timeout-ms", "700", "--", "--sync", "none", "--", "x"])
    assert cfg.data_dir == "d" and cfg.policy == bp.RestartPolicy.bounded(3, 500) and cfg.hang_timeout_ms == 700
    assert cfg.writer_args == ("--sync", "none", "--", "x")
    assert (cfg.restart_delay_ms, cfg.ready_timeout_ms, cfg.ready_fd) == (0, 30_000, None)
    assert parse(["d"]).policy == bp.RestartPolicy.once()


@pytest.mark.parametrize("argv", [
    [], ["d", "--restart", "backoff"], ["d", "--restart", "bounded:1:0"], ["d", "--ready-fd", "987654"],
    ["d", "--hang-timeout-ms", "0"], ["d", "--restart-delay-ms", "-1"],
])
def test_command_line_usage_errors_exit_2(argv: list[str], tmp_path: Any) -> None:
    res = subprocess.run([sys.executable, "-m", "batpak_supervisor", *argv], capture_output=True, timeout=30,
                         cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert b"error:" in res.stderr
    assert not os.path.exists(os.path.join(tmp_path, "d"))  # nothing created, no IPC object made
