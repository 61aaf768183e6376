"""The pure judgements behind the service's failure paths (issue 10, items 11, 12, 13).

Owns: when a client calls a service gone (``_client.service_gone``: a stale stamp and
neither pid a live process old enough to be the service's own; a reused pid is not the
service's); what the client accepts as a reply (``reply_data``, ``receipts_from_reply``,
``reply_too_large``: any shape or type other than the protocol's is ``ProtocolError``,
never KeyError/TypeError/IndexError/AttributeError, shown on examples and on generated
replies); which data directories ``serve`` refuses (``directory_problem``); and that the
supervisor parses the ``--parent-pid`` that ``supervisor_argv`` writes.
"""

from __future__ import annotations

import stat
from typing import Any

import msgpack
import pytest
from batpak_supervisor.__main__ import parse
from hypothesis import given, settings
from hypothesis import strategies as st

import batpak_mp as bp
from batpak_mp._client import (
    STALE_HEARTBEAT_NS,
    START_SLACK_NS,
    receipts_from_reply,
    reply_data,
    reply_too_large,
    service_gone,
)
from batpak_mp._ipc import codes as C
from batpak_mp._ipc import wire as W
from batpak_mp._ipc.control import ControlSnapshot
from batpak_mp._prepare import prepare
from batpak_mp._service import directory_problem
from batpak_mp._values import WriterState

HB = 10_000_000_000  # the block's last stamp, ns on the monotonic clock
STALE = HB + STALE_HEARTBEAT_NS
WRITER, SUPERVISOR = 4242, 4241


def _snap(state: WriterState = WriterState.READY, writer_pid: int = WRITER, supervisor_pid: int = SUPERVISOR,
          heartbeat_ns: int = HB) -> ControlSnapshot:
    fields: dict[str, Any] = dict.fromkeys(ControlSnapshot._fields, 0)
    fields.update(state=int(state), writer_pid=writer_pid, supervisor_pid=supervisor_pid, heartbeat_ns=heartbeat_ns,
                  reason="")
    return ControlSnapshot(**fields)


def _probe(**starts: int | None) -> Any:
    """``started_ns`` of a fake process table: pid -> start (missing: no such process)."""
    table = {WRITER: starts.get("writer"), SUPERVISOR: starts.get("supervisor")}
    return lambda pid: table.get(pid)


# -- service_gone -------------------------------------------------------------------------------
def test_a_fresh_stamp_is_never_judged() -> None:
    assert service_gone(_snap(), STALE - 1, _probe()) is None


def test_both_dead_behind_a_stale_stamp_is_gone_and_says_who() -> None:
    why = service_gone(_snap(), STALE, _probe())
    assert why is not None and "gone" in why and str(WRITER) in why and str(SUPERVISOR) in why and "READY" in why


@pytest.mark.parametrize("who", ["writer", "supervisor"])
def test_either_process_alive_means_wait(who: str) -> None:
    assert service_gone(_snap(), STALE, _probe(**{who: HB - 5_000_000_000})) is None


def test_a_restart_in_progress_is_waited_for() -> None:
    """Writer reaped, the supervisor between writers: STARTING, no writer pid."""
    snap = _snap(WriterState.STARTING, writer_pid=0)
    assert service_gone(snap, STALE * 10, _probe(supervisor=HB - 1)) is None
    assert service_gone(snap, STALE * 10, _probe()) is not None


def test_a_reused_pid_is_not_the_services() -> None:
    later = HB + START_SLACK_NS + 1
    assert service_gone(_snap(), STALE, _probe(writer=later, supervisor=later)) is not None
    # within the clock-tick slack: the benefit of the doubt (wait on, as before)
    assert service_gone(_snap(), STALE, _probe(writer=HB + START_SLACK_NS)) is None


def test_an_unknown_start_counts_as_alive() -> None:
    assert service_gone(_snap(), STALE, _probe(writer=0)) is None


@pytest.mark.parametrize("state", [WriterState.STOPPED, WriterState.FAILED])
def test_states_that_say_it_themselves_are_not_judged(state: WriterState) -> None:
    assert service_gone(_snap(state), STALE * 10, _probe()) is None


def test_a_block_nobody_claimed_is_judged_too() -> None:
    assert service_gone(_snap(WriterState.ABSENT, 0, 0, 0), STALE, _probe()) is not None


# -- replies ------------------------------------------------------------------------------------
def _prepared(n: int = 1) -> list[Any]:
    return [prepare(bp.Coordinate("e", "s"), bp.Kind(1, 1), i, idempotency_key=None, expected_clock=None,
                    causation_id=None, correlation_id=None, max_payload=1 << 20) for i in range(n)]


GOOD_RECEIPT = [b"i" * 16, 7, 1, b"h" * 32, b"p" * 32, 1_700_000_000_000, True, None]


def _reply(status: Any, data: Any, request_id: Any = 1) -> W.Reply:
    """What the client's decoder makes of these fields after the wire."""
    return W.decode_reply(W.encode_reply(W.Reply(request_id, 1, status, data)))


def test_good_replies_pass() -> None:
    data = reply_data(W.OP_APPEND, _reply(W.STATUS_OK, [GOOD_RECEIPT]))
    (receipt,) = receipts_from_reply(_prepared(), data)
    assert (receipt.global_sequence, receipt.entity, receipt.scope, receipt.durable) == (7, "e", "s", True)
    named = [*GOOD_RECEIPT, "other", "scope"]
    assert receipts_from_reply(_prepared(), [named])[0].entity == "other"
    assert reply_data(W.OP_SYNC, _reply(W.STATUS_OK, [3, 2])) == [3, 2]
    assert reply_data(W.OP_FENCE_BEGIN, _reply(W.STATUS_OK, [b"t" * 16])) == [b"t" * 16]
    with pytest.raises(bp.ConcurrencyConflict):
        reply_data(W.OP_APPEND, _reply(W.STATUS_ERROR, ["ConcurrencyConflict", ["e", 0, 1]]))


@pytest.mark.parametrize("op, status, data", [
    (W.OP_APPEND, W.STATUS_OK, "receipts"),
    (W.OP_APPEND, "ok", [GOOD_RECEIPT]),
    (W.OP_APPEND, True, [GOOD_RECEIPT]),
    (W.OP_APPEND, 7, [GOOD_RECEIPT]),
    (W.OP_SYNC, W.STATUS_OK, None),
    (W.OP_SYNC, W.STATUS_OK, [1]),
    (W.OP_SYNC, W.STATUS_OK, [1, "2"]),
    (W.OP_SYNC, W.STATUS_OK, {"visible": 1}),
    (W.OP_FENCE_COMMIT, W.STATUS_OK, [1, -2]),
    (W.OP_FENCE_BEGIN, W.STATUS_OK, []),
    (W.OP_FENCE_BEGIN, W.STATUS_OK, [b"short"]),
    (W.OP_FENCE_BEGIN, W.STATUS_OK, None),
    (W.OP_APPEND, W.STATUS_ERROR, ["FenceLost", [5, None]]),
    (W.OP_APPEND, W.STATUS_ERROR, ["ConcurrencyConflict", {"a": 1}]),
    (W.OP_APPEND, W.STATUS_ERROR, ["NoSuchError", []]),
    (W.OP_APPEND, W.STATUS_ERROR, None),
    (W.OP_APPEND, W.STATUS_ERROR, 12),
])
def test_a_reply_of_the_wrong_shape_or_types_is_a_protocol_error(op: int, status: Any, data: Any) -> None:
    with pytest.raises(bp.ProtocolError):
        reply_data(op, _reply(status, data))


@pytest.mark.parametrize("receipts", [
    [], [GOOD_RECEIPT, GOOD_RECEIPT], [None], ["x"], [{"event_id": 1}], [GOOD_RECEIPT[:7]], [[*GOOD_RECEIPT, "e"]],
    [[b"short", *GOOD_RECEIPT[1:]]], [[GOOD_RECEIPT[0], "7", *GOOD_RECEIPT[2:]]],
    [[*GOOD_RECEIPT[:6], 1, None]], [[*GOOD_RECEIPT[:7], "sig"]], [[*GOOD_RECEIPT, 1, "s"]],
    [[*GOOD_RECEIPT[:3], b"h" * 31, *GOOD_RECEIPT[4:]]], [[GOOD_RECEIPT[0], -1, *GOOD_RECEIPT[2:]]],
])
def test_a_malformed_receipt_is_a_protocol_error(receipts: list[Any]) -> None:
    with pytest.raises(bp.ProtocolError):
        receipts_from_reply(_prepared(), reply_data(W.OP_APPEND, _reply(W.STATUS_OK, receipts)))


@pytest.mark.parametrize("raw", [
    b"", b"\x05\x00", b"\x05\x00\x00\x00\x94\x01", b"\xff\xff\xff\xff" + b"\x00" * 8,
    W.LEN.pack(3) + msgpack.packb([1, 2, 3]), W.LEN.pack(2) + b"\xc1\xc1",
])
def test_a_truncated_or_torn_reply_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(bp.ProtocolError):
        reply_data(W.OP_APPEND, W.decode_reply(raw + bytes(64)))


def test_reply_too_large() -> None:
    assert reply_too_large(_reply(W.STATUS_ERROR, ["ReplyTooLarge", [5000]])) == 5000
    assert reply_too_large(_reply(W.STATUS_OK, ["ReplyTooLarge", [5000]])) is None
    assert reply_too_large(_reply(W.STATUS_ERROR, ["ConcurrencyConflict", ["e", 0, 1]])) is None
    for bad in (["ReplyTooLarge"], ["ReplyTooLarge", 5], ["ReplyTooLarge", ["5"]], ["ReplyTooLarge", [0]],
                ["ReplyTooLarge", [1, 2]], ["ReplyTooLarge", [1 << 40]]):
        with pytest.raises(bp.ProtocolError):
            reply_too_large(_reply(W.STATUS_ERROR, bad))


_PLAIN = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.binary(max_size=40) | st.text(max_size=10)
_VALUES = st.recursive(_PLAIN, lambda inner: st.lists(inner, max_size=10) | st.dictionaries(st.text(max_size=5), inner,
                                                                                              max_size=4), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from([W.OP_APPEND, W.OP_APPEND_FENCED, W.OP_SYNC, W.OP_FENCE_BEGIN, W.OP_FENCE_COMMIT]),
       status=_VALUES, data=_VALUES)
def test_any_reply_gives_data_or_a_typed_error(op: int, status: Any, data: Any) -> None:
    reply = _reply(status, data)
    try:
        reply_too_large(reply)
        got = reply_data(op, reply)
        if op in (W.OP_APPEND, W.OP_APPEND_FENCED):
            receipts_from_reply(_prepared(len(got) or 1), got)
    except bp.BatpakError:
        pass


# -- the data directory and the supervisor's command line ----------------------------------------
def test_directory_problem() -> None:
    d = stat.S_IFDIR
    assert directory_problem(d | 0o700, 1000, 1000) is None
    assert directory_problem(d | 0o500, 1000, 1000) is None
    for mode in (0o750, 0o705, 0o777, 0o710):
        why = directory_problem(d | mode, 1000, 1000)
        assert why is not None and f"{mode & 0o077:03o}" in why and "chmod" in why
    assert "another user" in (directory_problem(d | 0o700, 0, 1000) or "")
    assert "not a directory" in (directory_problem(stat.S_IFREG | 0o600, 1000, 1000) or "")


def test_the_supervisor_parses_the_parent_pid_serve_gives_it() -> None:
    argv = C.supervisor_argv("/data", bp.RestartPolicy.once(), parent_pid=4321, writer_args=["--sync", "none"])
    assert parse(argv[3:]).parent_pid == 4321
    assert parse(C.supervisor_argv("/data", bp.RestartPolicy.once())[3:]).parent_pid is None
    with pytest.raises(SystemExit):
        parse(["/data", C.OPT_PARENT_PID, "0"])
