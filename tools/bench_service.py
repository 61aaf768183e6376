"""Side-by-side benchmark of the batpak-mp service against what a user would pick instead.

Owns: the multiprocess workloads of issues 3 and 11, each run in the same invocation
against its baseline so the printed ratios are comparable even on a noisy shared machine:

  singles16  durable single appends, 16 client processes   vs SQLite WAL synchronous=FULL, 16 processes
                                                           (and SQLite synchronous=NORMAL, not durable)
  batched4   durable batches of 100, 4 client processes     vs LMDB sync=True, 4 processes, 100 puts/txn
  reads4     point reads by id, 4 client processes          vs SQLite and LMDB point reads, 4 processes
  threads8   8 threads appending through one Store          vs 8 processes, one Store each
  aio100     bp.aio: 100 appends in flight from one process's event loop
                                                           vs the sync API from 16 processes (issue 14)
  groups     single appends from 1, 4, 16 and 64 client processes: commit group sizes (the
             writer's histogram, BATPAK_MP_GROUP_STATS), throughput and CPU per append
  latency    single-append latency p50/p99, 1 client        vs write+fdatasync of 256 bytes on the same disk
  attach     connect() time and client RSS on an N-event store (default 1M; --quick: 100k)

CPU per acknowledged append is the CPU time of every process involved (writer,
supervisor and clients: /proc/<pid>/stat for the first two, each client's own
process_time) over the measured window, divided by the appends acknowledged in it; for
the baselines it is their client processes' CPU. It does not drift with machine noise
the way throughput does. Which codec serves (``bp.codec_backend()``) is recorded: run
under BATPAK_MP_PURE=1 for the pure-Python fallback (every process inherits it).

Run:  python tools/bench_service.py [--quick] [--seconds S] [--repeat R] [--only LIST] [--json FILE]
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
import tempfile
import threading
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
GROUP_STATS_ENV = "BATPAK_MP_GROUP_STATS"  # batpak_mp.writer writes its commit-group sizes there at a clean stop
GROUP_PROCS = (1, 4, 16, 64)
WORKLOADS = ("singles16", "batched4", "reads4", "threads8", "aio100", "groups", "latency", "attach")
CLK_TCK = os.sysconf("SC_CLK_TCK")

Result = tuple[int, float]  # (operations, CPU seconds of the process that did them)


def fresh(name: str) -> str:
    path = os.path.join(ROOT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o700)  # a data directory must be the owner's alone (bp.serve refuses anything else)
    return path


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) a live process has used; 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def run_parallel(nproc: int, fn: Callable[..., Result], args: tuple[Any, ...], seconds: float,
                 watch: tuple[int, ...] = ()) -> tuple[int, float]:
    """Run ``fn(worker, start_at, stop_at, *args)`` in ``nproc`` forked processes; returns
    (operations, CPU seconds of the workers plus the ``watch`` processes in the window)."""
    start_at = time.time() + 0.5 + nproc * 0.02
    with mp.get_context("fork").Pool(nproc) as pool:
        pending = pool.starmap_async(fn, [(w, start_at, start_at + seconds, *args) for w in range(nproc)])
        _wait(start_at)
        before = sum(proc_cpu(pid) for pid in watch)
        results = pending.get()
        after = sum(proc_cpu(pid) for pid in watch)
    return sum(n for n, _ in results), sum(c for _, c in results) + after - before


def _wait(t: float) -> None:
    while time.time() < t:
        time.sleep(0.001)


def served(svc: bp.Service) -> tuple[int, int]:
    """The writer's and the supervisor's pids of a running service."""
    status = svc.status()
    return status["writer_pid"], status["supervisor_pid"]


# ---- workers: each returns (operations, its CPU seconds in the window) -------------------
def bp_singles(w: int, start: float, stop: float, data_dir: str) -> Result:
    n = 0
    with bp.connect(data_dir) as s:
        c = bp.Coordinate(f"worker-{w}", "bench")
        _wait(start)
        cpu = time.process_time()
        while time.time() < stop:
            s.append(c, KIND, PAYLOAD)
            n += 1
        cpu = time.process_time() - cpu
    return n, cpu


def sqlite_connect(path: str, synchronous: str = "FULL") -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def sqlite_singles(w: int, start: float, stop: float, path: str, synchronous: str) -> Result:
    n = 0
    db = sqlite_connect(path, synchronous)
    _wait(start)
    cpu = time.process_time()
    while time.time() < stop:
        db.execute("INSERT INTO events(entity, payload) VALUES (?, ?)", (f"worker-{w}", PAYLOAD_BYTES))
        n += 1
    cpu = time.process_time() - cpu
    db.close()
    return n, cpu


def bp_batched(w: int, start: float, stop: float, data_dir: str) -> Result:
    n = 0
    with bp.connect(data_dir) as s:
        items = [bp.BatchItem(bp.Coordinate(f"w{w}-e{i}", "bench"), KIND, PAYLOAD) for i in range(100)]
        _wait(start)
        cpu = time.process_time()
        while time.time() < stop:
            s.append_batch(items)
            n += 100
        cpu = time.process_time() - cpu
    return n, cpu


def lmdb_batched(w: int, start: float, stop: float, path: str) -> Result:
    n = 0
    env = lmdb.open(path, map_size=8 << 30, sync=True, metasync=True, lock=True)
    key = 0
    _wait(start)
    cpu = time.process_time()
    while time.time() < stop:
        with env.begin(write=True) as txn:
            for _ in range(100):
                key += 1
                txn.put(f"{w:04d}-{key:012d}".encode(), PAYLOAD_BYTES)
        n += 100
    cpu = time.process_time() - cpu
    env.close()
    return n, cpu


def bp_reads(w: int, start: float, stop: float, data_dir: str, ids: list[bytes]) -> Result:
    n = 0
    rng = random.Random(w)
    with bp.connect(data_dir) as s:
        get = s.get
        _wait(start)
        cpu = time.process_time()
        while time.time() < stop:
            for _ in range(200):
                _ = get(ids[rng.randrange(len(ids))]).payload  # decode, as the baselines do
            n += 200
        cpu = time.process_time() - cpu
    return n, cpu


def sqlite_reads(w: int, start: float, stop: float, path: str, count: int) -> Result:
    n = 0
    rng = random.Random(w)
    db = sqlite_connect(path)
    q = "SELECT entity, payload FROM events WHERE id = ?"
    _wait(start)
    cpu = time.process_time()
    while time.time() < stop:
        for _ in range(200):
            row = db.execute(q, (rng.randrange(1, count + 1),)).fetchone()
            msgpack.unpackb(row[1])
        n += 200
    cpu = time.process_time() - cpu
    db.close()
    return n, cpu


def lmdb_reads(w: int, start: float, stop: float, path: str, count: int) -> Result:
    n = 0
    rng = random.Random(w)
    env = lmdb.open(path, map_size=8 << 30, readonly=True, lock=True)
    _wait(start)
    cpu = time.process_time()
    while time.time() < stop:
        with env.begin() as txn:
            for _ in range(200):
                value = txn.get(rng.randrange(1, count + 1).to_bytes(8, "big")) or b""
                msgpack.unpackb(value[LMDB_VALUE_HEAD:])
        n += 200
    cpu = time.process_time() - cpu
    env.close()
    return n, cpu


LMDB_VALUE_HEAD = 8  # a read row is an 8-byte entity tag, then the msgpack payload


def threads_appending(w: int, start: float, stop: float, data_dir: str, threads: int) -> Result:
    """``threads`` threads appending single events through one Store of this process."""
    counts = [0] * threads
    with bp.connect(data_dir) as s:
        def run(t: int) -> None:
            c = bp.Coordinate(f"thread-{w}-{t}", "bench")
            n = 0
            _wait(start)
            while time.time() < stop:
                s.append(c, KIND, PAYLOAD)
                n += 1
            counts[t] = n
        pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        _wait(start)
        cpu = time.process_time()
        for th in pool:
            th.join()
        cpu = time.process_time() - cpu
    return sum(counts), cpu


def aio_appending(w: int, start: float, stop: float, data_dir: str, in_flight: int) -> Result:
    """``in_flight`` coroutines appending single events through one AsyncStore of this process."""
    import asyncio

    async def main() -> Result:
        counts = [0] * in_flight
        async with await bp.aio.connect(data_dir) as s:
            async def run(t: int) -> None:
                c = bp.Coordinate(f"aio-{w}-{t}", "bench")
                while time.time() < stop:
                    await s.append(c, KIND, PAYLOAD)
                    counts[t] += 1

            await asyncio.sleep(max(0.0, start - time.time()))
            cpu = time.process_time()
            await asyncio.gather(*(run(t) for t in range(in_flight)))
            cpu = time.process_time() - cpu
        return sum(counts), cpu

    return asyncio.run(main())


# ---- workloads: each returns {"batpak": {...}, "<baseline>": {...}} of rate and CPU ------
def figures(ops: int, cpu: float, seconds: float) -> dict[str, float]:
    return {"rate": ops / seconds, "cpu_us": cpu / ops * 1e6 if ops else 0.0, "ops": ops}


def workload_singles(seconds: float, procs: int) -> dict[str, dict[str, float]]:
    d = fresh("singles-bp")
    out = {}
    with bp.serve(d) as svc:
        out["batpak"] = figures(*run_parallel(procs, bp_singles, (d,), seconds, served(svc)), seconds)
    for sync, name in (("FULL", "SQLite"), ("NORMAL", "SQLite NORMAL")):
        path = os.path.join(fresh("singles-sqlite"), "db.sqlite")
        db = sqlite_connect(path, sync)
        db.execute("CREATE TABLE events(id INTEGER PRIMARY KEY, entity TEXT, payload BLOB)")
        db.close()
        out[name] = figures(*run_parallel(procs, sqlite_singles, (path, sync), seconds), seconds)
    return out


def workload_batched(seconds: float, procs: int) -> dict[str, dict[str, float]]:
    d = fresh("batched-bp")
    out = {}
    with bp.serve(d) as svc:
        out["batpak"] = figures(*run_parallel(procs, bp_batched, (d,), seconds, served(svc)), seconds)
    out["LMDB"] = figures(*run_parallel(procs, lmdb_batched, (fresh("batched-lmdb"),), seconds), seconds)
    return out


def workload_reads(seconds: float, procs: int, count: int) -> dict[str, dict[str, float]]:
    d = fresh("reads-bp")
    out = {}
    with bp.serve(d):
        ids = []
        with bp.connect(d) as s:
            for i in range(0, count, 1000):
                rs = s.append_batch([bp.BatchItem(bp.Coordinate(f"e{j % 1000}", "bench"), KIND, PAYLOAD)
                                     for j in range(i, min(i + 1000, count))])
                ids += [r.event_id for r in rs]
        out["batpak"] = figures(*run_parallel(procs, bp_reads, (d, ids), seconds), seconds)
    path = os.path.join(fresh("reads-sqlite"), "db.sqlite")
    db = sqlite_connect(path)
    db.execute("CREATE TABLE events(id INTEGER PRIMARY KEY, entity TEXT, payload BLOB)")
    db.execute("BEGIN")
    db.executemany("INSERT INTO events(entity, payload) VALUES (?, ?)",
                   ((f"e{j % 1000}", PAYLOAD_BYTES) for j in range(count)))
    db.execute("COMMIT")
    db.close()
    out["SQLite"] = figures(*run_parallel(procs, sqlite_reads, (path, count), seconds), seconds)
    path = fresh("reads-lmdb")
    env = lmdb.open(path, map_size=8 << 30, sync=True, metasync=True)
    with env.begin(write=True) as txn:
        txn.cursor().putmulti(((j + 1).to_bytes(8, "big"), f"e{j % 1000:07d}".encode()[:LMDB_VALUE_HEAD] + PAYLOAD_BYTES)
                              for j in range(count))
    env.close()
    out["LMDB"] = figures(*run_parallel(procs, lmdb_reads, (path, count), seconds), seconds)
    return out


def workload_threads(seconds: float, threads: int) -> dict[str, dict[str, float]]:
    out = {}
    d = fresh("threads-bp")
    with bp.serve(d) as svc:
        out["batpak"] = figures(*run_parallel(1, threads_appending, (d, threads), seconds, served(svc)), seconds)
    d = fresh("threads-procs")
    with bp.serve(d) as svc:
        out[f"{threads} processes"] = figures(*run_parallel(threads, bp_singles, (d,), seconds, served(svc)), seconds)
    return out


def workload_aio(seconds: float, in_flight: int, procs: int) -> dict[str, dict[str, float]]:
    out = {}
    d = fresh("aio-bp")
    with bp.serve(d) as svc:
        out["batpak"] = figures(*run_parallel(1, aio_appending, (d, in_flight), seconds, served(svc)), seconds)
    d = fresh("aio-procs")
    with bp.serve(d) as svc:
        out[f"sync, {procs} processes"] = figures(*run_parallel(procs, bp_singles, (d,), seconds, served(svc)), seconds)
    return out


def group_sizes(procs: int, seconds: float) -> dict[str, Any]:
    """Single appends from ``procs`` processes; the writer's histogram of requests per
    commit group, with the throughput and the CPU per append of the same run."""
    d = fresh(f"groups-{procs}")
    fd, stats = tempfile.mkstemp(prefix="bench-groups-", suffix=".txt")
    os.close(fd)
    old = os.environ.get(GROUP_STATS_ENV)
    os.environ[GROUP_STATS_ENV] = stats  # the supervisor, and the writer it starts, inherit it
    try:
        with bp.serve(d) as svc:
            ops, cpu = run_parallel(procs, bp_singles, (d,), seconds, served(svc))
        with open(stats) as f:
            hist = {int(a): int(b) for a, b in (line.split() for line in f if line.strip())}
    finally:
        os.unlink(stats)
        if old is None:
            os.environ.pop(GROUP_STATS_ENV, None)
        else:
            os.environ[GROUP_STATS_ENV] = old
    sizes = sorted(hist)
    groups = sum(hist.values())
    requests = sum(k * v for k, v in hist.items())

    def pct(p: float) -> int:  # the group size at which p of the requests sit in a group that large or smaller
        acc = 0
        for k in sizes:
            acc += k * hist[k]
            if acc >= p * requests:
                return k
        return sizes[-1] if sizes else 0

    return {"procs": procs, **figures(ops, cpu, seconds), "groups": groups, "requests": requests,
            "mean": requests / groups if groups else 0.0, "p50": pct(0.5), "p90": pct(0.9),
            "max": sizes[-1] if sizes else 0, "histogram": {str(k): hist[k] for k in sizes}}


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
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "codec": bp.codec_backend()}


# ---- the runs -----------------------------------------------------------------------------
ROWS: dict[str, tuple[str, str]] = {  # workload -> (the baseline its ratio is taken against, unit)
    "singles16": ("SQLite", "events/s"),
    "batched4": ("LMDB", "events/s"),
    "reads4": ("SQLite", "reads/s"),
    "threads8": ("8 processes", "events/s"),
    "aio100": ("sync, 16 processes", "events/s"),
}


def ratio_row(name: str, repeat: int, fn: Callable[[], dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Run a workload ``repeat`` times: per backend the median rate and CPU per operation,
    per baseline the median of the per-run ratios batpak / baseline."""
    runs = [fn() for _ in range(repeat)]
    names = list(runs[0])
    med = {b: {k: statistics.median(r[b][k] for r in runs) for k in ("rate", "cpu_us")} for b in names}
    ratios = {b: statistics.median(r["batpak"]["rate"] / r[b]["rate"] for r in runs) for b in names if b != "batpak"}
    baseline, unit = ROWS[name]
    row = {"workload": name, "unit": unit, "baseline": baseline, "batpak": med["batpak"]["rate"],
           "baseline_value": med[baseline]["rate"], "ratio": ratios[baseline], "ratios": ratios, "median": med,
           "runs": runs}
    others = "  ".join(f"{b} {med[b]['rate']:,.0f} (ratio {ratios[b]:.2f}x)" for b in names if b != "batpak")
    print(f"{name:10s} batpak {med['batpak']['rate']:>11,.0f} {unit} ({med['batpak']['cpu_us']:.0f} us CPU/op)  "
          f"{others}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short runs")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--attach-events", type=int, default=None)
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    only = set(a.only.split(","))
    if not only <= set(WORKLOADS):
        ap.error(f"--only takes a subset of {','.join(WORKLOADS)}")
    seconds = a.seconds or (1.5 if a.quick else 4.0)
    repeat = 1 if a.quick else a.repeat
    os.makedirs(ROOT, exist_ok=True)
    info = machine()
    print(f"batpak-mp service benchmark — {info['date']} — {info['cpus']} CPUs, {info['cpu']}, "
          f"Python {info['python']}, {info['fs']}, codec {info['codec']}; median of {repeat} run(s) of {seconds:g}s")
    rows: list[dict[str, Any]] = []
    if "singles16" in only:
        rows.append(ratio_row("singles16", repeat, lambda: workload_singles(seconds, 16)))
    if "batched4" in only:
        rows.append(ratio_row("batched4", repeat, lambda: workload_batched(seconds, 4)))
    if "reads4" in only:
        count = 20_000 if a.quick else 200_000
        rows.append(ratio_row("reads4", repeat, lambda: workload_reads(seconds, 4, count)))
    if "threads8" in only:
        rows.append(ratio_row("threads8", repeat, lambda: workload_threads(seconds, 8)))
    if "aio100" in only:
        rows.append(ratio_row("aio100", repeat, lambda: workload_aio(seconds, 100, 16)))
    extra: dict[str, Any] = {}
    if "groups" in only:
        extra["groups"] = []
        for procs in GROUP_PROCS:
            g = group_sizes(procs, seconds)
            extra["groups"].append(g)
            print(f"groups     {procs:2d} processes: {g['rate']:>9,.0f} appends/s, {g['cpu_us']:.0f} us CPU/append, "
                  f"requests per group mean {g['mean']:.1f}, p50 {g['p50']}, p90 {g['p90']}, max {g['max']}", flush=True)
    if "latency" in only:
        extra["latency"] = lat = workload_latency(300 if a.quick else 2000)
        print(f"latency    append p50 {lat['append_p50_us']:.0f} us, p99 {lat['append_p99_us']:.0f} us;  "
              f"disk write+fdatasync p50 {lat['fsync_p50_us']:.0f} us, p99 {lat['fsync_p99_us']:.0f} us")
    if "attach" in only:
        count = a.attach_events or (100_000 if a.quick else 1_000_000)
        extra["attach"] = at = workload_attach(count, 3 if a.quick else 7)
        print(f"attach     {at['events']:,} events: connect {at['attach_ms']:.1f} ms (target < 50), first reads "
              f"{at['first_reads_ms']:.1f} ms, client RSS +{at['rss_over_bare_mib']:.1f} MiB over a bare "
              f"interpreter (target < 30)")
    doc = {"machine": info, "codec": info["codec"], "seconds": seconds, "repeat": repeat, "rows": rows, **extra}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
