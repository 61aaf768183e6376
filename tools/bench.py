#!/usr/bin/env python3
"""Benchmark report: run every benchmark program, on both codecs, and write docs/BENCHMARKS.md.

Owns: running the programs of tools/ one after another, each as a subprocess writing
its figures with ``--json`` to a temporary file; the engine and service programs run
twice, once on the compiled core (the C codec, ``BATPAK_MP_REQUIRE_NATIVE=1`` so a
broken build fails instead of measuring the fallback) and once on the pure-Python
fallback (``BATPAK_MP_PURE=1``, which every process they start inherits). From those
figures it writes the report — the machine and the date, the exact commands, the
issue 11 table (every row as a ratio against its baseline measured in the same run,
both cores side by side), CPU microseconds per acknowledged append, the commit group
sizes at 1, 4, 16 and 64 client processes, one table per program and core, the earlier
issues' targets and whether they were met, notes on method — and a chart
(docs/benchmarks.png; needs matplotlib, the ``bench`` extra: pip install -e '.[bench]').

  engine     tools/bench_engine.py     the in-process Engine vs SQLite and LMDB   (issues 2, 11)   both cores
  service    tools/bench_service.py    the multiprocess service vs SQLite, LMDB   (issues 3, 11)   both cores
  restart    tools/bench_restart.py    reopen and writer restart, 1M events       (issues 2, 4)    compiled core
  queries    tools/bench_queries.py    query latency, 1M vs 10k events            (issue 14)       compiled core
  subscribe  tools/bench_subscribe.py  subscription latency, projection rebuild   (issue 5)        compiled core

Without options every program runs at the size its issue asks for (1M-event stores,
16 and 4 client processes, median of 3 runs): run it on a quiet machine, it takes a
while. ``--quick`` passes each program its smoke sizes (a few minutes in all); a quick
report goes to bench-data/quick/ (gitignored), never over docs/, unless --out and
--chart say otherwise.

Run:  python tools/bench.py [--quick] [--only engine,service,restart,queries,subscribe] [--cores native,python]
          [--repeat N] [--out FILE] [--chart FILE] [--engine-args 'ARGS'] [--service-args 'ARGS'] ...
Exit codes: 0 ok; 1 a program failed (the report is written, naming it); 2 bad usage, or
a program rejected its options (no report). Targets not met do not change the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench_engine import machine

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
BENCH_DATA = os.path.join(ROOT, "bench-data")
DEFAULT_OUT = os.path.join(ROOT, "docs", "BENCHMARKS.md")
DEFAULT_CHART = os.path.join(ROOT, "docs", "benchmarks.png")
QUICK_DIR = os.path.join(BENCH_DATA, "quick")
NONE = "—"
CHART_CAP = 100.0  # absolute figures better than their target by more than this are drawn at it
CORES = {  # codec -> (its name in the report, the environment its programs run under)
    "native": ("compiled core", {"BATPAK_MP_PURE": "", "BATPAK_MP_REQUIRE_NATIVE": "1"}),
    "python": ("pure-Python fallback", {"BATPAK_MP_PURE": "1", "BATPAK_MP_REQUIRE_NATIVE": ""}),
}


class Fatal(Exception):
    """Stops the run with one ``error:`` line and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- formatting


def fmt(value: float | None, unit: str) -> str:
    """A figure with its unit: rates as k/M per second, times in s/ms/µs, ratios as ×."""
    if value is None:
        return NONE
    if unit == "/s":
        for scale, suffix in ((1e6, "M"), (1e3, "k")):
            if value >= scale:
                return f"{value / scale:.2f}{suffix}/s" if scale == 1e6 else f"{value / scale:.1f}{suffix}/s"
        return f"{value:.0f}/s"
    if unit == "s":
        return fmt(value * 1000, "ms")
    if unit == "ms":
        if abs(value) >= 1000:
            return f"{value / 1000:.2f} s"
        return f"{value:.0f} ms" if abs(value) >= 100 else f"{value:.1f} ms" if abs(value) >= 10 else f"{value:.2f} ms"
    if unit == "×":
        return f"{value:.2f}×" if value < 100 else f"{value:,.0f}×"
    return f"{value:,.1f} {unit}"


def percentiles(p50: float | None, p99: float | None, unit: str) -> str:
    return f"p50 {fmt(p50, unit)}, p99 {fmt(p99, unit)}"


def joined(values: Sequence[str]) -> str:
    return " / ".join(values) if values else NONE


def verdict(met: bool | None) -> str:
    return NONE if met is None else ("yes" if met else "**no**")


# ---------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A goal as an issue states it: the figure ``op`` ``bound``; a ratio to ``baseline``
    when one is named, else an absolute figure in the unit of the row."""

    text: str
    issue: int
    op: str  # ">=", "<" or "<="
    bound: float
    baseline: str = ""

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return {">=": value >= self.bound, "<": value < self.bound, "<=": value <= self.bound}[self.op]

    def chart_point(self, value: float) -> tuple[float, float]:
        """(bar, target mark): a ratio against its target ratio, or an absolute figure as
        how many times better than its bound it is (1 = on the target), at most CHART_CAP."""
        if self.baseline:
            return value, self.bound
        if value <= 0:  # nothing, or (a latency measured from a later moment) less than nothing
            return (CHART_CAP if self.op != ">=" else 0.0), 1.0
        return min(value / self.bound if self.op == ">=" else self.bound / value, CHART_CAP), 1.0

    def share(self, value: float) -> float:
        """How far ``value`` is along the way to the target: 1.0 meets it exactly."""
        return self.chart_point(value)[0] / self.chart_point(value)[1] if value > 0 else 0.0


@dataclass(frozen=True)
class Check:
    """One targeted figure of a run."""

    program: str
    workload: str
    value: float | None
    unit: str
    target: Target

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value)

    @property
    def measured(self) -> str:
        suffix = f" {self.target.baseline}" if self.target.baseline and self.value is not None else ""
        return fmt(self.value, self.unit) + suffix


# ---------------------------------------------------------------------------- sections

HEADERS = ["workload", "batpak-mp", "baseline", "baseline figure", "ratio", "target", "met"]


@dataclass
class Section:
    """One program's part of the report, on one core."""

    key: str
    core: str
    title: str
    what: str
    command: str = ""
    doc: dict[str, Any] = field(default_factory=dict)  # the program's JSON
    rows: list[list[str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""  # the program failed (or its JSON could not be read): the report says so
    skipped: str = ""  # the program is not there (yet): the report says so, the run goes on

    def add(self, workload: str, ours: str, *, baseline: str = NONE, theirs: str = NONE, ratio: str = NONE,
            target: Target | None = None, value: float | None = None, unit: str = "", goal: str = NONE) -> None:
        """A table row; with a ``target``, also a check of ``value`` (in ``unit``, or × for
        a ratio target) against it. ``goal`` fills the target column of untargeted rows."""
        met = NONE
        if target is not None:
            check = Check(self.key, workload, value, "×" if target.baseline else unit, target)
            self.checks.append(check)
            goal, met = f"{target.text} (issue {target.issue})", verdict(check.met)
        self.rows.append([workload, ours, baseline, theirs, ratio, goal, met])


Renderer = Callable[[dict[str, Any], Section], None]

# ---------------------------------------------------------------------------- engine

ENGINE_TARGETS = {
    "a": Target("≥ 1.0× LMDB", 11, ">=", 1.0, "LMDB"),
    "b": Target("≥ 3× SQLite", 2, ">=", 3.0, "SQLite"),
    "c": Target("≥ 2M events/s", 11, ">=", 2e6),
    "c2": Target("≥ 1M events/s", 2, ">=", 1e6),
    "d": Target("< 1 s for 1M events", 2, "<", 1.0),
}


def render_engine(doc: dict[str, Any], sec: Section) -> None:
    spec, results = doc["spec"], doc["results"]
    for key, r in results.items():
        base = results.get("c" if key == "c2" else key, r)["median"]  # c' is compared with the baselines' scan
        names = [n for n in ("SQLite", "LMDB") if base.get(n) is not None]
        unit = "s" if r["unit"] == "s" else "/s"
        target = ENGINE_TARGETS.get(key)
        ours = r["median"].get("batpak")
        label = r["label"] + (f", {spec['events']:,} events" if key == "d" else "")
        sec.add(label, fmt(ours, unit), baseline=joined(names), theirs=joined([fmt(base[n], unit) for n in names]),
                ratio=joined([fmt(r["ratio"].get(n), "×") for n in names]), target=target, unit=unit,
                value=r["ratio"].get(target.baseline) if target and target.baseline else ours)
    sec.notes += [
        f"{spec['events']:,} events in commits of {spec['batch']}, {spec['entities']:,} entities round-robin, "
        f"200-byte msgpack payloads; {spec['reads']:,} point reads at the same seeded random positions for "
        "every backend; the full scan touches each payload without decoding it.",
        f"Median of {spec['repeat']} rounds ({spec['opens']} for reopen); within a round the backends run one "
        "after another in an order that rotates from round to round. Only the calls that do the work are timed.",
        "The baselines get the same msgpack bytes ready-made and the leanest schema (one row / key per event "
        "keyed by sequence, no entity index, no hash chain); batpak encodes, validates, hashes, indexes and "
        "returns receipts within the timed call.",
        "Reopen: the baselines rebuild nothing at open, so that ratio is large by construction; its target "
        "is absolute.",
    ]
    reports = doc.get("batpak_recovery_reports") or []
    if reports:
        sec.notes.append(f"batpak `recovery_report` at the last reopen: `{json.dumps(reports[-1])}`")


# ---------------------------------------------------------------------------- service

SERVICE_ROWS: dict[str, tuple[str, Target | None]] = {
    "singles16": ("durable single appends, 16 client processes", Target("≥ 5× SQLite", 11, ">=", 5.0, "SQLite")),
    "batched4": ("durable batches of 100, 4 client processes", Target("≥ 1.0× LMDB", 11, ">=", 1.0, "LMDB")),
    "reads4": ("point reads by id, 4 client processes", Target("≥ 3× SQLite", 11, ">=", 3.0, "SQLite")),
    "threads8": ("8 threads appending through one `Store`", Target("≥ 0.8× 8 processes", 11, ">=", 0.8,
                                                                    "8 processes")),
    "aio100": ("`bp.aio`: 100 appends in flight from one process", None),  # issue 14: reported, no target
}
ATTACH_TARGET = Target("< 50 ms on a 1M-event store", 3, "<", 50.0)
RSS_TARGET = Target("< 30 MiB", 3, "<", 30.0)


def render_service(doc: dict[str, Any], sec: Section) -> None:
    for r in doc["rows"]:
        label, target = SERVICE_ROWS.get(r["workload"], (r["workload"], None))
        others = [b for b in r.get("ratios", {r["baseline"]: r["ratio"]})]
        med = r.get("median", {})
        sec.add(label, f"{fmt(r['batpak'], '/s')} ({fmt(med.get('batpak', {}).get('cpu_us'), 'µs')} CPU)"
                if med else fmt(r["batpak"], "/s"),
                baseline=joined([f"{b} (same processes)" for b in others]),
                theirs=joined([fmt(med[b]["rate"], "/s") if med else fmt(r["baseline_value"], "/s") for b in others]),
                ratio=joined([fmt(r.get("ratios", {}).get(b, r["ratio"]), "×") for b in others]),
                target=target, value=r["ratio"], goal="reported (issue 14)" if target is None else NONE)
    for g in doc.get("groups", []):
        sec.add(f"single appends, {g['procs']} client process{'es' if g['procs'] != 1 else ''}: requests per "
                "commit group", f"mean {g['mean']:.1f}, p50 {g['p50']}, p90 {g['p90']}, max {g['max']}",
                theirs=f"{fmt(g['rate'], '/s')}, {fmt(g['cpu_us'], 'µs')} CPU per append", goal="reported (issue 11)")
    lat = doc.get("latency")
    if lat:
        ms = {k: v / 1000 for k, v in lat.items()}
        sec.add("single-append latency, 1 client", percentiles(ms["append_p50_us"], ms["append_p99_us"], "ms"),
                baseline="the disk's write + fdatasync of 256 B",
                theirs=percentiles(ms["fsync_p50_us"], ms["fsync_p99_us"], "ms"),
                ratio=fmt(ms["append_p50_us"] / ms["fsync_p50_us"], "×") + " (p50)", goal="reported (issue 3)")
    at = doc.get("attach")
    if at:
        events = f"{at['events']:,}-event store"
        sec.add(f"client attach: `connect()` on a {events}", fmt(at["attach_ms"], "ms"), target=ATTACH_TARGET,
                value=at["attach_ms"], unit="ms")
        sec.add("client RSS after attach, above a bare interpreter", fmt(at["rss_over_bare_mib"], "MiB"),
                target=RSS_TARGET, value=at["rss_over_bare_mib"], unit="MiB")
        sec.add("first `get` + `history` after attach", fmt(at["first_reads_ms"], "ms"))
    sec.notes += [
        f"Throughput: median of {doc['repeat']} run(s) of {doc['seconds']:g} s each; every run measures batpak, "
        "then its baselines, with the same number of forked processes starting together; ratio = median of the "
        "per-run ratios.",
        "batpak runs as the real service (`bp.serve`: supervisor, writer, clients over POSIX queues); its "
        "baselines are opened by every process on its own, as a multiprocess app would.",
        "CPU: user + system time of every process involved over the measured window (writer and supervisor "
        "from /proc, each client its own), per acknowledged operation.",
        "Group sizes: the writer's own count of requests per commit group (one write, one fsync), "
        "written at a clean stop (`BATPAK_MP_GROUP_STATS`).",
        "Latency: one client appending one event at a time; the baseline is a 256-byte `write` + `fdatasync` "
        "on the same file system, the floor of any durable acknowledgement.",
        "Attach: `connect()` and RSS in fresh interpreters (median of several), with the service running.",
    ]


# ---------------------------------------------------------------------------- restart

REOPEN_TARGET = Target("< 1 s for 1M events", 2, "<", 1.0)
RESTART_TARGET = Target("p50 < 500 ms on a 1M-event store", 4, "<", 500.0)


def render_restart(doc: dict[str, Any], sec: Section) -> None:
    events, kills = f"{doc['events']:,} events", doc["kills"]
    sec.add(f"reopen after a clean close (same boot), {events}", fmt(doc["reopen_warm_s"], "s"),
            target=REOPEN_TARGET, value=doc["reopen_warm_s"], unit="s")
    sec.add(f"reopen as after a reboot (full recovery), {events}", fmt(doc["reopen_cold_s"], "s"), goal="reported")
    sec.add(f"writer restart under load, SIGKILL → ready: p50 (max of {kills})",
            f"{fmt(doc['restart_p50_ms'], 'ms')} ({fmt(doc['restart_max_ms'], 'ms')})",
            target=RESTART_TARGET, value=doc["restart_p50_ms"], unit="ms")
    built = f"built in {doc['build_s']:.1f} s" if doc.get("build_s") is not None else "reused (--keep)"
    sec.notes += [
        f"One store of {events} ({built}), reopened {doc['runs']} times each way (median). The reboot case "
        "gives each open a new boot id, so recovery trusts no checkpoint.",
        f"Restart: {kills} SIGKILLs of the writer, one a second, while a client appends continuously; timed "
        "from the kill until the control block shows a new writer epoch in state ready (the supervisor "
        "restarts it under `RestartPolicy.bounded`).",
        f"Afterwards the store held {doc.get('final_events', 0):,} events and `bp.verify` was "
        f"{'clean' if doc.get('verify_ok') else '**NOT clean**'}.",
        f"Recovery report, same boot: `{json.dumps(doc.get('reopen_warm_report'))}`; after a reboot: "
        f"`{json.dumps(doc.get('reopen_cold_report'))}`",
    ]
    if not doc.get("verify_ok"):
        sec.error = "bench_restart.py: bp.verify found problems in the store afterwards"


# ---------------------------------------------------------------------------- subscribe

SUBSCRIBE_TARGET = Target("p50 ≤ 1 ms", 5, "<=", 1.0)


def render_subscribe(doc: dict[str, Any], sec: Section) -> None:
    for r in doc["latency"]:
        who = f"{r['subscribers']} subscriber process{'es' if r['subscribers'] != 1 else ''}"
        sec.add(f"commit → subscriber, {who} (from `append` return)",
                percentiles(r["from_return_p50_ms"], r["from_return_p99_ms"], "ms"),
                target=SUBSCRIBE_TARGET, value=r["from_return_p50_ms"], unit="ms")
        sec.add(f"`append` call → subscriber (an upper bound), {who}",
                percentiles(r["from_call_p50_ms"], r["from_call_p99_ms"], "ms"), goal="reported")
        if r.get("missing"):
            sec.error = f"bench_subscribe.py: {r['missing']} event deliveries missing with {who}"
    rb = doc["rebuild"]
    sec.add(f"projection rebuild from zero, {rb['events']:,} events",
            f"{fmt(rb['from_zero_events_per_s'], '/s')} ({fmt(rb['from_zero_s'], 's')})", goal="reported (issue 5)")
    sec.add(f"projection rebuild from a snapshot {rb['since_snapshot']:,} events behind",
            f"{fmt(rb['from_snapshot_events_per_s'], '/s')} ({fmt(rb['from_snapshot_s'], 's')})", goal="reported (issue 5)")
    sec.add("`project_if_changed` with nothing new", fmt(rb["project_if_changed_unchanged_us"], "µs"))
    appends = doc["latency"][0]["appends"] if doc["latency"] else 0
    sec.notes += [
        f"Latency: one process appends {appends:,} single durable events, paced (a pause between appends), "
        "while every subscriber process records when each event reaches it; percentiles over every (event, "
        "subscriber) pair, on CLOCK_MONOTONIC, which all processes share.",
        "The target is checked on the first figure, measured from the moment `append` returned: the writer "
        "wakes subscribers before it replies, so it slightly understates commit → subscriber (it can even be "
        "negative). The second figure starts at the `append` call, so it also holds the queue trip, the "
        "write and the fsync: an upper bound.",
        "Rebuild: the rate is the events the resulting state covers over the wall time of `project` (median "
        "of 3); from a snapshot, only the events after it are folded.",
    ]


# ---------------------------------------------------------------------------- queries

QUERY_TARGET = Target("large ÷ small ≤ 2", 14, "<=", 2.0)


def render_queries(doc: dict[str, Any], sec: Section) -> None:
    small, large = doc["small"], doc["large"]
    for r in doc["rows"]:
        sec.add(r["query"], f"{fmt(r['large_us'], 'µs')} at {large:,} events",
                baseline=f"{small:,} events", theirs=fmt(r["small_us"], "µs"), ratio=f"{r['ratio']:.2f}×",
                target=QUERY_TARGET, value=r["ratio"], unit="×")
    sec.notes += [
        f"Two stores built in the run with the in-process `Engine` ({small:,} and {large:,} events, the same "
        "shape: 5,000 entities `acct:<n>` in 50 scopes, a hot entity with 1 event in 10, a rare prefix "
        "`order:<n>:line` in the last 1%); each figure the median wall time of "
        f"{doc['repeat']} calls after a warm-up. The ratio shows whether a call grows with the log (issue 14: "
        "each answered from the index in time that grows with the events returned).",
        "Prefix, kind, category and scope queries walk the tag index's postings (docs/FORMAT.md §6.4); "
        "`history`/`latest` the entity chain; `query_scope` the scope's skip links (O(log n)).",
    ]


# ---------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class Program:
    key: str
    script: str
    title: str
    what: str
    quick: tuple[str, ...]  # the smoke sizes
    repeat_flag: str  # the option that sets "runs per figure", or ""
    render: Renderer
    cores: tuple[str, ...]  # the codecs it runs on
    optional: bool = False  # missing, or without --json: skipped with a note instead of an error


PROGRAMS = {p.key: p for p in (
    Program("engine", "bench_engine.py", "Engine, in-process (issues 2 and 11)",
            "batpak-mp's `Engine` in the caller's process (no writer, no IPC) — the floor of what the service "
            "can reach — against SQLite and LMDB doing the same work in the same process.",
            ("--quick",), "--repeat", render_engine, ("native", "python")),
    Program("service", "bench_service.py", "Service, multiprocess (issues 3 and 11)",
            "The service as applications use it: client processes talking to one writer, against SQLite and "
            "LMDB opened by as many processes.",
            ("--quick",), "--repeat", render_service, ("native", "python")),
    Program("restart", "bench_restart.py", "Reopen and writer restart (issues 2 and 4)",
            "Opening a large store, and how long the service is away when its writer is SIGKILLed.",
            ("--events", "100000", "--runs", "3", "--kills", "3"), "--runs", render_restart, ("native",)),
    Program("queries", "bench_queries.py", "Queries on a large and a small store (issue 14)",
            "Query latency on a 1M-event store against the same query on a 10k-event store: a ratio near 1 "
            "means the call does not grow with the log.",
            ("--quick",), "", render_queries, ("native",)),
    Program("subscribe", "bench_subscribe.py", "Subscriptions and projections (issue 5)",
            "How soon other processes see a committed event, and how fast a projection is rebuilt.",
            ("--quick",), "", render_subscribe, ("native",), optional=True),
)}

METHOD = [
    "Every baseline runs in the same invocation as batpak-mp, on the same disk, minutes apart at most: "
    "absolute figures drift on a shared machine, ratios much less. Ratio = batpak-mp ÷ baseline (for a "
    "time, lower is better). Each figure is the median of 3 runs (the program sections say exactly how "
    "many, and of what).",
    "Both codecs: the engine and service programs run once on the compiled core (the C extension, "
    "`BATPAK_MP_REQUIRE_NATIVE=1`) and once on the pure-Python fallback (`BATPAK_MP_PURE=1`, inherited by "
    "the supervisor, the writer and every client); each run measures its own baselines, so each ratio "
    "compares figures taken in the same run. `bp.codec_backend()` is recorded by each run and checked.",
    "Equal durability: batpak-mp with its default `sync=\"group\"` (an append returns after its bytes are "
    "fdatasynced; one fsync per commit group); SQLite in WAL mode with `synchronous=FULL` (the WAL is "
    "synced at every commit); LMDB with `sync=True, metasync=True` (data and meta page synced at every "
    "write transaction). SQLite `synchronous=NORMAL` (not durable) is shown for reference.",
    "CPU per acknowledged append: user + system time of every process involved (writer, supervisor, "
    "clients) over the measured window, divided by the appends acknowledged in it. It does not drift with "
    "machine noise the way throughput does.",
    "The stores live under `bench-data/` on the project's own disk, not tmpfs, because the cost of fsync "
    "is part of what is measured.",
]

# ---------------------------------------------------------------------------- issue 11


@dataclass(frozen=True)
class Row11:
    """One row of the issue 11 table: where its figure comes from, its target and moonshot."""

    label: str
    now: str  # the issue's "Now" column
    program: str
    target: Target
    moonshot: Target
    pick: Callable[[dict[str, Any]], tuple[float, float, float] | None]  # doc -> (figure, value, moonshot value)


def _service_pick(workload: str, moon_baseline: str) -> Callable[[dict[str, Any]], tuple[float, float, float] | None]:
    def pick(doc: dict[str, Any]) -> tuple[float, float, float] | None:
        for r in doc.get("rows", []):
            if r["workload"] == workload and r["ratio"] is not None:
                ratios = r.get("ratios", {r["baseline"]: r["ratio"]})
                return r["batpak"], r["ratio"], ratios.get(moon_baseline, r["ratio"])
        return None
    return pick


def _engine_pick(key: str) -> Callable[[dict[str, Any]], tuple[float, float, float] | None]:
    def pick(doc: dict[str, Any]) -> tuple[float, float, float] | None:
        r = doc.get("results", {}).get(key)
        if r is None or r["median"].get("batpak") is None:
            return None
        ours = r["median"]["batpak"]
        if key == "a":  # a ratio to LMDB: none when LMDB did not run (--backends)
            lmdb = r["ratio"].get("LMDB")
            return None if lmdb is None else (ours, lmdb, lmdb)
        return ours, ours, ours
    return pick


ROWS11 = (
    Row11("Service: durable single appends, 16 processes", "1.4–1.8× SQLite", "service",
          Target("≥ 5× SQLite", 11, ">=", 5.0, "SQLite"), Target("≥ 9× SQLite", 11, ">=", 9.0, "SQLite"),
          _service_pick("singles16", "SQLite")),
    Row11("Service: durable batches of 100, 4 processes", "0.36–0.52× LMDB", "service",
          Target("≥ 1.0× LMDB", 11, ">=", 1.0, "LMDB"), Target("≥ 1.5× LMDB", 11, ">=", 1.5, "LMDB"),
          _service_pick("batched4", "LMDB")),
    Row11("Service: point reads by id, 4 processes", "1.5–1.9× SQLite", "service",
          Target("≥ 3× SQLite", 11, ">=", 3.0, "SQLite"), Target("≥ 1× LMDB", 11, ">=", 1.0, "LMDB"),
          _service_pick("reads4", "LMDB")),
    Row11("Engine in-process: batched appends (100/commit, 200 B)", "0.35× LMDB", "engine",
          Target("≥ 1.0× LMDB", 11, ">=", 1.0, "LMDB"), Target("≥ 2× LMDB", 11, ">=", 2.0, "LMDB"),
          _engine_pick("a")),
    Row11("Engine: full scan without payload decode", "0.67M events/s", "engine",
          Target("≥ 2M events/s", 11, ">=", 2e6), Target("≥ 5M events/s", 11, ">=", 5e6), _engine_pick("c")),
    Row11("8 threads appending through one `Store`", "serialized (≈ 1 thread)", "service",
          Target("≥ 0.8× 8 processes", 11, ">=", 0.8, "8 processes"),
          Target("= 8 processes", 11, ">=", 1.0, "8 processes"), _service_pick("threads8", "8 processes")),
)


@dataclass
class Figure11:
    """One row of the issue 11 table on one core."""

    row: Row11
    core: str
    figure: float
    value: float  # the ratio (or the absolute figure, for the scan)
    moon: float

    @property
    def met(self) -> bool | None:
        return self.row.target.met(self.value)

    @property
    def moon_met(self) -> bool | None:
        return self.row.moonshot.met(self.moon)

    def cell(self) -> str:
        unit = "/s"
        if self.row.target.baseline:
            return f"{fmt(self.figure, unit)} — **{fmt(self.value, '×')}** {self.row.target.baseline}"
        return f"**{fmt(self.figure, unit)}** ({fmt(self.value / self.row.target.bound, '×')} the target)"


def issue11_figures(sections: dict[tuple[str, str], Section]) -> dict[tuple[int, str], Figure11]:
    out = {}
    for i, row in enumerate(ROWS11):
        for core in CORES:
            sec = sections.get((row.program, core))
            got = row.pick(sec.doc) if sec is not None and sec.doc and not sec.error else None
            if got is not None:
                out[(i, core)] = Figure11(row, core, *got)
    return out


def issue11_table(figs: dict[tuple[int, str], Figure11]) -> list[list[str]]:
    rows = []
    for i, row in enumerate(ROWS11):
        native, python = figs.get((i, "native")), figs.get((i, "python"))
        baseline = row.target.baseline or "the target (absolute)"
        moon = NONE
        if native is not None:
            shown = fmt(native.moon, "×") + f" {row.moonshot.baseline}" if row.moonshot.baseline else fmt(native.moon, "/s")
            moon = f"{row.moonshot.text}: {shown} ({verdict(native.moon_met)})"
        rows.append([row.label, baseline, row.now, row.target.text,
                     native.cell() if native else NONE, python.cell() if python else NONE,
                     f"{verdict(native.met if native else None)} / {verdict(python.met if python else None)}", moon])
    return rows


ISSUE11_HEADERS = ["workload", "baseline (same run)", "issue 11: now", "target", "compiled core", "fallback",
                   "met (compiled / fallback)", "moonshot (compiled)"]


def cpu_rows(sections: dict[tuple[str, str], Section]) -> list[list[str]]:
    """CPU µs per acknowledged operation, both cores, and the baselines' (their clients')."""
    docs = {core: sections[("service", core)].doc for core in CORES if ("service", core) in sections
            and sections[("service", core)].doc}
    if not docs:
        return []
    labels = {"singles16": "durable single appends, 16 processes (per append)",
              "batched4": "durable batches of 100, 4 processes (per event)",
              "reads4": "point reads by id, 4 processes (per read)",
              "threads8": "8 threads through one `Store` (per append)"}
    rows = []
    for workload, label in labels.items():
        cells, base = [], NONE
        for core in CORES:
            r = next((r for r in docs.get(core, {}).get("rows", []) if r["workload"] == workload), None)
            med = r.get("median", {}) if r else {}
            cells.append(fmt(med["batpak"]["cpu_us"], "µs") if "batpak" in med else NONE)
            if core == "native" and med:
                base = joined([f"{b}: {fmt(v['cpu_us'], 'µs')}" for b, v in med.items() if b != "batpak"])
        rows.append([label, *cells, base])
    for i, procs in enumerate(g["procs"] for g in next(iter(docs.values())).get("groups", [])):
        cells = []
        for core in CORES:
            groups = docs.get(core, {}).get("groups", [])
            cells.append(fmt(groups[i]["cpu_us"], "µs") if i < len(groups) else NONE)
        rows.append([f"durable single appends, {procs} process{'es' if procs != 1 else ''} (per append)", *cells, NONE])
    return rows


CPU_HEADERS = ["workload", "compiled core", "fallback", "baselines (their client processes)"]


def group_rows(sections: dict[tuple[str, str], Section]) -> list[list[str]]:
    out = []
    per_core = {core: sections[("service", core)].doc.get("groups", []) for core in CORES
                if ("service", core) in sections and sections[("service", core)].doc}
    n = max((len(v) for v in per_core.values()), default=0)
    for i in range(n):
        cells, procs = [], 0
        for core in CORES:
            groups = per_core.get(core, [])
            if i < len(groups):
                g = groups[i]
                procs = g["procs"]
                cells.append(f"mean {g['mean']:.1f}, p50 {g['p50']}, p90 {g['p90']}, max {g['max']} — "
                             f"{fmt(g['rate'], '/s')}, {fmt(g['cpu_us'], 'µs')} CPU/append")
            else:
                cells.append(NONE)
        out.append([str(procs), *cells])
    return out


GROUP_HEADERS = ["client processes", "compiled core: requests per group — appends/s, CPU",
                 "fallback: requests per group — appends/s, CPU"]

# ---------------------------------------------------------------------------- running


def supports_json(path: str) -> bool:
    """The program exists and lists a ``--json`` option in its help."""
    if not os.path.isfile(path):
        return False
    helped = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT)
    return helped.returncode == 0 and "--json" in helped.stdout


def program_args(prog: Program, args: argparse.Namespace) -> list[str]:
    """Options for one program: the smoke sizes, the repeat count, then the caller's own."""
    extra = getattr(args, f"{prog.key}_args")
    try:
        more = shlex.split(extra)
    except ValueError as exc:
        raise Fatal(2, f"--{prog.key}-args: {exc}") from None
    repeat = [prog.repeat_flag, str(args.repeat)] if args.repeat and prog.repeat_flag else []
    return [*(prog.quick if args.quick else ()), *repeat, *more]


def run_program(prog: Program, core: str, args: argparse.Namespace, tmp: str) -> Section:
    """Runs one program on one core (its output goes straight to the terminal) and reads its JSON."""
    name, env = CORES[core]
    sec = Section(prog.key, core, f"{prog.title} — {name}", prog.what)
    path = os.path.join(TOOLS, prog.script)
    if not supports_json(path):
        why = f"tools/{prog.script} is not there or has no --json option"
        if not prog.optional:
            raise Fatal(2, why)
        sec.skipped = why
        print(f"note: skipping {prog.key}: {why}", file=sys.stderr, flush=True)
        return sec
    argv = program_args(prog, args)
    prefix = " ".join(f"{k}={v}" for k, v in env.items() if v)
    sec.command = f"{prefix} " + shlex.join(["python", f"tools/{prog.script}", *argv])
    out = os.path.join(tmp, f"{prog.key}-{core}.json")
    cmd = [sys.executable, path, *argv, "--json", out]
    print(f"$ {prefix} " + shlex.join(cmd), file=sys.stderr, flush=True)
    code = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **env})
    if code == 2:  # argparse's "bad usage": the options passed through
        raise Fatal(2, f"{prog.script} exited with code 2")
    if code != 0:
        sec.error = f"{prog.script} exited with code {code} on the {name}"
        return sec
    try:
        with open(out) as f:
            sec.doc = json.load(f)
        prog.render(sec.doc, sec)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        sec.error = f"{prog.script}: could not read its JSON ({type(exc).__name__}: {exc})"
    ran_on = sec.doc.get("codec") or sec.doc.get("machine", {}).get("codec")
    if ran_on is not None and ran_on != core:
        sec.error = f"{prog.script} asked for the {name} but ran on the {ran_on!r} codec"
    return sec


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        return "unknown"


@dataclass
class Run:
    """What the report says about the invocation as a whole."""

    command: str
    quick: bool
    machine: dict[str, str]
    load_before: str
    load_after: str = ""
    wall_s: float = 0.0


# ---------------------------------------------------------------------------- the report


def summary_rows(sections: list[Section]) -> list[list[str]]:
    return [[s.title.split(" (")[0], c.workload, c.measured, f"{c.target.text} (issue {c.target.issue})",
             verdict(c.met)] for s in sections for c in s.checks if s.core == "native" and c.target.issue != 11]


def machine_lines(run: Run) -> list[str]:
    m = run.machine
    return [
        f"- **Date**: {m['date']} (the whole run took {duration(run.wall_s)})",
        f"- **Command**: `{run.command}` (each program's own command is in its section)",
        f"- **Machine**: {m['cpus']} CPUs ({m['cpu']}), {memory()} RAM, Linux {m['kernel']}",
        f"- **Python**: {m['python']}; SQLite {m['sqlite']}; LMDB {m['lmdb']}",
        f"- **File system** of `bench-data/`: {m['fs']}",
        f"- **batpak-mp** at `{m['revision']}`",
        f"- **Load average** (1, 5, 15 min) before: {run.load_before}; after: {run.load_after}",
    ]


def section_lines(sec: Section) -> list[str]:
    lines = [f"### {sec.title}", "", sec.what, ""]
    if sec.skipped:
        return [*lines, f"Skipped: {sec.skipped}.", ""]
    if sec.command:
        lines += [f"Command: `{sec.command}`", ""]
    if sec.error:
        lines += [f"**Failed**: {sec.error}.", ""]
    if sec.rows:
        lines += [*markdown_table(HEADERS, sec.rows), ""]
    return lines + [f"- {n}" for n in sec.notes] + ([""] if sec.notes else [])


def render_report(run: Run, sections: list[Section], chart: str | None) -> str:
    by_key = {(s.key, s.core): s for s in sections}
    figs = issue11_figures(by_key)
    lines = [
        "# Benchmarks", "",
        "<!-- Generated by tools/bench.py (or `batpak-mp bench`) from the programs' JSON; do not edit by hand. -->", "",
        "batpak-mp side by side, in one invocation, with what a user would pick instead — SQLite in WAL mode "
        "with `synchronous=FULL` and LMDB with `sync=True` (equal durability) — on the compiled core and on "
        "the pure-Python fallback, with the absolute figures, the ratios and the targets set in the issues.", "",
    ]
    if run.quick:
        lines += ["> **A `--quick` smoke run**: sizes and durations are far below what the issues ask for; "
                  "these figures check that the programs work, they are not the report.", ""]
    lines += ["## Machine and run", "", *machine_lines(run), ""]
    lines += ["## Issue 11: the compiled core and the fallback", "",
              "Every row of the issue's table, each as a ratio against its baseline measured in the same run "
              "(the scan, whose target is absolute, as events per second). Bold: the figure the target is about.",
              ""]
    lines += [*markdown_table(ISSUE11_HEADERS, issue11_table(figs)), ""] if figs else ["Not measured.", ""]
    cpu = cpu_rows(by_key)
    if cpu:
        lines += ["### CPU per acknowledged operation (all processes together)", "",
                  *markdown_table(CPU_HEADERS, cpu), ""]
    groups = group_rows(by_key)
    if groups:
        lines += ["### Commit group sizes under load", "",
                  "Requests per commit group (one write and one fsync each) as the writer counted them, while "
                  "that many client processes append single durable events; p50 and p90 are per request "
                  "(half of the requests sat in a group at least that large).", "",
                  *markdown_table(["client processes", *GROUP_HEADERS[1:]], groups), ""]
    if chart:
        lines += [f"![issue 11 rows on both cores, and each earlier targeted figure against its target]({chart})", ""]
    lines += ["## Earlier targets (issues 2–5), compiled core", ""]
    summary = summary_rows(sections)
    lines += [*markdown_table(["program", "workload", "measured", "target", "met"], summary), ""] if summary else [
        "No targeted figure was measured.", ""]
    lines += ["## Method", "", *[f"- {m}" for m in METHOD], "", "## Results", ""]
    for sec in sections:
        lines += section_lines(sec)
    lines += [
        "## How to run", "", "```",
        ". .venv/bin/activate && pip install -e '.[dev,bench]'   # bench: matplotlib, for the chart",
        "python tools/bench.py              # every program at full size, both codecs; writes this file and the chart",
        "python tools/bench.py --quick      # smoke run (a few minutes), writes bench-data/quick/",
        "python tools/bench.py --cores native --only engine,service   # one codec, some programs",
        "batpak-mp bench [--quick] [--only engine,service,restart,queries,subscribe]   # the same, from the CLI",
        "```", "",
        "Each program also runs on its own (`python tools/bench_engine.py --help`, and so on); "
        "`BATPAK_MP_PURE=1` in its environment runs it on the fallback.", "",
    ]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, without the columns that are empty in every row."""
    keep = [i for i in range(len(headers)) if any(r[i] != NONE for r in rows)]
    lines = ["| " + " | ".join(headers[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    return lines + ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows]


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


# ---------------------------------------------------------------------------- the chart


def draw_chart(figs: dict[tuple[int, str], Figure11], checks: list[Check], path: str, title: str) -> bool:
    """Issue 11's rows on both cores (each as a share of its target), then every earlier
    targeted figure against its target; False when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return False
    measured = [c for c in checks if c.value is not None and c.target.issue != 11]
    panels = []
    if figs:
        panels.append(("issue 11", len(ROWS11)))
    if measured:
        panels.append(("earlier", len(measured)))
    if not panels:
        print("note: no targeted figure to chart", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(10, 2.0 + 0.55 * sum(n for _, n in panels)),
                             gridspec_kw={"height_ratios": [n + 1.5 for _, n in panels]})
    for ax, (name, _) in zip(axes[:, 0], panels, strict=True):
        if name == "issue 11":
            issue11_panel(ax, figs)
        else:
            targets_panel(ax, measured)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def issue11_panel(ax: Any, figs: dict[tuple[int, str], Figure11]) -> None:
    """Grouped bars: for each row, how far each core is along the way to the target (1 = met)."""
    height = 0.38
    values: list[float] = []
    for core, shift, color in (("native", -height / 2, "#2e6f9e"), ("python", height / 2, "#e0a030")):
        ys, shares, labels = [], [], []
        for i, row in enumerate(ROWS11):
            f = figs.get((i, core))
            if f is None:
                continue
            ys.append(i + shift)
            shares.append(max(row.target.share(f.value), 1e-3))
            labels.append(fmt(f.value, "×") + (f" {row.target.baseline}" if row.target.baseline else "")
                          if row.target.baseline else fmt(f.figure, "/s"))
        ax.barh(ys, shares, height=height, color=color, label=CORES[core][0])
        for y, s, text in zip(ys, shares, labels, strict=True):
            ax.text(s * 1.03, y, text, va="center", fontsize=7)
        values += shares
    ax.axvline(1.0, color="black", linewidth=1.5)
    ax.set_yticks(range(len(ROWS11)), labels=[textwrap.fill(f"{r.label} (target {r.target.text})".replace("`", ""), 46)
                                              for r in ROWS11], fontsize=8)
    ax.invert_yaxis()
    if values and max(values) / min(values) > 20:
        ax.set_xscale("log")
    ax.set_xlim(right=max([*values, 1.0]) * (2.2 if ax.get_xscale() == "log" else 1.35))
    ax.set_title("issue 11: share of the target reached (1 = met: the black line), both codecs", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)


def targets_panel(ax: Any, group: list[Check]) -> None:
    points = [c.target.chart_point(c.value) for c in group if c.value is not None]
    shares = [max(b / t, 1e-3) for b, t in points]
    ys = list(range(len(group)))
    ax.barh(ys, shares, color=["#3a7d44" if c.met else "#c0392b" for c in group], height=0.6)
    ax.axvline(1.0, color="black", linewidth=1.5)
    ax.set_yticks(ys, labels=[textwrap.fill(f"{c.program}: {c.workload}".replace("`", ""), 48) for c in group], fontsize=8)
    ax.invert_yaxis()
    if max(shares) / min(shares) > 20:
        ax.set_xscale("log")
    ax.set_xlim(right=max([*shares, 1.0]) * (1.6 if ax.get_xscale() == "log" else 1.08))
    for y, c in zip(ys, group, strict=True):  # the figures, in a column right of the plot
        ax.text(1.01, y, fmt(c.value, c.unit), va="center", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_title("earlier issues, compiled core: share of the target (1 = met) — green: met, red: not met",
                 fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)


# ---------------------------------------------------------------------------- main


def parse_list(value: str, choices: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return list(choices)
    unknown = [n for n in names if n not in choices]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"takes a comma-separated subset of {','.join(choices)} (or all){what}")
    return [k for k in choices if k in names]  # always in the report's order


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--quick", action="store_true", help="pass each program its smoke sizes (a few minutes in all)")
    p.add_argument("--only", type=lambda v: parse_list(v, list(PROGRAMS), ""), default=list(PROGRAMS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(PROGRAMS)} (default: all)")
    p.add_argument("--cores", type=lambda v: parse_list(v, list(CORES), ""), default=list(CORES), metavar="LIST",
                   help="codecs to run the engine and service programs on: native (the compiled core), python "
                        "(the fallback) (default: both)")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="runs per figure, for the programs that take it (engine, service: --repeat; restart: --runs)")
    p.add_argument("--out", help="the report (default docs/BENCHMARKS.md; with --quick bench-data/quick/BENCHMARKS.md)")
    p.add_argument("--chart", help="the PNG chart (default docs/benchmarks.png; with --quick bench-data/quick/)")
    for prog in PROGRAMS.values():
        p.add_argument(f"--{prog.key}-args", default="", metavar="'ARGS'",
                       help=f"more options for tools/{prog.script}, as one quoted string")
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.out = args.out or (os.path.join(QUICK_DIR, "BENCHMARKS.md") if args.quick else DEFAULT_OUT)
    args.chart = args.chart or (os.path.join(QUICK_DIR, "benchmarks.png") if args.quick else DEFAULT_CHART)
    return args


def print_summary(sections: list[Section]) -> None:
    by_key = {(s.key, s.core): s for s in sections}
    figs = issue11_figures(by_key)
    if figs:
        print("\nIssue 11 (ratio against the baseline measured in the same run):")
        print("\n".join(markdown_table(ISSUE11_HEADERS, issue11_table(figs))))
    cpu = cpu_rows(by_key)
    if cpu:
        print("\nCPU per acknowledged operation, all processes together:")
        print("\n".join(markdown_table(CPU_HEADERS, cpu)))
    groups = group_rows(by_key)
    if groups:
        print("\nRequests per commit group, single appends:")
        print("\n".join(markdown_table(GROUP_HEADERS, groups)))
    summary = summary_rows(sections)
    if summary:
        print("\nEarlier targets, compiled core:")
        print("\n".join(markdown_table(["program", "workload", "measured", "target", "met"], summary)))
    for sec in sections:
        if sec.skipped or sec.error:
            print(f"{sec.key} ({sec.core}): {'skipped: ' + sec.skipped if sec.skipped else 'FAILED: ' + sec.error}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(BENCH_DATA, exist_ok=True)
    run = Run(command=shlex.join(["python", "tools/bench.py", *(sys.argv[1:] if argv is None else argv)]),
              quick=args.quick, machine=machine(BENCH_DATA), load_before=load_average())
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="batpak-bench-") as tmp:
            sections = [run_program(PROGRAMS[key], core, args, tmp) for key in args.only
                        for core in PROGRAMS[key].cores if core in args.cores]
    except Fatal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    run.wall_s, run.load_after = time.monotonic() - started, load_average()
    checks = [c for s in sections if s.core == "native" for c in s.checks]
    figs = issue11_figures({(s.key, s.core): s for s in sections})
    title = f"batpak-mp benchmarks — {run.machine['date']} — {run.machine['cpus']} CPUs, {run.machine['cpu']}"
    chart = draw_chart(figs, checks, args.chart, title + (" — QUICK smoke run" if args.quick else ""))
    chart_ref = os.path.relpath(args.chart, os.path.dirname(os.path.abspath(args.out))) if chart else None
    write_text(args.out, render_report(run, sections, chart_ref))
    print_summary(sections)
    print(f"\nwrote {args.out}" + (f" and {args.chart}" if chart else ""))
    failed = [s.error for s in sections if s.error]
    if failed:
        print(f"error: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
