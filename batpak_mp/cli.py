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
