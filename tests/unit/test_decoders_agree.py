"""Every frame decoder accepts and rejects the same bytes (hypothesis).

The decoders: ``frame.scan_frame`` and ``frame.decode_frame`` (the codec), the recovery
scan ``scan.scan_segment``, the reader's frame paths (``Reader.event``, the hot path of
``get``/``history``/``query_after``, and ``Reader.frame``, behind ``walk_ancestors``), and
``inspect``'s ``frames_at``; and the active codec of ``batpak_mp._native`` (the C
mirror when it is built, which the reader, verify and the offline reader use). Each
example is one candidate frame area B; the reader and inspect see it as the frame area
of a real segment file (a header, B, an unsealed trailer area) with a record for
sequence 1 that spans at most B. They must agree:

- on acceptance: the codec accepts B exactly when the scan keeps a first frame, the
  reader returns an event (both with sequence 1 expected), inspect says "ok" (it has no
  sequence to expect), and ``decode_frame`` returns a Frame when the event hash matches
  too; the accepted values are the same everywhere;
- on the kind of rejection: end marker, truncated (needs more), or bad, with the same
  reason string in the scan and inspect; a newer frame version is ``FutureFormat``.

Inputs: valid frames, truncations, bit flips, mutations behind a fixed CRC (header
fields, names that are not UTF-8, lengths that do not add up), random bytes, future
versions, unknown flags, zero-length words and short zero runs.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from typing import Any

from _engine_helpers import set_frame_field
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batpak_mp import CorruptSegment, FutureFormat, _native
from batpak_mp._format.directory import INDEX_DIR, RECORDS_FILE, SEGMENT_DIR, segment_name
from batpak_mp._format.frame import (
    BAD,
    EMPTY,
    FLAG_COMMIT_END,
    FLAG_FENCED,
    FLAG_HAS_CAUSATION,
    FLAG_REDACTED,
    FRAME_VERSION,
    HASHED_START,
    HEADER_FIELDS,
    HEADER_SIZE,
    KNOWN_FLAGS,
    NEED_MORE,
    OK,
    Frame,
    NeedMore,
    decode_frame,
    encode_frame,
    frame_to_event,
    hash_matches,
    scan_frame,
)
from batpak_mp._format.layout import offset_of
from batpak_mp._format.record import RECORD, encode_records_header
from batpak_mp._format.scan import scan_segment
from batpak_mp._format.segment import SEG_HEADER_SIZE, SEG_TRAILER_SIZE, encode_segment_header
from batpak_mp._read.inspect import frames_at
from batpak_mp._read.reader import Reader, StaleView, View

PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STORE_ID = b"S" * 16
SEQ = 1  # the sequence the scan and the reader expect


def at(field: str) -> int:
    """Byte offset of a header field, from the one declaration of the layout."""
    return offset_of(HEADER_FIELDS, field)


name = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10).map(str.encode)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    seq = draw(st.sampled_from([SEQ, SEQ, SEQ, 2, 0]))
    flags = draw(st.sampled_from([FLAG_COMMIT_END, 0, FLAG_COMMIT_END | FLAG_HAS_CAUSATION,
                                  FLAG_COMMIT_END | FLAG_FENCED]))
    data, _ = encode_frame(
        flags=flags, kind=draw(st.integers(0, 0xFFFF)), payload_version=draw(st.integers(0, 0xFFFF)),
        global_sequence=seq, entity_clock=draw(st.integers(1, 1 << 40)), wall_ms=draw(st.integers(0, 1 << 47)),
        event_id=draw(st.binary(min_size=16, max_size=16)), causation_id=bytes(16), correlation_id=bytes(16),
        idem_hash=draw(st.binary(min_size=16, max_size=16)), prev_hash=draw(st.binary(min_size=32, max_size=32)),
        entity=draw(name), scope=draw(name), payload=draw(st.binary(max_size=200)),
    )
    return data


def fix_crc(buf: bytearray) -> bytes:
    """Make the CRC right for the stated length, so the checks after it decide."""
    length = struct.unpack_from("<I", buf, 0)[0]
    if HASHED_START <= length <= len(buf):
        struct.pack_into("<I", buf, 4, zlib.crc32(memoryview(buf)[HASHED_START:length]))
    return bytes(buf)


@st.composite
def candidates(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["valid", "valid+tail", "cut", "flip", "mutate", "names", "lengths", "random",
                                "future", "old", "flags", "zero_word", "zeros"]))
    if how == "random":
        return bytes(draw(st.binary(max_size=400)))
    if how == "zeros":
        return bytes(draw(st.integers(0, 12))) + draw(st.sampled_from([b"", b"\x01", b"\x00\x07"]))
    data = draw(frames())
    if how == "valid":
        return data
    if how == "valid+tail":
        return data + draw(st.binary(max_size=30))
    if how == "cut":
        return data[:draw(st.integers(0, len(data) - 1))]
    buf = bytearray(data)
    if how == "flip":
        pos = draw(st.integers(0, len(buf) - 1))
        buf[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if how == "mutate":
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(HASHED_START, len(buf) - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            buf[pos:pos + len(chunk)] = chunk[:len(buf) - pos]
        return fix_crc(buf)
    if how == "names":  # an entity byte that is not UTF-8, behind a valid CRC
        buf[HEADER_SIZE] = draw(st.sampled_from([0x80, 0xC3, 0xFF]))
        return fix_crc(buf)
    if how == "lengths":
        field = draw(st.sampled_from(["entity_len", "scope_len", "payload_len"]))
        fmt = "<I" if field == "payload_len" else "<H"
        return set_frame_field(data, fmt, at(field), draw(st.integers(0, 300)))
    if how == "future":
        return set_frame_field(data, "<H", at("version"), draw(st.integers(FRAME_VERSION + 1, 0xFFFF)))
    if how == "old":
        return set_frame_field(data, "<H", at("version"), 0)
    if how == "flags":
        return set_frame_field(data, "<H", at("flags"), draw(st.integers(0, 0xFFFF)))
    # zero_word: a zero length word, then whatever was there
    struct.pack_into("<I", buf, 0, 0)
    return bytes(buf[:draw(st.integers(4, len(buf)))])


# ---- the decoders, each asked about the same bytes ----------------------------------------
def store_with(tmp: str, area: bytes) -> str:
    """A data directory whose segment 1 holds ``area`` as its frame area, and a record
    for sequence 1 that spans at most ``area``."""
    os.makedirs(os.path.join(tmp, SEGMENT_DIR))
    os.makedirs(os.path.join(tmp, INDEX_DIR))
    size = SEG_HEADER_SIZE + len(area) + SEG_TRAILER_SIZE
    with open(os.path.join(tmp, SEGMENT_DIR, segment_name(1)), "wb") as f:
        f.write(encode_segment_header(1, STORE_ID, SEQ, size) + area + bytes(SEG_TRAILER_SIZE))
    stated = struct.unpack_from("<I", area, 0)[0] if len(area) >= 4 else len(area)
    flags = struct.unpack_from("<H", area, at("flags"))[0] if len(area) >= HEADER_SIZE else 0
    record = RECORD.pack(1, 1, SEG_HEADER_SIZE, min(stated, len(area)), 0, flags & ~FLAG_FENCED, 1, 1, 0, bytes(16))
    with open(os.path.join(tmp, INDEX_DIR, RECORDS_FILE), "wb") as f:
        f.write(encode_records_header(1) + record)
    return tmp


def reader_says(data_dir: str) -> tuple[Any, Any]:
    """(Reader.event(1), Reader.frame(1)): the value, or the StaleView the reader turns
    into a refresh and then CorruptSegment."""
    reader = Reader(data_dir, lambda: View(SEQ, 0, 0, 0))
    try:
        reader.refresh()
        out: list[Any] = []
        for call in (reader.event, reader.frame):
            try:
                out.append(call(SEQ))
            except StaleView as exc:
                out.append(exc)
        return out[0], out[1]
    finally:
        reader.close()


def decode_outcome(area: bytes) -> Any:
    try:
        return decode_frame(area, segment="seg", offset=0)
    except (CorruptSegment, FutureFormat) as exc:
        return exc


INSPECT_STATUS = {OK: "ok", BAD: "bad", NEED_MORE: "truncated", EMPTY: "end"}


@PROPS
@given(candidates())
@example(b"")
@example(b"\0\0\0")
@example(b"\0\0\0\0")
@example(b"\0\0\0\0\x01")
@example(b"\x01\x02")
@example(b"\0\0\0\0\0\0\0")
def test_every_decoder_gives_the_same_verdict(area: bytes) -> None:
    tmp = tempfile.mkdtemp(prefix="bp-agree-")
    try:
        data_dir = store_with(tmp, area)
        event, frame_read = reader_says(data_dir)
        inspected = frames_at(data_dir, 1, SEG_HEADER_SIZE, 1)["positions"][0]
    finally:
        shutil.rmtree(tmp)
    status, value = scan_frame(area, 0, len(area), final=True)
    stream_status, _ = scan_frame(area, 0, len(area))
    scan = scan_segment(area, 0, len(area), SEQ, check_hash=True)
    accepted = status == OK and isinstance(value, Frame) and value.global_sequence == SEQ
    # the active codec (C when built) answers exactly as the reference
    assert _native.scan_frame(area, 0, len(area), final=True) == (status, value)
    assert _native.scan_segment(area, 0, len(area), SEQ, check_hash=True) == scan

    # acceptance
    assert bool(scan.frames) == accepted
    assert (not isinstance(event, StaleView)) == accepted
    assert (not isinstance(frame_read, StaleView)) == accepted
    assert (inspected["status"] == "ok") == (status == OK)
    decoded = decode_outcome(area)
    assert isinstance(decoded, Frame) == (status == OK and hash_matches(area, 0, value))  # type: ignore[arg-type]

    # the same values wherever accepted
    if accepted:
        assert isinstance(value, Frame)
        first = scan.frames[0]
        assert (first.offset, first.frame_len, first.flags, first.kind, first.seq, first.clock, first.entity,
                first.scope, first.idem_hash, first.prev_hash, first.event_hash) == (
            0, value.frame_len, value.flags, value.kind, value.global_sequence, value.entity_clock, value.entity,
            value.scope, value.idem_hash, value.prev_hash, value.event_hash)
        assert frame_read == value
        expected = frame_to_event(value)
        assert {k: getattr(event, k) for k in _EVENT_FIELDS} == {k: getattr(expected, k) for k in _EVENT_FIELDS}
        assert inspected["fields"]["global_sequence"] == SEQ and inspected["fields"]["hash_ok"] == (
            not scan.hash_errors)

    # the same kind of rejection, and the same reason
    if status != OK:
        assert INSPECT_STATUS[status] == inspected["status"]
        assert scan.stop_status == status and scan.stop_offset == 0
        if status == BAD:
            assert scan.stop_reason == value == inspected["detail"]
    elif not accepted:
        assert scan.stop_status == OK and "sequence" in scan.stop_reason  # a whole frame, another sequence
    # a stream (no ``final``) differs only on a short run of zeros at the very end
    if stream_status != status:
        assert status == EMPTY and stream_status == NEED_MORE and len(area) < 4 and not any(area)
    if stream_status == EMPTY:
        assert decoded is None
    elif stream_status == NEED_MORE:
        assert isinstance(decoded, NeedMore)
    elif stream_status == BAD:
        assert isinstance(decoded, FutureFormat) == str(value).startswith("future frame version")
        assert isinstance(decoded, (CorruptSegment, FutureFormat))


_EVENT_FIELDS = ("event_id", "global_sequence", "coordinate", "kind", "entity_clock", "wall_ms", "payload_bytes",
                 "payload_version", "event_hash", "prev_hash", "causation_id", "correlation_id")


def test_flags_the_format_does_not_know_are_bad_everywhere() -> None:
    data = encode_frame(flags=FLAG_COMMIT_END, kind=1, payload_version=0, global_sequence=SEQ, entity_clock=1,
                        wall_ms=1, event_id=bytes(16), causation_id=bytes(16), correlation_id=bytes(16),
                        idem_hash=bytes(16), prev_hash=bytes(32), entity=b"e", scope=b"s", payload=b"")[0]
    for bit in range(16):
        flags = 1 << bit
        area = set_frame_field(data, "<H", at("flags"), flags)
        status, reason = scan_frame(area, 0, len(area))
        if flags == FLAG_REDACTED:  # a stub holds a 32-byte digest where this frame holds no payload
            assert (status, reason) == (BAD, "field lengths do not add up to the frame length")
            continue
        assert (status == OK) == bool(flags & KNOWN_FLAGS), bit
        if status == BAD:
            assert reason == f"unknown flags {flags:#x}"
