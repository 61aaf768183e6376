#!/usr/bin/env python3
"""Query latency that grows with the events returned, not with the log (issues 14 #3, 15 #2).

Owns: two stores built in this run with the in-process ``Engine`` (``--small`` events,
default 10,000, and ``--large``, default 1,000,000: batches of 10,000 events), the same
shape each (5,000 entities ``acct:<n>`` in 50 scopes ``tenant:<n>``, a hot entity
``acct:hot`` holding 1 event in 10, a rare entity prefix ``order:<n>:line`` near the end),
and the median latency of each query on both (calls alternating between the two stores,
so that both meet the same machine), with the ratio large / small:

  history(newest_first, limit=10)   the hot entity: its chain from the head
  latest(entity)                    one table look-up
  latest_in_scope(scope)            one table look-up
  query_scope(after_position, 10)   O(log n) seek along the scope's skip links
  prefix query, limit 10            query_after(region=Region(entity_prefix="order")) from
                                    the start: the tag index's postings of the prefix
  kind query, limit 10              query_after(kind=...) of a rare kind: the kind's postings
  category query, limit 10          Region(category=2): the category's postings
  scope query, limit 10             query_after(scope=...) from the middle of the log
  entity query, limit 10            query_after(entity=...): the entity's chain, not the log

A ratio near 1 means the call does not grow with the log. Every figure is the median of
``--repeat`` timed calls (after one warm-up), in µs of wall time and of this process's CPU.
Data goes under ``bench-data/queries/`` (gitignored). Not a test: ``python
tools/bench_queries.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import batpak_mp as bp  # noqa: E402

K = bp.Kind(1, 1)
ORDER = bp.Kind(2, 5)
BATCH = 10_000  # events per append_batch while building
ENTITIES = 5_000
SCOPES = 50


def build(path: str, events: int) -> float:
    """A store of ``events`` events (seconds taken). The rare prefix is in the last 1%."""
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    with bp.Engine.open(path, bp.EngineConfig(segment_max_bytes=256 << 20, sync=bp.SyncMode.NONE)) as e:
        n = 0
        while n < events:
            items = []
            for i in range(n, min(n + BATCH, events)):
                if i % 10 == 0:
                    coord = bp.Coordinate("acct:hot", "tenant:hot")
                elif i >= events * 99 // 100 and i % 7 == 0:
                    coord = bp.Coordinate(f"order:{i % 13}:line", f"tenant:{i % SCOPES}")
                else:
                    coord = bp.Coordinate(f"acct:{i % ENTITIES}", f"tenant:{i % SCOPES}")
                items.append(bp.BatchItem(coord, ORDER if coord.entity.startswith("order") else K, {"i": i}))
            e.append_batch(items)
            n += len(items)
        e.sync()
    return time.perf_counter() - started


def timed_pair(small: Callable[[], Any], large: Callable[[], Any], repeat: int) -> tuple[tuple[float, float], ...]:
    """((median wall µs, median CPU µs) of ``small``, the same of ``large``): ``repeat``
    calls of each after one warm-up, alternating, so both meet the same machine (noise
    that drifts, write-back of the stores just built) and the ratio compares like with like."""
    small()
    large()
    samples: tuple[tuple[list[float], list[float]], ...] = (([], []), ([], []))
    for _ in range(repeat):
        for fn, (wall, cpu) in zip((small, large), samples, strict=True):
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall.append((time.perf_counter() - w) * 1e6)
            cpu.append((time.process_time() - c) * 1e6)
    return tuple((statistics.median(wall), statistics.median(cpu)) for wall, cpu in samples)


def queries(e: bp.Engine) -> dict[str, Callable[[], Any]]:
    top = e.latest_in_scope("tenant:7")
    middle = (top.scope_position or 2) // 2 if top is not None else 0
    checks: dict[str, Callable[[], Any]] = {
        "history(newest_first, limit=10)": lambda: e.history("acct:hot", newest_first=True, limit=10),
        "latest(entity)": lambda: e.latest("acct:42"),
        "latest_in_scope(scope)": lambda: e.latest_in_scope("tenant:7"),
        "query_scope(mid, limit=10)": lambda: e.query_scope("tenant:7", middle, limit=10),
        "prefix query, limit 10": lambda: e.query_after(0, limit=10, region=bp.Region(entity_prefix="order")),
        "kind query, limit 10": lambda: e.query_after(0, limit=10, kind=ORDER),
        "category query, limit 10": lambda: e.query_after(0, limit=10, region=bp.Region(category=ORDER.category)),
        "scope query, limit 10": lambda: e.query_after(e.visible // 2, limit=10, scope="tenant:7"),
        "entity query, limit 10": lambda: e.query_after(e.visible - 2000, limit=10, entity="acct:hot"),
    }
    # each answers something: a bench of empty answers would prove nothing
    for name, fn in checks.items():
        got = fn()
        count = (len(got) if isinstance(got, list) else len(got.events) if isinstance(got, bp.Page)
                 else int(got is not None))
        assert count, f"{name} found nothing"
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the stores (and reuse them next time)")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 2,000 vs 100,000 events, 30 calls each")
    ap.add_argument("--json", help="also write the figures to this file (tools/bench.py reads it)")
    args = ap.parse_args()
    if args.quick:
        args.small, args.large, args.repeat = 2_000, 100_000, 30
    base = os.path.join(ROOT, "bench-data", "queries")
    os.makedirs(base, exist_ok=True)
    print(f"codec: {bp.codec_backend()}")
    paths = []
    for label, n in (("small", args.small), ("large", args.large)):
        path = os.path.join(base, f"{label}-{n}")
        if not (args.keep and os.path.isdir(path)):
            print(f"building {n:,} events ... ", end="", flush=True)
            print(f"{build(path, n):.1f} s")
        paths.append(path)
    os.sync()  # the stores' write-back done before anything is timed
    results: dict[str, dict[str, tuple[float, float]]] = {"small": {}, "large": {}}
    with bp.Engine.open(paths[0]) as small, bp.Engine.open(paths[1]) as large:
        on_small, on_large = queries(small), queries(large)
        for name in on_small:
            results["small"][name], results["large"][name] = timed_pair(on_small[name], on_large[name], args.repeat)
    if not args.keep:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
    print(f"\n{'query':34} {f'{args.small:,}: µs (cpu)':>18} {f'{args.large:,}: µs (cpu)':>18} {'ratio':>7}")
    rows = []
    for name in results["small"]:
        (sw, sc), (lw, lc) = results["small"][name], results["large"][name]
        print(f"{name:34} {sw:10.1f} ({sc:7.1f}) {lw:10.1f} ({lc:7.1f}) {lw / sw:7.2f}")
        rows.append({"query": name, "small_us": sw, "small_cpu_us": sc, "large_us": lw, "large_cpu_us": lc,
                     "ratio": lw / sw})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"codec": bp.codec_backend(), "small": args.small, "large": args.large, "repeat": args.repeat,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
