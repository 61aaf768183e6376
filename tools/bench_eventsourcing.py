"""Benchmark of the eventsourcing persistence module against eventsourcing's own SQLite module.

Owns two measurements, each side by side in the same run, batpak-mp (a real served store:
supervisor + writer, ``PERSISTENCE_MODULE=batpak_mp.eventsourcing``) and SQLite
(``eventsourcing.sqlite``: a file in WAL mode, the library's defaults):

  suites     eventsourcing's own figures: ``test_performance`` of the aggregate,
             application and process recorder cases (100 single inserts, one thread) and
             ``test_concurrent_throughput`` of the application recorder case (4 threads,
             jobs of 50 events), run as the library's test cases and parsed from what
             they print. Median of --runs runs, each on a fresh store / database.
  processes  single inserts (one new aggregate, one event per ``insert_events``) from 1,
             4 and 8 processes at once through the application recorder, for --seconds
             each: events/s over the wall time, and the CPU each insert cost in the
             inserting processes (and, for batpak-mp, in the writer too).

Every figure is printed with its ratio batpak-mp / SQLite (> 1: batpak-mp is faster;
for µs per insert the ratio is SQLite's time over batpak-mp's, so > 1 still means
batpak-mp is faster). Note the durability: an acknowledged batpak-mp insert is fsynced;
SQLite's is what its synchronous setting (printed) makes it.

Run:  python tools/bench_eventsourcing.py [--runs 3] [--seconds 5] [--quick] [--json FILE]
This is a tool, not a test; figures drift on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import unittest
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import multiprocess as mp
import psutil
from eventsourcing.persistence import ApplicationRecorder, StoredEvent
from eventsourcing.sqlite import (
    SQLiteAggregateRecorder,
    SQLiteApplicationRecorder,
    SQLiteDatastore,
    SQLiteProcessRecorder,
)
from eventsourcing.tests import persistence as suite

import batpak_mp as bp
from batpak_mp.eventsourcing import (
    BatpakAggregateRecorder,
    BatpakApplicationRecorder,
    BatpakProcessRecorder,
    Datastore,
)

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-data", "eventsourcing")
US_PER_INSERT = re.compile(r"([0-9.]+) μs per insert")
RATE = re.compile(r"Rate: ([0-9.]+) inserts per second")
_TARGET: dict[str, Any] = {}  # what the suite cases below record into (set per run)


def fresh(name: str) -> str:
    path = os.path.join(ROOT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


# -- the library's own cases, for both backends ---------------------------------------------

def _sqlite() -> SQLiteDatastore:
    return SQLiteDatastore(db_name=_TARGET["sqlite"], lock_timeout=30)


def _scope() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}/app"


class BatpakAggregate(suite.AggregateRecorderTestCase):
    def create_recorder(self) -> Any:
        return BatpakAggregateRecorder(Datastore(_TARGET["batpak"]), _scope() + ".snapshots")


class BatpakApplication(suite.ApplicationRecorderTestCase[Any]):
    def create_recorder(self) -> Any:
        return BatpakApplicationRecorder(Datastore(_TARGET["batpak"]), _scope())


class BatpakProcess(suite.ProcessRecorderTestCase):
    def create_recorder(self) -> Any:
        return BatpakProcessRecorder(Datastore(_TARGET["batpak"]), _scope())


class SQLiteAggregate(suite.AggregateRecorderTestCase):
    def create_recorder(self) -> Any:
        r = SQLiteAggregateRecorder(_sqlite(), events_table_name=f"s{uuid.uuid4().hex[:8]}")
        r.create_table()
        return r


class SQLiteApplication(suite.ApplicationRecorderTestCase[Any]):
    def create_recorder(self) -> Any:
        r = SQLiteApplicationRecorder(_sqlite(), events_table_name=f"e{uuid.uuid4().hex[:8]}")
        r.create_table()
        return r


class SQLiteProcess(suite.ProcessRecorderTestCase):
    def create_recorder(self) -> Any:
        r = SQLiteProcessRecorder(_sqlite(), events_table_name=f"p{uuid.uuid4().hex[:8]}")
        r.create_table()
        return r


SUITE_FIGURES: list[tuple[str, str, str, re.Pattern[str]]] = [
    # (label, case name without the backend, test method, what it prints)
    ("aggregate test_performance (µs/insert)", "Aggregate", "test_performance", US_PER_INSERT),
    ("application test_performance (µs/insert)", "Application", "test_performance", US_PER_INSERT),
    ("process test_performance (µs/insert)", "Process", "test_performance", US_PER_INSERT),
    ("application test_concurrent_throughput (events/s)", "Application", "test_concurrent_throughput", RATE),
]


def run_case(cls: type[unittest.TestCase], method: str, pattern: re.Pattern[str]) -> float:
    """Run one test method of the library's suite; the figure it printed."""
    out = io.StringIO()
    result = unittest.TestResult()
    with contextlib.redirect_stdout(out):
        cls(method).run(result)
    if result.errors or result.failures:
        raise RuntimeError(f"{cls.__name__}.{method} failed: {(result.errors + result.failures)[0][1]}")
    found = pattern.search(out.getvalue())
    if found is None:
        raise RuntimeError(f"{cls.__name__}.{method} printed no figure: {out.getvalue()!r:.300}")
    return float(found.group(1))


SERVE_ATTEMPTS = 5  # the POSIX queue quota is per user: other stores of the machine's user may hold it a while
SERVE_RETRY_S = 10.0


def serve(data: str) -> bp.Service:
    """``bp.serve``, tried again a few times while the user's message-queue quota is full."""
    for attempt in range(SERVE_ATTEMPTS):
        try:
            return bp.serve(data)
        except bp.WriterUnavailable as exc:
            if attempt == SERVE_ATTEMPTS - 1:
                raise
            print(f"  (serve failed: {str(exc)[:80]}...; again in {SERVE_RETRY_S:g} s)", file=sys.stderr, flush=True)
            time.sleep(SERVE_RETRY_S)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def backends(tag: str) -> Iterator[tuple[str, str]]:
    """A served batpak-mp store and an SQLite file, both fresh."""
    data = os.path.join(fresh(f"{tag}-batpak"), "data")
    db = os.path.join(fresh(f"{tag}-sqlite"), "events.db")
    with serve(data):
        yield data, db


def bench_suites(runs: int) -> list[dict[str, Any]]:
    rows = []
    for label, case, method, pattern in SUITE_FIGURES:
        got: dict[str, list[float]] = {"batpak": [], "sqlite": []}
        for run in range(runs):
            with backends(f"suite{run}") as (data, db):
                _TARGET.update(batpak=data, sqlite=db)
                for name, prefix in (("batpak", "Batpak"), ("sqlite", "SQLite")):
                    cls = globals()[prefix + case]
                    got[name].append(run_case(cls, method, pattern))
        b, s = statistics.median(got["batpak"]), statistics.median(got["sqlite"])
        ratio = s / b if pattern is US_PER_INSERT else b / s
        rows.append({"figure": label, "batpak": b, "sqlite": s, "ratio": ratio, "runs": got})
    return rows


# -- single inserts from several processes --------------------------------------------------

def _insert_loop(make: Callable[[], ApplicationRecorder], seconds: float, start_at: float, q: Any) -> None:
    recorder = make()
    event = StoredEvent(uuid.uuid4(), 1, "topic", b"x" * 100)
    recorder.insert_events([event])  # warm: connected, first insert done
    while time.monotonic() < start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    n = 0
    end = start_at + seconds
    while time.monotonic() < end:
        recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "topic", b"x" * 100)])
        n += 1
    q.put((n, time.process_time() - cpu0, time.monotonic() - start_at))


def _batpak_maker(data: str, scope: str) -> Callable[[], ApplicationRecorder]:
    return lambda: BatpakApplicationRecorder(Datastore(data, pool_size=1), scope)


def _sqlite_maker(db: str, table: str) -> Callable[[], ApplicationRecorder]:
    def make() -> ApplicationRecorder:
        r = SQLiteApplicationRecorder(SQLiteDatastore(db_name=db, lock_timeout=60), events_table_name=table)
        r.create_table()
        return r
    return make


def run_processes(make: Callable[[], ApplicationRecorder], procs: int, seconds: float,
                  cpu_of: Callable[[], float] | None = None) -> dict[str, float]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start_at = time.monotonic() + 1.0 + 0.2 * procs  # every process connected and warm before the clock starts
    workers = [ctx.Process(target=_insert_loop, args=(make, seconds, start_at, q)) for _ in range(procs)]
    for w in workers:
        w.start()
    while time.monotonic() < start_at:
        time.sleep(0.001)
    extra0 = cpu_of() if cpu_of else 0.0
    results = [q.get(timeout=seconds + 120) for _ in workers]
    extra = (cpu_of() - extra0) if cpu_of else 0.0
    for w in workers:
        w.join()
    n = sum(r[0] for r in results)
    wall = max(r[2] for r in results)
    return {"events_per_s": n / wall, "client_cpu_us": 1e6 * sum(r[1] for r in results) / n,
            "server_cpu_us": 1e6 * extra / n, "events": n}


def bench_processes(seconds: float, counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for procs in counts:
        with backends(f"procs{procs}") as (data, db):
            writer = psutil.Process(bp.connect(data).frontier().writer_pid)

            def writer_cpu(w: psutil.Process = writer) -> float:
                t = w.cpu_times()
                return float(t.user + t.system)

            b = run_processes(_batpak_maker(data, "bench/app"), procs, seconds, writer_cpu)
            s = run_processes(_sqlite_maker(db, "stored_events"), procs, seconds)
        rows.append({"processes": procs, "batpak": b, "sqlite": s, "ratio": b["events_per_s"] / s["events_per_s"]})
    return rows


def sqlite_synchronous(db: str) -> str:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        level = conn.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        conn.close()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(level, str(level))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of each suite figure (median)")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each multi-process row")
    ap.add_argument("--processes", default="1,4,8")
    ap.add_argument("--quick", action="store_true", help="one run, 2 s rows")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.seconds = 1, 2.0
    probe = os.path.join(tempfile.mkdtemp(), "probe.db")
    print(f"batpak-mp codec: {bp.codec_backend()}; SQLite {sqlite3.sqlite_version}, WAL, "
          f"synchronous={sqlite_synchronous(probe)} (eventsourcing.sqlite's defaults)", flush=True)

    suites = bench_suites(args.runs)
    print(f"\neventsourcing's own suite figures (median of {args.runs}):")
    print(f"  {'figure':52} {'batpak-mp':>12} {'SQLite':>12} {'ratio':>7}")
    for r in suites:
        print(f"  {r['figure']:52} {r['batpak']:12.1f} {r['sqlite']:12.1f} {r['ratio']:6.2f}x")

    procs = bench_processes(args.seconds, [int(x) for x in args.processes.split(",")])
    print(f"\nsingle inserts (one new aggregate per insert_events), {args.seconds:g} s per row:")
    print(f"  {'processes':>9} {'batpak-mp ev/s':>15} {'SQLite ev/s':>12} {'ratio':>7}"
          f" {'batpak CPU µs/ins (clients+writer)':>36} {'SQLite CPU µs/ins':>18}")
    for r in procs:
        b, s = r["batpak"], r["sqlite"]
        print(f"  {r['processes']:>9} {b['events_per_s']:15.0f} {s['events_per_s']:12.0f} {r['ratio']:6.2f}x"
              f" {b['client_cpu_us']:17.0f} + {b['server_cpu_us']:<16.0f} {s['client_cpu_us']:18.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"suites": suites, "processes": procs}, f, indent=1)


if __name__ == "__main__":
    main()
