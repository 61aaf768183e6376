"""The supervisor process: starts the writer, watches it, restarts it per the policy.

Owns: the writer child process (spawn, readiness pipe, reaping, SIGTERM/SIGKILL), hang
detection from the control block's heartbeat, the supervisor's own signals, its lock
(``SUPERVISOR_LOCK_FILE`` in the data directory: one supervisor per directory), the
fields of the control block the supervisor writes (``supervisor_pid``, ``restarts``,
``state`` and ``reason`` between writers) and when it exits with which code. The names,
codes and command lines are the contract's (``batpak_mp._ipc.names`` and ``codes``).
Every decision about restarting is asked of ``policy.decide``; this module only does the
I/O around it.

Invariants:
- The control block has one updater at a time: the supervisor writes it only while no
  writer of its own is alive (before the first spawn, after a reap). Before its first
  write it makes sure the directory is not someone else's (its own lock, then a probe of
  the writer's lock); a writer exit 72 leaves the block alone (it is the lock holder's).
- Readiness is explicit: the writer writes ``WRITER_READY_LINE`` on a pipe; nothing is ever
  "up because it ran for N seconds".
- A writer is always reaped before it is replaced; the supervisor never leaves a child
  behind on a normal exit, and the child gets SIGTERM from the kernel if the supervisor
  dies (PR_SET_PDEATHSIG on Linux; the writer also watches ``--supervisor-pid`` itself).
- With ``--parent-pid`` (``bp.serve`` and ``batpak-mp serve`` pass their own pid) the
  supervisor outlives its parent by at most a drain: once its parent is gone (even
  SIGKILLed) it stops as if asked to, so no orphaned supervisor and writer keep the
  directory from the next ``serve``. While it stops, its lock file says so
  (``"<pid> stopping"``) and a new supervisor waits for the lock instead of refusing.
- Every control-block write of the supervisor stamps ``heartbeat_ns``: the last
  stamp is a moment at which every process named in the block was already running,
  which lets a client tell a reused pid from the service's own.

Must not import the writer, the client or the engine (roles never import each other);
uses only ``batpak_mp._values``, ``batpak_mp._ipc`` and ``batpak_mp._errors``, and
``batpak_mp._metrics`` (imported only with ``--metrics-fd``: a thread serving /metrics).

Metrics: with ``--metrics-fd`` the supervisor serves ``/metrics`` on that listening
socket from one thread for its whole life, restarts from its own count.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from batpak_mp._errors import BatpakError
from batpak_mp._ipc import codes as C
from batpak_mp._ipc.control import ControlBlock
from batpak_mp._ipc.names import supervisor_lock_path, writer_lock_path
from batpak_mp._values import RestartPolicy, WriterState

from . import policy as P

WRITER_LOCK_WAIT_MS = 5_000  # an orphaned writer of a dead supervisor notices and exits within this
STOPPING_LOCK_GRACE_MS = 2_000  # beyond the holder's stop timeout: its last log lines and exit
STOPPING_MARK = "stopping"  # second word of the lock file's line while its supervisor stops
POLL_MS = 100  # how often the heartbeat is checked; exits and signals wake the loop at once
READY_LINE_MAX = 256  # bytes of readiness chatter accepted before the writer is judged broken

@dataclass(frozen=True, slots=True)
class Config:
    data_dir: str
    policy: RestartPolicy
    writer_args: tuple[str, ...] = ()
    hang_timeout_ms: int = C.HANG_TIMEOUT_MS
    restart_delay_ms: int = C.RESTART_DELAY_MS
    ready_timeout_ms: int = C.READY_TIMEOUT_MS
    stop_timeout_ms: int = C.STOP_TIMEOUT_MS
    ready_fd: int | None = None
    parent_pid: int | None = None
    metrics_fd: int | None = None  # a listening socket: serve /metrics on it (batpak_mp._metrics)
    bridge: tuple[str, str] | None = None  # (NATS URL, stream): a bridge runs beside the writer


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"batpak-supervisor[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class _Writer:
    """One writer child: its process, its readiness pipe and what it has said so far."""

    def __init__(self, proc: subprocess.Popen[bytes], ready_r: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.ready_r: int | None = ready_r
        self.buf = b""
        self.ready = False
        self.started_ns = time.monotonic_ns()
        self.ready_ns = 0
        self.last_alive_ns = 0

    def close_pipe(self) -> None:
        if self.ready_r is not None:
            os.close(self.ready_r)
            self.ready_r = None

    def read_ready(self) -> None:
        """Read what the writer wrote on the readiness pipe (non-blocking)."""
        assert self.ready_r is not None
        try:
            chunk = os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        if not chunk:  # the writer closed it (or died): its exit will be seen by poll()
            self.close_pipe()
            return
        self.buf += chunk
        if b"\n" in self.buf:
            line = self.buf.split(b"\n", 1)[0].strip()
            if line == C.WRITER_READY_LINE.strip():
                self.ready = True
                self.ready_ns = self.last_alive_ns = time.monotonic_ns()
            else:
                _log(f"writer pid {self.pid} wrote {line[:80]!r} on the readiness pipe; ignored")
            self.close_pipe()
        elif len(self.buf) > READY_LINE_MAX:
            _log(f"writer pid {self.pid} wrote {len(self.buf)} bytes without a newline on the readiness pipe")
            self.close_pipe()

    def exit_event(self) -> P.WriterExited:
        rc = self.proc.returncode
        assert rc is not None
        if rc < 0:
            return P.WriterExited(None, -rc, self.ready)
        return P.WriterExited(rc, None, self.ready)


class _Bridge:
    """The JetStream bridge child (``python -m batpak_mp.jetstream``): started once the
    writer is ready, restarted under its own copy of the restart policy (a bridge that
    is given up leaves the writer serving: the journal is the authority), stopped after
    the writer (SIGTERM, then SIGKILL after the stop timeout)."""

    def __init__(self, config: Config) -> None:
        assert config.bridge is not None
        self.url, self.stream = config.bridge
        self.data_dir = config.data_dir
        self.state = P.initial(config.policy)
        self.proc: subprocess.Popen[bytes] | None = None

    def tend(self) -> None:
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is None:
                return
            event = P.WriterExited(rc if rc >= 0 else None, -rc if rc < 0 else None)
            self.state, action = P.decide(self.state, event, _now_ms())
            self.proc = None
            if not isinstance(action, P.Restart):
                if isinstance(action, P.Fail):
                    _log(f"bridge given up (the writer goes on): {action.reason.replace('writer', 'bridge')}")
                return
            _log(f"restarting bridge: {action.describe(self.state.policy)}")
        elif self.state.outcome is not None:
            return
        argv = C.bridge_argv(self.data_dir, self.url, self.stream, supervisor_pid=os.getpid())
        # no preexec_fn (unsafe beside the metrics thread): the bridge watches its parent pid itself
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, process_group=0)
        _log(f"started bridge pid {self.proc.pid} to {self.url} stream {self.stream}")

    def stop(self, timeout_ms: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_ms / 1000)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait()


class Supervisor:
    """Run with ``run()``, which returns the process exit code."""

    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.state = P.initial(config.policy)
        self.block: ControlBlock | None = None
        self.writer: _Writer | None = None
        self.stop_signals = 0
        self._lock_fd = -1
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._ready_fd = config.ready_fd
        self._metrics: Any = None  # a batpak_mp._metrics.MetricsServer with --metrics-fd
        self._parent_fd: int | None = None  # a pidfd of the parent: readable once it is gone
        self._parent_gone = False
        self._old_handlers: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
        self.bridge: _Bridge | None = _Bridge(config) if config.bridge is not None else None

    # -- signals --------------------------------------------------------------------------
    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signals += 1

    def _on_child(self, signum: int, frame: FrameType | None) -> None:
        pass  # the wakeup fd already woke the loop

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_stop_signal)
        self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(-1)

    def _sleep(self, seconds: float, fds: tuple[int, ...] = ()) -> list[int]:
        """Wait up to ``seconds`` for one of ``fds``, any signal or the parent's end;
        return the readable ``fds``."""
        own = [self._wake_r] + ([self._parent_fd] if self._parent_fd is not None else [])
        try:
            readable, _, _ = select.select([*own, *fds], [], [], max(0.0, seconds))
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            return []
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass
        self._check_parent()
        return [fd for fd in readable if fd not in own]

    # -- the parent (--parent-pid) ------------------------------------------------------------
    def _watch_parent(self) -> None:
        """Open a pidfd of the parent (Linux 5.3+) so its end wakes the loop at once;
        elsewhere ``getppid`` is compared at every wake-up (at least every POLL_MS)."""
        pid = self.cfg.parent_pid
        if pid is None:
            return
        with contextlib.suppress(AttributeError, OSError):
            self._parent_fd = os.pidfd_open(pid)
        self._check_parent()  # after the open: the pidfd cannot name a later holder of the pid

    def _check_parent(self) -> None:
        """Once the parent is gone (we were re-parented), stop as if asked to: once."""
        pid = self.cfg.parent_pid
        if pid is None or self._parent_gone or os.getppid() == pid:
            return
        self._parent_gone = True
        if self._parent_fd is not None:
            os.close(self._parent_fd)
            self._parent_fd = None
        _log(f"parent pid {pid} is gone: stopping")
        if not self.stop_signals:
            self.stop_signals = 1
        self._note_stopping()

    # -- the supervisor's ready fd ----------------------------------------------------------
    def _announce(self, line: str) -> None:
        fd = self._ready_fd
        if fd is None:
            return
        self._ready_fd = None
        try:
            os.write(fd, line.encode("utf-8", "replace")[:4000] + b"\n")
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.close(fd)

    # -- ownership of the data directory ------------------------------------------------------
    def _take_dir(self) -> str | None:
        """Take the supervisor lock and wait for any writer lock holder to go; a reason
        when the directory is served by someone else."""
        d = self.cfg.data_dir
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd = os.open(supervisor_lock_path(d), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        holder = self._lock_or_holder(fd)
        if holder is not None:
            os.close(fd)
            return f"{d} is already supervised (supervisor pid {holder})"
        self._lock_fd = fd
        self._write_lock_line("")
        deadline = time.monotonic() + WRITER_LOCK_WAIT_MS / 1000
        path = writer_lock_path(d)
        while True:
            try:
                probe = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                holder = os.pread(probe, 32, 0).split(b"\n")[0].decode(errors="replace") or "?"
            finally:
                os.close(probe)
            if time.monotonic() >= deadline or self.stop_signals:
                return f"{d} is served by a live writer (pid {holder}) that this supervisor did not start"
            self._sleep(0.05)

    def _lock_or_holder(self, fd: int) -> str | None:
        """Take the supervisor lock (None), waiting while its holder says it is stopping;
        else the holder's pid, as text."""
        deadline = time.monotonic() + (self.cfg.stop_timeout_ms + STOPPING_LOCK_GRACE_MS) / 1000
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                try:
                    words = os.pread(fd, 64, 0).split(b"\n")[0].decode().split()
                except (OSError, UnicodeDecodeError):
                    words = []
            if STOPPING_MARK not in words[1:] or time.monotonic() >= deadline or self.stop_signals:
                return words[0] if words else "?"
            self._sleep(0.05)

    def _write_lock_line(self, note: str) -> None:
        """``"<pid>[ <note>]"`` in our lock file: who holds it, and whether it is stopping."""
        if self._lock_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}{' ' + note if note else ''}\n".encode(), 0)

    def _note_stopping(self) -> None:
        self._write_lock_line(STOPPING_MARK)

    def _release_dir(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- the control block (only while no writer of ours is alive) --------------------------
    def _mark(self, **fields: int | str) -> None:
        if self.block is not None:
            self.block.update(heartbeat_ns=time.monotonic_ns(), **fields)

    # -- the writer -------------------------------------------------------------------------
    def _spawn(self) -> None:
        cfg = self.cfg
        r, w = os.pipe()
        os.set_blocking(r, False)
        argv = C.writer_argv(cfg.data_dir, cfg.writer_args, ready_fd=w, supervisor_pid=os.getpid())
        try:
            # no preexec_fn (unsafe once the metrics thread runs): the writer, told our pid
            # (--supervisor-pid), asks the kernel itself for SIGTERM when we die, then checks we
            # are still its parent (closing the race with our death before that)
            proc = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.DEVNULL,
                                    process_group=0)  # a terminal's Ctrl-C reaches only us; we drain it
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.writer = _Writer(proc, r)
        _log(f"started writer pid {proc.pid}")

    def _reap(self) -> None:
        """Wait for the writer to end; signals keep being noted meanwhile."""
        wr = self.writer
        assert wr is not None
        while wr.proc.poll() is None:
            self._sleep(0.05)
        wr.close_pipe()

    def _kill(self) -> None:
        wr = self.writer
        assert wr is not None
        with contextlib.suppress(ProcessLookupError):
            wr.proc.send_signal(signal.SIGKILL)
        self._reap()

    def _log_exit(self) -> None:
        wr = self.writer
        assert wr is not None and wr.proc.returncode is not None
        rc = wr.proc.returncode
        how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exited with code {rc}"
        _log(f"writer pid {wr.pid} {how}{'' if wr.ready else ' before it was ready'}")

    def _hung_ms(self, now_ns: int) -> int:
        """How long a ready writer has been silent past the hang timeout (0: it is fine)."""
        wr = self.writer
        assert wr is not None and self.block is not None
        try:
            snap = self.block.read()
        except BatpakError:  # seqlock stuck odd: the writer stopped mid-update; judge it
            snap = None
        if snap is not None:
            if snap.state != WriterState.READY:
                wr.last_alive_ns = now_ns  # starting/draining: not judged on heartbeats
            elif snap.heartbeat_ns > wr.last_alive_ns:
                wr.last_alive_ns = snap.heartbeat_ns
        silent_ms = (now_ns - wr.last_alive_ns) // 1_000_000
        return silent_ms if silent_ms > self.cfg.hang_timeout_ms else 0

    def _watch(self) -> P.Event:
        """Wait until the writer ends, hangs, never gets ready, or we are told to stop."""
        wr = self.writer
        assert wr is not None
        cfg = self.cfg
        while True:
            if self.stop_signals:
                self._note_stopping()
                return P.StopRequested()
            if wr.proc.poll() is not None:
                if wr.ready_r is not None and not wr.ready:
                    wr.read_ready()  # it may have said "ready" just before it died
                self._reap()
                self._log_exit()
                return wr.exit_event()
            now = time.monotonic_ns()
            if not wr.ready:
                if (now - wr.started_ns) // 1_000_000 > cfg.ready_timeout_ms:
                    _log(f"writer pid {wr.pid} not ready within {cfg.ready_timeout_ms} ms; killing it")
                    self._kill()
                    return P.ReadyTimedOut(cfg.ready_timeout_ms)
            else:
                silent = self._hung_ms(now)
                if silent:
                    _log(f"writer pid {wr.pid} hung (no heartbeat for {silent} ms); killing it")
                    self._kill()
                    return P.WriterHung(silent)
            if self.bridge is not None and wr.ready:
                self.bridge.tend()  # started once the writer serves; restarted under its own copy of the policy
            fds = (wr.ready_r,) if wr.ready_r is not None else ()
            if self._sleep(POLL_MS / 1000, fds):
                was_ready = wr.ready
                wr.read_ready()
                if wr.ready and not was_ready:
                    self._on_ready()

    def _on_ready(self) -> None:
        wr = self.writer
        assert wr is not None and self.block is not None
        try:
            epoch = f" (epoch {self.block.read().writer_epoch})"
        except BatpakError:
            epoch = ""
        _log(f"writer pid {wr.pid} ready{epoch}")
        self._announce(C.ready_line(wr.pid))

    def _drain(self) -> P.Event:
        """Stop requested: SIGTERM the writer, wait, SIGKILL after the timeout (or at a
        second stop signal), reap. The writer's exit is the event."""
        wr = self.writer
        assert wr is not None
        if wr.proc.poll() is None:
            _log(f"stopping: SIGTERM to writer pid {wr.pid}")
            with contextlib.suppress(ProcessLookupError):
                wr.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            deadline = started + self.cfg.stop_timeout_ms / 1000
            seen = self.stop_signals
            while wr.proc.poll() is None:
                if time.monotonic() - started < 1.0:
                    # a signal sent to the whole process group (Ctrl-C, stopasgroup, systemd's
                    # control-group kill) arrives here twice at once: that is one stop request
                    seen = self.stop_signals
                if time.monotonic() >= deadline or self.stop_signals > seen:
                    _log(f"writer pid {wr.pid} still running; SIGKILL")
                    self._kill()
                    break
                self._sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        self._reap()
        self._log_exit()
        return wr.exit_event()

    # -- the main loop ----------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self._install_signals()
        try:
            self._watch_parent()
            busy = self._take_dir()
            if busy is not None:
                _log(f"failed: {busy}")
                self._announce(C.failed_line(busy))
                return C.SupervisorExit.IN_USE
            self.block = ControlBlock.create(cfg.data_dir)
            self._mark(supervisor_pid=os.getpid(), restarts=0, writer_pid=0,
                       state=int(WriterState.STARTING), reason="")
            _log(f"supervising {cfg.data_dir} (restart policy {cfg.policy.spec()})")
            if cfg.metrics_fd is not None:
                from batpak_mp._metrics import serve_on_fd  # prometheus_client and the reader: only when asked
                self._metrics = serve_on_fd(cfg.metrics_fd, cfg.data_dir, lambda: self.state.restarts)
                _log(f"serving metrics on {self._metrics.url}")
            return self._loop()
        except (BatpakError, OSError) as exc:  # no control block, no pipe, no fork: say so, once
            _log(f"failed: {exc}")
            self._announce(C.failed_line(str(exc)))
            return C.SupervisorExit.FAILED
        finally:
            if self.writer is not None and self.writer.proc.poll() is None:  # only on a crash of ours
                self._kill()
            if self.bridge is not None:  # after the writer: it publishes what the drain made visible
                self.bridge.stop(self.cfg.stop_timeout_ms)
            if self.block is not None:
                self.block.close()
            self._release_dir()
            self._restore_signals()
            if self._metrics is not None:
                self._metrics.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            if self._parent_fd is not None:
                os.close(self._parent_fd)

    def _loop(self) -> int:
        while True:
            if self.stop_signals:  # asked to stop while no writer runs (restart delay)
                self.state, action = P.decide(self.state, P.StopRequested(), _now_ms())
                return self._finish(action)
            self._spawn()
            event = self._watch()
            if isinstance(event, P.StopRequested):
                self.state, _ = P.decide(self.state, event, _now_ms())
                event = self._drain()
            self.state, action = P.decide(self.state, event, _now_ms())
            if isinstance(action, P.Restart):
                self._mark(state=int(WriterState.STARTING), writer_pid=0, restarts=action.restarts,
                           reason=action.cause)
                _log(f"restarting writer: {action.describe(self.cfg.policy)}")
                if self.cfg.restart_delay_ms:
                    end = time.monotonic() + self.cfg.restart_delay_ms / 1000
                    while not self.stop_signals and time.monotonic() < end:
                        self._sleep(end - time.monotonic())
                continue
            return self._finish(action)

    def _finish(self, action: P.Action) -> int:
        if isinstance(action, P.Stop):
            self._mark(state=int(WriterState.STOPPED), writer_pid=0)
            _log("stopped")
            self._announce(C.failed_line("stopped before the writer was ready"))
            return C.SupervisorExit.STOPPED
        assert isinstance(action, P.Fail)
        if action.store_locked:  # the control block belongs to the live lock holder
            _log(f"failed: {action.reason}")
            self._announce(C.failed_line(action.reason))
            return C.SupervisorExit.IN_USE
        reason = action.reason
        said = self.block.read() if self.block is not None else None
        if said is not None and said.state == int(WriterState.FAILED) and said.reason:
            reason = f"{reason}: {said.reason}"  # the writer's own words (a wrong master key, a corrupt segment)
        self._mark(state=int(WriterState.FAILED), writer_pid=0, reason=reason)
        _log(f"failed: {reason}")
        self._announce(C.failed_line(reason))
        return C.SupervisorExit.FAILED


def run(config: Config) -> int:
    return Supervisor(config).run()
