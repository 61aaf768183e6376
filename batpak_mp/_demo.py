"""The demo behind ``batpak-mp demo``: the product in one run.

Owns: serving a store (supervisor + writer) on a temporary or given directory, running
worker processes that append and read concurrently, SIGKILLing the writer once mid-run,
showing live progress (rich), then a summary: events, throughput, the restart as the
journal itself recorded it, and a clean verification. Must not import the supervisor.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time

import multiprocess as mp
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._client import connect
from ._errors import BatpakError
from ._ipc.control import ControlBlock
from ._read.verify import verify
from ._service import Service, serve
from ._values import BatchItem, Coordinate, Kind, RestartPolicy, WriterState

MOVE = Kind(1, 1)
ORDER = Kind(2, 1)


def _worker(data_dir: str, wid: int, stop_at: float) -> tuple[int, int, int]:
    appended = reads = 0
    retries = 0
    with connect(data_dir, timeout=30) as store:
        player = Coordinate(f"player:{wid}", "room:demo")
        step = 0
        while time.time() < stop_at:
            step += 1
            try:
                if step % 10 == 0:
                    items = [BatchItem(Coordinate(f"order:{wid}-{step}-{i}", "shop"), ORDER, {"sku": i, "qty": 1})
                             for i in range(20)]
                    store.append_batch(items)
                    appended += len(items)
                else:
                    r = store.append(player, MOVE, {"x": step, "y": wid})
                    assert store.get(r.event_id).payload == {"x": step, "y": wid}
                    appended += 1
                    reads += 1
                if step % 25 == 0:
                    reads += len(store.history(player.entity, limit=50))
            except BatpakError:
                retries += 1  # a typed error (e.g. a timeout during the restart): try again
                time.sleep(0.05)
    return appended, reads, retries


def run_demo(data_dir: str | None, workers: int = 4, seconds: float = 8.0, console: Console | None = None) -> bool:
    con = console or Console()
    path = os.path.abspath(data_dir) if data_dir else tempfile.mkdtemp(prefix="batpak-demo-")
    con.print(f"[bold]batpak-mp demo[/bold] — store in {path}")
    con.print(f"serving with restart policy bounded(5, 60s); {workers} worker processes for {seconds:g} s; "
              "the writer will be SIGKILLed once halfway")
    t_serve = time.perf_counter()
    svc = serve(path, restart=RestartPolicy.bounded(5, 60_000), segment_max_bytes=4 << 20)
    con.print(f"service ready in {(time.perf_counter() - t_serve) * 1000:.0f} ms "
              f"(supervisor pid {svc.supervisor_pid}, writer pid {svc.writer_pid})")
    try:
        return _run(con, svc, path, workers, seconds)
    finally:
        svc.stop()


def _run(con: Console, svc: Service, path: str, workers: int, seconds: float) -> bool:
    control = ControlBlock.attach(path)
    ctx = mp.get_context("fork")
    start = time.time()
    stop_at = start + seconds
    killed_pid = 0
    restart_ms = 0.0
    with ctx.Pool(workers) as pool:
        pending = pool.starmap_async(_worker, [(path, w, stop_at) for w in range(workers)])
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=con, transient=False) as progress:
            task = progress.add_task("appending", total=seconds, status="")
            while not pending.ready():
                now = time.time()
                snap = control.read()
                if not killed_pid and now > start + seconds / 2 and snap.state == WriterState.READY:
                    killed_pid = snap.writer_pid
                    old_epoch = snap.writer_epoch
                    os.kill(killed_pid, signal.SIGKILL)
                    t_kill = time.monotonic()
                    while True:
                        s2 = control.read()
                        if s2.state == WriterState.READY and s2.writer_epoch > old_epoch:
                            restart_ms = (time.monotonic() - t_kill) * 1000
                            break
                        if time.monotonic() - t_kill > 30:
                            break
                        time.sleep(0.002)
                    progress.console.print(f"[red]SIGKILL[/red] writer pid {killed_pid} — supervisor restarted it "
                                           f"in {restart_ms:.0f} ms (epoch {old_epoch} → {old_epoch + 1})")
                state = ("[green]ready[/green]" if snap.state == WriterState.READY
                         else f"[yellow]{WriterState(snap.state).name.lower()}[/yellow]")
                progress.update(task, completed=min(now - start, seconds),
                                status=f"{snap.visible:>8,} events committed · writer {state}")
                time.sleep(0.1)
            progress.update(task, completed=seconds)
        results = pending.get()
    elapsed = time.time() - start
    final = control.read()
    control.close()
    svc.stop()
    writer_starts = count_writer_starts(path)
    report = verify(path)
    appended = sum(r[0] for r in results)
    table = Table(title="summary", show_header=False)
    table.add_row("events appended by workers", f"{appended:,}")
    table.add_row("throughput", f"{appended / elapsed:,.0f} events/s (durable: fsynced before each ack)")
    table.add_row("reads (get + history)", f"{sum(r[1] for r in results):,}")
    table.add_row("writer SIGKILLed", f"pid {killed_pid}, back in {restart_ms:.0f} ms; "
                  f"{final.restarts} restart(s) by the supervisor")
    table.add_row("writer starts in the journal", str(writer_starts))
    table.add_row("calls retried by workers", str(sum(r[2] for r in results)))
    table.add_row("verification", f"[green]clean[/green] — {report.events_checked:,} events, "
                  f"{report.segments_checked} segments" if report.ok else f"[red]{len(report.problems)} problems")
    con.print(table)
    return report.ok


def count_writer_starts(path: str) -> int:
    """How many writer starts the (stopped) store's journal records."""
    from ._storage.engine import Engine

    with Engine.open(path) as engine:
        return sum(1 for ev in engine.reader.scan(0)
                   if ev.kind.category == 0 and ev.coordinate.entity == "writer" and ev.kind.type_id == 1)
