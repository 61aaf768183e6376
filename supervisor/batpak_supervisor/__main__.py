"""``python -m batpak_supervisor``: the supervisor's command line.

Owns: parsing arguments into a ``process.Config`` and mapping usage errors to exit 2.
The option names, their defaults and the exit codes are the contract's
(``batpak_mp._ipc.codes``, whose ``supervisor_argv`` builds what this parses).
Everything else is in ``process`` (I/O) and ``policy`` (pure decisions).

    python -m batpak_supervisor DATA_DIR [--restart once|bounded:N:MS]
        [--hang-timeout-ms 3000] [--restart-delay-ms 0] [--ready-timeout-ms 30000]
        [--stop-timeout-ms 10000] [--ready-fd N] [--parent-pid PID] [--metrics-fd N] -- WRITER_ARGS...

With ``--parent-pid`` the supervisor drains its writer and stops (exit 0) once its parent
is no longer PID (``bp.serve`` and ``batpak-mp serve`` pass their own pid).

Exit codes (``SupervisorExit``): 0 stopped on request (SIGTERM/SIGINT/SIGHUP; the writer drained), 2 bad
usage, 3 the service failed (restart policy exhausted, a fail-closed writer exit, or
never ready; the control block says FAILED with the reason), 4 the data directory is
already served by another supervisor or a writer this one did not start.

Must not import the writer, the client or the engine; from the library it imports only
``batpak_mp._ipc``, ``batpak_mp._values`` and ``batpak_mp._errors``.
"""

from __future__ import annotations

import argparse
import os
import sys

from batpak_mp._errors import InvalidArgument
from batpak_mp._ipc import codes as C
from batpak_mp._values import RestartPolicy

from .process import Config, run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(C.SupervisorExit.USAGE)


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


def _pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if pid < 1:
        raise argparse.ArgumentTypeError(f"{pid} must be >= 1")
    return pid


def parse(argv: list[str]) -> Config:
    """Split at the first ``--``: before it are ours, after it go to the writer verbatim."""
    own, writer_args = C.split_supervisor_args(argv)
    p = _Parser(prog=f"python -m {C.SUPERVISOR_MODULE}",
                usage="%(prog)s DATA_DIR [--restart once|bounded:N:MS] [options] [-- WRITER_ARGS...]",
                description="Run the batpak-mp writer for DATA_DIR and restart it under a policy.",
                epilog="Arguments after -- are passed to the writer (e.g. --segment-max-bytes N --sync group).")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument(C.OPT_RESTART, dest="restart", type=_policy, default=RestartPolicy.once(),
                   metavar="once|bounded:N:MS", help="restart policy (default: once)")
    p.add_argument(C.OPT_HANG_TIMEOUT_MS, dest="hang_timeout_ms", type=_positive_ms, default=C.HANG_TIMEOUT_MS,
                   help=f"kill a ready writer whose heartbeat is older than this (default {C.HANG_TIMEOUT_MS})")
    p.add_argument(C.OPT_RESTART_DELAY_MS, dest="restart_delay_ms", type=_ms, default=C.RESTART_DELAY_MS,
                   help=f"pause before each restart (default {C.RESTART_DELAY_MS})")
    p.add_argument(C.OPT_READY_TIMEOUT_MS, dest="ready_timeout_ms", type=_positive_ms, default=C.READY_TIMEOUT_MS,
                   help=f"kill a writer not ready this long after its start (default {C.READY_TIMEOUT_MS})")
    p.add_argument(C.OPT_STOP_TIMEOUT_MS, dest="stop_timeout_ms", type=_positive_ms, default=C.STOP_TIMEOUT_MS,
                   help=f"SIGKILL a draining writer after this long (default {C.STOP_TIMEOUT_MS})")
    p.add_argument(C.OPT_METRICS_FD, dest="metrics_fd", type=_fd, default=None,
                   help="serve Prometheus metrics on this listening socket (made by bp.serve / batpak-mp serve)")
    p.add_argument(C.OPT_READY_FD, dest="ready_fd", type=_fd, default=None,
                   help="write 'ready <writer_pid>' or 'failed <reason>' here once, then close it")
    p.add_argument(C.OPT_PARENT_PID, dest="parent_pid", type=_pid, default=None,
                   help="drain the writer and stop once the parent process is no longer this pid")
    p.add_argument(C.OPT_BRIDGE, dest="bridge_url", default=None, metavar="URL",
                   help="also run a JetStream bridge (batpak_mp.jetstream) to this NATS URL, same restart policy")
    p.add_argument(C.OPT_BRIDGE_STREAM, dest="bridge_stream", default=None, metavar="NAME",
                   help="the bridge's stream (required with --bridge)")
    ns = p.parse_args(own)
    if (ns.bridge_url is None) != (ns.bridge_stream is None):
        p.error(f"{C.OPT_BRIDGE} and {C.OPT_BRIDGE_STREAM} go together")
    return Config(
        data_dir=ns.data_dir, policy=ns.restart, writer_args=tuple(writer_args),
        metrics_fd=ns.metrics_fd,
        hang_timeout_ms=ns.hang_timeout_ms, restart_delay_ms=ns.restart_delay_ms,
        ready_timeout_ms=ns.ready_timeout_ms, stop_timeout_ms=ns.stop_timeout_ms,
        ready_fd=ns.ready_fd, parent_pid=ns.parent_pid,
        bridge=(ns.bridge_url, ns.bridge_stream) if ns.bridge_url is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
