"""A raw client of the wire protocol, for hostile tests (docs/PROTOCOL.md §5-§7).

It speaks to the writer without ``bp.Store``: makes client areas by hand (any size, mode,
sparse or not), writes any bytes as a request, sends any message on the request queue
(claiming any pid), and reads a reply back. Also runs Python code as another local user
(``setpriv``), for the cross-user tests. Used by tests/multiprocess/test_trust_boundary.py
and test_hostile_clients.py; importable by a process of another uid (it imports only the
package and posix_ipc).
"""

from __future__ import annotations

import mmap
import os
import secrets
import site
import subprocess
import sys
import time
from typing import Any

import msgpack
import posix_ipc

from batpak_mp._ipc import wire as W
from batpak_mp._ipc.names import SHM_DIR, area_name, shm_file

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
NOBODY = 65534  # the unprivileged user of every Linux distribution
KIND = 1 << 12 | 1  # bp.Kind(1, 1) packed
Q_DEPTH = 10
Q_MSG = W.MAX_MESSAGE


def shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, shm_file(name))


def item(entity: str, payload: Any, *, scope: str = "s", idem: bytes | None = None) -> list[Any]:
    """One append item as it travels (PROTOCOL.md §7.1)."""
    return [entity.encode(), scope.encode(), KIND, msgpack.packb(payload), 0, idem or secrets.token_bytes(16),
            None, None, None]


def request(op: int, request_id: int, body: Any, epoch: int = 0) -> bytes:
    """The msgpack of a request (without the area's header)."""
    return msgpack.packb([op, request_id, epoch, body], use_bin_type=True)  # type: ignore[no-any-return]


def message(area: str, request_id: int, pid: int | None = None, version: int = W.WIRE_VERSION) -> bytes:
    return msgpack.packb([version, os.getpid() if pid is None else pid, area, request_id])  # type: ignore[no-any-return]


class RawArea:
    """A client area made by hand. It is mapped by this process (as a client's is: the
    writer checks that the pid its name carries maps it)."""

    def __init__(self, prefix: str, size: int = 1 << 16, *, pid: int | None = None, mode: int = 0o600,
                 sparse: bool = False, token: str | None = None) -> None:
        self.name = area_name(prefix, os.getpid() if pid is None else pid, token or secrets.token_hex(4))
        self.path = shm_path(self.name)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        os.fchmod(self.fd, mode)
        if sparse:
            os.ftruncate(self.fd, size)
        else:
            os.posix_fallocate(self.fd, 0, size)
        self.size = size
        self.mm: mmap.mmap | None = mmap.mmap(self.fd, min(size, 1 << 16))

    def write(self, raw: bytes, at: int = 0) -> None:
        os.pwrite(self.fd, raw, at)

    def put(self, body: bytes, length: int | None = None) -> None:
        """A request body (msgpack) with its header; ``length``: the length to claim."""
        self.write(W.REPLY_TO.pack(0) + W.LEN.pack(len(body) if length is None else length) + body)

    def send(self, queue: posix_ipc.MessageQueue, request_id: int, pid: int | None = None) -> None:
        queue.send(message(self.name, request_id, pid), 1.0)

    def reply(self, request_id: int, timeout: float = 5.0) -> W.Reply | None:
        """The writer's reply to ``request_id``, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head = os.pread(self.fd, W.BODY_AT, 0)
            if len(head) == W.BODY_AT and W.REPLY_TO.unpack(head)[0] == request_id:
                return W.decode_reply(os.pread(self.fd, 1 << 20, W.BODY_AT))
            time.sleep(0.002)
        return None

    def call(self, queue: posix_ipc.MessageQueue, op: int, body: Any, request_id: int,
             timeout: float = 5.0) -> W.Reply | None:
        self.put(request(op, request_id, body))
        self.send(queue, request_id)
        return self.reply(request_id, timeout)

    def close(self, unlink: bool = True) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        os.close(self.fd)
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


REPO = os.path.dirname(TESTS_DIR)
_PATH = [TESTS_DIR, REPO, os.path.join(REPO, "supervisor"), *site.getsitepackages()]


def _python() -> str:
    """An interpreter another user may run: this one may sit under a home directory of
    mode 0700 (pyenv in /root); the system's own of the same version, with this one's
    packages on PYTHONPATH, then."""
    system = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    return system if os.path.exists(system) else sys.executable


def open_queue(name: str) -> posix_ipc.MessageQueue:
    return posix_ipc.MessageQueue(name, read=False, write=True)


def run_as(uid: int, code: str, *, args: list[str] | None = None, stdin: int | None = None,
           stdout: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    """``python -c code args...`` as ``uid`` (with ``_raw_client`` importable); needs root."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(_PATH), HOME="/")
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", _python(), "-c", code, *(args or [])]
    return subprocess.Popen(cmd, stdin=stdin, stdout=stdout, text=True, cwd="/", env=env)


