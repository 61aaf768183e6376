#!/usr/bin/env python3
"""Benchmark report: run every benchmark program in one go and write docs/BENCHMARKS.md.

Owns: running the programs of tools/ one after another, each as a subprocess writing
its figures with ``--json`` to a temporary file, and turning those figures into the
report — the machine and the date, the exact commands, one table per program (absolute
figures, baselines, ratios), the target each workload has in the issues and whether it
was met, notes on method — and a chart of every targeted figure against its target
(docs/benchmarks.png; needs matplotlib, the ``bench`` extra: pip install -e '.[bench]').

  engine     tools/bench_engine.py     the in-process Engine vs SQLite and LMDB   (issue 2)
  service    tools/bench_service.py    the multiprocess service vs SQLite, LMDB   (issue 3)
  restart    tools/bench_restart.py    reopen and writer restart, 1M events       (issues 2, 4)
  subscribe  tools/bench_subscribe.py  subscription latency, projection rebuild   (issue 5)

Without options every program runs at the size its issue asks for (1M-event stores for
reopen, attach and restart; 16 and 4 client processes; 1 and 16 subscribers): run it on
a quiet machine, it takes a while. ``--quick`` passes each program its smoke sizes; a
quick report goes to bench-data/quick/ (gitignored), never over docs/, unless --out and
--chart say otherwise.

Run:  python tools/bench.py [--quick] [--only engine,service,restart,subscribe] [--repeat N]
          [--out FILE] [--chart FILE] [--engine-args 'ARGS'] [--service-args 'ARGS'] ...
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
    """One program's part of the report."""

    key: str
    title: str
    what: str
    command: str = ""
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
    "a": Target("≥ 1.0× LMDB", 2, ">=", 1.0, "LMDB"),
    "b": Target("≥ 3× SQLite", 2, ">=", 3.0, "SQLite"),
    "c": Target("≥ 1M events/s", 2, ">=", 1e6),
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

SERVICE_ROWS = {
    "singles16": ("durable single appends, 16 client processes", Target("≥ 5× SQLite", 3, ">=", 5.0, "SQLite")),
    "batched4": ("durable batches of 100, 4 client processes", Target("≥ 1.0× LMDB", 3, ">=", 1.0, "LMDB")),
    "reads4": ("point reads by id, 4 client processes", Target("≥ 3× SQLite", 3, ">=", 3.0, "SQLite")),
}
ATTACH_TARGET = Target("< 50 ms on a 1M-event store", 3, "<", 50.0)
RSS_TARGET = Target("< 30 MiB", 3, "<", 30.0)


def render_service(doc: dict[str, Any], sec: Section) -> None:
    for r in doc["rows"]:
        label, target = SERVICE_ROWS.get(r["workload"], (r["workload"], None))
        sec.add(label, fmt(r["batpak"], "/s"), baseline=r["baseline"] + " (same processes)",
                theirs=fmt(r["baseline_value"], "/s"), ratio=fmt(r["ratio"], "×"), target=target, value=r["ratio"])
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
        "then its baseline, with the same number of forked processes starting together; ratio = median of the "
        "per-run ratios.",
        "batpak runs as the real service (`bp.serve`: supervisor, writer, clients over POSIX queues); its "
        "baselines are opened by every process on its own, as a multiprocess app would.",
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
    optional: bool = False  # missing, or without --json: skipped with a note instead of an error


PROGRAMS = {p.key: p for p in (
    Program("engine", "bench_engine.py", "Engine, in-process (issue 2)",
            "batpak-mp's `Engine` in the caller's process (no writer, no IPC) — the floor of what the service "
            "can reach — against SQLite and LMDB doing the same work in the same process.",
            ("--quick",), "--repeat", render_engine),
    Program("service", "bench_service.py", "Service, multiprocess (issue 3)",
            "The service as applications use it: client processes talking to one writer, against SQLite and "
            "LMDB opened by as many processes.",
            ("--quick",), "--repeat", render_service),
    Program("restart", "bench_restart.py", "Reopen and writer restart (issues 2 and 4)",
            "Opening a large store, and how long the service is away when its writer is SIGKILLed.",
            ("--events", "100000", "--runs", "3", "--kills", "3"), "--runs", render_restart),
    Program("subscribe", "bench_subscribe.py", "Subscriptions and projections (issue 5)",
            "How soon other processes see a committed event, and how fast a projection is rebuilt.",
            ("--quick",), "", render_subscribe, optional=True),
)}

METHOD = [
    "Every baseline runs in the same invocation as batpak-mp, on the same disk, minutes apart at most: "
    "absolute figures drift on a shared machine, ratios much less. Ratio = batpak-mp ÷ baseline (for a "
    "time, lower is better).",
    "Equal durability: batpak-mp with its default `sync=\"group\"` (an append returns after its bytes are "
    "fdatasynced; one fsync per commit group); SQLite in WAL mode with `synchronous=FULL` (the WAL is "
    "synced at every commit); LMDB with `sync=True, metasync=True` (data and meta page synced at every "
    "write transaction).",
    "The stores live under `bench-data/` on the project's own disk, not tmpfs, because the cost of fsync "
    "is part of what is measured.",
    "Each figure is a median over runs (or a percentile over events); the program sections say how many.",
]

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


def run_program(prog: Program, args: argparse.Namespace, tmp: str) -> Section:
    """Runs one program (its output goes straight to the terminal) and reads its JSON."""
    sec = Section(prog.key, prog.title, prog.what)
    path = os.path.join(TOOLS, prog.script)
    if not supports_json(path):
        why = f"tools/{prog.script} is not there or has no --json option"
        if not prog.optional:
            raise Fatal(2, why)
        sec.skipped = why
        print(f"note: skipping {prog.key}: {why}", file=sys.stderr, flush=True)
        return sec
    argv = program_args(prog, args)
    sec.command = shlex.join(["python", f"tools/{prog.script}", *argv])
    out = os.path.join(tmp, f"{prog.key}.json")
    cmd = [sys.executable, path, *argv, "--json", out]
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    if code == 2:  # argparse's "bad usage": the options passed through
        raise Fatal(2, f"{prog.script} exited with code 2")
    if code != 0:
        sec.error = f"{prog.script} exited with code {code}"
        return sec
    try:
        with open(out) as f:
            prog.render(json.load(f), sec)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        sec.error = f"{prog.script}: could not read its JSON ({type(exc).__name__}: {exc})"
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


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, without the columns that are empty in every row."""
    keep = [i for i in range(len(headers)) if any(r[i] != NONE for r in rows)]
    lines = ["| " + " | ".join(headers[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    return lines + ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows]


def summary_rows(sections: list[Section]) -> list[list[str]]:
    return [[s.title.split(" (")[0], c.workload, c.measured, f"{c.target.text} (issue {c.target.issue})",
             verdict(c.met)] for s in sections for c in s.checks]


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
    lines = [
        "# Benchmarks", "",
        "<!-- Generated by tools/bench.py (or `batpak-mp bench`) from the programs' JSON; do not edit by hand. -->", "",
        "batpak-mp side by side, in one invocation, with what a user would pick instead — SQLite in WAL mode "
        "with `synchronous=FULL` and LMDB with `sync=True` (equal durability) — with the absolute figures, "
        "the ratios and the targets set in the issues.", "",
    ]
    if run.quick:
        lines += ["> **A `--quick` smoke run**: sizes and durations are far below what the issues ask for; "
                  "these figures check that the programs work, they are not the report.", ""]
    lines += ["## Machine and run", "", *machine_lines(run), "", "## Targets", ""]
    summary = summary_rows(sections)
    lines += [*markdown_table(["program", "workload", "measured", "target", "met"], summary), ""] if summary else [
        "No targeted figure was measured.", ""]
    if chart:
        lines += [f"![each targeted figure against its target]({chart})", ""]
    lines += ["## Method", "", *[f"- {m}" for m in METHOD], "", "## Results", ""]
    for sec in sections:
        lines += section_lines(sec)
    lines += [
        "## How to run", "", "```",
        ". .venv/bin/activate && pip install -e '.[dev,bench]'   # bench: matplotlib, for the chart",
        "python tools/bench.py              # every program at full size, writes this file and the chart",
        "python tools/bench.py --quick      # smoke run, writes bench-data/quick/",
        "batpak-mp bench [--quick] [--only engine,service,restart,subscribe]   # the same, from the CLI",
        "```", "",
        "Each program also runs on its own (`python tools/bench_engine.py --help`, and so on).", "",
    ]
    return "\n".join(lines)


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


def draw_chart(checks: list[Check], path: str, title: str) -> bool:
    """Bars per targeted figure, the target marked; False when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return False
    measured = [c for c in checks if c.value is not None]
    panels = [(heading, group) for heading, group in (
        ("ratio to the baseline (batpak-mp ÷ baseline); | = target", [c for c in measured if c.target.baseline]),
        ("absolute targets: times better than the target (≥ 1 meets it)", [c for c in measured if not c.target.baseline]),
    ) if group]
    if not panels:
        print("note: no targeted figure to chart", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(10, 1.6 + 0.62 * len(measured)),
                             gridspec_kw={"height_ratios": [len(g) + 1 for _, g in panels]})
    for ax, (heading, group) in zip(axes[:, 0], panels, strict=True):
        chart_panel(ax, heading, group)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def chart_panel(ax: Any, heading: str, group: list[Check]) -> None:
    points = [c.target.chart_point(c.value) for c in group if c.value is not None]
    bars = [max(b, 1e-3) for b, _ in points]
    marks = [t for _, t in points]
    ys = list(range(len(group)))
    ax.barh(ys, bars, color=["#3a7d44" if c.met else "#c0392b" for c in group], height=0.6)
    ax.scatter(marks, ys, marker="|", s=600, linewidths=2.5, color="black", zorder=3)
    ax.set_yticks(ys, labels=[textwrap.fill(f"{c.program}: {c.workload}".replace("`", ""), 48) for c in group], fontsize=8)
    ax.invert_yaxis()
    extent = [*bars, *marks]
    if max(extent) / min(extent) > 20:
        ax.set_xscale("log")
    ax.set_xlim(right=max(extent) * (1.6 if ax.get_xscale() == "log" else 1.08))
    for y, c in zip(ys, group, strict=True):  # the figures, in a column right of the plot
        ax.text(1.01, y, fmt(c.value, c.unit), va="center", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_title(heading + " — green: met, red: not met", fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)


# ---------------------------------------------------------------------------- main


def parse_only(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return list(PROGRAMS)
    unknown = [n for n in names if n not in PROGRAMS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"takes a comma-separated subset of {','.join(PROGRAMS)} (or all)")
    return [k for k in PROGRAMS if k in names]  # always in the report's order


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--quick", action="store_true", help="pass each program its smoke sizes (about a minute in all)")
    p.add_argument("--only", type=parse_only, default=list(PROGRAMS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(PROGRAMS)} (default: all)")
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
    print("\n" + "\n".join(markdown_table(["program", "workload", "measured", "target", "met"], summary_rows(sections))))
    for sec in sections:
        if sec.skipped or sec.error:
            print(f"{sec.key}: {'skipped: ' + sec.skipped if sec.skipped else 'FAILED: ' + sec.error}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(BENCH_DATA, exist_ok=True)
    run = Run(command=shlex.join(["python", "tools/bench.py", *(sys.argv[1:] if argv is None else argv)]),
              quick=args.quick, machine=machine(BENCH_DATA), load_before=load_average())
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="batpak-bench-") as tmp:
            sections = [run_program(PROGRAMS[key], args, tmp) for key in args.only]
    except Fatal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    run.wall_s, run.load_after = time.monotonic() - started, load_average()
    checks = [c for s in sections for c in s.checks]
    title = f"batpak-mp benchmarks — {run.machine['date']} — {run.machine['cpus']} CPUs, {run.machine['cpu']}"
    chart = draw_chart(checks, args.chart, title + (" — QUICK smoke run" if args.quick else ""))
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
