#!/usr/bin/env python3
"""Engine benchmark: batpak-mp's in-process ``Engine`` against SQLite and LMDB, in one run.

Owns: the four workloads of docs/BENCHMARKS.md "Engine (in-process)", run side by side
against batpak-mp's ``Engine`` (sync=group), SQLite (WAL, synchronous=FULL) and LMDB
(sync=True), and their report: medians, ratios (batpak / baseline), targets, and the
table as text, JSON and markdown.

  a. batched durable appends: 100 events per commit, ~200-byte msgpack payloads,
     1000 entities round-robin                                  target >= 1.0x LMDB
  b. point reads by id of random stored events                  target >= 3x SQLite
  c. full scan in commit order, payloads not decoded            target >= 2M events/s (issue 11)
  d. reopen of the store (open wall time after a clean close)   target < 1 s

Fairness: every backend gets the same events (entities, kinds, msgpack payload bytes)
and the same random read positions. Backends run one after another, round by round, in
a rotating order, so each ratio compares figures taken minutes apart; absolute figures
drift on a shared machine, ratios much less. The baselines get their rows ready-made
(batpak encodes the payload dict itself, as its API does) and the leanest schema: one
row / key per event keyed by sequence, no entity index, no hash chain. Only the calls
that do the work are timed. Every figure is the median of ``--repeat`` runs.

Data goes under ``bench-data/`` at the project root (gitignored), on the project's own
disk, because the cost of fsync is part of what is measured (not tmpfs).
Not a test: run it by hand, ``python tools/bench_engine.py --help``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import functools
import gc
import json
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lmdb
import msgpack

import batpak_mp as bp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(ROOT, "bench-data")
PAYLOAD_BYTES = 200  # target msgpack size of each payload
PAYLOAD_POOL = 1024  # distinct payloads, reused round-robin (encoding cost is per event anyway)
KIND = bp.Kind(1, 1)
SCOPE = "bench"
PAGE = 1000  # query_after page size in the scan variant

# ---------------------------------------------------------------------------- the events


@dataclass(frozen=True)
class Spec:
    """What every backend stores: event i (0-based, sequence i+1) belongs to entity
    ``i % entities`` and carries payload ``i % PAYLOAD_POOL``."""

    events: int
    batch: int
    entities: int
    reads: int
    repeat: int
    opens: int
    seed: int = 20240601

    @property
    def names(self) -> list[str]:
        return [f"account-{i:05d}" for i in range(self.entities)]


def make_payload(i: int, size: int = PAYLOAD_BYTES) -> dict[str, Any]:
    """A realistic dict whose msgpack encoding is exactly ``size`` bytes."""
    payload: dict[str, Any] = {
        "op": "transfer", "amount": 1000 + i * 7, "currency": "EUR", "ok": True,
        "tags": ["bench", f"t{i % 17}"], "ref": f"ref-{i:08d}", "memo": "",
    }
    short = size - len(msgpack.packb(payload, use_bin_type=True))
    payload["memo"] = "m" * max(short - 1, 0)  # str header grows by one byte past 31 chars
    while len(msgpack.packb(payload, use_bin_type=True)) > size:
        payload["memo"] = payload["memo"][:-1]
    return payload


PAYLOADS = [make_payload(i) for i in range(PAYLOAD_POOL)]
PAYLOAD_RAW = [msgpack.packb(p, use_bin_type=True) for p in PAYLOADS]

# ---------------------------------------------------------------------------- backends


class Backend:
    """One store under test. ``prepare`` builds a commit's input (untimed), ``commit``
    makes it durable (timed); ``read`` and ``scan`` are timed whole."""

    name = "?"

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.path = ""

    def open(self, path: str) -> None:
        raise NotImplementedError

    def create(self, path: str) -> None:
        """Open a fresh, empty store at ``path``."""
        self.open(path)

    def close(self) -> None:
        raise NotImplementedError

    def prepare(self, start: int, count: int) -> Any:
        raise NotImplementedError

    def commit(self, batch: Any) -> Any:
        raise NotImplementedError

    def after_commit(self, result: Any) -> None:
        """Untimed bookkeeping after a commit (batpak keeps the event ids it got)."""

    def read_keys(self, positions: Sequence[int]) -> list[Any]:
        raise NotImplementedError

    def read(self, keys: Sequence[Any]) -> None:
        raise NotImplementedError

    def scan(self) -> int:
        """Read every event in commit order; returns how many."""
        raise NotImplementedError

    def scans(self) -> list[tuple[str, Callable[[], int]]]:
        """The scans workload c measures: (result key, scan)."""
        return [("c", self.scan)]

    def reopen(self) -> float:
        """Open the closed store again; returns the open's wall time in seconds."""
        t0 = time.perf_counter()
        self.open(self.path)
        elapsed = time.perf_counter() - t0
        self.close()
        return elapsed


class Batpak(Backend):
    name = "batpak"

    def __init__(self, spec: Spec) -> None:
        super().__init__(spec)
        self.engine: bp.Engine | None = None
        self.coords = [bp.Coordinate(n, SCOPE) for n in spec.names]
        self.ids: list[bytes] = []
        self.recovery_reports: list[dict[str, Any]] = []

    def open(self, path: str) -> None:
        self.path = path
        self.engine = bp.Engine.open(path)
        self.recovery_reports.append(dict(self.engine.recovery_report))

    def create(self, path: str) -> None:
        self.ids = []
        self.open(path)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def prepare(self, start: int, count: int) -> list[bp.BatchItem]:
        coords, n = self.coords, len(self.coords)
        return [bp.BatchItem(coords[i % n], KIND, PAYLOADS[i % PAYLOAD_POOL]) for i in range(start, start + count)]

    def commit(self, batch: list[bp.BatchItem]) -> list[bp.Receipt]:
        assert self.engine is not None
        return self.engine.append_batch(batch)

    def after_commit(self, result: list[bp.Receipt]) -> None:
        self.ids.extend(r.event_id for r in result)

    def read_keys(self, positions: Sequence[int]) -> list[bytes]:
        return [self.ids[p] for p in positions]

    def read(self, keys: Sequence[bytes]) -> None:
        assert self.engine is not None
        get = self.engine.get
        for k in keys:
            get(k)

    def scan(self) -> int:
        """The reader's ``scan()``: Event objects, payload bytes touched, not decoded."""
        assert self.engine is not None
        n = 0
        for ev in self.engine.reader.scan():
            ev.payload_bytes  # noqa: B018 (touch it, as a consumer would)
            n += 1
        return n

    def scans(self) -> list[tuple[str, Callable[[], int]]]:
        return [("c", self.scan), ("c2", self.scan_pages)]

    def scan_pages(self) -> int:
        """The public paging API: ``query_after`` pages of PAGE events."""
        assert self.engine is not None
        n, after = 0, 0
        while True:
            page = self.engine.query_after(after, limit=PAGE)
            if not page.events:
                return n
            for ev in page.events:
                ev.payload_bytes  # noqa: B018
            n += len(page.events)
            after = page.next_after


class SQLite(Backend):
    name = "SQLite"
    INSERT = "INSERT INTO events (seq, entity, kind, payload) VALUES (?, ?, ?, ?)"
    SELECT = "SELECT entity, kind, payload FROM events WHERE seq = ?"

    def __init__(self, spec: Spec) -> None:
        super().__init__(spec)
        self.conn: sqlite3.Connection | None = None
        self.names = spec.names

    def open(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        conn = sqlite3.connect(os.path.join(path, "events.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, entity TEXT NOT NULL, "
                     "kind INTEGER NOT NULL, payload BLOB NOT NULL)")
        conn.execute("SELECT max(seq) FROM events").fetchone()  # reopen: touch the data, as a user would
        self.conn = conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def prepare(self, start: int, count: int) -> list[tuple[int, str, int, bytes]]:
        names, n, kind = self.names, len(self.names), KIND.packed()
        return [(i + 1, names[i % n], kind, PAYLOAD_RAW[i % PAYLOAD_POOL]) for i in range(start, start + count)]

    def commit(self, batch: list[tuple[int, str, int, bytes]]) -> None:
        assert self.conn is not None
        self.conn.execute("BEGIN")
        self.conn.executemany(self.INSERT, batch)
        self.conn.execute("COMMIT")

    def read_keys(self, positions: Sequence[int]) -> list[int]:
        return [p + 1 for p in positions]

    def read(self, keys: Sequence[int]) -> None:
        assert self.conn is not None
        execute = self.conn.cursor().execute
        sql = self.SELECT
        for k in keys:
            execute(sql, (k,)).fetchone()

    def scan(self) -> int:
        assert self.conn is not None
        n = 0
        for row in self.conn.execute("SELECT seq, entity, kind, payload FROM events ORDER BY seq"):
            row[3]
            n += 1
        return n


class LMDB(Backend):
    name = "LMDB"
    KEY = struct.Struct(">Q")  # big-endian sequence: keys sort in commit order
    VALUE_HEAD = struct.Struct("<HH")  # kind, entity length; then entity, then payload

    def __init__(self, spec: Spec) -> None:
        super().__init__(spec)
        self.env: Any = None
        self.prefix = [self.VALUE_HEAD.pack(KIND.packed(), len(n.encode())) + n.encode() for n in spec.names]
        self.map_size = max(256 << 20, spec.events * 2048)

    def open(self, path: str) -> None:
        self.path = path
        self.env = lmdb.open(path, map_size=self.map_size, sync=True, metasync=True)
        with self.env.begin() as txn:
            txn.cursor().last()  # reopen: touch the data, as a user would

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def prepare(self, start: int, count: int) -> list[tuple[bytes, bytes]]:
        key, prefix, n = self.KEY.pack, self.prefix, len(self.prefix)
        return [(key(i + 1), prefix[i % n] + PAYLOAD_RAW[i % PAYLOAD_POOL]) for i in range(start, start + count)]

    def commit(self, batch: list[tuple[bytes, bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(batch, append=True)

    def read_keys(self, positions: Sequence[int]) -> list[bytes]:
        return [self.KEY.pack(p + 1) for p in positions]

    def read(self, keys: Sequence[bytes]) -> None:
        with self.env.begin() as txn:
            get = txn.get
            for k in keys:
                get(k)

    def scan(self) -> int:
        n = 0
        with self.env.begin() as txn:
            for _key, value in txn.cursor():
                value  # noqa: B018
                n += 1
        return n


BACKENDS: dict[str, type[Backend]] = {"batpak": Batpak, "sqlite": SQLite, "lmdb": LMDB}

# ---------------------------------------------------------------------------- workloads


def fill(backend: Backend, events: int, batch: int) -> float:
    """Append ``events`` in commits of ``batch``; returns the seconds spent in commits."""
    spent = 0.0
    for start in range(0, events, batch):
        prepared = backend.prepare(start, min(batch, events - start))
        t0 = time.perf_counter()
        result = backend.commit(prepared)
        spent += time.perf_counter() - t0
        backend.after_commit(result)
    return spent


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, after a full garbage collection."""
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def rotated(items: list[Backend], r: int) -> list[Backend]:
    """Round r runs the backends in a rotated order, so none always goes first."""
    k = r % len(items)
    return items[k:] + items[:k]


@dataclass
class Results:
    """Per workload, per backend: the figure of every run (rates in 1/s, times in s)."""

    runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, workload: str, backend: str, value: float) -> None:
        self.runs.setdefault(workload, {}).setdefault(backend, []).append(value)

    def median(self, workload: str, backend: str) -> float | None:
        values = self.runs.get(workload, {}).get(backend)
        return statistics.median(values) if values else None


Log = Callable[[str], None]


def bench_appends(spec: Spec, backends: list[Backend], base: str, res: Results, log: Log) -> None:
    """a. A fresh store per backend per round; the last round's stores stay open for b-d."""
    for r in range(spec.repeat):
        for b in rotated(backends, r):
            path = os.path.join(base, f"{b.name.lower()}-{r}")
            b.create(path)
            gc.collect()
            rate = spec.events / fill(b, spec.events, spec.batch)
            res.add("a", b.name, rate)
            log(f"  a  appends   round {r + 1}/{spec.repeat}  {b.name:7s} {fmt_rate(rate)}")
            if r < spec.repeat - 1:
                b.close()
                shutil.rmtree(path)


def bench_reads(spec: Spec, backends: list[Backend], res: Results, log: Log) -> None:
    """b. The same random positions for every backend."""
    rng = random.Random(spec.seed)
    positions = [rng.randrange(spec.events) for _ in range(spec.reads)]
    keys = {b.name: b.read_keys(positions) for b in backends}
    for r in range(spec.repeat):
        for b in rotated(backends, r):
            seconds, _ = timed(functools.partial(b.read, keys[b.name]))
            res.add("b", b.name, spec.reads / seconds)
            log(f"  b  reads     round {r + 1}/{spec.repeat}  {b.name:7s} {fmt_rate(spec.reads / seconds)}")


def bench_scans(spec: Spec, backends: list[Backend], res: Results, log: Log) -> None:
    """c (and c2, batpak's paging API). Every scan must see every event."""
    for r in range(spec.repeat):
        for b in rotated(backends, r):
            for key, scan in b.scans():
                seconds, count = timed(scan)
                if count != spec.events:
                    raise SystemExit(f"{b.name} scanned {count} of {spec.events} events")
                res.add(key, b.name, spec.events / seconds)
                log(f"  {key:2s} scan      round {r + 1}/{spec.repeat}  {b.name:7s} {fmt_rate(spec.events / seconds)}")


def bench_reopens(spec: Spec, backends: list[Backend], res: Results, log: Log) -> None:
    """d. Close cleanly, then time each open (the store is closed again after each)."""
    for b in backends:
        b.close()
        if isinstance(b, Batpak):
            b.recovery_reports.clear()
    for r in range(spec.opens):
        for b in rotated(backends, r):
            seconds = b.reopen()
            res.add("d", b.name, seconds)
            log(f"  d  reopen    round {r + 1}/{spec.opens}  {b.name:7s} {seconds * 1000:.1f} ms")


def run_all(spec: Spec, names: list[str], base: str, log: Log) -> tuple[Results, list[Backend]]:
    backends = [BACKENDS[n](spec) for n in names]
    res = Results()
    bench_appends(spec, backends, base, res, log)
    bench_reads(spec, backends, res, log)
    bench_scans(spec, backends, res, log)
    bench_reopens(spec, backends, res, log)
    return res, backends


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: str
    met: Callable[[Results], bool | None]


def _ratio(res: Results, key: str, baseline: str) -> float | None:
    ours = res.median(key, "batpak")
    theirs = res.median("c" if key == "c2" else key, baseline)
    return ours / theirs if ours and theirs else None


def _at_least(key: str, baseline: str, x: float) -> Callable[[Results], bool | None]:
    def met(res: Results) -> bool | None:
        r = _ratio(res, key, baseline)
        return None if r is None else r >= x
    return met


def _absolute(key: str, ok: Callable[[float], bool]) -> Callable[[Results], bool | None]:
    def met(res: Results) -> bool | None:
        v = res.median(key, "batpak")
        return None if v is None else ok(v)
    return met


ROWS = [
    Row("a", "a. batched durable appends (100/commit)", "events/s", True, ">= 1.0x LMDB", _at_least("a", "LMDB", 1.0)),
    Row("b", "b. point reads by id", "reads/s", True, ">= 3x SQLite", _at_least("b", "SQLite", 3.0)),
    Row("c", "c. full scan, no payload decode (reader.scan)", "events/s", True, ">= 2M/s",
        _absolute("c", lambda v: v >= 2e6)),
    Row("c2", "c'. full scan via query_after pages of 1000", "events/s", True, ">= 1M/s",
        _absolute("c2", lambda v: v >= 1e6)),
    Row("d", "d. reopen (open wall time after close)", "s", False, "< 1 s", _absolute("d", lambda v: v < 1.0)),
]


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M/s"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k/s"
    return f"{v:.0f}/s"


def fmt_value(row: Row, v: float | None) -> str:
    if v is None:
        return "—"
    return fmt_rate(v) if row.higher_is_better else (f"{v:.3f} s" if v >= 0.1 else f"{v * 1000:.1f} ms")


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def table_rows(res: Results) -> list[list[str]]:
    out = []
    for row in ROWS:
        if row.key not in res.runs:
            continue
        base_key = "c" if row.key == "c2" else row.key
        met = row.met(res)
        out.append([
            row.label,
            fmt_value(row, res.median(row.key, "batpak")),
            fmt_value(row, res.median(base_key, "SQLite")),
            fmt_value(row, res.median(base_key, "LMDB")),
            fmt_ratio(_ratio(res, row.key, "SQLite")),
            fmt_ratio(_ratio(res, row.key, "LMDB")),
            row.target,
            "—" if met is None else ("yes" if met else "**no**"),
        ])
    return out


HEADERS = ["workload", "batpak", "SQLite", "LMDB", "batpak/SQLite", "batpak/LMDB", "target", "met"]


def text_table(rows: list[list[str]]) -> str:
    cells = [HEADERS, *[[c.replace("**", "") for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "| --- " + "| ---: " * (len(HEADERS) - 3) + "| --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- machine


def fs_type(path: str) -> str:
    """File system type and device of the mount that holds ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, found = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, kind = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, found = mnt, f"{kind} ({dev} on {mnt})"
    except OSError:
        pass
    return found


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def revision() -> str:
    """The project's git commit, marked ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine(path: str) -> dict[str, str]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": revision(),
        "cpus": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "fs": fs_type(path),
        "sqlite": sqlite3.sqlite_version,
        "lmdb": f"{'.'.join(map(str, lmdb.version()))} (py-lmdb {lmdb.__version__})",
    }


# ---------------------------------------------------------------------------- profile


def profile(spec: Spec, workload: str, base: str, top: int) -> None:
    """Run batpak's side of workload a or b under cProfile (only the timed calls)."""
    b = Batpak(spec)
    b.open(os.path.join(base, "batpak-profile"))
    prof = cProfile.Profile()
    try:
        if workload == "a":
            batches = [b.prepare(s, min(spec.batch, spec.events - s)) for s in range(0, spec.events, spec.batch)]
            prof.enable()
            for batch in batches:
                b.commit(batch)
            prof.disable()
        else:
            fill(b, spec.events, spec.batch)
            keys = b.read_keys([random.Random(spec.seed).randrange(spec.events) for _ in range(spec.reads)])
            prof.enable()
            b.read(keys)
            prof.disable()
    finally:
        b.close()
    for order in ("cumulative", "tottime"):
        print(f"\n=== workload {workload}: top {top} by {order} ===")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats(order).print_stats(top)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run (< 30 s)")
    p.add_argument("--events", type=int, help="events per store (default 1,000,000; 20,000 with --quick)")
    p.add_argument("--reads", type=int, help="point reads per run (default min(events, 200,000))")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    p.add_argument("--opens", type=int, default=5, help="reopens per backend for workload d (default 5)")
    p.add_argument("--batch", type=int, default=100, help="events per commit (default 100)")
    p.add_argument("--entities", type=int, default=1000, help="entities, written round-robin (default 1000)")
    p.add_argument("--backends", default="batpak,sqlite,lmdb", help="comma-separated subset of batpak,sqlite,lmdb")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"where the stores go (default {DEFAULT_DIR})")
    p.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    p.add_argument("--json", metavar="FILE", help="write machine-readable results")
    p.add_argument("--markdown", metavar="FILE", help="write the results as a markdown section")
    p.add_argument("--profile", choices=["a", "b"], help="profile batpak's side of one workload instead")
    p.add_argument("--top", type=int, default=15, help="rows of profile output (default 15)")
    args = p.parse_args(argv)
    names = [n.strip().lower() for n in args.backends.split(",") if n.strip()]
    if not names or any(n not in BACKENDS for n in names):
        p.error(f"--backends takes a subset of {','.join(BACKENDS)}")
    args.backend_names = names
    return args


def make_spec(args: argparse.Namespace) -> Spec:
    events = args.events or (20_000 if args.quick else 1_000_000)
    reads = args.reads or min(events, 20_000 if args.quick else 200_000)
    return Spec(events=events, batch=args.batch, entities=args.entities, reads=reads,
                repeat=max(args.repeat, 1), opens=max(args.opens if not args.quick else min(args.opens, 3), 1))


def command_line(argv: Sequence[str] | None) -> str:
    return "python tools/bench_engine.py " + " ".join(sys.argv[1:] if argv is None else argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = make_spec(args)
    base = os.path.join(os.path.abspath(args.dir), f"engine-{os.getpid()}")
    os.makedirs(base)
    info = machine(base)
    if info["fs"].startswith("tmpfs"):
        print(f"warning: {base} is on tmpfs; fsync costs nothing there", file=sys.stderr)
    try:
        if args.profile:
            profile(spec, args.profile, base, args.top)
            return 0
        print(f"batpak-mp engine benchmark — {info['date']} — codec {bp.codec_backend()}")
        for k, v in info.items():
            print(f"  {k:7s} {v}")
        print(f"  events {spec.events:,} in commits of {spec.batch}, {spec.entities} entities, "
              f"{PAYLOAD_BYTES}-byte payloads; {spec.reads:,} reads; median of {spec.repeat} runs, "
              f"{spec.opens} reopens\n")
        started = time.perf_counter()
        res, backends = run_all(spec, args.backend_names, base, lambda s: print(s, flush=True))
        rows = table_rows(res)
        reports = next((b.recovery_reports for b in backends if isinstance(b, Batpak)), [])
        print(f"\n{text_table(rows)}\n")
        print("ratio = batpak / baseline (for reopen, a time: lower is better)")
        if reports:
            print(f"batpak recovery_report (last reopen): {reports[-1]}")
        print(f"total wall time {time.perf_counter() - started:.0f} s")
        if args.json:
            write_json(args.json, argv, info, spec, res, reports)
        if args.markdown:
            write_markdown(args.markdown, argv, info, spec, rows, reports)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def write_json(path: str, argv: Sequence[str] | None, info: dict[str, str], spec: Spec, res: Results,
               reports: list[dict[str, Any]]) -> None:
    doc = {
        "command": command_line(argv), "machine": info, "codec": bp.codec_backend(), "spec": spec.__dict__,
        "results": {
            row.key: {
                "label": row.label, "unit": row.unit, "target": row.target, "met": row.met(res),
                "median": {name: res.median(row.key, name) for name in res.runs.get(row.key, {})},
                "runs": res.runs.get(row.key, {}),
                "ratio": {base: _ratio(res, row.key, base) for base in ("SQLite", "LMDB")},
            }
            for row in ROWS if row.key in res.runs
        },
        "batpak_recovery_reports": reports,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def write_markdown(path: str, argv: Sequence[str] | None, info: dict[str, str], spec: Spec,
                   rows: list[list[str]], reports: list[dict[str, Any]]) -> None:
    lines = [
        "### Results", "",
        f"Command: `{command_line(argv)}`", "",
        f"Machine: {info['cpus']} × {info['cpu']}, Python {info['python']}, Linux {info['kernel']}, "
        f"{info['fs']}; SQLite {info['sqlite']}, LMDB {info['lmdb']}. Date: {info['date']}; "
        f"batpak-mp at {info['revision']}.", "",
        f"{spec.events:,} events in commits of {spec.batch}, {spec.entities} entities, {PAYLOAD_BYTES}-byte "
        f"payloads, {spec.reads:,} random reads; each figure is the median of {spec.repeat} runs "
        f"({spec.opens} for reopen). Ratio = batpak / baseline (for reopen, a time, lower is better).", "",
        markdown_table(rows), "",
    ]
    if reports:
        lines += [f"batpak `recovery_report` at the last reopen: `{json.dumps(reports[-1])}`", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
