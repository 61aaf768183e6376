"""The pure parts of the trust boundary: what an IPC object must be (``objects.problem``),
and the bounded decoders of ``_ipc/wire`` — what a request may allocate is fixed by
``Limits``, whatever its shape (docs/PROTOCOL.md §2.1, §11)."""

from __future__ import annotations

import os
import stat
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batpak_mp import _errors as E
from batpak_mp._ipc import objects
from batpak_mp._ipc import wire as W

LIMITS = W.request_limits(16 << 20, 10_000, 256 << 20)


def _stat(mode: int = stat.S_IFREG | 0o600, uid: int = 1000, nlink: int = 1, size: int = 65536) -> os.stat_result:
    return os.stat_result((mode, 1, 2, nlink, uid, uid, size, 0, 0, 0))


@pytest.mark.parametrize(("st", "why"), [
    (_stat(), None),
    (_stat(mode=stat.S_IFDIR | 0o700), "not a regular file"),
    (_stat(mode=stat.S_IFIFO | 0o600), "not a regular file"),
    (_stat(mode=stat.S_IFLNK | 0o777), "not a regular file"),
    (_stat(uid=65534), "belongs to uid 65534"),
    (_stat(mode=stat.S_IFREG | 0o666), "open to other users"),
    (_stat(mode=stat.S_IFREG | 0o640), "open to other users"),
    (_stat(nlink=2), "has 2 links"),
    (_stat(size=5), "under 4096"),
    (_stat(size=(1 << 30) + 1), "over 1073741824"),
])
def test_what_an_area_must_be(st: os.stat_result, why: str | None) -> None:
    got = objects.problem(st, objects.Expect(1000, W.AREA_MIN, W.AREA_MAX))
    assert got is None if why is None else (got is not None and why in got)


def test_a_control_block_may_have_links_when_asked() -> None:
    assert objects.problem(_stat(nlink=3), objects.Expect(1000, single_link=False)) is None


def test_the_largest_request() -> None:
    assert LIMITS.max_request == (256 << 20) + 10_000 * (2 * 1024 + 128) + 64 == 290_195_520
    assert LIMITS.max_objects == 16 + 10_000 * 10


def _item(i: int) -> list[Any]:
    return [b"entity-%d" % i, b"scope", 4097, msgpack.packb({"i": i}), 0, bytes(16), None, None, None]


def _decode(doc: Any, *, stream: bool) -> W.Request:
    raw = msgpack.packb(doc, use_bin_type=True)
    if stream:
        source = _Chunks(raw)
        return W.decode_request(source, len(raw), LIMITS)
    return W.decode_request(raw, len(raw), LIMITS)


class _Chunks(W.Source):
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, size: int) -> bytes:
        chunk = self.data[self.at:self.at + min(size, 7)]  # odd little chunks
        self.at += len(chunk)
        return chunk


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), fenced=st.booleans())
def test_both_decoders_give_the_same_request(n: int, fenced: bool) -> None:
    items = [_item(i) for i in range(n)]
    op = W.OP_APPEND_FENCED if fenced else W.OP_APPEND
    body: Any = [b"t" * 16, items] if fenced else items
    doc = [op, 7, 3, body]
    assert _decode(doc, stream=False) == _decode(doc, stream=True) == W.Request(op, 7, 3, body)


@pytest.mark.parametrize("doc", [
    [W.OP_APPEND, 1, 0, [{"a": 1}]], [W.OP_APPEND, 1, 0, [["x"] * 9]], [W.OP_APPEND, 1, 0, [[[]] * 10]],
    [W.OP_APPEND, 1, 0, []], [W.OP_APPEND, "1", 0, [_item(1)]], [99, 1, 0, None], [W.OP_FENCE_COMMIT, 1, 0, b"x"],
    [W.OP_APPEND_FENCED, 1, 0, [b"short", [_item(1)]]], [W.OP_APPEND, 1, 0, [_item(1)], "extra"],
])
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_requests_are_protocol_errors(doc: Any, stream: bool) -> None:
    with pytest.raises(E.ProtocolError):
        _decode(doc, stream=stream)


def test_too_many_items_are_the_engines_error_before_any_is_decoded() -> None:
    raw = msgpack.packb([W.OP_APPEND, 1, 0, []])[:-1] + b"\xdd" + struct.pack(">I", 3_500_000) + b"\xc0" * 16
    with pytest.raises(E.InvalidArgument, match="at most 10000 events"):
        W.decode_request(raw, len(raw), LIMITS)


def _tree(depth: int) -> bytes:
    return b"\x90" if depth == 0 else b"\x99" + _tree(depth - 1) * 9


HEAD = msgpack.packb([W.OP_APPEND, 1, 0, []])[:-1]
HOSTILE = {
    "many tiny arrays": HEAD + b"\xdd" + struct.pack(">I", 4000) + _tree(3) * 4000,
    "deeply nested": HEAD + b"\xdd" + struct.pack(">I", 3500) + (b"\x91" * 1000 + b"\xc0") * 3500,
    "empty maps": HEAD + b"\x91\x99\xdd" + struct.pack(">I", 3_500_000) + b"\x80" * 3_500_000,
    "headers claiming 10,000 elements": HEAD + b"\x91" + b"\xdc\x27\x10" * 1100,
    "trailing bytes": msgpack.packb([W.OP_PING, 1, 0, None]) + b"\xc0" * 100,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_requests_allocate_a_bounded_amount(name: str) -> None:
    raw = HOSTILE[name]
    tracemalloc.start()
    try:
        with pytest.raises(E.ProtocolError):
            W.decode_request(raw, len(raw), LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * len(raw) + (4 << 20), peak  # the old decoder: ~70 x the bytes


def test_a_bin_claiming_more_than_the_request_is_refused() -> None:
    raw = HEAD + b"\x91\x99\xc4\x01e\xc4\x01s\x01\xc6" + struct.pack(">I", 1 << 30)
    with pytest.raises(E.ProtocolError):
        W.decode_request(_Chunks(raw), len(raw), LIMITS)
    with pytest.raises(E.ProtocolError, match="over the 290195520-byte limit"):
        W.request_length(W.REPLY_TO.pack(0) + W.LEN.pack(LIMITS.max_request + 1), LIMITS)
    with pytest.raises(E.ProtocolError, match="no request header"):
        W.request_length(b"\x00" * 11, LIMITS)


@pytest.mark.parametrize(("data", "ok"), [
    (msgpack.packb({"a": [1, 2, {"b": None}]}), True), (msgpack.packb(None), True), (b"", False), (b"\xc1", False),
    (msgpack.packb(1) + b"\x01", False), (b"\x92\x01", False), (b"\x91" * 2000 + b"\xc0", False),
    (b"\xdd\xff\xff\xff\xff", False),
])
def test_a_payload_is_checked_without_being_built(data: bytes, ok: bool) -> None:
    assert W.payload_is_msgpack(data) is ok


def test_a_store_kind_payload_is_decoded_within_a_budget() -> None:
    assert W.unpack_limited(msgpack.packb({"cursor": "c", "through": 5}), 64, 64, 8) == {"cursor": "c", "through": 5}
    with pytest.raises(E.ProtocolError):
        W.unpack_limited(msgpack.packb({"gates": ["g"] * 100}), 64, 1024, 8)


def test_a_request_and_a_reply_in_an_area() -> None:
    area = bytearray(4096)
    raw = W.encode_request(W.Request(W.OP_PING, 9, 2, None))
    area[:len(raw)] = raw
    assert W.REPLY_TO.unpack_from(area, 0)[0] == 0
    n = W.request_length(bytes(area[:64]), LIMITS)
    assert W.decode_request(bytes(area[W.HEADER:W.HEADER + n]), n, LIMITS) == W.Request(W.OP_PING, 9, 2, None)
    reply = W.encode_reply(W.Reply(9, 2, W.STATUS_OK, [1, 1]))
    area[W.BODY_AT:W.BODY_AT + len(reply)] = reply
    area[:8] = W.REPLY_TO.pack(9)
    assert W.decode_reply(bytes(area[W.BODY_AT:])) == W.Reply(9, 2, W.STATUS_OK, [1, 1])
