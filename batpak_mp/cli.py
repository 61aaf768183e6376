"""The ``batpak-mp`` command line.

Owns: argument parsing, exit codes and human/JSON output of every command. Errors are
one clear line on stderr (``--debug`` shows the traceback). Exit codes: 0 ok,
1 a check found problems, 2 bad usage or input, 3 the store could not be used.
Must not import the supervisor package (it starts it as a process).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ._errors import BatpakError
from ._verify import verify as verify_dir

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_STORE = 0, 1, 2, 3


def _emit(as_json: bool, doc: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(doc, indent=2, default=str) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """batpak-mp: a durable, hash-chained event store for multiprocess Python apps."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(data_dir: str, as_json: bool) -> None:
    """Check every checksum, hash chain, sequence and index of DATA_DIR (offline)."""
    report = verify_dir(data_dir)
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


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--restart", "restart", default="once", show_default=True, metavar="once|bounded:N:MS",
              help="Restart policy of the supervisor.")
@click.option("--sync", type=click.Choice(["group", "interval", "none"]), default="group", show_default=True,
              help="When the writer fsyncs (group: before every acknowledgement).")
@click.option("--segment-max-bytes", type=int, default=None, help="Size of each segment file (default 64 MiB).")
@click.option("--hang-timeout-ms", type=int, default=3000, show_default=True,
              help="A writer whose heartbeat is older than this is killed and restarted.")
def serve(data_dir: str, restart: str, sync: str, segment_max_bytes: int | None, hang_timeout_ms: int) -> None:
    """Run the service for DATA_DIR in the foreground until SIGTERM/SIGINT (graceful drain)."""
    import os
    import signal
    import subprocess

    from ._service import cleanup_ipc, writer_args
    from ._values import RestartPolicy

    policy = RestartPolicy.parse(restart)
    path = os.path.abspath(data_dir)
    os.makedirs(path, mode=0o700, exist_ok=True)
    config = {} if segment_max_bytes is None else {"segment_max_bytes": segment_max_bytes}
    cmd = [sys.executable, "-m", "batpak_supervisor", path, "--restart", policy.spec(),
           "--hang-timeout-ms", str(hang_timeout_ms), "--", *writer_args(sync, config, path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = proc.wait()
    cleanup_ipc(path)
    sys.exit(code)


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


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="batpak-mp", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except BatpakError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE if isinstance(exc, ValueError) else EXIT_STORE)
    except SystemExit:
        raise
    sys.exit(EXIT_OK)


if __name__ == "__main__":
    main()
