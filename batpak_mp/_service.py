"""``bp.serve()``: start the supervised service for a data directory and manage it.

Owns: starting the supervisor process (its command line is ``_ipc.codes.supervisor_argv``),
waiting for its explicit ready line, reporting status from the control block, and
stopping it (SIGTERM: the writer drains, fsyncs, exits) followed by unlinking the store's
IPC objects (``cleanup_ipc``, by the names of ``_ipc.names``). Never imports the
supervisor package (it is a separate process role).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import posix_ipc

from ._errors import InvalidArgument, WriterTimeout, WriterUnavailable
from ._ipc import codes as C
from ._ipc.control import ControlBlock, state_name
from ._ipc.names import SHM_DIR, client_objects, ipc_prefix, request_queue_name
from ._storage.engine import EngineConfig, parse_sync
from ._values import RestartPolicy, SyncMode

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def writer_args(sync: SyncMode | str, config: dict[str, Any], data_dir: str) -> list[str]:
    """Command-line options for ``batpak_mp.writer`` from ``serve``'s keyword config."""
    known = {"segment_max_bytes", "sync_interval_ms", "max_payload_bytes", "signing_key", "signing_key_file"}
    unknown = set(config) - known
    if unknown:
        raise InvalidArgument("config", sorted(unknown), f"unknown option(s); known: {sorted(known)}")
    mode = parse_sync(sync.value if isinstance(sync, SyncMode) else sync)
    EngineConfig(**{k: v for k, v in config.items() if k in ("segment_max_bytes", "sync_interval_ms",
                                                              "max_payload_bytes")})  # validates early
    args = ["--sync", mode.value]
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


class Service:
    """A running supervisor + writer for one data directory."""

    def __init__(self, data_dir: str, proc: subprocess.Popen[bytes], policy: RestartPolicy) -> None:
        self.data_dir = data_dir
        self._proc = proc
        self.policy = policy
        self._control = ControlBlock.attach(data_dir)
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
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.exit_code = self._proc.returncode
        self._control.close()
        cleanup_ipc(self.data_dir)
        return self.exit_code

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cleanup_ipc(data_dir: str) -> None:
    """Unlink the store's queue, control block and every client area and semaphore
    (after the service has stopped: a client still attached makes a fresh area when it
    sees the next writer)."""
    try:
        posix_ipc.unlink_message_queue(request_queue_name(data_dir))
    except posix_ipc.ExistentialError:
        pass
    ControlBlock.unlink(data_dir)
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return
    for obj in client_objects(entries, ipc_prefix(data_dir)):
        try:
            (posix_ipc.unlink_semaphore if obj.semaphore else posix_ipc.unlink_shared_memory)(obj.name)
        except posix_ipc.ExistentialError:
            pass


def serve(data_dir: str | os.PathLike[str], *, restart: RestartPolicy | None = None,
          sync: SyncMode | str = SyncMode.GROUP, ready_timeout: float = READY_TIMEOUT_S,
          hang_timeout_ms: int = C.HANG_TIMEOUT_MS, **config: Any) -> Service:
    """Start the supervisor (which starts the writer); return once the writer serves."""
    path = os.path.abspath(os.fspath(data_dir))
    policy = restart or RestartPolicy.once()
    if not isinstance(policy, RestartPolicy):
        raise InvalidArgument("restart", restart, "must be a bp.RestartPolicy")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    wargs = writer_args(sync, config, path)
    read_fd, write_fd = os.pipe()
    cmd = C.supervisor_argv(path, policy, hang_timeout_ms=hang_timeout_ms, ready_fd=write_fd, writer_args=wargs)
    try:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(write_fd)
    line = _read_line(read_fd, ready_timeout)
    os.close(read_fd)
    ready, detail = C.parse_announcement(line)
    if not ready:
        if proc.poll() is None:
            proc.kill()
        if proc.wait() != C.SupervisorExit.IN_USE:  # another live service owns these IPC objects
            cleanup_ipc(path)
        if not line:
            raise WriterTimeout("the service to become ready", ready_timeout)
        raise WriterUnavailable(detail)
    return Service(path, proc, policy)


def _read_line(fd: int, timeout: float) -> str:
    import select

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
