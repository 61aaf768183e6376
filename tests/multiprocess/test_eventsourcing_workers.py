"""One eventsourcing application in 4 worker processes at once, and a follower process,
over one served store (examples/eventsourcing_bank, run as its README says).

The workers open accounts and deposit, all of them also into one shared account (so
their saves race: the loser of a race gets eventsourcing's IntegrityError and retries).
Checked: the notification ids the workers were handed are exactly 1..N, each once,
whatever process saved the event, and each names the event the notification log holds
under it; no deposit to the shared account was lost; the follower (an eventsourcing
``EventSourcedProjectionRunner``, started before the workers) recorded every event of
the bank exactly once, with its tracking position, and a second run of it finds nothing
left to do. The store must verify at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

pytest.importorskip("eventsourcing")

from conftest import assert_verified

import batpak_mp as bp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(ROOT, "examples", "eventsourcing_bank", "run.py")
WORKERS = 4
ACCOUNTS = 3  # each worker's own
DEPOSITS = 6  # into each of its accounts and into the shared one


def _run(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, RUN, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_four_workers_one_notification_log_and_a_follower_that_sees_each_event_once(tmp_path: Any) -> None:
    data = str(tmp_path / "data")
    total = WORKERS * (ACCOUNTS + DEPOSITS * (ACCOUNTS + 1)) + 1  # + the shared account's opening
    with bp.serve(data, segment_max_bytes=1 << 20):
        follower = _run("follow", data, "--until", str(total), "--timeout", "90")
        outs = [str(tmp_path / f"w{i}.json") for i in range(WORKERS)]
        workers = [_run("worker", data, "--accounts", str(ACCOUNTS), "--deposits", str(DEPOSITS), "--out", out)
                   for out in outs]
        for w in workers:
            _finish(w)
        assert int(_finish(follower).strip()) == total

        reports = [_load(out) for out in outs]
        saved = [n for r in reports for n in r["saved"]]
        assert sorted(n["id"] for n in saved) == list(range(1, total + 1))  # no gap, no repeat, across processes
        assert len({r["pid"] for r in reports}) == WORKERS

        os.environ.update({"PERSISTENCE_MODULE": "batpak_mp.eventsourcing", "BATPAK_MP_DATA_DIR": data})
        try:
            example = _example()
            with example.Bank() as bank:
                log = {n.id: n for n in bank.recorder.select_notifications(None, total + 10)}
                assert sorted(log) == list(range(1, total + 1))
                for n in saved:  # the id a worker was handed names the event the log holds under it
                    assert str(log[n["id"]].originator_id) == n["originator"]
                assert bank.balance(example.HOUSE) == WORKERS * DEPOSITS
            with example.Ledger() as ledger:
                entries = ledger.recorder.select_notifications(None, total + 10)
                assert len(entries) == total  # one entry per bank event
                assert ledger.recorder.max_tracking_id("Bank") == total
        finally:
            for k in ("PERSISTENCE_MODULE", "BATPAK_MP_DATA_DIR"):
                os.environ.pop(k, None)
        # a second follower run finds everything done: nothing is processed twice
        assert int(_finish(_run("follow", data, "--until", str(total), "--timeout", "30")).strip()) == total
    assert_verified(data)


def _example() -> Any:
    """The example's module, imported by its package name as its processes do (its
    events' topics name it)."""
    import importlib

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module("examples.eventsourcing_bank.bank")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(base: str, method: str, path: str) -> tuple[int, int, Any]:
    """One request on loopback (never through a proxy): (status, worker pid, JSON body)."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(base + path, data=b"" if method == "POST" else None, method=method)
    try:
        with opener.open(req, timeout=15) as resp:
            return resp.status, int(resp.headers["X-Worker-Pid"]), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, int(e.headers["X-Worker-Pid"]), json.loads(e.read())


def test_the_wsgi_example_under_gunicorn_with_four_workers(tmp_path: Any) -> None:
    """examples/eventsourcing_bank/wsgi.py as its docstring runs it: concurrent deposits
    through 4 gunicorn workers all count, and every worker serves the same log."""
    from concurrent.futures import ThreadPoolExecutor

    data = str(tmp_path / "data")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PERSISTENCE_MODULE="batpak_mp.eventsourcing", BATPAK_MP_DATA_DIR=data)
    with bp.serve(data, segment_max_bytes=1 << 20), open(tmp_path / "gunicorn.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--chdir", ROOT, "-w", "4", "-b", f"127.0.0.1:{port}",
                                 "examples.eventsourcing_bank.wsgi:app"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
                try:
                    if _http(base, "POST", "/accounts/alice")[0] == 201:
                        break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
                    time.sleep(0.1)
            assert _http(base, "POST", "/accounts/alice")[0] == 409  # opened once
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda _: _http(base, "POST", "/accounts/alice/deposit?amount=2"), range(40)))
            assert all(status == 200 for status, _, _ in got), got
            assert len({pid for _, pid, _ in got}) > 1  # more than one worker took deposits
            ids = sorted(n for _, _, body in got for n in body["notifications"])
            assert ids == list(range(2, 42))  # the opening is 1; each deposit its own id
            status, _, body = _http(base, "GET", "/accounts/alice")
            assert (status, body) == (200, {"balance": 80})
            logs = {pid: body for _, pid, body in (_http(base, "GET", "/notifications?after=30") for _ in range(12))}
            assert len({json.dumps(b) for b in logs.values()}) == 1  # every worker serves the same log
            assert [n["id"] for n in next(iter(logs.values()))] == list(range(31, 42))
            assert _http(base, "GET", "/accounts/bob")[0] == 404
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert_verified(data)
