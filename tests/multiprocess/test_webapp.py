"""The example web app (examples/webapp) under a real gunicorn with several worker
processes, driven by real HTTP requests on loopback: deposits from many concurrent
requests add up in every worker's own projection, a repeated Idempotency-Key counts
once, a deposit is visible to the next request whatever worker serves it, and a Store
connected before the fork (``--preload``) works in every worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import batpak_mp as bp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(ROOT, "examples", "webapp", "gunicorn.conf.py")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(base: str, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, int, Any]:
    """One request: (status, worker pid, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Idempotency-Key", key)
    try:
        with _HTTP.open(req, timeout=15) as resp:
            return resp.status, int(resp.headers["X-Worker-Pid"]), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, int(e.headers["X-Worker-Pid"]), json.loads(e.read())


class Gunicorn:
    """A gunicorn master and its workers, in a session of their own (so a finalizer can
    take the whole group down if the master is stuck)."""

    def __init__(self, data_dir: str, log_path: str, app: str, *extra: str, workers: int = 4) -> None:
        self.port = _free_port()  # gunicorn cannot bind port 0
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "gunicorn", "-c", CONF, "--chdir", ROOT, "-b", f"127.0.0.1:{self.port}",
                     "-w", str(workers), *extra, app]
        self.env = dict(os.environ, BATPAK_DIR=data_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if _call(self.base, "GET", "/stats")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gunicorn did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM (graceful: workers finish their request and exit), then wait."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """The finalizer: SIGKILL to the whole process group, if the master still runs."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


@pytest.fixture
def served(tmp_path: Any) -> Iterator[tuple[bp.Service, str]]:
    data_dir = os.path.join(os.fspath(tmp_path), "data")
    svc = bp.serve(data_dir, segment_max_bytes=1 << 20)
    try:
        yield svc, data_dir
    finally:
        svc.stop()  # idempotent: a no-op when the test stopped it


@pytest.fixture
def start_gunicorn(tmp_path: Any, served: tuple[bp.Service, str]) -> Iterator[Callable[..., Gunicorn]]:
    """Starts gunicorn; at the end kills whatever still runs (before ``served`` stops the
    service, which this fixture depends on for that order)."""
    started: list[Gunicorn] = []

    def start(data_dir: str, app: str, *extra: str, workers: int = 4) -> Gunicorn:
        log_path = os.path.join(os.fspath(tmp_path), f"gunicorn{len(started)}.log")
        g = Gunicorn(data_dir, log_path, app, *extra, workers=workers)
        started.append(g)  # registered before it starts, so a failed start is still cleaned up
        g.start()
        return g

    yield start
    for g in started:
        g.kill()


def _parallel(calls: list[tuple[Any, ...]], base: str, threads: int = 12) -> list[tuple[int, int, Any]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda c: _call(base, *c), calls))


def _read_everywhere(base: str, expected: dict[str, int], min_pids: int, rounds: int = 20) -> dict[int, int]:
    """Read every balance and the board, concurrently, until at least ``min_pids`` workers
    answered; every answer must match ``expected``. Returns reads per worker pid."""
    per_pid: Counter[int] = Counter()
    total = sum(expected.values())
    for _ in range(rounds):
        calls: list[tuple[Any, ...]] = [("GET", f"/accounts/{a}") for a in expected for _ in range(3)]
        calls += [("GET", "/accounts")] * 12
        for (status, pid, body), call in zip(_parallel(calls, base), calls, strict=True):
            assert status == 200, (call, body)
            if call[1] == "/accounts":
                assert body["total"] == total, (pid, body)
                assert body["balances"] == {a: n for a, n in expected.items() if n}, (pid, body)
            else:
                assert body["balance"] == expected[body["account"]], (pid, body)
            per_pid[pid] += 1
        if len(per_pid) >= min_pids:
            break
    assert len(per_pid) >= min_pids, per_pid
    return dict(per_pid)


def _stop_and_verify(g: Gunicorn, svc: bp.Service, data_dir: str) -> None:
    assert g.stop() == 0, g.log()
    assert svc.stop() == 0
    report = bp.verify(data_dir)
    assert report.ok, report.problems


def test_workers_append_and_each_serves_its_projection(served: tuple[bp.Service, str],
                                                       start_gunicorn: Callable[..., Gunicorn]) -> None:
    svc, data_dir = served
    g = start_gunicorn(data_dir, "examples.webapp.app:app", workers=4)
    accounts = [f"acct{i}" for i in range(6)]
    expected = dict.fromkeys(accounts, 0)

    # many concurrent deposits, none lost
    deposits = [(accounts[i % len(accounts)], i % 7 + 1) for i in range(240)]
    results = _parallel([("POST", f"/accounts/{a}/deposit", {"amount": n}) for a, n in deposits], g.base)
    for (status, _pid, body), (a, n) in zip(results, deposits, strict=True):
        assert status == 201, body
        assert (body["account"], body["amount"]) == (a, n)
        expected[a] += n
    assert len({body["sequence"] for _, _, body in results}) == len(deposits)
    assert len({pid for _, pid, _ in results}) >= 2  # the appends came from several workers

    # a repeated Idempotency-Key counts once, concurrently or later, in whatever worker
    same = [("POST", "/accounts/acct0/deposit", {"amount": 1000}, "pay-42")] * 8
    results = _parallel(same, g.base, threads=8)
    results += [_call(g.base, *same[0]) for _ in range(3)]
    assert {status for status, _, _ in results} == {201}
    assert len({body["event_id"] for _, _, body in results}) == 1
    expected["acct0"] += 1000
    status, _, body = _call(g.base, "POST", "/accounts/acct1/deposit", {"amount": 1000}, "pay-42")
    assert status == 422, body  # the same key for another deposit is refused, not counted

    # every worker's projection holds every deposit; repeated reads hit its cache
    per_pid = _read_everywhere(g.base, expected, min_pids=2)
    stats = {}
    for _ in range(10):
        for status, pid, body in _parallel([("GET", "/stats")] * 12, g.base):
            assert status == 200 and body["pid"] == pid
            assert body["connected_in"] == pid  # lazy: each worker connected itself
            stats[pid] = body
        if len(stats) >= 2:
            break
    assert len(stats) >= 2, stats
    last = max(body["frontier"]["visible"] for body in stats.values())
    assert all(b["frontier"]["writer_state"] == "READY" for b in stats.values())
    assert all(b["frontier"]["durable"] >= len(deposits) + 1 for b in stats.values())
    served_reads = [stats[p]["projection"] for p in per_pid if p in stats]
    assert sum(p["hits"] for p in served_reads) > 0, stats
    assert sum(p["events_folded"] for p in served_reads) > 0, stats

    # read your writes across processes: a deposit is in the very next read, whichever
    # worker serves either request, while other clients deposit and read concurrently
    def deposit_then_read(i: int) -> list[tuple[int, int]]:
        account, seen = f"ryw{i}", []
        for k in range(1, 6):
            status, p1, body = _call(g.base, "POST", f"/accounts/{account}/deposit", {"amount": 1})
            assert status == 201, body
            status, p2, body = _call(g.base, "GET", f"/accounts/{account}")
            assert status == 200 and body["balance"] == k, body
            seen.append((p1, p2))
        return seen

    with ThreadPoolExecutor(10) as pool:
        pairs = [pair for seen in pool.map(deposit_then_read, range(10)) for pair in seen]
    assert any(p1 != p2 for p1, p2 in pairs)  # some writes were read by another worker
    expected.update({f"ryw{i}": 5 for i in range(10)})
    _read_everywhere(g.base, expected, min_pids=2)
    assert _call(g.base, "GET", "/stats")[2]["frontier"]["visible"] > last

    _stop_and_verify(g, svc, data_dir)


def test_store_connected_before_fork_works_in_every_worker(served: tuple[bp.Service, str],
                                                           start_gunicorn: Callable[..., Gunicorn]) -> None:
    svc, data_dir = served
    # --preload loads the app in the master, and create_app(connect=True) connects there:
    # every worker inherits that Store through the fork and re-attaches on its own
    g = start_gunicorn(data_dir, "examples.webapp.app:create_app(connect=True)", "--preload", workers=3)
    deposits = [(f"p{i % 4}", i + 1) for i in range(60)]
    results = _parallel([("POST", f"/accounts/{a}/deposit", {"amount": n}) for a, n in deposits], g.base)
    assert {status for status, _, _ in results} == {201}
    pids = {pid for _, pid, _ in results}
    for _ in range(20):  # the kernel may hand a whole burst to one worker: deposit more until two did
        if len(pids) >= 2:
            break
        more = [(f"p{i % 4}", 1) for i in range(30)]
        results = _parallel([("POST", f"/accounts/{a}/deposit", {"amount": n}) for a, n in more], g.base)
        assert {status for status, _, _ in results} == {201}
        pids |= {pid for _, pid, _ in results}
        deposits += more
    assert len(pids) >= 2, pids
    expected: dict[str, int] = defaultdict(int)
    for a, n in deposits:
        expected[a] += n
    _read_everywhere(g.base, dict(expected), min_pids=2)
    seen = set()
    for status, pid, body in _parallel([("GET", "/stats")] * 12, g.base):
        assert status == 200
        assert body["connected_in"] == g.pid != pid  # connected in the master, used in a worker
        seen.add(pid)
    assert g.pid not in seen
    _stop_and_verify(g, svc, data_dir)
