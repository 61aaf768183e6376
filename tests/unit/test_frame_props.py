"""Property tests of the pure frame codec and the recovery scan (hypothesis).

The decoders are total: any byte string gives a frame, "need more", the end marker or
one typed error (``CorruptSegment``/``FutureFormat``), never ``IndexError`` or
``struct.error``. ``scan_frame`` and ``scan_segment`` never raise at all.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, NamedTuple

import pytest
from _engine_helpers import set_frame_field
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batpak_mp import CorruptSegment, FutureFormat
from batpak_mp._format.frame import (
    BAD,
    EMPTY,
    FLAG_COMMIT_END,
    FLAG_HAS_CAUSATION,
    FLAG_HAS_CORRELATION,
    FLAG_REDACTED,
    FRAME_VERSION,
    HASH_OFFSET,
    HASHED_START,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MIN_FRAME,
    NEED_MORE,
    OK,
    Frame,
    NeedMore,
    decode_frame,
    encode_frame,
    hash_matches,
    scan_frame,
)
from batpak_mp._format.scan import scan_segment

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, (1 << 64) - 1)
id16 = st.binary(min_size=16, max_size=16)
# names are UTF-8 (FORMAT.md §3.2): other bytes make the frame bad (see test_names_must_be_utf8)
name = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).map(str.encode)


@st.composite
def frame_fields(draw: st.DrawFn, *, seq: int | None = None, flags: int | None = None) -> dict[str, Any]:
    return {
        "flags": draw(st.sampled_from([0, FLAG_COMMIT_END, FLAG_HAS_CAUSATION | FLAG_COMMIT_END,
                                        FLAG_HAS_CORRELATION, 0x7])) if flags is None else flags,
        "kind": draw(u16),
        "payload_version": draw(u16),
        "global_sequence": draw(u64) if seq is None else seq,
        "entity_clock": draw(u64),
        "wall_ms": draw(u64),
        "event_id": draw(id16),
        "causation_id": draw(id16),
        "correlation_id": draw(id16),
        "idem_hash": draw(id16),
        "prev_hash": draw(st.binary(min_size=32, max_size=32)),
        "entity": draw(name),
        "scope": draw(name),
        "payload": draw(st.binary(max_size=300)),
    }


def encoded(fields: dict[str, Any]) -> bytes:
    return encode_frame(**fields)[0]


frames = frame_fields().map(encoded)

DECODE_OUTCOMES = (CorruptSegment, FutureFormat)


def decode_outcome(data: bytes) -> Frame | NeedMore | BaseException | None:
    """decode_frame's result, or the typed error it raised; anything else fails the test."""
    try:
        return decode_frame(data, segment="seg", offset=123)
    except DECODE_OUTCOMES as exc:
        if isinstance(exc, CorruptSegment):
            assert exc.segment == "seg" and exc.offset == 123 and exc.reason
        return exc


# ---- round trip ----------------------------------------------------------------------
@PROPS
@given(frame_fields(), st.binary(max_size=64))
def test_encode_decode_round_trip(fields: dict[str, Any], tail: bytes) -> None:
    data, event_hash = encode_frame(**fields)
    assert len(data) == HEADER_SIZE + len(fields["entity"]) + len(fields["scope"]) + len(fields["payload"])
    out = decode_frame(data + tail)  # bytes after the frame belong to the next one
    assert isinstance(out, Frame)
    assert out.frame_len == len(data) and out.event_hash == event_hash
    for key, value in fields.items():
        assert getattr(out, key) == value, key
    status, scanned = scan_frame(b"\0" * 5 + data + tail, 5, 5 + len(data))
    assert status == OK and scanned == out
    assert hash_matches(data, 0, out)


@PROPS
@given(frame_fields(), frame_fields())
def test_event_hash_is_cumulative(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The hash covers prev_hash: the same event after another predecessor hashes differently."""
    _, first_hash = encode_frame(**a)
    b2 = {**b, "prev_hash": first_hash}
    _, h1 = encode_frame(**b2)
    _, h2 = encode_frame(**{**b2, "prev_hash": bytes(x ^ 1 for x in first_hash)})
    assert h1 != h2


# ---- totality ------------------------------------------------------------------------
@PROPS
@given(st.binary(max_size=600))
@example(b"")
@example(b"\0\0\0")
@example(b"\0\0\0\0")
@example(b"\0\0\0\0\x01")
@example(struct.pack("<II", MIN_FRAME - 1, 0))
@example(struct.pack("<II", 0xFFFFFFFF, 0))
@example(struct.pack("<II", MIN_FRAME, 0) + bytes(MIN_FRAME))
def test_decode_random_bytes_is_total(data: bytes) -> None:
    out = decode_outcome(data)
    if isinstance(out, NeedMore):
        assert out.needed > len(data)
    if isinstance(out, Frame):
        assert out.frame_len <= len(data)


@PROPS
@given(frames, st.data())
def test_decode_truncated_frame_needs_more(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data) - 1))
    out = decode_outcome(data[:cut])
    assert isinstance(out, NeedMore), out
    assert out.needed > cut
    if cut >= 8:
        assert out.needed == len(data)


@PROPS
@given(frames, st.data())
def test_decode_flipped_bit_is_never_a_frame(data: bytes, draw: st.DataObject) -> None:
    pos = draw.draw(st.integers(0, len(data) - 1))
    bit = draw.draw(st.integers(0, 7))
    buf = bytearray(data)
    buf[pos] ^= 1 << bit
    out = decode_outcome(bytes(buf))
    # CRC32 catches every single-bit error; a flip in the length can make it "need
    # more" or (for a power-of-two length) the end marker.
    assert not isinstance(out, Frame)
    if pos >= 4:
        assert isinstance(out, CorruptSegment)


@PROPS
@given(frames, st.data())
def test_decode_mutations_behind_a_valid_crc_are_typed(data: bytes, draw: st.DataObject) -> None:
    """Mutate any bytes (header fields included) and fix the CRC, so the structural
    checks after it are exercised: lengths, version, flags, the event hash."""
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        pos = draw.draw(st.integers(HASHED_START, len(buf) - 1))
        chunk = draw.draw(st.binary(min_size=1, max_size=8))
        buf[pos:pos + len(chunk)] = chunk
    if draw.draw(st.booleans()):
        buf += draw.draw(st.binary(max_size=16))
    struct.pack_into("<I", buf, 4, zlib.crc32(memoryview(buf)[HASHED_START:len(data)]))
    out = decode_outcome(bytes(buf))
    if bytes(buf[:len(data)]) != data:
        assert not isinstance(out, Frame), "a changed frame decoded as valid"


@PROPS
@given(frames, st.integers(0, (1 << 32) - 1))
def test_decode_any_length_word_is_typed(data: bytes, length: int) -> None:
    buf = bytearray(data)
    struct.pack_into("<I", buf, 0, length)
    out = decode_outcome(bytes(buf))
    if length == 0:
        assert out is None
    elif length != len(data):
        assert not isinstance(out, Frame)


@PROPS
@given(st.binary(max_size=400), st.integers(-600, 600), st.integers(-600, 600))
def test_scan_frame_never_raises(data: bytes, off: int, limit: int) -> None:
    status, value = scan_frame(data, off, limit)
    assert status in (OK, EMPTY, NEED_MORE, BAD)
    if status == OK:
        assert isinstance(value, Frame)
    elif status == NEED_MORE:
        assert isinstance(value, int) and value > limit - off
    elif status == BAD:
        assert isinstance(value, str) and value


@PROPS
@given(frames, st.integers(0, 40), st.integers(-50, 50))
def test_scan_frame_of_embedded_frame(data: bytes, pad: int, slack: int) -> None:
    buf = b"\xff" * pad + data + b"\xee" * 50
    status, value = scan_frame(buf, pad, min(len(buf), max(pad, pad + len(data) + slack)))
    if slack >= 0:
        assert status == OK and isinstance(value, Frame) and value.frame_len == len(data)
    else:
        assert status == NEED_MORE and value == len(data)


# ---- format versions -----------------------------------------------------------------
@PROPS
@given(frames, st.integers(FRAME_VERSION + 1, 0xFFFF))
def test_future_frame_version(data: bytes, version: int) -> None:
    """A frame from a newer format (valid CRC) is FutureFormat, never corruption."""
    future = set_frame_field(data, "<H", 8, version)
    with pytest.raises(FutureFormat) as ei:
        decode_frame(future, segment="s.seg")
    assert ei.value.found == version and ei.value.supported == FRAME_VERSION
    status, reason = scan_frame(future, 0, len(future))
    assert status == BAD and str(reason).startswith("future")


@given(frames)
@settings(max_examples=50, deadline=None)
def test_unknown_old_frame_version_is_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptSegment):
        decode_frame(set_frame_field(data, "<H", 8, 0))


@given(frames, st.integers(0, 0xFFFF))
@settings(max_examples=100, deadline=None)
def test_unknown_flags_are_corrupt(data: bytes, flags: int) -> None:
    out = decode_outcome(set_frame_field(data, "<H", 10, flags))
    if flags & FLAG_REDACTED:  # a stub's payload is its 32-byte digest: lengths, then the hash, then the flags
        assert isinstance(out, CorruptSegment)
    elif flags & ~KNOWN_FLAGS:
        assert isinstance(out, CorruptSegment) and "flags" in out.reason
    else:
        # known flags: the CRC is right but the hash covers the flags
        assert isinstance(out, Frame) == (flags == struct.unpack_from("<H", data, 10)[0])


def test_hash_mismatch_behind_valid_crc() -> None:
    data, _ = encode_frame(flags=FLAG_COMMIT_END, kind=1, payload_version=0, global_sequence=1,
                           entity_clock=1, wall_ms=5, event_id=b"e" * 16, causation_id=bytes(16),
                           correlation_id=bytes(16), idem_hash=b"i" * 16, prev_hash=bytes(32),
                           entity=b"a", scope=b"s", payload=b"\x01")
    buf = bytearray(data)
    buf[HASH_OFFSET] ^= 1
    struct.pack_into("<I", buf, 4, zlib.crc32(memoryview(buf)[HASHED_START:]))
    with pytest.raises(CorruptSegment, match="event hash"):
        decode_frame(bytes(buf))


# ---- the recovery scan ---------------------------------------------------------------
class Log(NamedTuple):
    data: bytes
    start: int  # where the first frame begins (after a few stray bytes)
    ends: list[int]  # offset just past each commit
    first: int  # sequence of the first frame


@st.composite
def logs(draw: st.DrawFn) -> Log:
    """A run of commits (1..4 frames each, only the last flagged COMMIT_END)."""
    first = draw(st.integers(1, 1 << 40))
    seq = first
    buf = bytearray(draw(st.binary(max_size=3)))
    start = len(buf)
    ends: list[int] = []
    for _ in range(draw(st.integers(0, 5))):
        n = draw(st.integers(1, 4))
        for i in range(n):
            fields = draw(frame_fields(seq=seq, flags=FLAG_COMMIT_END if i == n - 1 else 0))
            buf += encoded({**fields, "payload": fields["payload"][:40]})
            seq += 1
        ends.append(len(buf))
    return Log(bytes(buf), start, ends, first)


def _check_scan_invariants(buf: bytes, start: int, limit: int, expect: int) -> None:
    scan = scan_segment(buf, start, limit, expect, check_hash=True)
    assert 0 <= scan.committed <= len(scan.frames)
    assert not scan.hash_errors
    off = start
    for i, f in enumerate(scan.frames):
        assert f.offset == off and f.seq == expect + i
        off += f.frame_len
    assert scan.stop_offset == off
    if scan.committed:
        last = scan.frames[scan.committed - 1]
        assert last.flags & FLAG_COMMIT_END
        assert scan.commit_end == last.offset + last.frame_len
    else:
        assert scan.commit_end == start
    assert scan.stop_status in (OK, EMPTY, NEED_MORE, BAD)


@PROPS
@given(logs(), st.data())
def test_scan_segment_cuts_at_the_last_whole_commit(log: Log, draw: st.DataObject) -> None:
    """A torn write (zeros from any offset on) keeps exactly the whole commits before it."""
    cut = draw.draw(st.integers(log.start, len(log.data)))
    torn = log.data[:cut] + bytes(len(log.data) - cut + draw.draw(st.integers(0, 300)))
    scan = scan_segment(torn, log.start, len(torn), log.first)
    whole = [e for e in log.ends if e <= cut]
    assert scan.commit_end == (whole[-1] if whole else log.start)
    assert scan.committed == sum(1 for f in scan.frames if f.offset < scan.commit_end)
    assert not scan.damage_mid_log
    _check_scan_invariants(torn, log.start, len(torn), log.first)


@PROPS
@given(logs(), st.data())
def test_scan_segment_is_total(log: Log, draw: st.DataObject) -> None:
    buf = bytearray(log.data)
    mode = draw.draw(st.sampled_from(["flip", "garbage", "random", "zeros"]))
    if mode == "flip" and buf:
        pos = draw.draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= 1 << draw.draw(st.integers(0, 7))
    elif mode == "garbage" and buf:
        pos = draw.draw(st.integers(0, len(buf) - 1))
        chunk = draw.draw(st.binary(min_size=1, max_size=24))
        buf[pos:pos + len(chunk)] = chunk
    elif mode == "random":
        buf = bytearray(draw.draw(st.binary(max_size=500)))
    else:
        buf += bytes(draw.draw(st.integers(0, 20)))
    start = draw.draw(st.integers(-10, len(buf) + 10))
    limit = draw.draw(st.integers(-10, len(buf) + 10))
    expect = draw.draw(st.integers(0, 1 << 64))
    scan = scan_segment(bytes(buf), start, limit, expect, check_hash=draw.draw(st.booleans()))
    assert 0 <= scan.committed <= len(scan.frames)
    assert scan.stop_status in (OK, EMPTY, NEED_MORE, BAD)


def test_scan_segment_damage_in_the_middle_is_not_a_torn_tail() -> None:
    seq = 1
    buf = bytearray()
    offsets = []
    for _ in range(3):
        offsets.append(len(buf))
        buf += encode_frame(flags=FLAG_COMMIT_END, kind=1, payload_version=0, global_sequence=seq,
                            entity_clock=seq, wall_ms=1, event_id=bytes(16), causation_id=bytes(16),
                            correlation_id=bytes(16), idem_hash=bytes(16), prev_hash=bytes(32),
                            entity=b"e", scope=b"s", payload=b"p" * 10)[0]
        seq += 1
    buf[offsets[1] + 100] ^= 0x10
    scan = scan_segment(bytes(buf), 0, len(buf), 1)
    assert scan.stop_status == BAD and scan.stop_offset == offsets[1]
    assert scan.committed == 1 and scan.damage_mid_log
    # the same damage in the last frame looks like a torn tail
    scan = scan_segment(bytes(buf[:offsets[2]]), 0, offsets[2], 1)
    assert scan.stop_status == BAD and not scan.damage_mid_log


def test_scan_segment_stops_at_a_sequence_jump() -> None:
    def frame(seq: int) -> bytes:
        return encode_frame(flags=FLAG_COMMIT_END, kind=1, payload_version=0, global_sequence=seq,
                            entity_clock=1, wall_ms=1, event_id=bytes(16), causation_id=bytes(16),
                            correlation_id=bytes(16), idem_hash=bytes(16), prev_hash=bytes(32),
                            entity=b"e", scope=b"s", payload=b"")[0]
    buf = frame(7) + frame(8) + frame(10)
    scan = scan_segment(buf, 0, len(buf), 7)
    assert scan.stop_status == OK and "sequence 10" in scan.stop_reason
    assert [f.seq for f in scan.frames] == [7, 8] and scan.committed == 2
    assert scan_segment(buf, 0, len(buf), 6).frames == []
    assert scan_segment(b"", 0, 0, 1).stop_status == EMPTY
    assert scan_segment(frame(1)[:5] + bytes(3), 0, 8, 1).stop_status != OK
