#!/usr/bin/env python3
"""Consumer-group throughput with 1, 2 and 4 member processes (issue 14 #4).

Owns: one served store (``bench-data/groups/``) holding ``--events`` events; for each
member count, a fresh group (``store.cursor(name, group=True)``) whose members are real
processes that each take an event, spend ``--work-ms`` on it (a sleep: the I/O-bound
handler a group exists to spread), acknowledge it, and report. The clock runs from the
moment every member is attached to the moment the last event is acknowledged; the figure
is events per second, the median of ``--repeat`` runs, with the ratio to one member in the
same run. ``--work-ms 0`` measures the group's own overhead (claims and progress are
compare-and-set appends, one durable round trip each).
Not a test: ``python tools/bench_groups.py --help``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import multiprocess as mp  # noqa: E402

import batpak_mp as bp  # noqa: E402

K = bp.Kind(1, 1)
S = "jobs"
CTX = mp.get_context("spawn")


def member(data_dir: str, name: str, work_s: float, chunk: int, ack_every: int, go: Any, q: Any) -> None:
    with bp.connect(data_dir) as s:
        m = s.cursor(name, scope=S, group=True, chunk=chunk, ack_every=ack_every)
        q.put("ready")
        go.wait()
        n = 0
        while (ev := m.next(1.0)) is not None:
            if work_s:
                time.sleep(work_s)
            m.ack(ev)
            n += 1
        m.close()
        q.put(("count", n, time.monotonic()))


def run(data_dir: str, members: int, events: int, work_s: float, chunk: int, ack_every: int, tag: str) -> float:
    go, q = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=member, args=(data_dir, f"g-{tag}", work_s, chunk, ack_every, go, q))
             for _ in range(members)]
    for p in procs:
        p.start()
    for _ in procs:
        assert q.get(timeout=60) == "ready"
    started = time.monotonic()
    go.set()
    counts, ends = [], []
    for _ in procs:
        _, n, end = q.get(timeout=600)
        counts.append(n)
        ends.append(end - 1.0)  # each member waited 1 s idle before it left
    for p in procs:
        p.join(30)
    assert sum(counts) >= events, counts
    return float(events / (max(ends) - started))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--work-ms", type=float, default=1.0)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--ack-every", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    data_dir = os.path.join(ROOT, "bench-data", "groups")
    shutil.rmtree(data_dir, ignore_errors=True)
    with bp.serve(data_dir) as _, bp.connect(data_dir) as s:
        s.append_batch([bp.BatchItem(bp.Coordinate(f"job-{i}", S), K, i) for i in range(args.events)])
        rates: dict[int, list[float]] = {1: [], 2: [], 4: []}
        for r in range(args.repeat):
            for k in rates:
                rates[k].append(run(data_dir, k, args.events, args.work_ms / 1000, args.chunk, args.ack_every,
                                    f"{r}-{k}"))
    base = statistics.median(rates[1])
    print(f"codec {bp.codec_backend()}, {args.events} events, work {args.work_ms} ms/event, chunk {args.chunk}, "
          f"progress every {args.ack_every} acks, median of {args.repeat}")
    for k, values in rates.items():
        med = statistics.median(values)
        print(f"{k} member(s): {med:9.0f} events/s   x{med / base:.2f} vs 1 member")
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
