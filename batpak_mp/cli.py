"""The ``batpak-mp`` command line.

Owns: argument parsing, exit codes and the human/JSON output of every command (serve,
status, top, append, get, history, tail, verify, inspect, drill, demo, bench, backup, restore, fork). Errors are one
clear line on stderr; ``--debug`` (before the command) shows the traceback instead.

Exit codes (also in ``batpak-mp --help`` and the README): 0 ok; 1 a check found
problems (verify, drill), an ``--expected-clock`` conflict (append) or a benchmark
program failed (bench); 2 bad usage or input (options, JSON, kind, names, an event id
that is malformed or not in the store, a directory that is not a store); 3 the store
could not be used (service down or failed, directory locked by a writer, corruption,
I/O error).

Reads (get, history, tail) go through a running service (``connect``) and, when none
runs, open the directory read-only (``OfflineStore``: no lock, no recovery, no writes, so
a read never changes a byte and never keeps a writer from starting); ``tail --follow``
needs the service. ``status`` and ``inspect`` never take the lock.
Must not import the supervisor package (``serve`` starts it as a process) or the writer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import posix_ipc

from ._client import Store, connect, process_started_ns, service_gone
from ._errors import BatpakError, ConcurrencyConflict, NotFound, StoreLocked, WriterUnavailable
from ._ipc import codes as C
from ._ipc.control import ControlBlock, ControlSnapshot, state_name
from ._read.inspect import checkpoint_seq, frames_at, is_data_dir, jsonable, payload_preview, segment_ids, summary
from ._read.offline import OfflineStore
from ._read.verify import verify as verify_dir
from ._values import Coordinate, Event, Kind, Receipt, VerifyReport, WriterState

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_STORE = 0, 1, 2, 3
PAGE = 1000  # events per query_after call of tail
TAIL_DEFAULT = 10  # tail without --after shows this many of the newest events
FOLLOW_POLL_S = 0.05  # tail --follow without Store.subscribe: how often the frontier is read
PROGRESS_AFTER_S = 0.5  # verify shows its progress bar only when it runs longer than this

EPILOG = """\b
Exit codes:
  0  ok
  1  a check found problems (verify, drill), an --expected-clock
     conflict (append), or a benchmark program failed (bench)
  2  bad usage or input: an option, JSON, kind or name that is wrong,
     an event id that is malformed or not in the store, a directory
     that is not a batpak-mp store
  3  the store could not be used: no service running (status, append,
     tail --follow) or it failed, the directory is locked by a writer,
     corruption, an I/O error
\b
Errors are one line on stderr; put --debug before the command to get
the traceback. Every read command takes --json.
"""


class CliError(Exception):
    """An error the CLI reports as one line with its own exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fail(code: int, message: str) -> NoReturn:
    raise CliError(code, message)


# ---- parameter types ------------------------------------------------------------------
class KindType(click.ParamType[Kind]):
    """``CAT:TYPE`` -> ``Kind`` (decimal or 0x hex; ranges checked, reserved ones are
    refused by ``append`` itself, and allowed as filters)."""

    name = "CAT:TYPE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Kind:
        if isinstance(value, Kind):
            return value
        parts = str(value).split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            category, type_id = int(parts[0], 0), int(parts[1], 0)
        except ValueError:
            self.fail(f"{value!r} is not CAT:TYPE (two integers, for example 1:7)", param, ctx)
        if not 0 <= category <= 15 or not 0 <= type_id <= 4095:
            self.fail(f"{value!r}: category must be 0..15 and type 0..4095", param, ctx)
        return Kind(category, type_id)


class OffsetType(click.ParamType[int]):
    """A byte offset >= 0, decimal or 0x hex."""

    name = "BYTES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            number = int(str(value), 0)
        except ValueError:
            self.fail(f"{value!r} is not a byte offset (decimal or 0x hex)", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return number


KIND = KindType()
OFFSET = OffsetType()
DATA_DIR = click.Path(file_okay=False)
POSITIVE = click.IntRange(min=1)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


# ---- output ---------------------------------------------------------------------------
def _print_json(doc: Any) -> None:
    click.echo(json.dumps(jsonable(doc), indent=2, ensure_ascii=False))


def _emit(as_json: bool, doc: dict[str, Any], text: str) -> None:
    if as_json:
        _print_json(doc)
    else:
        click.echo(text)


def _iso(wall_ms: int) -> str:
    try:
        when = dt.datetime.fromtimestamp(wall_ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{wall_ms} ms"
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hex(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).hex()


def _kind_text(kind: tuple[int, int]) -> str:
    return f"{kind[0]}:{kind[1]}"


def _event_doc(ev: Event) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "global_sequence": ev.global_sequence, "event_id": ev.event_id.hex(), "entity": ev.entity,
        "scope": ev.scope, "kind": _kind_text(ev.kind), "entity_clock": ev.entity_clock, "wall_ms": ev.wall_ms,
        "time": _iso(ev.wall_ms),
    }
    try:
        doc["payload"] = jsonable(ev.payload)
    except Exception as exc:  # a payload that is not msgpack: show its bytes instead
        doc["payload"] = None
        doc["payload_error"] = f"{type(exc).__name__}: {exc}"
        doc["payload_hex"] = bytes(ev.payload_bytes).hex()
    doc.update({
        "payload_version": ev.payload_version, "payload_size": len(ev.payload_bytes),
        "event_hash": ev.event_hash.hex(), "prev_hash": ev.prev_hash.hex(),
        "causation_id": _hex(ev.causation_id), "correlation_id": _hex(ev.correlation_id),
    })
    return doc


def _event_line(ev: Event) -> str:
    """One event on one line: the sequence first (resume with ``tail --after``)."""
    return (f"{ev.global_sequence:>8}  {_iso(ev.wall_ms)}  {_kind_text(ev.kind):>7}  {ev.entity} @ {ev.scope}"
            f"  #{ev.entity_clock}  {payload_preview(bytes(ev.payload_bytes))}")


def _event_text(ev: Event) -> str:
    lines = [
        f"event {ev.event_id.hex()}",
        f"  sequence        {ev.global_sequence}",
        f"  entity          {ev.entity}   (clock {ev.entity_clock})",
        f"  scope           {ev.scope}",
        f"  kind            {_kind_text(ev.kind)}",
        f"  time            {_iso(ev.wall_ms)}   ({ev.wall_ms} ms)",
        f"  event hash      {ev.event_hash.hex()}",
        f"  prev hash       {ev.prev_hash.hex()}",
    ]
    if ev.causation_id is not None:
        lines.append(f"  causation       {ev.causation_id.hex()}")
    if ev.correlation_id is not None:
        lines.append(f"  correlation     {ev.correlation_id.hex()}")
    lines.append(f"  payload         ({len(ev.payload_bytes)} bytes, version {ev.payload_version})")
    try:
        body = json.dumps(jsonable(ev.payload), indent=2, ensure_ascii=False)
    except Exception:
        body = payload_preview(bytes(ev.payload_bytes), 10_000)
    lines += ["    " + line for line in body.splitlines()]
    return "\n".join(lines)


def _receipt_doc(r: Receipt) -> dict[str, Any]:
    return {
        "event_id": r.event_id.hex(), "global_sequence": r.global_sequence, "entity": r.entity, "scope": r.scope,
        "entity_clock": r.entity_clock, "event_hash": r.event_hash.hex(), "prev_hash": r.prev_hash.hex(),
        "wall_ms": r.wall_ms, "durable": r.durable, "signature": _hex(r.signature),
    }


# ---- the service, and reading with or without it --------------------------------------
def _snapshot(path: str) -> ControlSnapshot | None:
    """The control block of ``path``'s service, or None when no service ever ran."""
    try:
        block = ControlBlock.attach(path)
    except WriterUnavailable:
        return None
    except posix_ipc.Error as exc:  # not an OSError: say it as the library would
        raise WriterUnavailable(f"cannot open the control block of {path!r}: {type(exc).__name__}: {exc}") from None
    try:
        return block.read()
    finally:
        block.close()


def _alive(pid: int) -> bool:
    """A live process has ``pid`` (a zombie nobody reaped yet counts as gone)."""
    return bool(pid) and process_started_ns(pid) is not None


def _down_reason(snap: ControlSnapshot) -> str | None:
    """Why the service behind ``snap`` cannot serve, or None when it can (or is
    restarting its writer: clients wait for that)."""
    if snap.state == WriterState.FAILED:
        return f"the service failed: {snap.reason or 'no reason recorded'}"
    if snap.state == WriterState.STOPPED:
        return "the service was stopped"
    return service_gone(snap, time.monotonic_ns(), process_started_ns)  # the clients' own judgement


def _durable_hint(path: str) -> tuple[int, int] | None:
    """(store key, durable frontier) from a stale control block: recovery must not cut
    what the last writer acknowledged as durable."""
    try:
        snap = _snapshot(path)
    except BatpakError:
        return None
    return (snap.store_key, snap.durable) if snap is not None and snap.store_key else None


def _open_offline(path: str) -> OfflineStore:
    """The directory opened read-only: no lock, no recovery, no writes (safe beside a
    writer that is starting)."""
    if not is_data_dir(path):
        _fail(EXIT_USAGE, f"{path!r} is not a batpak-mp data directory (no store.meta), and no service runs for it")
    store = OfflineStore.open(path, durable_hint=_durable_hint(path))
    if sys.stderr.isatty():  # for people; scripts get clean stderr (errors stay one line)
        click.echo(f"note: no service is running for {path!r}; reading its files read-only", err=True)
    return store


@contextmanager
def _reader(data_dir: str, *, offline_ok: bool = True) -> Iterator[Store | OfflineStore]:
    """A running service's store, or (``offline_ok``, no service) the files read-only."""
    path = os.path.abspath(data_dir)
    source: Store | OfflineStore
    try:
        source = connect(path)
    except WriterUnavailable:
        if not offline_ok:
            raise
        source = _open_offline(path)
    try:
        yield source
    finally:
        source.close()


def _visible(source: Store | OfflineStore) -> int:
    return source.frontier().visible if isinstance(source, Store) else source.visible


# ---- the group ---------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (give it before the command).")
@click.version_option(package_name="batpak-mp", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """batpak-mp: a durable, hash-chained event store for multiprocess Python apps."""
    ctx.obj = {"debug": debug}


# ---- verify ------------------------------------------------------------------------------
def _verify_with_progress(path: str, delay: float) -> VerifyReport:
    """``verify`` that shows a rich progress bar on stderr when it runs longer than
    ``delay`` seconds and stderr is a terminal (stdout, and so ``--json``, stays clean).
    The bar pulses: ``bp.verify`` reports no per-segment progress."""
    if not sys.stderr.isatty():
        return verify_dir(path)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    done: list[VerifyReport] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(verify_dir(path))
        except BaseException as exc:  # handed to the main thread below
            failed.append(exc)

    worker = threading.Thread(target=run, name="verify", daemon=True)
    worker.start()
    if delay > 0:
        worker.join(delay)
    if delay <= 0 or worker.is_alive():
        seg_dir = os.path.join(path, "segments")
        ids = segment_ids(path)
        total = 0
        for sid in ids:
            try:
                total += os.stat(os.path.join(seg_dir, f"{sid:012d}.seg")).st_size
            except OSError:
                pass
        what = f"verifying {len(ids)} segment(s), {total / 2**20:,.1f} MiB"
        columns = (SpinnerColumn(), TextColumn(what), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            progress.add_task(what, total=None)
            while worker.is_alive():
                worker.join(0.1)
    worker.join()
    if failed:
        raise failed[0]
    return done[0]


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@json_option
@click.option("--progress-after", type=click.FloatRange(min=0), default=PROGRESS_AFTER_S, hidden=True)
def verify(data_dir: str, as_json: bool, progress_after: float) -> None:
    """Check every checksum, hash chain, sequence and index of DATA_DIR (offline,
    read-only, safe beside a live writer). Exits 1 when it finds any problem."""
    report = _verify_with_progress(os.path.abspath(data_dir), progress_after)
    doc = {
        "ok": report.ok, "events_checked": report.events_checked,
        "segments_checked": report.segments_checked,
        "problems": [{"segment": p.segment, "offset": p.offset, "what": p.what} for p in report.problems],
    }
    lines = [f"{'ok' if report.ok else 'PROBLEMS'}: {report.events_checked} events in "
             f"{report.segments_checked} segments checked"]
    lines += [f"  {p.segment} @ {p.offset}: {p.what}" for p in report.problems]
    _emit(as_json, doc, "\n".join(lines))
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


# ---- serve -------------------------------------------------------------------------------
@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.option("--restart", "restart", default="once", show_default=True, metavar="once|bounded:N:MS",
              help="Restart policy of the supervisor.")
@click.option("--sync", type=click.Choice(["group", "interval", "none"]), default="group", show_default=True,
              help="When the writer fsyncs (group: before every acknowledgement).")
@click.option("--segment-max-bytes", type=int, default=None, help="Size of each segment file (default 64 MiB).")
@click.option("--hang-timeout-ms", type=click.IntRange(min=1), default=C.HANG_TIMEOUT_MS, show_default=True,
              help="A writer whose heartbeat is older than this is killed and restarted.")
@click.option("--ready-timeout-ms", type=click.IntRange(min=1), default=C.READY_TIMEOUT_MS, show_default=True,
              help="How long a starting writer may take to recover before it counts as failed.")
@click.option("--stop-timeout-ms", type=click.IntRange(min=1), default=C.STOP_TIMEOUT_MS, show_default=True,
              help="How long a drain may take before the writer is killed.")
@click.option("--restart-delay-ms", type=click.IntRange(min=0), default=C.RESTART_DELAY_MS, show_default=True,
              help="Pause before each restart.")
@click.option("--sync-interval-ms", type=click.IntRange(min=1), default=None,
              help="With --sync interval: the longest an acknowledged event waits for its fsync.")
@click.option("--max-payload-bytes", type=click.IntRange(min=1), default=None,
              help="Largest encoded payload accepted (default 16 MiB).")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464).")
@click.option("--no-tag-index", "no_tag_index", is_flag=True, default=False,
              help="Keep no tag index: the writer saves ~1.5 µs per event; prefix, scope and kind queries "
                   "filter the records instead.")
@click.option("--bridge", "bridge_url", default=None, metavar="URL",
              help="Also run a JetStream bridge to this NATS URL, under the same restart policy (docs/SCALING.md).")
@click.option("--bridge-stream", default=None, metavar="NAME", help="The bridge's stream (with --bridge).")
def serve(data_dir: str, restart: str, sync: str, segment_max_bytes: int | None, hang_timeout_ms: int,
          ready_timeout_ms: int, stop_timeout_ms: int, restart_delay_ms: int, sync_interval_ms: int | None,
          max_payload_bytes: int | None, metrics: str | None, no_tag_index: bool = False,
          bridge_url: str | None = None, bridge_stream: str | None = None) -> None:
    """Run the service for DATA_DIR in the foreground until SIGTERM/SIGINT (graceful drain).
    DATA_DIR is created 0700 when missing; one open to group/other or owned by another user
    is refused. If this process dies, even by SIGKILL, the service drains and stops."""
    from ._service import cleanup_ipc_if_unserved, prepare_data_dir, writer_args
    from ._values import RestartPolicy

    policy = RestartPolicy.parse(restart)
    path = os.path.abspath(data_dir)
    prepare_data_dir(path)
    config = {key: value for key, value in (("segment_max_bytes", segment_max_bytes),
                                            ("sync_interval_ms", sync_interval_ms),
                                            ("max_payload_bytes", max_payload_bytes)) if value is not None}
    if no_tag_index:
        config["tag_index"] = False
    wargs = writer_args(sync, config, path)
    if (bridge_url is None) != (bridge_stream is None):
        _fail(EXIT_USAGE, "--bridge and --bridge-stream go together")
    listener = None
    if metrics is not None:  # bound here: a bad or busy address fails before anything starts
        from ._metrics import listen

        listener = listen(metrics)
    ready_r, ready_w = os.pipe()
    cmd = C.supervisor_argv(path, policy, hang_timeout_ms=hang_timeout_ms, ready_timeout_ms=ready_timeout_ms,
                            stop_timeout_ms=stop_timeout_ms, restart_delay_ms=restart_delay_ms, ready_fd=ready_w,
                            writer_args=wargs, parent_pid=os.getpid(),
                            bridge=(bridge_url, bridge_stream) if bridge_url and bridge_stream else None)
    if listener is not None:
        cmd = C.with_metrics_fd(cmd, listener.fileno())
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            pass_fds=(ready_w,) if listener is None else (ready_w, listener.fileno()))
    os.close(ready_w)
    if listener is not None:
        listener.close()  # the supervisor serves it now

    def announce() -> None:
        """Tell systemd (Type=notify) when the writer serves: the supervisor's ready line."""
        with os.fdopen(ready_r, "rb") as pipe:
            line = pipe.readline().decode(errors="replace").strip()
        ready, detail = C.parse_announcement(line)
        if ready:
            sd_notify(f"READY=1\nSTATUS=serving {path} (writer pid {detail})")
        elif line:
            sd_notify(f"STATUS={line}")

    threading.Thread(target=announce, daemon=True).start()

    def forward(signum: int, _frame: object) -> None:
        sd_notify("STOPPING=1")
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = proc.wait()
    if code == C.SupervisorExit.STOPPED:
        cleanup_ipc_if_unserved(path)  # a clean stop: nothing is left for clients to read
    # FAILED: the control block keeps the reason for `status` and for clients;
    # IN_USE (the directory is served by someone else): its IPC objects are not ours to remove
    sys.exit(128 - code if code < 0 else code)


def sd_notify(message: str) -> None:
    """Send a state line to systemd's notify socket when there is one ($NOTIFY_SOCKET);
    a no-op elsewhere (supervisord, a terminal)."""
    import socket

    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), addr)
    except OSError:
        pass  # readiness is a courtesy: never fail the service over it


# ---- reset-ipc ---------------------------------------------------------------------------
def _lock_held(path: str) -> bool:
    """True when a live process holds the flock of ``path`` (False when it is free or absent)."""
    import fcntl
    import os

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@cli.command("reset-ipc")
@click.argument("data_dir", type=DATA_DIR)
@click.option("--yes", is_flag=True, help="Really remove them (without it, only say what would go).")
def reset_ipc(data_dir: str, yes: bool) -> None:
    """Remove a stopped service's leftover IPC objects for DATA_DIR (control block, queue,
    client areas) — e.g. after restoring an older backup into the same path, whose last
    durable sequence the old control block would otherwise hold recovery to. Refuses
    while a writer or supervisor runs for it. The data directory is not touched."""
    import os

    from ._ipc.names import SHM_DIR, ipc_prefix, request_queue_name, store_files, supervisor_lock_path, writer_lock_path
    from ._service import cleanup_ipc

    path = os.path.abspath(data_dir)
    for lock in (writer_lock_path(path), supervisor_lock_path(path)):
        if _lock_held(lock):
            raise StoreLocked(path)  # exit 3: a live service owns these objects; stop it first
    found = store_files(os.listdir(SHM_DIR), ipc_prefix(path)) if os.path.isdir(SHM_DIR) else []
    if not yes:
        click.echo(f"would remove the request queue {request_queue_name(path)[1:]} and {len(found)} object(s) "
                   f"in {SHM_DIR}:")
        for n in found:
            click.echo(f"  {n}")
        click.echo("this forgets the old service's durable frontier (a recovery floor): run again with --yes")
        sys.exit(EXIT_PROBLEMS)
    cleanup_ipc(path)
    click.echo(f"removed the IPC objects of {path}")


# ---- backup, restore, fork ---------------------------------------------------------------
def _copy_with_progress(what: str, run: Callable[[Callable[[int, int], None] | None], Any]) -> Any:
    """Run ``run(progress)`` with a byte progress bar on stderr when stderr is a terminal
    (stdout, and so ``--json``, stays clean); ``run(None)`` otherwise."""
    if not sys.stderr.isatty():
        return run(None)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    columns = (TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)
        return run(lambda done, total: bar.update(task, completed=done, total=max(total, done)))


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@json_option
def compact(data_dir: str, as_json: bool) -> None:
    """Remove the payloads erasure requests name (a stub stays in each one's place, the
    chains still verify): sealed segments are rewritten and swapped in, by the running
    service (appends go on) or, with none running, here under the writer lock.
    OPERATIONS.md §11."""
    path = os.path.abspath(data_dir)
    if not is_data_dir(path):
        raise click.BadParameter(f"{path!r} is not a batpak-mp data directory", param_hint="DATA_DIR")
    try:
        store = connect(path)
    except WriterUnavailable:
        from ._storage.engine import Engine

        with Engine.open(path) as eng:  # no service: this process is the writer meanwhile (StoreLocked otherwise)
            r = eng.compact()
    else:
        try:
            r = store.compact()
        finally:
            store.close()
    _emit(as_json, r._asdict(), f"compacted {path}: {r.segments_rewritten} segment(s) rewritten, "
                                f"{r.events_removed} payload(s) removed, {r.bytes_reclaimed:,} bytes reclaimed "
                                f"in {r.elapsed_ms:.0f} ms")


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.argument("dest", type=DATA_DIR)
@click.option("--max-rate", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MIB_S",
              help="Copy at most this many MiB per second (leave the disk to the service).")
@json_option
def backup(data_dir: str, dest: str, max_rate: float | None, as_json: bool) -> None:
    """Copy DATA_DIR into DEST consistently, while its service runs or not: every event
    durable when the backup starts, whole commits only, each segment checked as copied.
    DEST is missing, empty or a previous backup of the same store (then only new
    segments are copied); it is replaced atomically, so an interrupted backup leaves the
    previous one. Exits 2 when DEST is refused, 3 when the source fails its checks or
    the disk is full."""
    from ._backup import backup as run_backup

    rate = max_rate * 2**20 if max_rate is not None else None
    r = _copy_with_progress("backup", lambda progress: run_backup(data_dir, dest, progress=progress, max_rate=rate))
    doc = r._asdict()
    _emit(as_json, doc, f"backed up {r.store_id} through sequence {r.last_sequence} into {r.dest}: "
                        f"{r.files_copied} file(s) copied ({r.bytes_copied / 2**20:,.1f} MiB), {r.files_reused} "
                        f"reused from the previous backup, in {r.seconds:.2f} s")


@cli.command()
@click.argument("backup_dir", metavar="BACKUP", type=DATA_DIR)
@click.argument("data_dir", type=DATA_DIR)
@click.option("--force", is_flag=True, help="Replace DATA_DIR even when it holds another store or other files.")
@json_option
def restore(backup_dir: str, data_dir: str, force: bool, as_json: bool) -> None:
    """Put BACKUP in place as DATA_DIR: refused while DATA_DIR is served (exit 3) or
    when it holds another store (exit 2, unless --force). The copy is verified before
    it replaces DATA_DIR in one atomic step; the stale IPC objects of DATA_DIR are
    removed, and its previous contents are kept at DATA_DIR.pre-restore-<ms>."""
    from ._backup import restore as run_restore

    r = _copy_with_progress("restore", lambda progress: run_restore(backup_dir, data_dir, force=force,
                                                                     progress=progress))
    kept = f"; the previous contents are at {r.previous}" if r.previous else ""
    _emit(as_json, r._asdict(), f"restored {r.store_id} through sequence {r.last_sequence} into {r.data_dir}{kept}")


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.argument("dest", type=DATA_DIR)
@click.option("--at", "at", type=click.IntRange(min=0), default=None, metavar="SEQ",
              help="The last sequence the fork holds (default: the durable frontier now); it must end a commit.")
@json_option
def fork(data_dir: str, dest: str, at: int | None, as_json: bool) -> None:
    """Make DEST a new store (its own store id, and a lineage record naming DATA_DIR's
    store and the fork point) with DATA_DIR's history through --at. Sealed segments are
    shared by hard link where DEST's file system allows; later writes of either store
    never reach the other. DEST must be missing or empty."""
    from ._backup import fork as run_fork

    r = _copy_with_progress("fork", lambda progress: run_fork(data_dir, dest, at=at, progress=progress))
    _emit(as_json, r._asdict(), f"forked {r.parent_store_id} at sequence {r.fork_sequence} into {r.dest} as "
                                f"store {r.store_id}: {r.files_linked} segment(s) shared, {r.files_copied} copied "
                                f"({r.bytes_copied / 2**20:,.1f} MiB), in {r.seconds:.2f} s")


# ---- status ------------------------------------------------------------------------------
def _retention_doc(path: str) -> dict[str, Any] | None:
    """The retention rules in force (issue 13), read from the files (no lock, no writes);
    None when they cannot be read."""
    from ._read.redaction import current_retention

    try:
        store = OfflineStore.open(path)
    except BatpakError:
        return None
    try:
        r = current_retention(store.reader, {})
    except BatpakError:
        return None
    finally:
        store.close()
    return {"rules": [rule.to_wire() for rule in r.rules], "idempotency_window_ms": r.idempotency_window_ms}


def _retention_line(doc: dict[str, Any]) -> str:
    rules = "; ".join(f"entity {p or '*'} scope {s or '*'} kind {':'.join(map(str, k)) if k else '*'}"
                      f"{f' keep last {n}' if n else ''}{f' max age {a} ms' if a else ''}" for p, s, k, n, a in doc["rules"])
    window = doc["idempotency_window_ms"]
    keys = f"idempotency keys for {window} ms" if window else "idempotency keys for good"
    return f"{len(doc['rules'])} rule(s){': ' + rules if rules else ''}; {keys}"


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@json_option
def status(data_dir: str, as_json: bool) -> None:
    """Show the service of DATA_DIR: writer state, epoch and pid, frontier, restarts,
    clients, dropped messages, failure reason. Exits 3 when no service is running (or it
    failed, or was stopped); never takes the writer lock."""
    path = os.path.abspath(data_dir)
    snap = _snapshot(path)
    if snap is None:
        if not is_data_dir(path):
            _fail(EXIT_USAGE, f"{path!r} is not a batpak-mp data directory (no store.meta), and no service runs for it")
        ckpt = checkpoint_seq(path)
        if as_json:
            _print_json({"data_dir": path, "running": False, "state": "absent", "checkpoint_seq": ckpt})
        last = f" (last checkpoint: sequence {ckpt})" if ckpt is not None else ""
        _fail(EXIT_STORE, f"no service is running for {path!r}{last}")
    now = time.monotonic_ns()
    down = _down_reason(snap)
    doc: dict[str, Any] = {
        "data_dir": path, "running": down is None, "state": state_name(snap.state),
        "visible": snap.visible, "durable": snap.durable, "writer_epoch": snap.writer_epoch,
        "writer_pid": snap.writer_pid or None, "writer_alive": _alive(snap.writer_pid),
        "supervisor_pid": snap.supervisor_pid or None, "supervisor_alive": _alive(snap.supervisor_pid),
        "restarts": snap.restarts, "clients": snap.clients, "dropped_messages": snap.dropped_messages,
        "reason": snap.reason or None,
        "heartbeat_age_s": round((now - snap.heartbeat_ns) / 1e9, 3) if snap.heartbeat_ns else None,
        "writer_uptime_s": round((now - snap.started_ns) / 1e9, 3) if snap.started_ns and snap.writer_pid else None,
    }
    bridge = _bridge_status(path)
    if bridge is not None:
        doc["bridge"] = bridge
    retention = _retention_doc(path)
    if retention is not None:
        doc["retention"] = retention
    if as_json:
        _print_json(doc)
    else:
        def pid(p: int | None, alive: bool) -> str:
            return f"{p}{'' if alive else ' (not running)'}" if p else "-"

        up = f", up {doc['writer_uptime_s']:.1f} s" if doc["writer_uptime_s"] is not None else ""
        beat = f"{doc['heartbeat_age_s']:.1f} s ago" if doc["heartbeat_age_s"] is not None else "-"
        lines = [
            f"data dir     {path}",
            f"state        {doc['state']}{'' if down is None else '  (' + down + ')'}",
            f"writer       epoch {snap.writer_epoch}, pid {pid(snap.writer_pid, doc['writer_alive'])}{up}",
            f"supervisor   pid {pid(snap.supervisor_pid, doc['supervisor_alive'])}, restarts {snap.restarts}",
            f"frontier     visible {snap.visible}, durable {snap.durable}",
            f"clients      {snap.clients}",
            f"dropped      {snap.dropped_messages} message(s)",
            f"heartbeat    {beat}",
        ]
        if snap.reason:
            lines.append(f"reason       {snap.reason}")
        if bridge is not None:
            lines.append(f"bridge       {_bridge_line(bridge)}")
        if retention is not None:
            lines.append(f"retention    {_retention_line(retention)}")
        click.echo("\n".join(lines))
    if down is not None:
        _fail(EXIT_STORE, down)


# ---- append ------------------------------------------------------------------------------
@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.argument("entity")
@click.argument("scope")
@click.option("--kind", type=KIND, required=True,
              help="Event kind CAT:TYPE, e.g. 1:7 (category 1..15 but 13, type 0..4095).")
@click.option("--payload", required=True, metavar="JSON", help="The payload as JSON ('-': read it from stdin).")
@click.option("--key", default=None, metavar="K", help="Idempotency key: the same key again returns the first receipt.")
@click.option("--expected-clock", type=click.IntRange(min=0), default=None, metavar="N",
              help="Append only if ENTITY has exactly N events now (exit 1 otherwise).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True, metavar="S",
              help="Seconds to wait for the writer.")
@json_option
def append(data_dir: str, entity: str, scope: str, kind: Kind, payload: str, key: str | None,
           expected_clock: int | None, timeout: float, as_json: bool) -> None:
    """Append one event to ENTITY in SCOPE through the running service of DATA_DIR and
    print its receipt (returns once the event is durable, in the default sync mode)."""
    text = sys.stdin.read() if payload == "-" else payload
    try:
        value = json.loads(text)
    except ValueError as exc:
        _fail(EXIT_USAGE, f"--payload is not valid JSON: {exc}")
    coord = Coordinate(entity, scope)
    path = os.path.abspath(data_dir)
    snap = _snapshot(path)
    if snap is not None and (down := _down_reason(snap)) is not None:
        _fail(EXIT_STORE, down)  # at once, instead of waiting out the timeout
    with connect(path, timeout=timeout) as store:
        r = store.append(coord, kind, value, idempotency_key=key, expected_clock=expected_clock)
    _emit(as_json, _receipt_doc(r),
          f"appended sequence {r.global_sequence}: {r.entity} @ {r.scope} clock {r.entity_clock}, "
          f"{'durable' if r.durable else 'not yet durable'}\n"
          f"  event id    {r.event_id.hex()}\n  event hash  {r.event_hash.hex()}")


# ---- reads -------------------------------------------------------------------------------
def _event_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 16:
        _fail(EXIT_USAGE, f"{text!r} is not an event id (32 hex digits)")
    return raw


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.argument("event_id", metavar="EVENT_ID_HEX")
@json_option
def get(data_dir: str, event_id: str, as_json: bool) -> None:
    """Show one event by its id (32 hex digits). An id not in the store exits 2."""
    raw = _event_id(event_id)
    with _reader(data_dir) as source:
        ev = source.get(raw)
        _emit(as_json, _event_doc(ev), _event_text(ev))


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.argument("entity")
@click.option("--after-clock", type=click.IntRange(min=0), default=None, metavar="N", help="Only events with a clock above N.")
@click.option("--limit", type=POSITIVE, default=None, metavar="N", help="At most N events (the oldest ones).")
@json_option
def history(data_dir: str, entity: str, after_clock: int | None, limit: int | None, as_json: bool) -> None:
    """Show the events of ENTITY, oldest first (JSON: an array)."""
    with _reader(data_dir) as source:
        events = source.history(entity, after_clock=after_clock, limit=limit)
        if as_json:
            _print_json([_event_doc(ev) for ev in events])
        elif events:
            click.echo("\n".join(_event_line(ev) for ev in events))
        else:
            click.echo(f"no events for entity {entity!r}", err=True)


class _Stop(BaseException):
    """SIGTERM while following. A BaseException, like KeyboardInterrupt: the handler may
    run inside any ``except Exception`` (payload rendering has some) and must not be
    swallowed there."""


def _newest(source: Store | OfflineStore, n: int, entity: str | None, scope: str | None,
            kind: Kind | None) -> tuple[list[Event], int]:
    """The ``n`` newest events matching the filters, and the sequence to follow from."""
    if entity is None and scope is None and kind is None:
        start = max(0, _visible(source) - n)
        page = source.query_after(start, limit=n)
        return page.events, max(page.next_after, start)
    newest: deque[Event] = deque(maxlen=n)
    pos = 0
    while True:
        page = source.query_after(pos, limit=PAGE, entity=entity, scope=scope, kind=kind)
        newest.extend(page.events)
        if page.next_after <= pos:
            return list(newest), pos
        pos = page.next_after


def _follow(store: Store, pos: int, entity: str | None, scope: str | None, kind: Kind | None,
            emit: Callable[[Event], bool]) -> None:
    """Hand every new matching event after ``pos`` to ``emit`` until it returns False.
    Uses ``Store.subscribe`` (woken by the writer) when the store has it, else polls."""
    if hasattr(store, "subscribe"):
        subscription = store.subscribe(pos, entity=entity, scope=scope, kind=kind)
        try:
            for ev in subscription:
                if not emit(ev):
                    return
        finally:
            close = getattr(subscription, "close", None)
            if close is not None:
                close()
        return
    while True:
        page = store.query_after(pos, limit=PAGE, entity=entity, scope=scope, kind=kind)
        for ev in page.events:
            if not emit(ev):
                return
        if page.next_after > pos:
            pos = page.next_after
            continue
        state = store.frontier().writer_state
        if state in (WriterState.FAILED, WriterState.STOPPED):
            raise WriterUnavailable(f"the service {'failed' if state == WriterState.FAILED else 'was stopped'}")
        time.sleep(FOLLOW_POLL_S)


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.option("--after", type=click.IntRange(min=0), default=None, metavar="SEQ",
              help="Start after global sequence SEQ (resumable); default: the newest events.")
@click.option("--limit", type=POSITIVE, default=None, metavar="N",
              help=f"With --after: print at most N events, then exit (also with --follow). "
                   f"Without --after: start with the N newest events (default {TAIL_DEFAULT}).")
@click.option("--entity", default=None, help="Only events of this entity.")
@click.option("--scope", default=None, help="Only events in this scope.")
@click.option("--kind", type=KIND, default=None, help="Only events of this kind CAT:TYPE.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until SIGINT/SIGTERM (exit 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line (JSON lines).")
def tail(data_dir: str, after: int | None, limit: int | None, entity: str | None, scope: str | None,
         kind: Kind | None, follow: bool, as_json: bool) -> None:
    """Print events in commit order, each with its global sequence, optionally filtered.
    --follow needs the running service; without it, tail reads a stopped store too."""
    printed = 0

    def emit(ev: Event) -> bool:
        nonlocal printed
        if as_json:
            click.echo(json.dumps(jsonable(_event_doc(ev)), ensure_ascii=False))
        else:
            click.echo(_event_line(ev))
        printed += 1
        return limit is None or after is None or printed < limit

    def on_term(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not interrupt the cleanup
        raise _Stop()

    if follow:
        signal.signal(signal.SIGTERM, on_term)
    try:
        with _reader(data_dir, offline_ok=not follow) as source:
            if after is None:
                events, pos = _newest(source, limit or TAIL_DEFAULT, entity, scope, kind)
                for ev in events:
                    emit(ev)
            else:
                pos = after
                while limit is None or printed < limit:
                    room = PAGE if limit is None else min(PAGE, limit - printed)
                    page = source.query_after(pos, limit=room, entity=entity, scope=scope, kind=kind)
                    for ev in page.events:
                        emit(ev)
                    if page.next_after <= pos:
                        break
                    pos = page.next_after
            if follow and (limit is None or after is None or printed < limit):
                assert isinstance(source, Store)  # offline_ok=False above
                _follow(source, pos, entity, scope, kind, emit)
    except (KeyboardInterrupt, _Stop):
        if not follow:
            raise
    sys.exit(EXIT_OK)


# ---- inspect -----------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / 2**20:.1f} MiB"


def _summary_text(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [f"data dir    {doc['data_dir']}"]
    if not meta["present"]:
        lines.append("store.meta  missing")
    else:
        created = _iso(meta["created_ms"]) if isinstance(meta.get("created_ms"), int) else "?"
        state = "" if meta.get("ok") else f"  PROBLEM: {meta.get('problem')}"
        lines.append(f"store       id {meta.get('store_id')}, format {meta.get('format_version')}, created {created}{state}")
    ck = doc["checkpoint"]
    if ck is None:
        lines.append("checkpoint  none")
    elif ck["ok"]:
        lines.append(f"checkpoint  sequence {ck['seq']} (segment {ck['segment_id']}, offset {ck['end_offset']})")
    else:
        lines.append(f"checkpoint  {ck['problem']}")
    wl = doc["writer_lock"]
    lines.append(f"writer.lock {'pid ' + str(wl['pid']) + (' (alive)' if wl['alive'] else ' (not running)') if wl['pid'] else '-'}")
    lines.append("")
    lines.append(f"{'segment':>8} {'first seq':>10} {'last seq':>10} {'frames':>8} {'size':>10} {'state':>8} "
                 f"{'data end':>10}  footer / tail")
    for s in doc["segments"]:
        if s["state"] == "sealed":
            where = f"@{s['footer_offset']} ({_size(s['footer_len'] or 0)}, {'ok' if s['footer_ok'] else 'BAD'})"
        else:
            where = f"tail: {s['tail']}" if s["tail"] else "-"
        if s["problem"]:
            where += f"  PROBLEM: {s['problem']}"

        def num(v: int | None) -> str:
            return "-" if v is None else str(v)

        lines.append(f"{s['segment_id']:>8} {num(s['first_seq']):>10} {num(s['last_seq']):>10} {s['frames']:>8} "
                     f"{_size(s['size']):>10} {s['state']:>8} {num(s['data_end']):>10}  {where}")
    if not doc["segments"]:
        lines.append("(no segments)")
    if doc["index_files"]:
        lines.append("")
        lines.append("index       " + ", ".join(f"{f['name']} {_size(f['size'])}" for f in doc["index_files"]))
    return "\n".join(lines)


def _ok(value: object) -> str:
    return "ok" if value else "MISMATCH"


def _frames_text(doc: dict[str, Any]) -> str:
    lines = [f"segment {doc['segment_id']} ({doc['file']}, {_size(doc['size'])}, "
             f"{'sealed' if doc['sealed'] else 'not sealed'})"]
    for p in doc["positions"]:
        f = p["fields"]
        head = f"@{p['offset']}: {p['what']}, {p['status']}" + (f" ({p['detail']})" if p["detail"] else "")
        lines.append(head)
        if p["what"] == "frame" and "version" in f:
            flags = ",".join(f["flag_names"]) or "-"
            lines += [
                f"    length {f['frame_len']}, crc {f['crc']} {_ok(f['crc_ok'])}, hash {_ok(f.get('hash_ok'))}, "
                f"version {f['version']}, flags {flags}",
                f"    sequence {f['global_sequence']}, clock {f['entity_clock']}, kind {f['kind']}, "
                f"time {_iso(f['wall_ms'])}, payload {f['payload_len']} B v{f['payload_version']}",
                f"    event id   {f['event_id']}",
                f"    event hash {f['event_hash']}",
                f"    prev hash  {f['prev_hash']}",
            ]
            if "entity" in f:
                lines.append(f"    entity {f['entity']!r}, scope {f['scope']!r}")
                lines.append(f"    payload {f['payload_preview']}")
        elif p["what"] == "frame":
            lines.append(f"    length {f.get('frame_len')}, crc {f.get('crc')}")
        elif f:
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in f.items()))
    return "\n".join(lines)


@cli.command("inspect")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--segment", type=click.IntRange(min=0), default=None, metavar="N",
              help="Decode frames of segment N (the number in its file name).")
@click.option("--offset", type=OFFSET, default=None,
              help="Byte offset in the segment to decode from (default 64: its first frame; 0x.. accepted).")
@click.option("--count", type=POSITIVE, default=10, show_default=True, metavar="N", help="Frames to decode with --segment.")
@json_option
def inspect_cmd(data_dir: str, segment: int | None, offset: int | None, count: int, as_json: bool) -> None:
    """Show what DATA_DIR holds: store.meta, the checkpoint, every segment (first and
    last sequence, frames, size, sealed or active, where its data and footer are) and
    the index files; with --segment, decode frames (header fields, entity, scope,
    payload preview, CRC and hash checks), damaged ones too. Read-only, takes no lock:
    safe beside a live writer. Exits 0 whatever it shows (verify is the check)."""
    path = os.path.abspath(data_dir)
    if offset is not None and segment is None:
        raise click.UsageError("--offset needs --segment")
    if not is_data_dir(path) and not segment_ids(path):
        _fail(EXIT_USAGE, f"{path!r} is not a batpak-mp data directory (no store.meta, no segments)")
    if segment is None:
        doc = summary(path)
        _emit(as_json, doc, _summary_text(doc))
    else:
        doc = frames_at(path, segment, offset, count)
        _emit(as_json, doc, _frames_text(doc))


# ---- drill, demo, bench ------------------------------------------------------------------
@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False), required=False)
@click.option("--clients", type=int, default=8, show_default=True, help="Client processes appending.")
@click.option("--kills", type=int, default=10, show_default=True, help="Times the writer is SIGKILLed.")
@click.option("--seconds", type=float, default=30.0, show_default=True, help="How long clients append.")
@click.option("--seed", type=int, default=None, help="Seed of the kill schedule and the workload.")
@click.option("--segment-max-bytes", type=int, default=1 << 20, show_default=True,
              help="Small segments make kills land mid-rotation and mid-seal too.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def drill(data_dir: str | None, clients: int, kills: int, seconds: float, seed: int | None,
          segment_max_bytes: int, as_json: bool) -> None:
    """Crash-restart drill: clients append while the writer is SIGKILLed; then prove
    every acknowledged event is present exactly once and the journal verifies.
    Exits 1 on any loss, duplicate or verification problem."""
    from ._drill import run_drill

    report = run_drill(data_dir, clients=clients, kills=kills, seconds=seconds, seed=seed,
                       segment_max_bytes=segment_max_bytes,
                       progress=None if as_json else lambda m: click.echo(m, err=True))
    _emit(as_json, report.summary(), report.text())
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False), required=False)
@click.option("--workers", type=int, default=4, show_default=True, help="Worker processes.")
@click.option("--seconds", type=float, default=8.0, show_default=True, help="How long they run.")
def demo(data_dir: str | None, workers: int, seconds: float) -> None:
    """Serve a store, run workers appending and reading, SIGKILL the writer once, verify."""
    from ._demo import run_demo

    sys.exit(EXIT_OK if run_demo(data_dir, workers=workers, seconds=seconds) else EXIT_PROBLEMS)


BENCH_PROGRAMS = ("engine", "service", "restart", "subscribe")  # the programs tools/bench.py runs, in order


def _bench_only(ctx: click.Context, param: click.Parameter, value: str) -> str:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names != ["all"] and (not names or any(n not in BENCH_PROGRAMS for n in names)):
        raise click.BadParameter(f"takes a comma-separated subset of {','.join(BENCH_PROGRAMS)} (or all)")
    return ",".join(names)


def _bench_program_args(f: Callable[..., None]) -> Callable[..., None]:
    """One ``--NAME-args`` option per benchmark program."""
    for name in reversed(BENCH_PROGRAMS):
        f = click.option(f"--{name}-args", default="", metavar="'ARGS'",
                         help=f"More options for tools/bench_{name}.py, as one quoted string.")(f)
    return f


@cli.command()
@click.option("--quick", is_flag=True, help="Small sizes and short runs (a smoke run; the report then goes to "
              "bench-data/quick/ unless --out/--chart say otherwise).")
@click.option("--repeat", type=POSITIVE, default=None, metavar="N", help="Runs per figure; the median is reported.")
@click.option("--only", "--suite", "only", default="all", show_default=True, metavar="LIST", callback=_bench_only,
              help=f"Which benchmark programs to run: a comma-separated subset of {','.join(BENCH_PROGRAMS)}.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="The report (default docs/BENCHMARKS.md).")
@click.option("--chart", type=click.Path(dir_okay=False), default=None, help="The PNG chart (default docs/benchmarks.png).")
@click.option("--tools-dir", type=click.Path(file_okay=False), default=None,
              help="Where the benchmark programs are (default: tools/ of the source checkout).")
@_bench_program_args
def bench(quick: bool, repeat: int | None, only: str, out: str | None, chart: str | None, tools_dir: str | None,
          **program_args: str) -> None:
    """Run the benchmarks side by side with SQLite and LMDB and write the report: tools/bench.py
    runs tools/bench_engine.py, bench_service.py, bench_restart.py and bench_subscribe.py,
    then writes docs/BENCHMARKS.md and its chart docs/benchmarks.png (matplotlib, the
    'bench' extra). They ship with the source checkout, not the installed package: exits 2
    when they are not there (or reject an option passed through), 1 when one fails."""
    tools = Path(tools_dir) if tools_dir else Path(__file__).resolve().parents[1] / "tools"
    program = tools / "bench.py"
    if not program.is_file():
        _fail(EXIT_USAGE, f"benchmark program not found: {program} (it ships with the source checkout; run from a "
                          "clone, or give --tools-dir)")
    options = {"--repeat": repeat and str(repeat), "--only": only != "all" and only, "--out": out, "--chart": chart,
               **{"--" + key.replace("_", "-"): value for key, value in program_args.items()}}
    cmd = [sys.executable, str(program), *(["--quick"] if quick else []),
           *(f"{name}={value}" for name, value in options.items() if value)]  # name=value: ARGS may start with -
    click.echo("$ " + shlex.join(cmd), err=True)
    code = subprocess.call(cmd)
    if code in (EXIT_PROBLEMS, EXIT_USAGE):  # bench.py has said why, in its last line
        sys.exit(code)
    if code != 0:
        _fail(EXIT_PROBLEMS, f"{program.name} exited with code {code}")


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and tests).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="S",
              help="Seconds between refreshes.")
def top(data_dir: str, once: bool, interval: float) -> None:
    """A live view of DATA_DIR's service: writer state, appends and bytes per second, group
    sizes, commit and fsync latency, queue depth, clients, restarts, frontiers and the lag
    of each durable cursor (the figures of `serve --metrics`). q or Ctrl-C quits. Exits 3
    when no service runs."""
    from ._top import run_top

    run_top(os.path.abspath(data_dir), once=once, interval=interval)


# ---- entry point -------------------------------------------------------------------------
def _debug_requested(args: list[str]) -> bool:
    """``--debug`` among the group's options (the ones before the command name)."""
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an error that ends a command."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, ConcurrencyConflict):
        return EXIT_PROBLEMS
    if isinstance(exc, (NotFound, ValueError)):
        return EXIT_USAGE
    return EXIT_STORE


# ---- JetStream: bridge, restore-from-stream (batpak_mp.jetstream, docs/SCALING.md) ---------------
BRIDGE_STALE_S = 5.0  # a bridge status file not rewritten for this long belongs to a bridge that is gone


def _bridge_status(path: str) -> dict[str, Any] | None:
    """The bridge's status file (``batpak_mp.jetstream``), with ``running`` judged from
    its pid and age; None when no bridge ever ran here. Reads a file: needs no nats-py."""
    try:
        with open(os.path.join(path, "bridge.status"), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    age = (time.time_ns() // 1_000_000 - int(doc.get("updated_ms") or 0)) / 1000
    doc["running"] = (doc.get("state") not in ("stopped", "failed") and _alive(int(doc.get("pid") or 0))
                      and age < BRIDGE_STALE_S)
    doc["age_s"] = round(age, 1)
    return doc


def _bridge_line(b: dict[str, Any]) -> str:
    err = f", last error: {b['last_error']}" if b.get("last_error") else ""
    run = "" if b.get("running") else " (not running)"
    return (f"{b.get('state')}{run}: stream {b.get('stream')} at {b.get('url')}, published through "
            f"{b.get('published_through')}, lag {b.get('lag_events')} event(s), {b.get('events_per_s')} events/s, "
            f"{b.get('errors')} error(s){err}")


@cli.command()
@click.argument("data_dir", type=DATA_DIR)
@click.option("--nats", "url", required=True, metavar="URL", help="NATS server URL (several: comma-separated).")
@click.option("--stream", required=True, metavar="NAME", help="JetStream stream (created when missing).")
@click.option("--prefix", default=None, metavar="SUBJECT", help="Subject prefix (default batpak.<stream>).")
@click.option("--replicas", type=click.IntRange(min=1, max=5), default=1, show_default=True,
              help="Replicas of a stream the bridge creates (3 on a three-node cluster).")
def bridge(data_dir: str, url: str, stream: str, prefix: str | None, replicas: int) -> None:
    """Publish every committed event of the served DATA_DIR to a JetStream stream, in
    commit order, exactly once, until SIGTERM/SIGINT. Resumes from the stream's last
    message; shows its state in `batpak-mp status`. Exits 2 when the stream holds another
    store's journal (or diverged), 3 when a journal frame fails its check."""
    from .jetstream import BridgeConfig, run_bridge

    code = run_bridge(BridgeConfig(os.path.abspath(data_dir), url, stream, prefix, replicas),
                      log=lambda msg: click.echo(msg, err=True))
    if code == 2:
        _fail(EXIT_USAGE, "the stream refused this journal (see `batpak-mp status`)")
    if code:
        _fail(EXIT_STORE, "a journal frame failed its check (see `batpak-mp status`)")


@cli.command("restore-from-stream")
@click.argument("url", metavar="URL")
@click.argument("stream", metavar="STREAM")
@click.argument("data_dir", type=DATA_DIR)
@click.option("--segment-max-bytes", type=int, default=None, help="Size of each segment file (default 64 MiB).")
@json_option
def restore_from_stream(url: str, stream: str, data_dir: str, segment_max_bytes: int | None, as_json: bool) -> None:
    """Rebuild a journal in DATA_DIR (missing or empty) from a bridge's STREAM: the same
    event ids, sequences and hashes, every message checked; then verify it. Exits 1 when
    the verification finds problems, 2 for a stream that is not a whole journal or a
    DATA_DIR that is not empty, 3 when the stream cannot be read or fails its checks."""
    from ._errors import InvalidArgument, StreamMismatch
    from .jetstream import restore_from_stream as run_restore

    try:
        r = run_restore(url, stream, data_dir, segment_max_bytes=segment_max_bytes)
    except (InvalidArgument, StreamMismatch) as exc:
        _fail(EXIT_USAGE, str(exc))
    report = verify_dir(os.path.abspath(data_dir))
    doc = {**r.__dict__, "verify_ok": report.ok, "events_checked": report.events_checked}
    _emit(as_json, doc, f"restored store {r.store_id}: {r.events} event(s) from stream {stream} "
                        f"({r.segments} segment(s), {r.events / max(r.seconds, 1e-9):,.0f} events/s), "
                        f"verify {'ok' if report.ok else 'FOUND PROBLEMS'}")
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    try:
        code = cli.main(args=args, prog_name="batpak-mp", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # the group's help
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # the reader of our output went away (``| head``): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_OK)
    except (CliError, BatpakError, OSError) as exc:
        if debug:
            raise
        message = exc.message if isinstance(exc, CliError) else str(exc)
        click.echo(f"error: {message}", err=True)
        sys.exit(exit_code_for(exc))
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: internal error, {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(EXIT_STORE)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
