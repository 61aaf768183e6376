"""``batpak-mp top DATA_DIR``: a live terminal view of a served store's figures.

Owns: laying out one frame of ``_metrics.Figures`` with ``rich`` (``frame``: pure over
two reads, the rates are their difference) and the refresh loop (``run_top``: q or
Ctrl-C quits; ``--once`` prints one frame without rates, for scripts and tests).
Invariants: it only reads (``_metrics.Source``), so any number of ``top``s and scrapers
can watch one store; the terminal is put back as it was however the loop ends.
Must not import the writer, the engine, the client or the supervisor.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._ipc.control import state_name
from ._ipc.stats import Histogram
from ._metrics import Figures, Source

QUIT_KEYS = frozenset("qQ")
CURSOR_ROWS = 20  # cursors shown, most lagging first (the rest are counted)


def _ns(ns: int | None) -> str:
    if ns is None:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1000:.3g} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3g} ms"
    return f"{ns / 1e9:.3g} s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _latency(h: Histogram) -> str:
    if not h.observations:
        return "none yet"
    p99 = h.quantile(0.99)
    return (f"p50 ≤ {_ns(h.quantile(0.5))}, p99 ≤ {_ns(p99) if p99 is not None else '> ' + _ns(h.bounds[-1])}, "
            f"mean {_ns(h.total // h.observations)} ({h.observations})")


def frame(f: Figures, prev: Figures | None = None) -> RenderableType:
    """One frame: ``prev`` (an earlier read) gives the rates."""
    c, s = f.control, f.stats
    dt = (f.read_ns - prev.read_ns) / 1e9 if prev is not None else 0.0
    same_writer = prev is not None and prev.control.writer_epoch == c.writer_epoch and dt > 0

    def rate(now: int, before: int | None, fmt: Callable[[float], str] = lambda x: f"{x:,.0f}") -> str:
        return f" ({fmt((now - before) / dt)}/s)" if same_writer and before is not None and now >= before else ""

    p = prev.stats if prev is not None else None
    up = Text("up", style="bold green") if f.writer_up else Text("DOWN", style="bold red")
    beat = f"{f.heartbeat_age_s:.2f} s ago" if f.heartbeat_age_s is not None else "-"
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold cyan")
    rows.add_column()
    rows.add_row("writer", Text.assemble(up, f"  {state_name(c.state)}, epoch {c.writer_epoch}, pid {c.writer_pid or '-'}, "
                                             f"heartbeat {beat}, restarts {f.restarts}"))
    rows.add_row("frontier", f"visible {c.visible:,}, durable {c.durable:,}")
    rows.add_row("appends", f"{c.requests:,} requests{rate(c.requests, prev.control.requests if prev else None)}, "
                            f"{s.appended_events:,} events{rate(s.appended_events, p.appended_events if p else None)}, "
                            f"{_bytes(s.appended_bytes)}{rate(s.appended_bytes, p.appended_bytes if p else None, _bytes)}")
    g = s.group_size
    mean = f"mean {g.total / g.observations:.1f} requests" if g.observations else "none yet"
    rows.add_row("groups", f"{c.groups:,} groups{rate(c.groups, prev.control.groups if prev else None)}, {mean}, "
                           f"p99 ≤ {g.quantile(0.99) or '-'}")
    rows.add_row("commit", _latency(s.commit_ns))
    rows.add_row("fsync", _latency(s.fsync_ns))
    queue = f"{f.queue_depth} / {f.queue_capacity} messages" if f.queue_depth is not None else "- (no queue now)"
    rows.add_row("queue", queue)
    rows.add_row("clients", f"{c.clients}, dropped {c.dropped_messages:,} message(s)")
    if c.reason:
        rows.add_row("reason", c.reason)
    if f.errors:
        rows.add_row("errors", f"{f.errors} part(s) could not be read")
    parts: list[RenderableType] = [Text(f"batpak-mp top  {f.data_dir}", style="bold"), rows]
    if f.cursors:
        table = Table(title=None, show_edge=False, pad_edge=False)
        table.add_column("cursor")
        table.add_column("position", justify="right")
        table.add_column("lag (events)", justify="right")
        names = sorted(f.cursors, key=lambda n: (-f.cursor_lag(n), n))
        for name in names[:CURSOR_ROWS]:
            lag = f.cursor_lag(name)
            table.add_row(name, f"{f.cursors[name]:,}", Text(f"{lag:,}", style="yellow" if lag else ""))
        if len(names) > CURSOR_ROWS:
            table.add_row(f"… {len(names) - CURSOR_ROWS} more", "", "")
        parts.append(table)
    else:
        parts.append(Text("no durable cursors", style="dim"))
    return Group(*parts)


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """``wait(seconds)`` -> the key pressed meanwhile ("" for none). On a terminal, stdin
    is in cbreak mode meanwhile (restored on the way out); elsewhere it only sleeps."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else -1
    if fd < 0:
        def sleep(seconds: float) -> str:
            time.sleep(seconds)
            return ""
        yield sleep
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)

        def wait(seconds: float) -> str:
            ready, _, _ = select.select([fd], [], [], seconds)
            return os.read(fd, 32).decode(errors="replace") if ready else ""
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(data_dir: str, *, once: bool = False, interval: float = 1.0, console: Console | None = None) -> None:
    """Show the figures of ``data_dir``'s service until q or Ctrl-C (``once``: one frame).
    ``WriterUnavailable`` when nothing serves it."""
    console = console or Console()
    source = Source(data_dir)
    try:
        if once:
            console.print(frame(source.read()))
            return
        prev: Figures | None = None
        with _keys() as wait, Live(console=console, auto_refresh=False, transient=False) as live:
            try:
                while True:
                    figures = source.read()
                    live.update(Group(frame(figures, prev), Text(f"every {interval:g} s; q quits", style="dim")),
                                refresh=True)
                    prev = figures
                    if QUIT_KEYS & set(wait(interval)):
                        return
            except KeyboardInterrupt:
                return
    finally:
        source.close()
