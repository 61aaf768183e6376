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
import subprocess
import sys
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
