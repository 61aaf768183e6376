"""Side-by-side benchmark of the batpak-mp service against what a user would pick instead.

Owns: the multiprocess workloads of issue 3, each run in the same invocation against
its baseline so the printed ratios are comparable even on a noisy shared machine:

  singles16  durable single appends, 16 client processes   vs SQLite WAL synchronous=FULL, 16 processes
  batched4   durable batches of 100, 4 client processes     vs LMDB sync=True, 4 processes, 100 puts/txn
  reads4     point reads by id, 4 client processes          vs SQLite point reads, 4 processes
  latency    single-append latency p50/p99, 1 client        vs write+fdatasync of 256 bytes on the same disk
  attach     connect() time and client RSS on an N-event store (default 1M; --quick: 100k)

Run:  python tools/bench_service.py [--quick] [--seconds S] [--repeat R] [--json FILE] [--markdown FILE]
Each throughput figure is the median of R runs. This is a tool, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import lmdb
import msgpack
import multiprocess as mp

import batpak_mp as bp

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-data", "service")
PAYLOAD = {"user": "alice", "action": "move", "x": 10, "y": 20, "pad": "x" * 140}
PAYLOAD_BYTES = msgpack.packb(PAYLOAD)
KIND = bp.Kind(1, 1)


def fresh(name: str) -> str:
    path = os.path.join(ROOT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def run_parallel(nproc: int, fn: Callable[..., Any], args: tuple[Any, ...], seconds: float) -> list[Any]:
    """Run ``fn(worker, start_at, stop_at, *args)`` in ``nproc`` forked processes."""
    start_at = time.time() + 0.5
    with mp.get_context("fork").Pool(nproc) as pool:
        return pool.starmap(fn, [(w, start_at, start_at + seconds, *args) for w in range(nproc)])


def _wait(t: float) -> None:
    while time.time() < t:
        time.sleep(0.001)


# ---- workers ------------------------------------------------------------------------
def bp_singles(w: int, start: float, stop: float, data_dir: str) -> int:
    n = 0
    with bp.connect(data_dir) as s:
        c = bp.Coordinate(f"worker-{w}", "bench")
        _wait(start)
        while time.time() < stop:
            s.append(c, KIND, PAYLOAD)
            n += 1
    return n


def sqlite_connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def sqlite_singles(w: int, start: float, stop: float, path: str) -> int:
    n = 0
    db = sqlite_connect(path)
    _wait(start)
    while time.time() < stop:
        db.execute("INSERT INTO events(entity, payload) VALUES (?, ?)", (f"worker-{w}", PAYLOAD_BYTES))
        n += 1
    db.close()
    return n


def bp_batched(w: int, start: float, stop: float, data_dir: str) -> int:
    n = 0
    with bp.connect(data_dir) as s:
        items = [bp.BatchItem(bp.Coordinate(f"w{w}-e{i}", "bench"), KIND, PAYLOAD) for i in range(100)]
        _wait(start)
        while time.time() < stop:
            s.append_batch(items)
            n += 100
    return n


def lmdb_batched(w: int, start: float, stop: float, path: str) -> int:
    n = 0
    env = lmdb.open(path, map_size=8 << 30, sync=True, metasync=True, lock=True)
    key = 0
    _wait(start)
    while time.time() < stop:
        with env.begin(write=True) as txn:
            for _ in range(100):
                key += 1
                txn.put(f"{w:04d}-{key:012d}".encode(), PAYLOAD_BYTES)
        n += 100
    env.close()
    return n


def bp_reads(w: int, start: float, stop: float, data_dir: str, ids: list[bytes]) -> int:
    n = 0
    rng = random.Random(w)
    with bp.connect(data_dir) as s:
        get = s.get
        _wait(start)
        while time.time() < stop:
            for _ in range(200):
                _ = get(ids[rng.randrange(len(ids))]).payload  # decode, as the SQLite side does
            n += 200
    return n


def sqlite_reads(w: int, start: float, stop: float, path: str, count: int) -> int:
    n = 0
    rng = random.Random(w)
    db = sqlite_connect(path)
    q = "SELECT entity, payload FROM events WHERE id = ?"
    _wait(start)
    while time.time() < stop:
        for _ in range(200):
            row = db.execute(q, (rng.randrange(1, count + 1),)).fetchone()
            msgpack.unpackb(row[1])
        n += 200
    db.close()
    return n


# ---- workloads ----------------------------------------------------------------------
def workload_singles(seconds: float, procs: int) -> tuple[float, float]:
    d = fresh("singles-bp")
    with bp.serve(d):
        bpn = sum(run_parallel(procs, bp_singles, (d,), seconds)) / seconds
    path = os.path.join(fresh("singles-sqlite"), "db.sqlite")
    db = sqlite_connect(path)
    db.execute("CREATE TABLE events(id INTEGER PRIMARY KEY, entity TEXT, payload BLOB)")
    db.close()
    sq = sum(run_parallel(procs, sqlite_singles, (path,), seconds)) / seconds
    return bpn, sq


def workload_batched(seconds: float, procs: int) -> tuple[float, float]:
    d = fresh("batched-bp")
    with bp.serve(d):
        bpn = sum(run_parallel(procs, bp_batched, (d,), seconds)) / seconds
    path = fresh("batched-lmdb")
    lm = sum(run_parallel(procs, lmdb_batched, (path,), seconds)) / seconds
    return bpn, lm


def workload_reads(seconds: float, procs: int, count: int) -> tuple[float, float]:
    d = fresh("reads-bp")
    with bp.serve(d):
        ids = []
        with bp.connect(d) as s:
            for i in range(0, count, 1000):
                rs = s.append_batch([bp.BatchItem(bp.Coordinate(f"e{j % 1000}", "bench"), KIND, PAYLOAD)
                                     for j in range(i, min(i + 1000, count))])
                ids += [r.event_id for r in rs]
        bpn = sum(run_parallel(procs, bp_reads, (d, ids), seconds)) / seconds
    path = os.path.join(fresh("reads-sqlite"), "db.sqlite")
    db = sqlite_connect(path)
    db.execute("CREATE TABLE events(id INTEGER PRIMARY KEY, entity TEXT, payload BLOB)")
    db.execute("BEGIN")
    db.executemany("INSERT INTO events(entity, payload) VALUES (?, ?)",
                   ((f"e{j % 1000}", PAYLOAD_BYTES) for j in range(count)))
    db.execute("COMMIT")
    db.close()
    sq = sum(run_parallel(procs, sqlite_reads, (path, count), seconds)) / seconds
    return bpn, sq


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def workload_latency(n: int) -> dict[str, float]:
    d = fresh("latency-bp")
    lat = []
    with bp.serve(d), bp.connect(d) as s:
        c = bp.Coordinate("lat", "bench")
        for _ in range(50):
            s.append(c, KIND, PAYLOAD)
        for _ in range(n):
            t = time.perf_counter()
            s.append(c, KIND, PAYLOAD)
            lat.append(time.perf_counter() - t)
    f = os.path.join(fresh("latency-fsync"), "f")
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    fs = []
    blob = os.urandom(256)
    for _ in range(n):
        t = time.perf_counter()
        os.write(fd, blob)
        os.fdatasync(fd)
        fs.append(time.perf_counter() - t)
    os.close(fd)
    return {"append_p50_us": percentile(lat, 0.5) * 1e6, "append_p99_us": percentile(lat, 0.99) * 1e6,
            "fsync_p50_us": percentile(fs, 0.5) * 1e6, "fsync_p99_us": percentile(fs, 0.99) * 1e6}


ATTACH_PROBE = r"""
import os, sys, time
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
base = rss()
if sys.argv[1] == "bare":
    print(base, 0.0, 0); sys.exit()
t0 = time.perf_counter()
import batpak_mp as bp
t1 = time.perf_counter()
s = bp.connect(sys.argv[2])
t2 = time.perf_counter()
ev = s.get(bytes.fromhex(sys.argv[3]))
h = s.history(ev.coordinate.entity, limit=10)
t3 = time.perf_counter()
print(rss() - base, (t2 - t1) * 1000, (t3 - t2) * 1000)
"""


def workload_attach(count: int, runs: int) -> dict[str, float]:
    d = fresh("attach-bp")
    t = time.perf_counter()
    with bp.Engine.open(d) as e:
        for i in range(0, count, 1000):
            last = e.append_batch([bp.BatchItem(bp.Coordinate(f"e{j % 10000}", "bench"), KIND, PAYLOAD)
                                   for j in range(i, min(i + 1000, count))])
    build_s = time.perf_counter() - t
    out: dict[str, list[float]] = {"attach_ms": [], "first_reads_ms": [], "rss_over_bare_mib": []}
    with bp.serve(d):
        for _ in range(runs):
            bare = subprocess.run([sys.executable, "-c", ATTACH_PROBE, "bare"], capture_output=True, text=True,
                                  check=True).stdout.split()
            got = subprocess.run([sys.executable, "-c", ATTACH_PROBE, "attach", d, last[-1].event_id.hex()],
                                 capture_output=True, text=True, check=True).stdout.split()
            out["attach_ms"].append(float(got[1]))
            out["first_reads_ms"].append(float(got[2]))
            out["rss_over_bare_mib"].append((int(got[0]) - int(bare[0])) / 2**20)
    return {"events": count, "build_s": build_s, **{k: statistics.median(v) for k, v in out.items()}}


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    fs = subprocess.run(["df", "-T", ROOT], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    return {"cpus": str(os.cpu_count()), "cpu": cpu, "python": sys.version.split()[0], "fs": fs,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short runs")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--attach-events", type=int, default=None)
    ap.add_argument("--only", default="singles16,batched4,reads4,latency,attach")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()
    seconds = a.seconds or (1.5 if a.quick else 4.0)
    repeat = 1 if a.quick else a.repeat
    only = set(a.only.split(","))
    os.makedirs(ROOT, exist_ok=True)
    info = machine()
    print(f"batpak-mp service benchmark — {info['date']} — {info['cpus']} CPUs, {info['cpu']}, "
          f"Python {info['python']}, {info['fs']}; median of {repeat} run(s) of {seconds:g}s")
    rows: list[dict[str, Any]] = []

    def ratio_row(name: str, unit: str, baseline: str, target: float, fn: Callable[[], tuple[float, float]]) -> None:
        pairs = [fn() for _ in range(repeat)]
        ours = statistics.median(p[0] for p in pairs)
        theirs = statistics.median(p[1] for p in pairs)
        ratios = [p[0] / p[1] for p in pairs]
        row = {"workload": name, "unit": unit, "batpak": ours, "baseline": baseline, "baseline_value": theirs,
               "ratio": statistics.median(ratios), "target": target, "runs": pairs}
        rows.append(row)
        print(f"{name:10s} batpak {ours:>11,.0f} {unit}   {baseline} {theirs:>11,.0f}   ratio {row['ratio']:.2f}x "
              f"(target >= {target:g}x)", flush=True)

    if "singles16" in only:
        ratio_row("singles16", "events/s", "SQLite WAL FULL", 5.0, lambda: workload_singles(seconds, 16))
    if "batched4" in only:
        ratio_row("batched4", "events/s", "LMDB sync", 1.0, lambda: workload_batched(seconds, 4))
    if "reads4" in only:
        ratio_row("reads4", "reads/s", "SQLite", 3.0, lambda: workload_reads(seconds, 4, 20_000 if a.quick else 200_000))
    extra: dict[str, Any] = {}
    if "latency" in only:
        extra["latency"] = workload_latency(300 if a.quick else 2000)
        lat = extra["latency"]
        print(f"latency    append p50 {lat['append_p50_us']:.0f} us, p99 {lat['append_p99_us']:.0f} us;  "
              f"disk write+fdatasync p50 {lat['fsync_p50_us']:.0f} us, p99 {lat['fsync_p99_us']:.0f} us")
    if "attach" in only:
        count = a.attach_events or (100_000 if a.quick else 1_000_000)
        extra["attach"] = workload_attach(count, 3 if a.quick else 7)
        at = extra["attach"]
        print(f"attach     {at['events']:,} events: connect {at['attach_ms']:.1f} ms (target < 50), first reads "
              f"{at['first_reads_ms']:.1f} ms, client RSS +{at['rss_over_bare_mib']:.1f} MiB over a bare "
              f"interpreter (target < 30)")
    doc = {"machine": info, "seconds": seconds, "repeat": repeat, "rows": rows, **extra}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Measured {m['date']} on {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, {m['fs']}; "
             f"median of {doc['repeat']} run(s) of {doc['seconds']:g} s each, baselines run in the same invocation.",
             "", "| workload | batpak-mp | baseline | baseline figure | ratio | target |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['workload']} | {r['batpak']:,.0f} {r['unit']} | {r['baseline']} | "
                     f"{r['baseline_value']:,.0f} {r['unit']} | {r['ratio']:.2f}x | >= {r['target']:g}x |")
    if "latency" in doc:
        lat = doc["latency"]
        lines += ["", f"Single-append latency (1 client): p50 {lat['append_p50_us']:.0f} µs, p99 "
                  f"{lat['append_p99_us']:.0f} µs; the disk's 256-byte write+fdatasync: p50 {lat['fsync_p50_us']:.0f} µs, "
                  f"p99 {lat['fsync_p99_us']:.0f} µs."]
    if "attach" in doc:
        at = doc["attach"]
        lines += ["", f"Attach on a {at['events']:,}-event store: `connect()` {at['attach_ms']:.1f} ms (target < 50 ms); "
                  f"first get + history {at['first_reads_ms']:.1f} ms; client RSS {at['rss_over_bare_mib']:.1f} MiB "
                  "above a bare interpreter (target < 30 MiB)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
