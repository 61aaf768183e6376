"""The C codec (batpak_mp._native._codec) agrees with the pure-Python reference in
batpak_mp._format, byte for byte and verdict for verdict (hypothesis).

Every encoder's bytes, every decoder's status, value and reason string, on valid frames,
truncations at every length, single bit flips anywhere (with and without a fixed CRC),
random garbage, future versions, unknown flags, zero words and offsets outside the
buffer; CRC-32 and BLAKE2b against zlib and hashlib; a commit group in one call against
sequential ``encode_parts``; a group's records against ``RECORD.pack_into`` (the bytes
left behind by an error too); the reader's Events (``event_at``, ``scan_events``) slot
by slot against ``event_from_header``; the same exception types for arguments struct
would reject.
Results are compared by value and by type, recursively (a ``Frame`` must be a ``Frame``).
tools/native_sanitize.sh runs this file against an ASan/UBSan build of the extension.

Skipped when the extension is not built, unless BATPAK_MP_REQUIRE_NATIVE=1 (CI): then a
missing or broken build fails here instead of passing on the fallback.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batpak_mp import _errors as bp_values_errors
from batpak_mp import _values as bp_values
from batpak_mp._format import directory, frame, record, scan
from batpak_mp._format.frame import FLAG_COMMIT_END, FLAG_REDACTED, HASHED_START, HEADER_SIZE, KNOWN_FLAGS, MIN_FRAME
from batpak_mp._native import _pure
from batpak_mp._prepare import Prepared

try:
    from batpak_mp._native import _codec as C
except ImportError as exc:  # pragma: no cover - depends on the build
    if os.environ.get("BATPAK_MP_REQUIRE_NATIVE") == "1":
        raise
    pytest.skip(f"the C extension batpak_mp._native._codec is not built ({exc}); "
                "`pip install -e .` on a machine with gcc builds it", allow_module_level=True)

# examples per property: a few seconds in all by default; BATPAK_MP_NATIVE_EXAMPLES=1000 digs deeper
EXAMPLES = int(os.environ.get("BATPAK_MP_NATIVE_EXAMPLES", "60"))
PROPS = settings(max_examples=EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(PROPS, max_examples=max(5, EXAMPLES // 6))

u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, (1 << 64) - 1)
id16 = st.binary(min_size=16, max_size=16)
hash32 = st.binary(min_size=32, max_size=32)
utf8 = st.text(min_size=1, max_size=40).map(str.encode)
name = st.one_of(utf8, st.binary(min_size=1, max_size=1), st.binary(min_size=1, max_size=60),
                 st.text(min_size=200, max_size=2000).map(str.encode))  # random binary is mostly not UTF-8
payload = st.one_of(st.just(b""), st.binary(max_size=400), st.binary(min_size=3000, max_size=20000))
flags = st.one_of(st.sampled_from([0, FLAG_COMMIT_END, 0x3, 0x5, 0x9, KNOWN_FLAGS]), u16)


# ---- comparison helpers --------------------------------------------------------------
def same(a: Any, b: Any) -> None:
    """Equal by value and by type, all the way down (NamedTuples, lists, bytes, ints)."""
    assert type(a) is type(b), (type(a), type(b), a, b)
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    else:
        assert a == b, (a, b)


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The result, or ('raised', exception type) when it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return ("raised", type(exc))


def agree(py: Callable[..., Any], native: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Both give the same value and types, or raise the same exception type."""
    expected = outcome(py, *args, **kwargs)
    same(outcome(native, *args, **kwargs), expected)
    return expected


@contextmanager
def buffer_of(kind: str, data: bytes) -> Iterator[Any]:
    """``data`` as one kind of buffer-protocol object."""
    if kind == "bytes":
        yield data
    elif kind == "bytearray":
        yield bytearray(data)
    elif kind == "memoryview":
        # a slice of a larger object: the view starts past offset 0 of its exporter
        yield memoryview(b"\xaa" * 3 + data + b"\xbb")[3:3 + len(data)]
    else:
        m = mmap.mmap(-1, max(len(data), 1))
        m[:len(data)] = data
        try:
            # an mmap is never empty: a 1-byte map of zero stands in for b""
            yield m
        finally:
            m.close()


BUFFER_KINDS = ("bytes", "bytearray", "memoryview", "mmap")


# ---- events --------------------------------------------------------------------------
@st.composite
def event_fields(draw: st.DrawFn, *, seq: int | None = None, flag: int | None = None) -> tuple[Any, ...]:
    """The 14 arguments of encode_parts, over all their ranges."""
    return (
        draw(flags) if flag is None else flag, draw(u16), draw(u16), draw(u64) if seq is None else seq,
        draw(u64), draw(u64), draw(id16), draw(id16), draw(id16), draw(id16), draw(hash32),
        draw(name), draw(name), draw(payload),
    )


def encode(fields: tuple[Any, ...]) -> bytes:
    return b"".join(frame.encode_parts(*fields)[0])


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def set_field(data: bytes, fmt: str, offset: int, value: int, *, fix_crc: bool = True) -> bytes:
    """Overwrite one header field; with fix_crc the CRC is made right again."""
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    if fix_crc:
        struct.pack_into("<I", buf, 4, zlib.crc32(memoryview(buf)[HASHED_START:]))
    return bytes(buf)


# ---- CRC-32 and BLAKE2b --------------------------------------------------------------
@PROPS
@given(st.binary(max_size=3000), st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(-(1 << 70), 1 << 70)),
       st.integers(0, 3000))
@example(b"", 0, 0)
@example(b"", 0xFFFFFFFF, 0)
def test_crc32_matches_zlib(data: bytes, start: int, cut: int) -> None:
    assert C.crc32(data) == zlib.crc32(data)
    assert C.crc32(data, start) == zlib.crc32(data, start)
    assert C.crc32(data, value=start) == zlib.crc32(data, start)
    # chained: the CRC of a+b is the CRC of b started at the CRC of a
    assert C.crc32(data[cut:], C.crc32(data[:cut])) == zlib.crc32(data)
    assert C.crc32(data[cut:], zlib.crc32(data[:cut], start)) == zlib.crc32(data, start)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 255, 256, 257, 65535, 65536, 1 << 20])
def test_crc32_and_blake2b_on_every_block_boundary(size: int) -> None:
    data = os.urandom(size)
    assert C.crc32(data) == zlib.crc32(data)
    assert C.crc32(data, 0xDEADBEEF) == zlib.crc32(data, 0xDEADBEEF)
    for digest_size in (1, 8, 16, 32, 64):
        assert C.blake2b(data, digest_size) == hashlib.blake2b(data, digest_size=digest_size).digest()
    assert C.blake2b(data, 16, b"bp-idem") == hashlib.blake2b(data, digest_size=16, person=b"bp-idem").digest()


@PROPS
@given(st.binary(max_size=1200), st.integers(1, 64), st.binary(max_size=16))
def test_blake2b_matches_hashlib(data: bytes, digest_size: int, person: bytes) -> None:
    expected = hashlib.blake2b(data, digest_size=digest_size, person=person).digest()
    assert C.blake2b(data, digest_size, person) == expected
    assert C.blake2b(data, digest_size=digest_size, person=person) == expected
    if digest_size == 64 and not person:
        assert C.blake2b(data) == expected


@pytest.mark.parametrize(("args", "error"), [
    ((b"x", 0), ValueError), ((b"x", 65), ValueError), ((b"x", 32, bytes(17)), ValueError),
    (("text",), TypeError), ((b"x", 1.5), TypeError), ((None,), TypeError),
])
def test_blake2b_rejects_what_hashlib_rejects(args: tuple[Any, ...], error: type[Exception]) -> None:
    kwargs = {k: v for k, v in zip(("digest_size", "person"), args[1:], strict=False)}
    with pytest.raises(error):
        hashlib.blake2b(args[0], **kwargs)
    with pytest.raises(error):
        C.blake2b(*args)


def test_crc32_rejects_what_zlib_rejects() -> None:
    for args in (("text",), (None,), (b"x", 1.5), (b"x", "1")):
        with pytest.raises(TypeError):
            zlib.crc32(*args)
        with pytest.raises(TypeError):
            C.crc32(*args)


# ---- name and idempotency hashes -----------------------------------------------------
surrogate = st.integers(0xD800, 0xDFFF).map(chr)
keys = st.one_of(
    st.text(max_size=80), st.lists(st.one_of(st.characters(), surrogate), max_size=20).map("".join),
    st.binary(max_size=300), st.binary(max_size=60).map(bytearray), st.binary(max_size=60).map(lambda b: memoryview(b)),
    st.integers(0, 64),  # bytes(n): n zero bytes, as the reference does
)


@PROPS
@given(keys)
@example("")
@example(b"")
@example("\udc80")
def test_idem_hash_matches(key: Any) -> None:
    agree(directory.idem_hash, C.idem_hash, key)


@PROPS
@given(st.one_of(st.binary(max_size=2000), st.binary(max_size=60).map(bytearray)))
@example(b"")
def test_name_hash_matches(raw: Any) -> None:
    agree(directory.name_hash, C.name_hash, raw)
    with buffer_of("memoryview", bytes(raw)) as mv:
        agree(directory.name_hash, C.name_hash, mv)


@pytest.mark.parametrize("bad", [None, "text", 1.5, [1, 2], -1])
def test_hashes_reject_what_the_reference_rejects(bad: Any) -> None:
    agree(directory.name_hash, C.name_hash, bad)
    agree(directory.idem_hash, C.idem_hash, bad)


# ---- encode_parts --------------------------------------------------------------------
@PROPS
@given(event_fields())
def test_encode_parts_matches(fields: tuple[Any, ...]) -> None:
    expected = frame.encode_parts(*fields)
    same(C.encode_parts(*fields), expected)
    names = ("flags", "kind", "payload_version", "global_sequence", "entity_clock", "wall_ms", "event_id",
             "causation_id", "correlation_id", "idem_hash", "prev_hash", "entity", "scope", "payload")
    same(C.encode_parts(*fields[:5], **dict(zip(names[5:], fields[5:], strict=True))), expected)


@PROPS
@given(event_fields(), st.lists(st.tuples(st.integers(6, 10), st.binary(max_size=40)), max_size=5))
def test_encode_parts_pads_and_truncates_ids_like_struct(fields: tuple[Any, ...], ids: list[tuple[int, bytes]]) -> None:
    changed = list(fields)
    for index, value in ids:
        changed[index] = bytearray(value) if len(value) % 2 else value
    same(C.encode_parts(*changed), frame.encode_parts(*changed))


def test_encode_parts_at_the_edges_of_every_field() -> None:
    top = (1 << 64) - 1
    for fields in (
        (0, 0, 0, 0, 0, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b""),
        (0xFFFF, 0xFFFF, 0xFFFF, top, top, top, b"\xff" * 16, b"\xff" * 16, b"\xff" * 16, b"\xff" * 16,
         b"\xff" * 32, b"E" * 0xFFFF, b"S" * 0xFFFF, os.urandom(1 << 20)),
        (True, False, True, 1, 2, 3, b"", b"", b"", b"", b"", b"\0", b"\0", b"\0"),
    ):
        same(C.encode_parts(*fields), frame.encode_parts(*fields))


@pytest.mark.parametrize(("index", "value"), [
    (0, -1), (0, 0x10000), (1, 1 << 16), (2, -5), (3, -1), (3, 1 << 64), (4, 1 << 70), (5, -(1 << 70)),
    (0, 1.0), (3, "1"), (4, None),
    (6, "sixteen chars..."), (7, memoryview(bytes(16))), (8, None), (9, 5), (10, "x" * 32),
    (11, b""), (12, b""), (11, "entity"), (13, "payload"), (11, 5), (13, None),
    (11, b"e" * 0x10000), (12, b"s" * 0x10000),
])
def test_encode_parts_rejects_what_struct_rejects(index: int, value: Any) -> None:
    fields = list((3, 1, 0, 7, 1, 99, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"p"))
    fields[index] = value
    agree(frame.encode_parts, C.encode_parts, *fields)


def test_encode_parts_argument_binding() -> None:
    fields = (3, 1, 0, 7, 1, 99, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"p")
    for args, kwargs in (((), {}), (fields[:13], {}), ((*fields, b""), {}), (fields, {"flags": 1}),
                         (fields[:13], {"payload": b"", "nonsense": 1})):
        agree(frame.encode_parts, C.encode_parts, *args, **kwargs)


# ---- encode_group --------------------------------------------------------------------
@st.composite
def groups(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """A commit group whose items chain to earlier items by index, or to given hashes."""
    items = []
    for i in range(draw(st.integers(0, 10))):
        fields = list(draw(event_fields()))
        if i and draw(st.booleans()):
            fields[10] = draw(st.integers(0, i - 1))
        items.append(tuple(fields))
    return items


def sequential(items: list[tuple[Any, ...]]) -> tuple[bytes, list[bytes], list[int]]:
    """The reference: one encode_parts call per item, chaining by hand."""
    parts: list[bytes] = []
    hashes: list[bytes] = []
    lens: list[int] = []
    for fields in items:
        prev = fields[10]
        encode_parts: Callable[..., tuple[tuple[bytes, ...], bytes, int]] = frame.encode_parts
        pieces, event_hash, frame_len = encode_parts(*fields[:10], hashes[prev] if isinstance(prev, int) else prev,
                                                           *fields[11:])
        parts += pieces
        hashes.append(event_hash)
        lens.append(frame_len)
    return b"".join(parts), hashes, lens


@PROPS
@given(groups())
def test_encode_group_matches_sequential_encode_parts(items: list[tuple[Any, ...]]) -> None:
    expected = sequential(items)
    same(C.encode_group(items), expected)
    same(_pure.encode_group(items), expected)
    as_lists: Any = [list(item) for item in items]  # any sequences do
    same(C.encode_group(as_lists), expected)
    same(C.encode_group(tuple(items)), expected)


def test_encode_group_chains_a_real_log() -> None:
    """A group whose every event follows the one before: the frames scan as one log."""
    base = (FLAG_COMMIT_END, 1, 0, 1, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"")
    items = [(*base[:3], i + 1, i + 1, *base[5:10], i - 1 if i else bytes(32), *base[11:13], os.urandom(i))
             for i in range(50)]
    data, hashes, lens = C.encode_group(items)
    result = scan.scan_segment(data, 0, len(data), 1, check_hash=True)
    assert len(result.frames) == 50 and not result.hash_errors
    assert [f.prev_hash for f in result.frames[1:]] == hashes[:-1]
    assert [f.frame_len for f in result.frames] == lens


@pytest.mark.parametrize("mutate", [
    lambda items: [*items, (*items[0][:10], 2, *items[0][11:])],  # a later item
    lambda items: [*items, (*items[0][:10], -1, *items[0][11:])],  # negative
    lambda items: [*items, (*items[0][:10], 1 << 80, *items[0][11:])],
    lambda items: [(*items[0][:10], 0, *items[0][11:])],  # itself
    lambda items: [*items, items[0][:13]],  # 13 fields
    lambda items: [*items, items[0] + (b"",)],  # 15 fields
    lambda items: [*items, 5],  # not a sequence
    lambda items: [*items, (*items[0][:3], -1, *items[0][4:])],  # struct rejects
    lambda items: [*items, (*items[0][:11], "entity", *items[0][12:])],
    lambda items: 5,
])
def test_encode_group_rejects_like_the_pure_fallback(mutate: Callable[[list[Any]], Any]) -> None:
    items = [(0, 1, 0, 1, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"p")] * 2
    bad = mutate(items)
    expected = outcome(_pure.encode_group, bad)
    assert expected[0] == "raised"
    same(outcome(C.encode_group, bad), expected)


def test_encode_group_of_nothing() -> None:
    same(C.encode_group([]), (b"", [], []))
    same(_pure.encode_group([]), (b"", [], []))


# ---- frame_header, scan_frame, frame_hash and hash_matches ---------------------------
def frame_agrees(buf: Any, off: int, limit: int) -> Any:
    """scan_frame verdicts agree, final or not; so do frame_header's (where its
    precondition holds), and for OK frames frame_hash and hash_matches."""
    agree(frame.scan_frame, C.scan_frame, buf, off, limit, final=True)
    if isinstance(off, int) and isinstance(limit, int) and off >= 0 and limit <= len(buf):
        agree(frame.frame_header, C.frame_header, buf, off, limit)
        agree(frame.frame_header, C.frame_header, buf, off, limit, final=True)
    status, value = agree(frame.scan_frame, C.scan_frame, buf, off, limit)
    if status == frame.OK:
        agree(frame.hash_matches, C.hash_matches, buf, off, value)
        agree(frame.frame_hash, C.frame_hash, buf, off, value.frame_len)
    return status, value


@PROPS
@given(event_fields(), st.binary(max_size=20), st.binary(max_size=20))
def test_scan_frame_on_valid_frames(fields: tuple[Any, ...], before: bytes, after: bytes) -> None:
    data = encode(fields)
    buf = before + data + after
    status, value = frame_agrees(buf, len(before), len(buf))
    if fields[0] & ~(KNOWN_FLAGS & ~FLAG_REDACTED) == 0 and is_utf8(fields[11]) and is_utf8(fields[12]):
        assert status == frame.OK and C.hash_matches(buf, len(before), value)
    frame_agrees(buf, len(before), len(before) + len(data))


@FEW
@given(event_fields(), st.sampled_from(BUFFER_KINDS))
def test_scan_frame_truncated_at_every_length(fields: tuple[Any, ...], kind: str) -> None:
    data = encode(fields)
    step = max(1, len(data) // 400)  # every length of small frames; a dense sample of large ones
    for cut in [*range(0, len(data) + 1, step), len(data) - 1, len(data)]:
        frame_agrees(data[:cut], 0, cut)  # a buffer that ends there
        frame_agrees(data, 0, cut)  # a limit that ends there
    with buffer_of(kind, data) as buf:
        frame_agrees(buf, 0, len(data))
        frame_agrees(buf, 0, len(data) - 1)


@settings(PROPS, max_examples=max(3, EXAMPLES // 15))
@given(event_fields().map(lambda f: (*f[:11], f[11][:30], f[12][:30], f[13][:100])))
def test_scan_frame_on_every_single_bit_flip(fields: tuple[Any, ...]) -> None:
    data = encode(fields)
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        frame_agrees(bytes(flipped), 0, len(data))
        if bit >= 64:  # the same flip under a correct CRC: only the hash (or the structure) can tell
            fixed = set_field(bytes(flipped), "<I", 0, len(data))  # rewrites the length it had, fixes the CRC
            frame_agrees(fixed, 0, len(fixed))


@PROPS
@given(st.binary(max_size=700), st.integers(-20, 720), st.integers(-20, 720))
@example(b"", 0, 0)
@example(b"\0\0\0", 0, 3)
@example(b"\0\0\0\0", 0, 4)
@example(b"\0\0\0\0\x01", 0, 5)
@example(bytes(8), 0, 8)
@example(struct.pack("<II", MIN_FRAME - 1, 0), 0, 8)
@example(struct.pack("<II", 0xFFFFFFFF, 0), 0, 8)
@example(struct.pack("<II", (1 << 31) + 1, 0), 0, 8)
@example(struct.pack("<II", MIN_FRAME, 0) + bytes(MIN_FRAME), 0, MIN_FRAME + 8)
def test_scan_frame_on_random_garbage(data: bytes, off: int, limit: int) -> None:
    frame_agrees(data, off, limit)
    frame_agrees(data, max(0, min(off, len(data))), len(data))


@pytest.mark.parametrize(("off", "limit"), [
    (-1, 10), (0, 11), (5, 4), (1 << 70, 5), (0, 1 << 70), (-(1 << 70), 5), (True, 10), (False, True), (10, 10),
])
def test_scan_frame_offsets_outside_the_buffer(off: int, limit: int) -> None:
    frame_agrees(bytes(10), off, limit)


def test_frame_header_refuses_to_read_outside_the_buffer() -> None:
    """The reference leaves these to its callers (scan_frame checks them); C says so."""
    for off, limit in ((-1, 10), (0, 11), (-(1 << 70), 5), (0, 1 << 70)):
        with pytest.raises(ValueError):
            C.frame_header(bytes(10), off, limit)
    for off, limit in ((11, 10), (1 << 70, 10), (5, -3), (0, -(1 << 70))):  # past the end, limits below off: no read
        for final in (False, True):
            agree(frame.frame_header, C.frame_header, bytes(9) + b"\x01", off, limit, final=final)


# every byte sequence UTF-8 decoding could get wrong: all of 1 and 2 bytes, 3- and 4-byte
# leads with every second byte, and the classic edge cases
UTF8_CASES: list[bytes] = (
    [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    + [bytes([a, b, c]) for a in range(0xE0, 0x100) for b in range(256) for c in (0x80, 0xBF, 0x7F)]
    + [bytes([a, b, 0x80, 0x80]) for a in range(0xF0, 0x100) for b in range(256)]
    + [b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xee\x80\x80",
       b"\xef\xbf\xbf", b"\xe0\xa0\x80", b"\xe0\x9f\xbf", b"\xf0\x90\x80\x80", b"\xf0\x8f\xbf\xbf",
       b"abcdefgh\xc3\xa9", b"abcdefg\xc3", ("é" * 9 + "x" * 8).encode(), "\U0010ffff".encode() * 3]
)


def test_names_must_be_utf8_exactly_as_python_decodes_them() -> None:
    """The entity (and scope) of a frame are checked as bytes.decode("utf-8") would."""
    cases = UTF8_CASES
    for n in sorted({len(c) for c in cases}):
        base = encode((0, 1, 0, 1, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e" * n, b"s", b""))
        for i, case in enumerate(c for c in cases if len(c) == n):
            for where in (HEADER_SIZE, HEADER_SIZE + n):  # as the entity, then as the scope
                data = bytearray(base) if where == HEADER_SIZE else bytearray(
                    encode((0, 1, 0, 1, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s" * n, b"")))
                start = HEADER_SIZE if where == HEADER_SIZE else HEADER_SIZE + 1
                data[start:start + n] = case
                struct.pack_into("<I", data, 4, zlib.crc32(memoryview(data)[HASHED_START:]))
                valid = is_utf8(case)
                status, value = C.scan_frame(data, 0, len(data))
                assert (status == frame.OK) is valid, (case, status, value)
                if i % 97 == 0:  # the reference agrees (a sample: it is the slow one)
                    same(C.scan_frame(data, 0, len(data)), frame.scan_frame(data, 0, len(data)))
                    agree(scan.scan_segment, C.scan_segment, bytes(data), 0, len(data), 1)


@pytest.mark.parametrize(("off", "limit"), [(1.0, 10), (0, "10"), (None, 3)])
def test_scan_frame_rejects_non_integer_offsets(off: Any, limit: Any) -> None:
    data = encode((0, 1, 0, 1, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"p"))
    with pytest.raises(TypeError):
        C.scan_frame(data, off, limit)
    # not a buffer: C always says so; the reference says so once it reads (here, past 8 bytes)
    agree(frame.scan_frame, C.scan_frame, "not a buffer" * 20, 0, 200)
    with pytest.raises(TypeError):
        C.scan_frame("", 0, 0)  # type: ignore[arg-type]


@PROPS
@given(event_fields(flag=FLAG_COMMIT_END), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
@example((0, 1, 0, 1, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"p"), 2, 0)
@example((0, 1, 0, 1, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"p"), 0, 0x10)
def test_scan_frame_on_versions_flags_and_lengths(fields: tuple[Any, ...], version: int, flag_bits: int) -> None:
    data = encode(fields)
    frame_agrees(set_field(data, "<H", 8, version), 0, len(data))  # future, unknown, current versions
    frame_agrees(set_field(data, "<H", 10, flag_bits), 0, len(data))  # unknown flags
    for offset in (14, 16, 20):  # entity, scope and payload lengths that do not add up, or are zero
        frame_agrees(set_field(data, "<H", offset, 0), 0, len(data))
        frame_agrees(set_field(data, "<H", offset, 1), 0, len(data))
    frame_agrees(set_field(data, "<I", 20, flag_bits), 0, len(data))


@pytest.mark.parametrize("size", range(0, 17))
def test_scan_frame_on_zero_words(size: int) -> None:
    for off in range(0, size + 1):
        frame_agrees(bytes(size), off, size)
        frame_agrees(bytes(size) + b"\x01", off, size + 1)


@PROPS
@given(event_fields(), st.integers(-300, 3000), st.integers(-300, 3000), st.binary(max_size=4))
def test_hash_matches_on_any_offset_and_length(fields: tuple[Any, ...], off: int, frame_len: int, noise: bytes) -> None:
    data = encode(fields) + noise
    value = frame.scan_frame(data, 0, len(data))[1]
    if not isinstance(value, frame.Frame):
        return
    agree(frame.hash_matches, C.hash_matches, data, off, value)
    agree(frame.hash_matches, C.hash_matches, data, off, value._replace(frame_len=frame_len))
    other: Any = value  # an event_hash that is a bytearray compares by content too
    agree(frame.hash_matches, C.hash_matches, data, 0, other._replace(event_hash=bytearray(value.event_hash)))
    for huge in (1 << 70, -(1 << 70)):
        agree(frame.hash_matches, C.hash_matches, data, huge, value)
        agree(frame.hash_matches, C.hash_matches, data, 0, value._replace(frame_len=huge))
    agree(frame.hash_matches, C.hash_matches, data, 0, ("not", "a", "frame"))


# ---- scan_segment --------------------------------------------------------------------
@st.composite
def logs(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A segment's bytes: a header-like prefix, then continuous frames (some ending a
    commit; from near 2**64 they wrap to 0, which the scan must stop at), then zeros or
    garbage. Returns (bytes, start, first sequence)."""
    first = draw(st.one_of(st.integers(1, 1000), st.just((1 << 64) - 3)))
    n = draw(st.integers(0, 8))
    prefix = draw(st.binary(max_size=24))
    body = b""
    for i in range(n):
        commit = FLAG_COMMIT_END if draw(st.booleans()) or (i == n - 1 and draw(st.booleans())) else 0
        fields = draw(event_fields(seq=(first + i) % (1 << 64), flag=commit | draw(st.sampled_from([0, 0x2, 0x8]))))
        short_names = (draw(st.binary(min_size=1, max_size=20)), draw(st.binary(min_size=1, max_size=20)))
        fields = (*fields[:11], *short_names, draw(st.binary(max_size=300)))
        body += reform(encode(fields), draw(st.sampled_from(FORMS)))
    tail = draw(st.one_of(st.just(b""), st.binary(max_size=12).map(lambda b: bytes(len(b))), st.binary(max_size=40)))
    return prefix + body + tail, len(prefix), first


FORMS = ("v2", "v2", "stub", "v1")  # how a frame of a log is written: as the writer does, a stub, or version 1


def as_v1(data: bytes) -> bytes:
    """A version-2 frame made into the version-1 frame of the same fields (its hash over
    the payload bytes, its CRC redone)."""
    buf = bytearray(data)
    struct.pack_into("<H", buf, 8, 1)
    buf[144:176] = frame.chain_hash(bytes(buf[8:144]), bytes(buf[176:]))
    struct.pack_into("<I", buf, 4, zlib.crc32(buf[8:]))
    return bytes(buf)


def as_stub(data: bytes) -> bytes:
    h = frame.frame_header(data, 0, len(data))
    assert isinstance(h, tuple)
    return frame.encode_stub(data, 0, h)


def reform(data: bytes, form: str) -> bytes:
    return as_v1(data) if form == "v1" else as_stub(data) if form == "stub" else data


@PROPS
@given(event_fields(), st.sampled_from(BUFFER_KINDS))
def test_stubs_and_version_1_frames_agree_and_keep_their_hash(fields: tuple[Any, ...], kind: str) -> None:
    """A stub verifies against the frame's own event hash in both codecs, reads as a
    redacted Event (payload None) and agrees everywhere; a version-1 frame hashes its
    payload bytes and agrees too; a version-1 frame flagged REDACTED is bad."""
    fields = (fields[0] & (KNOWN_FLAGS & ~FLAG_REDACTED), *fields[1:])
    data = encode(fields)
    names_ok = is_utf8(fields[11]) and is_utf8(fields[12])
    stub, v1 = as_stub(data), as_v1(data)
    assert len(stub) == len(data) - len(fields[13]) + 32 and stub[144:176] == data[144:176]
    for buf in (stub, v1):
        with buffer_of(kind, buf) as b:
            status, _ = frame_agrees(b, 0, len(buf))
        if buf is stub:
            assert frame.frame_hash(buf, 0, len(buf)) == data[144:176] == C.frame_hash(buf, 0, len(buf))
        assert status == (frame.OK if names_ok else frame.BAD)
        events_agree(_pure.event_at, C.event_at, buf, 0, len(buf), fields[3])
    if names_ok:
        ev = C.event_at(stub, 0, len(stub), fields[3], {})
        assert ev is not None and ev.redacted and ev.payload is None and ev.payload_bytes == b""
        assert ev.event_hash == data[144:176]
        old = C.event_at(v1, 0, len(v1), fields[3], {})
        assert old is not None and not old.redacted
    h = frame.frame_header(stub, 0, len(stub))
    assert isinstance(h, tuple) and frame.encode_stub(stub, 0, h) == stub  # a stub stays a stub
    bad_stub = bytearray(stub)
    struct.pack_into("<H", bad_stub, 8, 1)  # a version-1 stub: no such frame
    struct.pack_into("<I", bad_stub, 4, zlib.crc32(bad_stub[8:]))
    assert frame_agrees(bytes(bad_stub), 0, len(bad_stub)) == (frame.BAD, f"unknown flags {fields[0] | FLAG_REDACTED:#x}")
    altered = bytearray(stub)
    altered[-1] ^= 1  # a stub whose digest is not the payload's: the hash no longer matches
    struct.pack_into("<I", altered, 4, zlib.crc32(altered[8:]))
    frame_agrees(bytes(altered), 0, len(altered))
    assert frame.frame_hash(altered, 0, len(altered)) != data[144:176]
    assert C.frame_hash(altered, 0, len(altered)) != data[144:176]


@st.composite
def damaged(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A log with one thing wrong: a cut, a bit flip (CRC fixed or not), garbage or zeros
    written over a stretch, or a frame from later in the log."""
    data, start, first = draw(logs())
    how = draw(st.sampled_from(["none", "cut", "flip", "flip_fixed", "overwrite", "zeros", "jump"]))
    if how == "none" or len(data) == start:
        return data, start, first
    at = draw(st.integers(start, len(data) - 1))
    buf = bytearray(data)
    if how == "cut":
        return bytes(buf[:at]), start, first
    if how in ("flip", "flip_fixed"):
        buf[at] ^= 1 << draw(st.integers(0, 7))
        if how == "flip_fixed":  # make the CRC of the frame that holds `at` right again, if it is a frame
            result = scan.scan_segment(data, start, len(data), first)
            for f in result.frames:
                if f.offset + HASHED_START <= at < f.offset + f.frame_len:
                    struct.pack_into("<I", buf, f.offset + 4, zlib.crc32(buf[f.offset + HASHED_START:f.offset + f.frame_len]))
        return bytes(buf), start, first
    if how in ("overwrite", "zeros"):
        junk = draw(st.binary(min_size=1, max_size=30))
        buf[at:at + len(junk)] = bytes(len(junk)) if how == "zeros" else junk
        return bytes(buf), start, first
    later = encode(draw(event_fields(seq=(first + draw(st.integers(5, 9))) % (1 << 64), flag=FLAG_COMMIT_END)))
    return bytes(buf[:at]) + later, start, first


def segment_agrees(buf: Any, start: Any, limit: Any, expect: Any) -> None:
    for check_hash in (False, True):
        agree(scan.scan_segment, C.scan_segment, buf, start, limit, expect, check_hash=check_hash)


@PROPS
@given(damaged(), st.data())
def test_scan_segment_matches(log: tuple[bytes, int, int], draw: st.DataObject) -> None:
    data, start, first = log
    segment_agrees(data, start, len(data), first)
    limit = draw.draw(st.one_of(st.integers(start - 10, len(data) + 10), st.just(1 << 70), st.just(-(1 << 70))))
    expect = draw.draw(st.one_of(st.just(first), st.just(first + 1), st.integers(-2, 3), st.just(1 << 64),
                                 st.just(-(1 << 70)), st.just(float(first)), st.just(True)))
    segment_agrees(data, start, limit, expect)
    other_start = draw.draw(st.integers(-3, len(data) + 3))
    segment_agrees(data, other_start, len(data), first)


@FEW
@given(damaged(), st.sampled_from(BUFFER_KINDS))
def test_scan_segment_on_every_buffer_kind(log: tuple[bytes, int, int], kind: str) -> None:
    data, start, first = log
    with buffer_of(kind, data) as buf:
        segment_agrees(buf, start, len(data), first)


def test_scan_segment_finds_damage_in_the_middle() -> None:
    items = [(FLAG_COMMIT_END, 1, 0, s, s, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"x" * s)
             for s in (1, 2, 3)]
    joined, _, lens = sequential(items)
    data = bytearray(joined)
    data[lens[0] + HEADER_SIZE + 3] ^= 0x40  # inside the second frame's body
    result = C.scan_segment(bytes(data), 0, len(data), 1)
    assert result.damage_mid_log and result.stop_reason == "checksum mismatch"
    segment_agrees(bytes(data), 0, len(data), 1)


def test_scan_segment_across_the_last_sequence() -> None:
    """The expected sequence steps past 2**64 - 1 inside the scan (a Python int there)."""
    top = (1 << 64) - 1
    items = [(FLAG_COMMIT_END, 1, 0, s, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), b"e", b"s", b"")
             for s in (top - 1, top, 0)]
    data = sequential(items)[0]
    for expect in (top - 1, top, 0, 1 << 64):
        segment_agrees(data, 0, len(data), expect)
    broken = bytearray(data)
    broken[MIN_FRAME + 10] ^= 1  # damage the second frame: is the third one "next + 1"?
    segment_agrees(bytes(broken), 0, len(data), top - 1)


@pytest.mark.parametrize("limit", [-(1 << 70), -(1 << 63), -13, -12, -11, -1, 0, 11, 12, 13, 1 << 63, 1 << 70])
def test_scan_segment_limits_far_from_start(limit: int) -> None:
    """A limit below the start reads buf[start:limit] the Python way (from the end when
    negative); no limit, however far, makes C arithmetic overflow."""
    for data in (bytes(12), bytes(11) + b"\x01", b"\x01" + bytes(11)):
        for start in (0, 4, 12):
            segment_agrees(data, start, limit, 1)
            frame_agrees(data, start, len(data))
            if limit <= len(data):
                agree(frame.frame_header, C.frame_header, data, start, limit, final=True)


def test_scan_segment_rejects_like_the_reference() -> None:
    data = bytes(64)
    for args in (("not a buffer", 0, 10, 1), (data, 1.5, 10, 1), (data, 0, None, 1)):
        with pytest.raises(TypeError):
            C.scan_segment(*args)
    agree(scan.scan_segment, C.scan_segment, data, 0, 64)
    agree(scan.scan_segment, C.scan_segment, data, 0, 64, 1, 2)
    agree(scan.scan_segment, C.scan_segment, data, 0, 64, 1, check=True)


# ---- unpack_record -------------------------------------------------------------------
@PROPS
@given(st.binary(max_size=400), st.one_of(st.integers(-8, 8), st.integers(-(1 << 80), 1 << 80)))
@example(bytes(128), 1)
@example(bytes(128), 2)
@example(bytes(128), 0)
@example(bytes(128), -1)
@example(bytes(128), 1 << 57)
def test_unpack_record_matches(data: bytes, seq: int) -> None:
    agree(_pure.unpack_record, C.unpack_record, data, seq)
    agree(lambda b, s: record.RECORD.unpack_from(b, record.RECORDS_HEADER_SIZE + (s - 1) * record.RECORD_SIZE),
          C.unpack_record, data, seq)
    with buffer_of("memoryview", data) as mv:
        agree(_pure.unpack_record, C.unpack_record, mv, seq)


# ---- pack_records --------------------------------------------------------------------
u32 = st.integers(0, 0xFFFFFFFF)
metas_st = st.lists(st.tuples(st.integers(0, 7), u64, u16, u16, u32, u64, u64, u64, st.binary(max_size=8), id16), max_size=6)
bad_value = st.sampled_from([-1, 1 << 64, 1 << 32, 1 << 16, 1.5, "x", None, True])


@PROPS
@given(metas_st, st.one_of(u32, st.just(1 << 32), st.just(-1)), st.one_of(u32, st.just((1 << 32) - 1)),
       st.integers(0, 600), st.data())
def test_pack_records_matches(metas: list[tuple[Any, ...]], segment_id: int, offset: int, size: int,
                              draw: st.DataObject) -> None:
    metas = list(metas)
    out_of_range: bool = draw.draw(st.booleans())
    if metas and out_of_range:  # one field of one record out of struct's range
        i, f = draw.draw(st.integers(0, len(metas) - 1)), draw.draw(st.integers(0, 9))
        metas[i] = (*metas[i][:f], draw.draw(bad_value), *metas[i][f + 1:])
    wrong_shape: bool = draw.draw(st.integers(0, 9)) == 0
    if metas and wrong_shape:
        metas.append(metas[0][:draw.draw(st.integers(0, 11))] * 2)
    py_buf, c_buf = bytearray(size), bytearray(size)
    expected = outcome(_pure.pack_records, py_buf, metas, segment_id, offset)
    same(outcome(C.pack_records, c_buf, metas, segment_id, offset), expected)
    assert c_buf == py_buf, (metas, expected)  # the same bytes, records before an error included


def test_pack_records_into_every_writable_buffer_and_not_into_a_read_only_one() -> None:
    metas = [(s, s * 3, 7, 1, 200 + s, s - 1, 11, 12, b"e", bytes([s]) * 16) for s in (1, 2, 3)]
    expected = bytearray(320)
    assert _pure.pack_records(expected, metas, 9, 4096) == 4096 + 606
    with buffer_of("mmap", bytes(320)) as m:
        assert C.pack_records(m, metas, 9, 4096) == 4096 + 606 and m[:320] == expected
    for read_only in (bytes(320), memoryview(bytes(320))):
        same(outcome(C.pack_records, read_only, metas, 9, 4096), outcome(_pure.pack_records, read_only, metas, 9, 4096))
    same(C.pack_records(bytearray(64), [], 1, 5), 5)
    for bad in (None, 5, [5]):
        same(outcome(C.pack_records, bytearray(320), bad, 9, 4096), outcome(_pure.pack_records, bytearray(320), bad,
                                                                              9, 4096))


@PROPS
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.integers(0, 3)), max_size=12),
       st.sets(st.sampled_from([b"a", b"b", b"c", b"d"])))
def test_index_group_matches(events: list[tuple[bytes, int]], known: set[bytes]) -> None:
    """A group's records, then each entity's delta slot at its newest event; a slot met
    for the first time comes from upsert."""
    metas = [(seq, i, 7, 1, 200 + i, prev, 1000 + ord(e[:1]), 12, e, bytes(16))
             for seq, (i, (e, prev)) in enumerate(enumerate(events), start=1)]
    outcomes = []
    for fn in (_pure.index_group, C.index_group):
        records, delta = bytearray(64 * (len(metas) + 2)), bytearray(1024)
        slots = {e: 128 + 16 * (ord(e[:1]) - ord("a")) for e in known}
        calls: list[tuple[int, int, int]] = []

        def upsert(h: int, seq: int, prev: int, calls: list[tuple[int, int, int]] = calls) -> int:
            calls.append((h, seq, prev))
            return 512 + 16 * len(calls)

        end = outcome(fn, records, metas, 3, 4096, delta, slots, upsert)
        outcomes.append((end, bytes(records), bytes(delta), slots, calls))
    same(outcomes[1], outcomes[0])
    bad = outcome(C.index_group, bytearray(64 * 20), metas, 3, 0, bytearray(16), {}, lambda h, s, p: 16)
    assert bad == ("raised", struct.error) or not metas  # a slot outside the table


# ---- event_at, scan_events -----------------------------------------------------------
def event_fields_of(ev: Any) -> Any:
    """Every slot of an Event (its == compares only id and hash), the coordinate by name."""
    if not isinstance(ev, bp_values.Event):
        return ev
    assert type(ev) is bp_values.Event
    names = [n for n in bp_values.Event.__slots__ if n not in ("coordinate", "_payload")]
    coord = ev.coordinate
    assert type(coord) is bp_values.Coordinate and type(ev.kind) is bp_values.Kind
    return ([(n, type(getattr(ev, n)), getattr(ev, n)) for n in names]
            + [("coordinate", coord.entity, coord.scope, coord._entity_bytes, coord._scope_bytes),
               ("undecoded", ev._payload is bp_values._UNDECODED)])


def events_agree(py: Callable[..., Any], native: Callable[..., Any], buf: Any, *args: Any) -> None:
    """Both give the same Events (every slot), offsets and sequence, or raise alike; the
    name caches they fill agree too."""
    py_cache: dict[bytes, Any] = {}
    c_cache: dict[bytes, Any] = {}
    expected, got = outcome(py, buf, *args, coords=py_cache), outcome(native, buf, *args, coords=c_cache)
    if isinstance(expected, tuple) and expected and isinstance(expected[0], list):
        expected = ([event_fields_of(e) for e in expected[0]], *expected[1:])
        got = ([event_fields_of(e) for e in got[0]], *got[1:]) if isinstance(got, tuple) and got[0] != "raised" else got
    else:
        expected, got = event_fields_of(expected), event_fields_of(got)
    same(got, expected)
    assert {k: (v[0], v[1].entity, v[1].scope) for k, v in c_cache.items()} == {
        k: (v[0], v[1].entity, v[1].scope) for k, v in py_cache.items()}


def frames_in(data: bytes, start: int, first: int) -> list[tuple[int, int, int]]:
    """(offset, length, sequence) of each whole frame the reference scan finds."""
    return [(f.offset, f.frame_len, f.seq) for f in scan.scan_segment(data, start, len(data), first).frames]


@PROPS
@given(damaged(), st.data())
def test_event_at_matches(log: tuple[bytes, int, int], draw: st.DataObject) -> None:
    data, start, first = log
    at = frames_in(data, start, first) or [(start, 200, first)]
    off, length, seq = draw.draw(st.sampled_from(at))
    for args in ((off, off + length, seq), (off, off + length, seq + 1), (off, off + length - 1, seq),
                 (off, off + length + 1, seq), (off + 1, off + length, seq), (off, len(data) + 1, seq),
                 (-1, off + length, seq), (off, off + length, 1 << 70), (off, off + length, -1)):
        events_agree(_pure.event_at, C.event_at, data, *args)
    with buffer_of(draw.draw(st.sampled_from(["bytes", "mmap"])), data) as buf:
        events_agree(_pure.event_at, C.event_at, buf, off, off + length, seq)


@PROPS
@given(damaged(), st.data())
def test_scan_events_matches(log: tuple[bytes, int, int], draw: st.DataObject) -> None:
    data, start, first = log
    last = draw.draw(st.one_of(st.just(first + 20), st.integers(first - 2, first + 9), st.just(1 << 70),
                               st.just(-(1 << 70)), st.just((1 << 64) - 1)))
    most = draw.draw(st.one_of(st.just(1000), st.integers(-1, 4), st.just(1 << 70)))
    seq = draw.draw(st.one_of(st.just(first), st.just(first + 1), st.just(1 << 64), st.just(-1)))
    limit = draw.draw(st.one_of(st.just(len(data)), st.integers(start, len(data))))
    events_agree(_pure.scan_events, C.scan_events, data, start, limit, seq, last, most)
    with buffer_of(draw.draw(st.sampled_from(["bytes", "mmap"])), data) as buf:
        events_agree(_pure.scan_events, C.scan_events, buf, start, limit, seq, last, most)
    for off, lim in ((-1, len(data)), (start, len(data) + 1)):
        events_agree(_pure.scan_events, C.scan_events, data, off, lim, seq, last, most)


def test_event_builders_reuse_and_bound_the_name_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached Coordinate is reused only for the same split of the same bytes; a full
    cache starts over (COORD_CACHE_MAX, read when the codec first builds an Event)."""
    items = [(FLAG_COMMIT_END, 1, 0, s, 1, 0, bytes(16), bytes(16), bytes(16), bytes(16), bytes(32), e, sc, b"\xc0")
             for s, (e, sc) in enumerate([(b"ab", b"c"), (b"ab", b"c"), (b"a", b"bc")], start=1)]
    data = encode_group_reference(items)
    cache: dict[bytes, Any] = {}
    events, _, _ = C.scan_events(data, 0, len(data), 1, 3, cache, 10)
    assert [(e.coordinate.entity, e.coordinate.scope) for e in events] == [("ab", "c"), ("ab", "c"), ("a", "bc")]
    assert events[0].coordinate is events[1].coordinate and cache == {b"abc": (1, events[2].coordinate)}
    assert events[1].payload is None  # decoded on first use, like any Event
    crowded = {i.to_bytes(4, "big"): (1, events[0].coordinate) for i in range(frame.COORD_CACHE_MAX)}
    C.event_at(data, 0, 0 + C.scan_events(data, 0, len(data), 1, 1, {}, 1)[1], 1, crowded)
    assert list(crowded) == [b"abc"]


def encode_group_reference(items: list[tuple[Any, ...]]) -> bytes:
    return _pure.encode_group(items)[0]


# ---- encode_request ------------------------------------------------------------------
class _State(NamedTuple):  # planning's EntityState, as the codec sees it: any NamedTuple of 4
    clock: int
    head_hash: bytes
    head_seq: int
    name_hash: int


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[Prepared], dict[bytes, Any], dict[bytes, Any], dict[bytes, Any]]:
    """A request of up to 8 events over a few entities (several events of one entity
    chain inside it), the group's states, the known states and the log's (lookup)."""
    entities = [draw(utf8) for _ in range(draw(st.integers(1, 4)))]
    def state() -> _State:
        return _State(draw(st.integers(0, 50)), draw(hash32), draw(st.integers(0, 1000)), draw(u64))
    group = {e: state() for e in entities if draw(st.booleans())}
    known = {e: state() for e in entities if draw(st.booleans())}
    log = {e: state() for e in entities}
    items = []
    for _ in range(draw(st.integers(0, 8))):
        entity = draw(st.sampled_from(entities))
        current = group.get(entity) or known.get(entity) or log[entity]
        expected = draw(st.one_of(st.none(), st.just(current.clock), st.integers(0, 60)))
        items.append(Prepared(entity, draw(st.sampled_from([b"s", b"scope-2", draw(utf8)])), draw(u16),
                              draw(st.binary(max_size=300)), draw(u16),
                              draw(st.one_of(st.just(frame.ZERO_ID), id16)), expected,
                              draw(st.one_of(st.just(frame.ZERO_ID), id16)), draw(st.one_of(st.just(frame.ZERO_ID), id16))))
    return items, group, known, log


def request_outcome(fn: Callable[..., Any], items: list[Any], group: dict[bytes, Any], known: dict[bytes, Any],
                    log: dict[bytes, Any], first: int, fence: int, scopes: dict[bytes, int]) -> Any:
    """The result and every dict it may change, or the exception type (and the dicts)."""
    group, known, scopes, asked = dict(group), dict(known), dict(scopes), []

    def lookup(entity: bytes) -> Any:
        asked.append(entity)
        return log[entity]

    got = outcome(fn, items, group, known, lookup, first, 1_700_000_000_123, b"\x01\x8b\xcf\xe5\x68\x1b\xbe\xef",
                  fence, True, scopes, bp_values.Receipt, _State)
    return got, group, known, scopes, asked


@PROPS
@given(requests(), st.one_of(st.integers(1, 10_000), st.just((1 << 64) - 3), st.just(1 << 64)),
       st.sampled_from([0, frame.FLAG_FENCED]), st.dictionaries(st.sampled_from([b"s", b"x"]), u64, max_size=2))
def test_encode_request_matches(req: tuple[list[Prepared], dict[bytes, Any], dict[bytes, Any], dict[bytes, Any]],
                                first: int, fence: int, scopes: dict[bytes, int]) -> None:
    items, group, known, log = req
    expected = request_outcome(_pure.encode_request, items, group, known, log, first, fence, scopes)
    same(request_outcome(C.encode_request, items, group, known, log, first, fence, scopes), expected)
    if not (isinstance(expected[0], tuple) and expected[0][0] == "raised"):  # the frames scan as planned
        data, metas, receipts, _ = expected[0]
        assert [m[0] for m in metas] == [r.global_sequence for r in receipts] == list(range(first, first + len(items)))
        frames = scan.scan_segment(data, 0, len(data), first % (1 << 64), check_hash=True).frames
        assert ([f.event_hash for f in frames] == [r.event_hash for r in receipts] and not items) or frames


def test_encode_request_refuses_a_conflict_before_it_changes_anything() -> None:
    a, b = b"a", b"b"
    log = {a: _State(3, b"\x07" * 32, 9, 11), b: _State(0, bytes(32), 0, 12)}
    items = [Prepared(a, b"s", 1, b"\x90", 0, frame.ZERO_ID, 3, frame.ZERO_ID, frame.ZERO_ID),
             Prepared(a, b"s", 1, b"\x90", 0, frame.ZERO_ID, 5, frame.ZERO_ID, frame.ZERO_ID)]  # a is at 4 there
    for fn in (_pure.encode_request, C.encode_request):
        group: dict[bytes, Any] = {}
        known: dict[bytes, Any] = {}
        with pytest.raises(bp_values_errors.ConcurrencyConflict) as ei:
            fn(items, group, known, log.__getitem__, 10, 0, bytes(8), 0, True, {}, bp_values.Receipt, _State)
        assert (ei.value.expected, ei.value.actual) == (5, 4) and group == {} and known == {a: log[a]}
    again = [items[0], items[0]._replace(expected_clock=4), items[0]._replace(entity=b, expected_clock=0)]
    _, metas, receipts, keyed = C.encode_request(again, group, {}, log.__getitem__, 10, 0, bytes(8), 0, False,
                                                  {}, bp_values.Receipt, _State)
    assert [r.entity_clock for r in receipts] == [4, 5, 1] and receipts[1].prev_hash == receipts[0].event_hash
    assert group == {a: _State(5, receipts[1].event_hash, 11, 11), b: _State(1, receipts[2].event_hash, 12, 12)}
    assert [m[5] for m in metas] == [9, 10, 0] and keyed == [] and not receipts[0].durable


# ---- the loader ----------------------------------------------------------------------
def loader(env: dict[str, str], code: str = "") -> subprocess.CompletedProcess[str]:
    """Import batpak_mp._native in a fresh interpreter under ``env``; print its verdict."""
    script = code + ("import batpak_mp._native as n\n"
                     "print(n.BACKEND, n.backend(), n.codec is None, n.scan_frame.__module__, repr(n.UNAVAILABLE))\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("BATPAK_MP_PURE", "BATPAK_MP_REQUIRE_NATIVE")}
    return subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)


BLOCK = "import sys\nsys.modules['batpak_mp._native._codec'] = None  # as if it were not built\n"


@pytest.mark.parametrize(("env", "block", "backend"), [
    ({}, False, "native"),
    ({"BATPAK_MP_PURE": "1"}, False, "python"),
    ({"BATPAK_MP_PURE": "yes"}, False, "python"),
    ({"BATPAK_MP_PURE": "0"}, False, "native"),
    ({"BATPAK_MP_PURE": ""}, False, "native"),
    ({}, True, "python"),
    ({"BATPAK_MP_PURE": "1", "BATPAK_MP_REQUIRE_NATIVE": "1"}, False, "python"),
])
def test_backend_follows_the_environment(env: dict[str, str], block: bool, backend: str) -> None:
    proc = loader(env, BLOCK if block else "")
    assert proc.returncode == 0, proc.stderr
    got, helper, is_none, module, reason = proc.stdout.strip().split(maxsplit=4)
    assert (got, helper, is_none) == (backend, backend, str(backend == "python"))
    assert module == ("batpak_mp._format.frame" if backend == "python" else "batpak_mp._native._codec")
    assert (reason == "''") == (backend == "native")


def test_the_build_matches_its_source() -> None:
    """A failed optional rebuild leaves the old build in place: the loader refuses it, and
    so does this test (the agreement above would be about yesterday's code)."""
    source = Path(C.__file__).with_name("_codec.c")
    assert C.SOURCE_SHA256, "built without the source hash (setup.py passes it)"
    assert hashlib.sha256(source.read_bytes()).hexdigest() == C.SOURCE_SHA256, "stale build: pip install -e ."


def test_require_native_fails_loudly_without_the_extension() -> None:
    proc = loader({"BATPAK_MP_REQUIRE_NATIVE": "1"}, BLOCK)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "BATPAK_MP_REQUIRE_NATIVE=1" in proc.stderr


def stale_build() -> str:
    """Code that loads the built extension as if it had been built from other source."""
    return ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('batpak_mp._native._codec', {C.__file__!r})\n"
            "mod = importlib.util.module_from_spec(spec)\n"
            "mod.SOURCE_SHA256 = '0' * 64\n"
            "sys.modules['batpak_mp._native._codec'] = mod\n")


def test_a_stale_build_does_not_serve() -> None:
    proc = loader({}, stale_build())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("python python True") and "stale build" in proc.stdout
    proc = loader({"BATPAK_MP_REQUIRE_NATIVE": "1"}, stale_build())
    assert proc.returncode != 0 and "stale build" in proc.stderr


def test_the_active_backend_is_public() -> None:
    import batpak_mp as bp
    from batpak_mp import _native

    assert "codec_backend" in bp.__all__ and bp.codec_backend() == _native.BACKEND == _native.backend()
