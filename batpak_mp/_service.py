"""``bp.serve()``: start the supervised service for a data directory and manage it.

Owns: checking the data directory before anything is started (created 0700 when
missing; one owned by another uid or open to group/other is refused, never chmodded),
starting the supervisor process (its command line is ``_ipc.codes.supervisor_argv``,
with our pid as its ``--parent-pid``: the service lives as long as the process that
started it), waiting for its explicit ready line, reporting status from the control
block, and stopping it (SIGTERM: the writer drains, fsyncs, exits) followed by
unlinking the store's IPC objects (``cleanup_ipc``, by the names of ``_ipc.names``).

Invariants: IPC objects are unlinked only while nobody serves the directory: under the
supervisor lock, with the writer lock free (``cleanup_ipc_if_unserved``). A ``serve``
that finds the directory served by someone else leaves that service untouched and
raises ``AlreadyServed`` naming its supervisor pid. ``posix_ipc`` errors never escape.
Never imports the supervisor package (it is a separate process role).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import posix_ipc

from ._errors import (
    AlreadyServed,
    InvalidArgument,
    StorageError,
    UnsafeDirectory,
    WriterTimeout,
    WriterUnavailable,
)
from ._ipc import codes as C
from ._ipc.control import ControlBlock, state_name
from ._ipc.names import (
    supervisor_lock_path,
    writer_lock_path,
)
from ._ipc.objects import remove_store_objects
from ._storage.engine import EngineConfig, parse_sync
from ._values import RestartPolicy, SyncMode

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
ANNOUNCED_EXIT_S = 10.0  # a supervisor that announced its failure exits right after; kill it past this
DIR_MODE = 0o700  # a data directory: its owner only (the root of trust, docs/OPERATIONS.md)


def writer_args(sync: SyncMode | str, config: dict[str, Any], data_dir: str) -> list[str]:
    """Command-line options for ``batpak_mp.writer`` from ``serve``'s keyword config."""
    known = {"segment_max_bytes", "sync_interval_ms", "max_payload_bytes", "signing_key", "signing_key_file",
             "tag_index"}
    unknown = set(config) - known
    if unknown:
        raise InvalidArgument("config", sorted(unknown), f"unknown option(s); known: {sorted(known)}")
    mode = parse_sync(sync.value if isinstance(sync, SyncMode) else sync)
    EngineConfig(**{k: v for k, v in config.items() if k in ("segment_max_bytes", "sync_interval_ms",
                                                              "max_payload_bytes", "tag_index")})  # validates early
    args = ["--sync", mode.value]
    if config.get("tag_index") is False:
        args.append("--no-tag-index")
    for key in ("segment_max_bytes", "sync_interval_ms", "max_payload_bytes"):
        if key in config:
            args += ["--" + key.replace("_", "-"), str(int(config[key]))]
    key_file = config.get("signing_key_file")
    if config.get("signing_key") is not None:
        key = config["signing_key"]
        if not isinstance(key, bytes) or len(key) != 32:
            raise InvalidArgument("signing_key", "<redacted>", "must be 32 raw Ed25519 private key bytes")
        key_file = os.path.join(data_dir, "receipt.key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
    if key_file:
        args += ["--signing-key-file", os.fspath(key_file)]
    return args


# -- the data directory ---------------------------------------------------------------------
def directory_problem(mode: int, owner_uid: int, euid: int) -> str | None:
    """Why a directory with ``mode`` (``st_mode``) owned by ``owner_uid`` must not be
    served by ``euid``, or None. Pure."""
    if not stat.S_ISDIR(mode):
        return "is not a directory"
    if owner_uid != euid:
        return f"is owned by another user (this process runs as uid {euid}); serve it as its owner"
    if stat.S_IMODE(mode) & 0o077:
        return (f"gives group/other permission bits ({stat.S_IMODE(mode) & 0o077:03o}); a data directory must be "
                f"{DIR_MODE:04o} (chmod {DIR_MODE:o} it yourself: serve never changes a directory it is given)")
    return None


def prepare_data_dir(path: str) -> None:
    """Create ``path`` 0700 when it is missing; refuse one another user owns or that
    group/other may enter (``UnsafeDirectory``, naming its mode). Never chmods."""
    try:
        os.makedirs(path, mode=DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StorageError("mkdir", path, exc) from None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StorageError("stat", path, exc) from None
    problem = directory_problem(st.st_mode, st.st_uid, os.geteuid())
    if problem is not None:
        raise UnsafeDirectory(path, stat.S_IMODE(st.st_mode), st.st_uid, problem)


def lock_holder(path: str) -> int | None:
    """The pid a live holder of the flock on ``path`` wrote there (0 when unreadable);
    None when nobody holds it (or there is no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        try:
            words = os.pread(fd, 64, 0).split(b"\n")[0].split()
            return int(words[0]) if words and words[0].isdigit() and len(words[0]) < 11 else 0
        except OSError:
            return 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def _unserved(data_dir: str) -> Iterator[bool]:
    """Hold the supervisor lock for the block (so no service starts meanwhile); yields
    whether the directory is unserved: our lock taken and no writer holding its own."""
    try:
        fd = os.open(supervisor_lock_path(data_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1  # no supervisor ever ran here
    except OSError:
        yield False
        return
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
        yield lock_holder(writer_lock_path(data_dir)) is None
    finally:
        if fd >= 0:
            os.close(fd)


def cleanup_ipc(data_dir: str) -> None:
    """Unlink the store's queue, control block and every client area and semaphore
    (after the service has stopped: a client still attached makes a fresh area when it
    sees the next writer). Callers make sure nobody serves the directory
    (``cleanup_ipc_if_unserved``, or ``reset-ipc``'s lock probes)."""
    remove_store_objects(data_dir)


def cleanup_ipc_if_unserved(data_dir: str) -> bool:
    """``cleanup_ipc`` unless a supervisor or a writer (still) serves the directory;
    whether it ran. A failed or second ``serve`` never removes a live service's objects."""
    with _unserved(data_dir) as free:
        if free:
            cleanup_ipc(data_dir)
        return free


# -- the service ------------------------------------------------------------------------------
def _stop_process(proc: subprocess.Popen[bytes], timeout: float, *, terminate: bool = True) -> int:
    """Wait up to ``timeout`` for ``proc`` to end (after a SIGTERM when ``terminate``),
    then SIGKILL it; its exit code."""
    if proc.poll() is None and terminate:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Service:
    """A running supervisor + writer for one data directory. It stops (draining the
    writer) when the process that called ``serve`` ends, however it ends."""

    def __init__(self, data_dir: str, proc: subprocess.Popen[bytes], policy: RestartPolicy,
                 metrics_url: str | None = None) -> None:
        self.data_dir = data_dir
        self._proc = proc
        self.policy = policy
        self.metrics_url = metrics_url  # http://HOST:PORT/metrics when serve(metrics=...) was given
        try:
            self._control = ControlBlock.attach(data_dir)
        except posix_ipc.Error as exc:  # not an OSError: none escapes the API raw
            raise WriterUnavailable(f"cannot open the control block of {data_dir!r}: {type(exc).__name__}: {exc}") \
                from None
        self.exit_code: int | None = None

    @property
    def supervisor_pid(self) -> int:
        return self._proc.pid

    @property
    def writer_pid(self) -> int:
        return self._control.read().writer_pid

    def status(self) -> dict[str, Any]:
        s = self._control.read()
        return {
            "state": state_name(s.state), "writer_pid": s.writer_pid, "writer_epoch": s.writer_epoch,
            "supervisor_pid": self._proc.pid, "supervisor_alive": self._proc.poll() is None,
            "restarts": s.restarts, "visible": s.visible, "durable": s.durable, "clients": s.clients,
            "dropped_messages": s.dropped_messages, "reason": s.reason, "policy": self.policy.spec(),
        }

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Drain and stop; returns the supervisor's exit code. Idempotent."""
        if self.exit_code is not None:
            return self.exit_code
        self.exit_code = _stop_process(self._proc, timeout)
        self._control.close()
        cleanup_ipc_if_unserved(self.data_dir)
        return self.exit_code

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(data_dir: str | os.PathLike[str], *, restart: RestartPolicy | None = None,
          sync: SyncMode | str = SyncMode.GROUP, ready_timeout: float = READY_TIMEOUT_S,
          hang_timeout_ms: int = C.HANG_TIMEOUT_MS, metrics: str | None = None, **config: Any) -> Service:
    """Start the supervisor (which starts the writer); return once the writer serves.
    The service stops when the calling process ends (``--parent-pid``). ``metrics``:
    ``"HOST:PORT"`` to serve Prometheus metrics there (port 0: any free port; the
    service's ``metrics_url`` says which), bound here first, so a bad address is
    ``InvalidArgument`` and a busy one ``MetricsUnavailable`` before anything starts."""
    path = os.path.abspath(os.fspath(data_dir))
    policy = restart or RestartPolicy.once()
    if not isinstance(policy, RestartPolicy):
        raise InvalidArgument("restart", restart, "must be a bp.RestartPolicy")
    prepare_data_dir(path)
    wargs = writer_args(sync, config, path)
    listener, metrics_url = _metrics_listener(metrics)
    read_fd, write_fd = os.pipe()
    cmd = C.supervisor_argv(path, policy, hang_timeout_ms=hang_timeout_ms, ready_fd=write_fd, writer_args=wargs,
                            parent_pid=os.getpid())
    if listener is not None:
        cmd = C.with_metrics_fd(cmd, listener.fileno())
    try:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,) if listener is None else (write_fd, listener.fileno()),
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(write_fd)
        if listener is not None:
            listener.close()  # the supervisor has its copy
    try:
        line = _read_line(read_fd, ready_timeout)
    finally:
        os.close(read_fd)
    ready, detail = C.parse_announcement(line)
    if ready:
        try:
            return Service(path, proc, policy, metrics_url)
        except BaseException:
            _stop_process(proc, STOP_TIMEOUT_S)
            raise
    raise _not_served(path, proc, line, detail, ready_timeout)


def _metrics_listener(metrics: str | None) -> tuple[socket.socket | None, str | None]:
    """The listening socket of ``serve(metrics=...)`` and its URL, or (None, None)."""
    if metrics is None:
        return None, None
    from ._metrics import listen, url_of  # prometheus_client: only for a service that serves metrics

    sock = listen(metrics)
    return sock, url_of(sock)


def _not_served(path: str, proc: subprocess.Popen[bytes], line: str, detail: str, ready_timeout: float) -> Exception:
    """The supervisor did not get ready: let it end (it exits right after a failure it
    announced; one that said nothing is stopped), remove the IPC objects only if nobody
    serves the directory, and say why."""
    code = _stop_process(proc, ANNOUNCED_EXIT_S, terminate=False) if line else _stop_process(proc, STOP_TIMEOUT_S)
    if code == C.SupervisorExit.IN_USE:  # another live service owns the directory: hands off
        return AlreadyServed(path, lock_holder(supervisor_lock_path(path)) or None, detail)
    cleanup_ipc_if_unserved(path)
    if not line:
        return WriterTimeout("the service to become ready", ready_timeout)
    return WriterUnavailable(detail)


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()
