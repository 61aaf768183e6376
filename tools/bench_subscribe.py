"""Benchmark of the replay layer: subscription latency and projection rebuild rate.

Owns two measurements against a real service (supervisor + writer, real processes):

  latency   commit-to-subscriber latency with 1 and with 16 subscriber processes. One
            appender process appends single durable events, paced (a pause between
            appends, so this measures latency, not a queue building up); every subscriber
            records when each event reaches it. Two figures per event and subscriber,
            all on CLOCK_MONOTONIC (shared by every process on the machine):
              from return  receive time - the moment ``append`` returned in the appender.
                           The writer publishes the frontier (and wakes subscribers)
                           BEFORE it replies, so this can be negative; it is the figure
                           closest to "commit to subscriber" that needs no writer hook.
              from call    receive time - the moment ``append`` was called: an upper bound
                           that includes the queue trip, the write and the fsync.
  rebuild   projection rebuild rate over N events (default 200k): a fold from zero, and
            from a snapshot taken at N with 5% more events appended since. Rates are the
            events the resulting state covers divided by the wall time of the call.

Run:  python tools/bench_subscribe.py [--quick] [--events N] [--appends N] [--json FILE]
This is a tool, not a test; figures drift on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import multiprocess as mp

import batpak_mp as bp

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-data", "subscribe")
KIND = bp.Kind(1, 1)
STOP = bp.Kind(1, 2)
PAD = "x" * 100


def fresh(name: str) -> str:
    path = os.path.join(ROOT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(ROOT, exist_ok=True)
    return path


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# -- latency ---------------------------------------------------------------------------------


def subscriber(data_dir: str, after: int, q: Any) -> None:
    received: dict[int, float] = {}
    with bp.connect(data_dir) as s:
        sub = s.subscribe(after, timeout=60)
        q.put(("ready", os.getpid()))
        for ev in sub:
            now = time.monotonic()
            if ev.kind == STOP:
                break
            if ev.kind == KIND:
                received[ev.global_sequence] = now
    q.put(("done", received))


def appender(data_dir: str, n: int, pause_s: float, q: Any) -> None:
    sent: dict[int, tuple[float, float]] = {}
    with bp.connect(data_dir) as s:
        coord = bp.Coordinate("bench", "latency")
        for i in range(n):
            t_call = time.monotonic()
            r = s.append(coord, KIND, {"i": i, "pad": PAD})
            sent[r.global_sequence] = (t_call, time.monotonic())
            time.sleep(pause_s)
        s.append(coord, STOP, {})
    q.put(("sent", sent))


def latency(subscribers: int, appends: int, pause_s: float) -> dict[str, Any]:
    data_dir = fresh(f"lat{subscribers}")
    ctx = mp.get_context("fork")
    with bp.serve(data_dir, segment_max_bytes=64 << 20) as _svc, bp.connect(data_dir) as s:
        after = s.frontier().visible
        q = ctx.Queue()
        subs = [ctx.Process(target=subscriber, args=(data_dir, after, q)) for _ in range(subscribers)]
        for p in subs:
            p.start()
        for _ in subs:
            assert q.get(timeout=30)[0] == "ready"
        time.sleep(0.2)
        app = ctx.Process(target=appender, args=(data_dir, appends, pause_s, q))
        app.start()
        sent: dict[int, tuple[float, float]] = {}
        received: list[dict[int, float]] = []
        for _ in range(subscribers + 1):
            tag, value = q.get(timeout=300)
            if tag == "sent":
                sent = value
            else:
                received.append(value)
        for p in [*subs, app]:
            p.join(30)
    from_return: list[float] = []
    from_call: list[float] = []
    missing = 0
    for got in received:
        for seq, (t_call, t_ret) in sent.items():
            t = got.get(seq)
            if t is None:
                missing += 1
                continue
            from_return.append((t - t_ret) * 1e3)
            from_call.append((t - t_call) * 1e3)
    return {
        "subscribers": subscribers, "appends": appends, "missing": missing,
        "from_return_p50_ms": percentile(from_return, 50), "from_return_p99_ms": percentile(from_return, 99),
        "from_call_p50_ms": percentile(from_call, 50), "from_call_p99_ms": percentile(from_call, 99),
    }


# -- projection rebuild ----------------------------------------------------------------------


class Totals:
    """Per-entity count and sum: a typical small read model."""

    name = "bench-totals"
    version = 1
    initial: Any = dict

    def apply(self, state: dict[str, list[int]], event: bp.Event) -> dict[str, list[int]]:
        row = state.get(event.entity)
        if row is None:
            row = state[event.entity] = [0, 0]
        row[0] += 1
        row[1] += event.payload["i"]
        return state


def fill(s: bp.Store, start: int, n: int, batch: int = 1000) -> None:
    for base in range(start, start + n, batch):
        count = min(batch, start + n - base)
        s.append_batch([bp.BatchItem(bp.Coordinate(f"acct:{i % 1000}", "bench"), KIND, {"i": i, "pad": PAD})
                        for i in range(base, base + count)])


def rebuild(events: int) -> dict[str, Any]:
    data_dir = fresh("rebuild")
    extra = max(events // 20, 1)
    with bp.serve(data_dir, segment_max_bytes=64 << 20), bp.connect(data_dir) as s:
        t = time.perf_counter()
        fill(s, 0, events)
        fill_s = time.perf_counter() - t
        s.project(Totals(), kind=KIND, snapshot=True, snapshot_every=1)  # the snapshot at N
        fill(s, events, extra)
        covered = events + extra
        zero = []
        for _ in range(3):
            t = time.perf_counter()
            state_zero = s.project(Totals(), kind=KIND)
            zero.append(time.perf_counter() - t)
        snap = []
        for _ in range(3):
            t = time.perf_counter()
            state_snap = s.project(Totals(), kind=KIND, snapshot=True, snapshot_every=10**9)  # do not rewrite it
            snap.append(time.perf_counter() - t)
        assert state_snap == state_zero and sum(r[0] for r in state_zero.values()) == covered
        p = Totals()
        s.project_if_changed(p, kind=KIND)
        t = time.perf_counter()
        for _ in range(10_000):
            s.project_if_changed(p, kind=KIND)
        cached_us = (time.perf_counter() - t) / 10_000 * 1e6
    zero_s, snap_s = statistics.median(zero), statistics.median(snap)
    return {
        "events": covered, "since_snapshot": extra, "fill_events_per_s": events / fill_s,
        "from_zero_s": zero_s, "from_zero_events_per_s": covered / zero_s,
        "from_snapshot_s": snap_s, "from_snapshot_events_per_s": covered / snap_s,
        "project_if_changed_unchanged_us": cached_us,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer appends and events (a smoke run)")
    ap.add_argument("--appends", type=int, default=None, help="appends per latency run (default 1000; quick 200)")
    ap.add_argument("--pause-ms", type=float, default=2.0, help="pause between the appender's appends")
    ap.add_argument("--events", type=int, default=None, help="events for the rebuild (default 200000; quick 20000)")
    ap.add_argument("--subscribers", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    appends = args.appends or (200 if args.quick else 1000)
    events = args.events or (20_000 if args.quick else 200_000)

    results: dict[str, Any] = {"cpus": os.cpu_count(), "latency": [], "rebuild": None}
    for n in args.subscribers:
        row = latency(n, appends, args.pause_ms / 1000)
        results["latency"].append(row)
    results["rebuild"] = rebuild(events)

    print(f"\ncommit-to-subscriber latency ({appends} paced single appends, {os.cpu_count()} CPUs)")
    print(f"{'subscribers':>11} | {'from return p50':>15} | {'p99':>8} | {'from call p50':>13} | {'p99':>8} | missing")
    for row in results["latency"]:
        print(f"{row['subscribers']:>11} | {row['from_return_p50_ms']:>12.3f} ms | {row['from_return_p99_ms']:>5.2f} ms"
              f" | {row['from_call_p50_ms']:>10.3f} ms | {row['from_call_p99_ms']:>5.2f} ms | {row['missing']}")
    rb = results["rebuild"]
    print(f"\nprojection rebuild ({rb['events']} events; snapshot {rb['since_snapshot']} events behind)")
    print(f"{'start':>14} | {'time':>9} | {'events/s':>12}")
    print(f"{'from zero':>14} | {rb['from_zero_s']:>7.3f} s | {rb['from_zero_events_per_s']:>12,.0f}")
    print(f"{'from snapshot':>14} | {rb['from_snapshot_s']:>7.3f} s | {rb['from_snapshot_events_per_s']:>12,.0f}")
    print(f"project_if_changed with nothing new: {rb['project_if_changed_unchanged_us']:.1f} µs per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
