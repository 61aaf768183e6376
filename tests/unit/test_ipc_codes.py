"""The exit codes and command lines between processes (``batpak_mp._ipc.codes``): the
supervisor parses what ``supervisor_argv`` builds, the writer parses what ``writer_argv``
builds, and every role uses these codes."""

from __future__ import annotations

import os

import pytest
from batpak_supervisor import policy as P
from batpak_supervisor.__main__ import parse
from batpak_supervisor.process import Config

import batpak_mp as bp
from batpak_mp import writer
from batpak_mp._ipc import codes as C


@pytest.mark.parametrize("policy", [bp.RestartPolicy.once(), bp.RestartPolicy.bounded(3, 500)])
def test_supervisor_argv_round_trips_through_the_supervisors_parser(policy: bp.RestartPolicy) -> None:
    r, w = os.pipe()
    try:
        wargs = ["--sync", "none", "--segment-max-bytes", "65536", "--", "x"]
        argv = C.supervisor_argv("/data", policy, hang_timeout_ms=700, restart_delay_ms=5, ready_timeout_ms=900,
                                 stop_timeout_ms=1100, ready_fd=w, writer_args=wargs, python="py")
        assert argv[:3] == ["py", "-m", C.SUPERVISOR_MODULE]
        assert parse(argv[3:]) == Config("/data", policy, tuple(wargs), 700, 5, 900, 1100, w)
    finally:
        os.close(r)
        os.close(w)


def test_the_defaults_are_the_same_on_both_sides() -> None:
    argv = C.supervisor_argv("/data", bp.RestartPolicy.once())
    assert parse(argv[3:]) == parse(["/data"]) == Config("/data", bp.RestartPolicy.once())
    assert Config("/d", bp.RestartPolicy.once()).hang_timeout_ms == C.HANG_TIMEOUT_MS


def test_writer_argv_round_trips_through_the_writers_parser() -> None:
    argv = C.writer_argv("/data", ["--sync", "interval", "--sync-interval-ms", "7"], ready_fd=9, supervisor_pid=123,
                         python="py")
    assert argv[:3] == ["py", "-m", C.WRITER_MODULE]
    args = writer.build_parser().parse_args(argv[3:])
    assert (args.data_dir, args.sync, args.sync_interval_ms, args.ready_fd, args.supervisor_pid) == \
        ("/data", "interval", 7, 9, 123)


def test_split_at_the_first_double_dash() -> None:
    assert C.split_supervisor_args(["d", "--", "a", "--", "b"]) == (["d"], ["a", "--", "b"])
    assert C.split_supervisor_args(["d"]) == (["d"], [])


def test_readiness_lines() -> None:
    assert C.parse_announcement(C.ready_line(42) + "\n") == (True, "42")
    assert C.parse_announcement(C.failed_line("exit 71: corrupt")) == (False, "exit 71: corrupt")
    assert C.parse_announcement("garbage") == (False, "garbage")
    assert C.parse_announcement("") == (False, "")
    assert C.WRITER_READY_LINE == b"ready\n"


def test_the_codes_keep_their_numbers() -> None:
    """Scripts, unit files and docs/PROTOCOL.md §14 rely on these numbers."""
    assert {e.name: int(e) for e in C.WriterExit} == {"OK": 0, "USAGE": 2, "POISONED": 70, "CORRUPT": 71,
                                                      "LOCKED": 72}
    assert {e.name: int(e) for e in C.SupervisorExit} == {"STOPPED": 0, "USAGE": 2, "FAILED": 3, "IN_USE": 4}


def test_the_policy_never_restarts_the_exits_restarting_cannot_help() -> None:
    assert set(P.TERMINAL_EXITS) == set(C.RESTART_CANNOT_HELP) == {2, 70, 71, 72}
    assert P.TERMINAL_EXITS[71] == "the writer found corruption during recovery (exit 71)"
    state = P.initial(bp.RestartPolicy.bounded(5, 1000))
    for code in C.WriterExit:
        _, action = P.decide(state, P.WriterExited(int(code)), 0)
        assert isinstance(action, P.Fail) == (code in C.RESTART_CANNOT_HELP)
        if isinstance(action, P.Fail):
            assert action.store_locked == (code == C.WriterExit.LOCKED)


def test_a_bad_command_line_exits_with_the_usage_code() -> None:
    with pytest.raises(SystemExit) as info:
        parse(["/data", C.OPT_RESTART, "backoff"])
    assert info.value.code == C.SupervisorExit.USAGE
