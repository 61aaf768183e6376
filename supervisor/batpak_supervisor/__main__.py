"""``python -m batpak_supervisor``: the supervisor's command line.

Owns: parsing arguments into a ``process.Config`` and mapping usage errors to exit 2.
Everything else is in ``process`` (I/O) and ``policy`` (pure decisions).

    python -m batpak_supervisor DATA_DIR [--restart once|bounded:N:MS]
        [--hang-timeout-ms 3000] [--restart-delay-ms 0] [--ready-timeout-ms 30000]
        [--stop-timeout-ms 10000] [--ready-fd N] -- WRITER_ARGS...

Exit codes: 0 stopped on request (SIGTERM/SIGINT/SIGHUP; the writer drained), 2 bad
usage, 3 the service failed (restart policy exhausted, a fail-closed writer exit, or
never ready; the control block says FAILED with the reason), 4 the data directory is
already served by another supervisor or a writer this one did not start.

Must not import the writer, the client or the engine.
"""

from __future__ import annotations

import argparse
import os
import sys

from batpak_mp._errors import InvalidArgument
from batpak_mp._values import RestartPolicy

from .process import EXIT_USAGE, Config, run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of milliseconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _positive_ms(text: str) -> int:
    value = _ms(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _policy(text: str) -> RestartPolicy:
    try:
        return RestartPolicy.parse(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fd(text: str) -> int:
    try:
        fd = int(text)
        os.fstat(fd)
    except (ValueError, OSError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an open file descriptor") from None
    return fd


def parse(argv: list[str]) -> Config:
    """Split at the first ``--``: before it are ours, after it go to the writer verbatim."""
    if "--" in argv:
        cut = argv.index("--")
        own, writer_args = argv[:cut], argv[cut + 1:]
    else:
        own, writer_args = argv, []
    p = _Parser(prog="python -m batpak_supervisor",
                usage="%(prog)s DATA_DIR [--restart once|bounded:N:MS] [options] [-- WRITER_ARGS...]",
                description="Run the batpak-mp writer for DATA_DIR and restart it under a policy.",
                epilog="Arguments after -- are passed to the writer (e.g. --segment-max-bytes N --sync group).")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--restart", type=_policy, default=RestartPolicy.once(), metavar="once|bounded:N:MS",
                   help="restart policy (default: once)")
    p.add_argument("--hang-timeout-ms", type=_positive_ms, default=3_000,
                   help="kill a ready writer whose heartbeat is older than this (default 3000)")
    p.add_argument("--restart-delay-ms", type=_ms, default=0, help="pause before each restart (default 0)")
    p.add_argument("--ready-timeout-ms", type=_positive_ms, default=30_000,
                   help="kill a writer not ready this long after its start (default 30000)")
    p.add_argument("--stop-timeout-ms", type=_positive_ms, default=10_000,
                   help="SIGKILL a draining writer after this long (default 10000)")
    p.add_argument("--ready-fd", type=_fd, default=None,
                   help="write 'ready <writer_pid>' or 'failed <reason>' here once, then close it")
    ns = p.parse_args(own)
    return Config(
        data_dir=ns.data_dir, policy=ns.restart, writer_args=tuple(writer_args),
        hang_timeout_ms=ns.hang_timeout_ms, restart_delay_ms=ns.restart_delay_ms,
        ready_timeout_ms=ns.ready_timeout_ms, stop_timeout_ms=ns.stop_timeout_ms,
        ready_fd=ns.ready_fd,
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
