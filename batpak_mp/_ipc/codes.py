"""Exit codes and command lines between the processes of a service.

Owns (docs/PROTOCOL.md §14): the writer's exit codes and what each means to the
supervisor; the supervisor's exit codes; the supervisor's command line
(``python -m batpak_supervisor DATA_DIR [options] -- WRITER_ARGS``: its option names, its
defaults and ``supervisor_argv``, the one builder that ``bp.serve`` and ``batpak-mp
serve`` use; the supervisor's parser takes its option names and defaults from here, and a
test parses what ``supervisor_argv`` builds); the options the supervisor adds to the
writer's command line (``writer_argv``); and the readiness lines on the ready pipes.

Invariants: every code and option is written once, here; the writer returns these
codes, the supervisor acts on them, ``bp.serve`` and the CLI read the supervisor's.
A code never changes meaning (scripts and unit files rely on them).
Pure: no I/O. Must not import the storage layer, the read layer or any process role.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Sequence

from .._values import RestartPolicy


class WriterExit(enum.IntEnum):
    """How ``python -m batpak_mp.writer`` ends."""

    OK = 0  # clean stop (or started by a parent other than --supervisor-pid)
    USAGE = 2  # bad arguments or configuration: the next start would fail the same way
    POISONED = 70  # an fsync failed: the kernel may have dropped pages; never retry over them
    CORRUPT = 71  # recovery found damage below the durable end (or a newer format): an operator must look
    LOCKED = 72  # another live process holds the store's lock: this service does not own the directory


# The writer exits that restarting cannot help, and how the supervisor explains each.
RESTART_CANNOT_HELP: dict[WriterExit, str] = {
    WriterExit.USAGE: "the writer refused its arguments or configuration",
    WriterExit.POISONED: "the writer stopped after a failed fsync; the store is poisoned",
    WriterExit.CORRUPT: "the writer found corruption during recovery",
    WriterExit.LOCKED: "the store is locked by another live process",
}


class SupervisorExit(enum.IntEnum):
    """How ``python -m batpak_supervisor`` ends (``batpak-mp serve`` exits with it too)."""

    STOPPED = 0  # stopped on request; the writer drained and is gone
    USAGE = 2  # bad command line
    FAILED = 3  # the service failed: policy exhausted, a fail-closed writer exit, never ready
    IN_USE = 4  # another supervisor or a live writer already serves this data directory


# -- the supervisor's command line ------------------------------------------------------------
SUPERVISOR_MODULE = "batpak_supervisor"  # run as ``python -m batpak_supervisor``
WRITER_MODULE = "batpak_mp.writer"  # run by the supervisor as ``python -m batpak_mp.writer``
WRITER_ARGS_AFTER = "--"  # everything after the first one goes to the writer verbatim

OPT_RESTART = "--restart"  # once | bounded:N:MS (RestartPolicy.spec())
OPT_HANG_TIMEOUT_MS = "--hang-timeout-ms"
OPT_RESTART_DELAY_MS = "--restart-delay-ms"
OPT_READY_TIMEOUT_MS = "--ready-timeout-ms"
OPT_STOP_TIMEOUT_MS = "--stop-timeout-ms"
OPT_READY_FD = "--ready-fd"  # the supervisor's and the writer's: where to write the readiness line
OPT_SUPERVISOR_PID = "--supervisor-pid"  # the writer's: stop when the parent is no longer this pid
OPT_PARENT_PID = "--parent-pid"  # the supervisor's: drain and stop when its parent is no longer this pid
OPT_METRICS_FD = "--metrics-fd"  # the supervisor's: a listening socket to serve /metrics on (batpak_mp._metrics)

HANG_TIMEOUT_MS = 3_000  # a ready writer whose heartbeat (every 50 ms) is older than this is killed
RESTART_DELAY_MS = 0  # pause before each restart (restart policies, not back-off, bound restarts)
READY_TIMEOUT_MS = 30_000  # a starting writer must recover within this (a large tail takes seconds)
STOP_TIMEOUT_MS = 10_000  # a draining writer is SIGKILLed after this


def supervisor_argv(data_dir: str, restart: RestartPolicy, *, hang_timeout_ms: int = HANG_TIMEOUT_MS,
                    restart_delay_ms: int = RESTART_DELAY_MS, ready_timeout_ms: int = READY_TIMEOUT_MS,
                    stop_timeout_ms: int = STOP_TIMEOUT_MS, ready_fd: int | None = None,
                    writer_args: Sequence[str] = (), python: str | None = None,
                    parent_pid: int | None = None, bridge: tuple[str, str] | None = None) -> list[str]:
    """The command line that starts a supervisor for ``data_dir`` (``python``: the
    interpreter, default this one; ``parent_pid``: the supervisor stops, draining its
    writer, once its parent is no longer that process)."""
    argv = [python or sys.executable, "-m", SUPERVISOR_MODULE, data_dir, OPT_RESTART, restart.spec(),
            OPT_HANG_TIMEOUT_MS, str(hang_timeout_ms), OPT_RESTART_DELAY_MS, str(restart_delay_ms),
            OPT_READY_TIMEOUT_MS, str(ready_timeout_ms), OPT_STOP_TIMEOUT_MS, str(stop_timeout_ms)]
    if ready_fd is not None:
        argv += [OPT_READY_FD, str(ready_fd)]
    if parent_pid is not None:
        argv += [OPT_PARENT_PID, str(parent_pid)]
    if bridge is not None:  # (NATS URL, stream): the supervisor runs a bridge beside the writer
        argv += [OPT_BRIDGE, bridge[0], OPT_BRIDGE_STREAM, bridge[1]]
    return [*argv, WRITER_ARGS_AFTER, *writer_args]


def split_supervisor_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the supervisor's own arguments, the writer's) of a supervisor command line
    without its ``python -m batpak_supervisor`` head."""
    if WRITER_ARGS_AFTER in args:
        cut = list(args).index(WRITER_ARGS_AFTER)
        return list(args[:cut]), list(args[cut + 1:])
    return list(args), []


def writer_argv(data_dir: str, writer_args: Sequence[str], *, ready_fd: int, supervisor_pid: int,
                python: str | None = None) -> list[str]:
    """The command line a supervisor starts its writer with."""
    return [python or sys.executable, "-m", WRITER_MODULE, data_dir, *writer_args,
            OPT_READY_FD, str(ready_fd), OPT_SUPERVISOR_PID, str(supervisor_pid)]


# -- the bridge (batpak_mp.jetstream): run by the supervisor beside the writer, same policy ------
BRIDGE_MODULE = "batpak_mp.jetstream"  # run as ``python -m batpak_mp.jetstream DATA_DIR --nats URL --stream NAME``
OPT_BRIDGE = "--bridge"  # the supervisor's: NATS URL of the bridge to run (none: no bridge)
OPT_BRIDGE_STREAM = "--bridge-stream"  # the supervisor's: its stream name
OPT_BRIDGE_NATS = "--nats"  # the bridge's own options
OPT_BRIDGE_STREAM_NAME = "--stream"
# The bridge exits with WriterExit.USAGE when the stream refuses the journal (another store's,
# diverged) and WriterExit.CORRUPT when a journal frame fails its check: the policy never
# restarts those; anything else is restarted under the service's restart policy.


def bridge_argv(data_dir: str, url: str, stream: str, *, supervisor_pid: int, python: str | None = None) -> list[str]:
    """The command line a supervisor starts its bridge with."""
    return [python or sys.executable, "-m", BRIDGE_MODULE, data_dir, OPT_BRIDGE_NATS, url,
            OPT_BRIDGE_STREAM_NAME, stream, OPT_SUPERVISOR_PID, str(supervisor_pid)]


def with_metrics_fd(argv: list[str], fd: int) -> list[str]:
    """``supervisor_argv``'s command line with the supervisor serving metrics on the
    listening socket ``fd`` (inherited: pass it in ``pass_fds``)."""
    at = argv.index(WRITER_ARGS_AFTER)
    return [*argv[:at], OPT_METRICS_FD, str(fd), *argv[at:]]


# -- readiness lines ---------------------------------------------------------------------------
WRITER_READY_LINE = b"ready\n"  # the writer, on its --ready-fd, once it serves
READY = "ready"  # the supervisor, on its --ready-fd: "ready <writer pid>" ...
FAILED = "failed"  # ... or "failed <reason>"; one line, then the fd is closed


def ready_line(writer_pid: int) -> str:
    return f"{READY} {writer_pid}"


def failed_line(reason: str) -> str:
    return f"{FAILED} {reason}"


def parse_announcement(line: str) -> tuple[bool, str]:
    """(ready?, the writer pid when ready, else the reason) of a supervisor's line."""
    word, _, rest = line.strip().partition(" ")
    return word == READY, rest or line.strip()
