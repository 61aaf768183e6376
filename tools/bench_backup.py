"""Online backup figures (issue 12): throughput of ``bp.backup`` of a large served store
while client processes append, what the backup costs those clients, and the time of an
incremental backup.

Owns: building an N-event store once (default 1,000,000, in-process, batches of 1000),
serving it, starting C client processes (default 8) that append single events in a loop,
then R rounds (default 3) of
  baseline  the clients' append rate over a window with no backup (events/s, from the
            visible frontier);
  backup    a full ``bp.backup`` into an empty destination: MB/s (bytes copied / time),
            and the clients' append rate over exactly the backup's duration;
and, after the rounds, K times (default 3): 10,000 more events (batches of 1000), then an
incremental ``bp.backup`` into the last destination (seconds, bytes copied).
Each backup is checked (``bp.verify``) after its round, outside the timed windows.
With ``--nice N`` and/or ``--max-rate MIB_S`` every round also makes a second full backup
from a forked child at CPU niceness N (what the recipes of OPERATIONS.md §4.2 do) and/or
paced to that many MiB/s (``bp.backup(max_rate=)``), after a baseline window of its own, so
the two costs to the clients are measured side by side.

The machine is shared and noisy: every figure is the median of the rounds, and the
clients' cost is the ratio of their rate during a backup to their rate in the baseline
window just before it (same run, same clients). CPU seconds of the backing-up process per
MB copied are reported too.
Run: python tools/bench_backup.py [--events N] [--clients C] [--rounds R] [--incrementals K]
     [--dir DIR] [--keep] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from typing import Any

import multiprocess as mp

import batpak_mp as bp

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-data", "backup")
PAYLOAD = {"user": "alice", "action": "move", "x": 10, "y": 20, "pad": "x" * 140}  # as bench_restart.py
BASELINE_S = 2.0  # seconds of each baseline window: long enough for thousands of group commits
WARMUP_S = 1.0  # clients attach and settle before the first window


def build(path: str, events: int) -> float:
    t = time.perf_counter()
    with bp.Engine.open(path) as e:
        for i in range(0, events, 1000):
            e.append_batch([bp.BatchItem(bp.Coordinate(f"e{j % 10000}", "bench"), bp.Kind(1, 1), PAYLOAD)
                            for j in range(i, min(i + 1000, events))])
    return time.perf_counter() - t


def _client(path: str, cid: int, stop: Any) -> None:
    with bp.connect(path, timeout=60) as s:
        coord = bp.Coordinate(f"client:{cid}", "bench")
        while not stop.is_set():
            s.append(coord, bp.Kind(1, 2), PAYLOAD)


def _rate(store: bp.Store, seconds: float) -> float:
    v0, t0 = store.frontier().visible, time.perf_counter()
    time.sleep(seconds)
    return (store.frontier().visible - v0) / (time.perf_counter() - t0)


def _timed_backup(store: bp.Store, src: str, dest: str) -> tuple[bp.BackupReport, float, float]:
    """(report, clients' events/s during it, CPU seconds of this process)."""
    cpu0 = time.process_time()
    v0, t0 = store.frontier().visible, time.perf_counter()
    report = bp.backup(src, dest)
    elapsed = time.perf_counter() - t0
    rate = (store.frontier().visible - v0) / elapsed
    return report, rate, time.process_time() - cpu0


def _second_backup(store: bp.Store, src: str, dest: str, nice: int, max_rate: float | None) -> tuple[float, float, int]:
    """A full backup from a forked child at niceness ``nice``, paced to ``max_rate``
    bytes/s: (seconds, clients' events/s meanwhile, bytes copied)."""
    r, w = os.pipe()
    v0, t0 = store.frontier().visible, time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.nice(nice)
            report = bp.backup(src, dest, max_rate=max_rate)
            os.write(w, f"{report.seconds} {report.bytes_copied}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    rate = (store.frontier().visible - v0) / elapsed
    seconds, copied = os.read(r, 100).split()
    os.close(r)
    return float(seconds), rate, int(copied)


def grow(store: bp.Store, n: int) -> None:
    for i in range(0, n, 1000):
        store.append_batch([bp.BatchItem(bp.Coordinate(f"more{j % 100}", "bench"), bp.Kind(1, 3), PAYLOAD)
                            for j in range(i, min(i + 1000, n))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--incrementals", type=int, default=3)
    ap.add_argument("--more", type=int, default=10_000, help="events added before each incremental backup")
    ap.add_argument("--dir", default=ROOT)
    ap.add_argument("--keep", action="store_true", help="keep the store (and reuse it next time)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--nice", type=int, default=0, help="also a backup at this CPU niceness each round (0: none)")
    ap.add_argument("--max-rate", type=float, default=None, metavar="MIB_S",
                    help="also a backup paced to this many MiB/s each round")
    ap.add_argument("--quick", action="store_true", help="100,000 events, 2 rounds: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.events, args.rounds, args.incrementals = 100_000, 2, 2
    src, dests = os.path.join(args.dir, "data"), os.path.join(args.dir, "backups")
    if not args.keep and os.path.exists(args.dir):
        shutil.rmtree(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    if not os.path.exists(os.path.join(src, "store.meta")):
        print(f"building a {args.events:,}-event store ... {build(src, args.events):.1f} s", flush=True)
    shutil.rmtree(dests, ignore_errors=True)
    os.makedirs(dests)
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    rounds: list[dict[str, float]] = []
    incrementals: list[dict[str, float]] = []
    with bp.serve(src) as _svc, bp.connect(src) as store:
        procs = [ctx.Process(target=_client, args=(src, c, stop)) for c in range(args.clients)]
        for p in procs:
            p.start()
        try:
            time.sleep(WARMUP_S)
            dest = ""
            for r in range(args.rounds):
                base = _rate(store, BASELINE_S)
                if dest:
                    shutil.rmtree(dest)
                dest = os.path.join(dests, f"round{r}")
                report, during, cpu = _timed_backup(store, src, dest)
                mb = report.bytes_copied / 1e6
                rounds.append({"baseline_eps": base, "during_eps": during, "ratio": during / base if base else 0.0,
                               "mb": mb, "seconds": report.seconds, "mb_s": mb / report.seconds,
                               "cpu_s_per_mb": cpu / mb, "last_sequence": report.last_sequence})
                print(f"round {r}: {mb:,.0f} MB in {report.seconds:.2f} s = {mb / report.seconds:,.0f} MB/s; "
                      f"clients {base:,.0f} -> {during:,.0f} events/s ({during / base:.2f}x)", flush=True)
                assert bp.verify(dest).ok
                if args.nice or args.max_rate:
                    base = _rate(store, BASELINE_S)
                    shutil.rmtree(dest)
                    rate = args.max_rate * 2**20 if args.max_rate else None
                    seconds, during, copied = _second_backup(store, src, dest, args.nice, rate)
                    variant = f"nice {args.nice}, max rate {args.max_rate} MiB/s"
                    rounds[-1].update(nice_baseline_eps=base, nice_during_eps=during, nice_ratio=during / base,
                                      nice_mb_s=copied / 1e6 / seconds)
                    print(f"  at {variant}: {copied / 1e6 / seconds:,.0f} MB/s; clients {base:,.0f} -> "
                          f"{during:,.0f} events/s ({during / base:.2f}x)", flush=True)
                    assert bp.verify(dest).ok
            for k in range(args.incrementals):
                grow(store, args.more)
                report = bp.backup(src, dest)
                incrementals.append({"seconds": report.seconds, "mb": report.bytes_copied / 1e6,
                                     "files_copied": report.files_copied, "files_reused": report.files_reused})
                print(f"incremental {k}: +{args.more:,} events: {report.seconds * 1000:.0f} ms, "
                      f"{report.bytes_copied / 1e6:,.1f} MB copied, {report.files_reused} segment(s) reused",
                      flush=True)
            assert bp.verify(dest).ok
        finally:
            stop.set()
            for p in procs:
                p.join(60)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    summary = {
        "events": args.events, "clients": args.clients, "rounds": len(rounds), "codec": bp.codec_backend(),
        "backup_mb_s_median": med(rounds, "mb_s"), "backup_mb_median": med(rounds, "mb"),
        "backup_seconds_median": med(rounds, "seconds"), "cpu_s_per_mb_median": med(rounds, "cpu_s_per_mb"),
        "clients_baseline_eps_median": med(rounds, "baseline_eps"),
        "clients_during_eps_median": med(rounds, "during_eps"),
        "clients_ratio_median": med(rounds, "ratio"),
        "incremental_seconds_median": med(incrementals, "seconds") if incrementals else None,
        "incremental_mb_median": med(incrementals, "mb") if incrementals else None,
        "rounds_detail": rounds, "incrementals_detail": incrementals,
    }
    if args.nice or args.max_rate:
        summary.update(nice=args.nice, max_rate_mib_s=args.max_rate, nice_mb_s_median=med(rounds, "nice_mb_s"),
                       nice_ratio_median=med(rounds, "nice_ratio"))
    print(f"\nmedians over {len(rounds)} rounds ({args.events:,} events, {args.clients} appending clients, "
          f"codec {summary['codec']}):")
    print(f"  full backup: {summary['backup_mb_s_median']:,.0f} MB/s ({summary['backup_mb_median']:,.0f} MB in "
          f"{summary['backup_seconds_median']:.2f} s; {summary['cpu_s_per_mb_median'] * 1e3:.2f} ms CPU per MB)")
    print(f"  clients' appends during a backup: {summary['clients_ratio_median']:.2f}x their rate without "
          f"({summary['clients_during_eps_median']:,.0f} vs {summary['clients_baseline_eps_median']:,.0f} events/s)")
    if args.nice or args.max_rate:
        print(f"  at nice {args.nice}, max rate {args.max_rate} MiB/s: {summary['nice_mb_s_median']:,.0f} MB/s, clients "
              f"{summary['nice_ratio_median']:.2f}x their rate without")
    if incrementals:
        print(f"  incremental backup after {args.more:,} more events: {summary['incremental_seconds_median'] * 1000:.0f} ms "
              f"({summary['incremental_mb_median']:,.1f} MB copied)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
