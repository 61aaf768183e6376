"""The asyncio example (examples/aio_app: Starlette) under a real ``uvicorn --workers 4``,
driven over real HTTP on loopback: concurrent appends land once each across the workers,
a repeated Idempotency-Key is stored once, a long-polling feed wakes on a commit, and a
graceful stop closes every worker's AsyncStore (issue 14 #1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import assert_verified
from test_webapp import _free_port

import batpak_mp as bp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def call(base: str, method: str, path: str, body: Any = None, key: str | None = None,
         timeout: float = 20) -> tuple[int, int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if key is not None:
        req.add_header("Idempotency-Key", key)
    try:
        with _HTTP.open(req, timeout=timeout) as resp:
            return resp.status, int(resp.headers["X-Worker-Pid"]), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, int(e.headers["X-Worker-Pid"]), json.loads(e.read())


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture
def uvicorn(tmp_path: Any) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    data_dir = os.path.join(os.fspath(tmp_path), "data")
    log_path = os.path.join(os.fspath(tmp_path), "uvicorn.log")
    port = _free_port()
    with bp.serve(data_dir):
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.aio_app.app:app", "--workers", "4",
                                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                    cwd=ROOT, env=dict(os.environ, BATPAK_DIR=data_dir), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, _read(log_path)
                try:
                    if call(base, "GET", "/stats", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "uvicorn did not answer:\n" + _read(log_path)
                time.sleep(0.1)
            yield base, data_dir, proc
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
    assert_verified(data_dir)


def test_four_uvicorn_workers_append_and_read_over_http(uvicorn: tuple[str, str, subprocess.Popen[bytes]]) -> None:
    base, data_dir, proc = uvicorn
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: call(base, "POST", f"/notes/n{i % 8}", {"text": f"t{i}"}), range(240)))
    assert all(status == 201 for status, _, _ in answers), answers[:3]
    workers = Counter(pid for _, pid, _ in answers)
    assert len({a[2]["sequence"] for a in answers}) == 240
    deadline = time.monotonic() + 10
    while len(workers) < 2 and time.monotonic() < deadline:  # a burst may all land on one worker: ask more
        workers[call(base, "POST", "/notes/more", {"text": "m"})[1]] += 1
    assert len(workers) >= 2, workers

    # an Idempotency-Key: stored once, the repeat says so; the same key for another note is refused
    s1, _, first = call(base, "POST", "/notes/k", {"text": "once"}, key="abc")
    s2, _, again = call(base, "POST", "/notes/k", {"text": "once"}, key="abc")
    s3, _, _ = call(base, "POST", "/notes/k2", {"text": "once"}, key="abc")
    assert (s1, s2, s3) == (201, 201, 422)
    assert again["sequence"] == first["sequence"] and again["deduplicated"] and not first["deduplicated"]

    status, _, note = call(base, "GET", "/notes/n3")
    assert status == 200 and sorted(e["text"] for e in note["events"]) == sorted(f"t{i}" for i in range(3, 240, 8))
    assert [e["clock"] for e in note["events"]] == list(range(1, 31))  # oldest first
    newest = call(base, "GET", "/notes/n3?newest=2")[2]["events"]
    assert newest == note["events"][::-1][:2]
    assert call(base, "POST", "/notes/bad%20id!", {"text": "x"})[0] == 400
    assert call(base, "POST", "/notes/ok", "not a map")[0] == 400
    assert call(base, "GET", "/feed?wait=99")[0] == 400

    # a long poll sleeps until a commit wakes it
    after = call(base, "GET", "/stats")[2]["visible"]
    got: list[Any] = []
    poller = threading.Thread(target=lambda: got.append(call(base, "GET", f"/feed?after={after}&wait=8")))
    t0 = time.monotonic()
    poller.start()
    time.sleep(0.5)
    call(base, "POST", "/notes/live", {"text": "hello"})
    poller.join(15)
    assert got and got[0][0] == 200 and [e["text"] for e in got[0][2]["events"]] == ["hello"]
    assert time.monotonic() - t0 < 5

    proc.send_signal(signal.SIGTERM)  # graceful: each worker's lifespan closes its AsyncStore
    assert proc.wait(30) == 0
    with bp.connect(data_dir) as s:
        texts = Counter(e.payload["text"] for e in s.query_after(0, limit=10_000, scope="notes").events)
    assert texts["once"] == 1 and texts["hello"] == 1
    assert all(texts[f"t{i}"] == 1 for i in range(240))
    assert sum(texts.values()) == 240 + texts["m"] + 2  # nothing else, nothing twice
