"""Unit tests of the pure pieces: the directory layout codecs (segment header, trailer,
seal footer, checkpoint, store.meta, event ids), the lookup tables and RestartPolicy."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batpak_mp as bp
from batpak_mp._format.checkpoint import CHECKPOINT, decode_checkpoint, encode_checkpoint
from batpak_mp._format.directory import FORMAT_VERSION, idem_hash, name_hash
from batpak_mp._format.ids import event_id_sequence, make_event_id
from batpak_mp._format.meta import decode_meta, encode_meta
from batpak_mp._format.record import RECORD, RECORD_SIZE
from batpak_mp._format.segment import (
    FOOTER_HEAD,
    SEG_HEADER,
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    SEGMENT_MAGIC,
    decode_footer,
    decode_segment_header,
    decode_trailer,
    encode_footer,
    encode_segment_header,
    encode_trailer,
)
from batpak_mp._format.tables import (
    DELTA_MAGIC,
    DELTA_SLOT_SIZE,
    ENTITY_BASE_MAGIC,
    IDEM_BASE_MAGIC,
    TABLE_HEADER,
    TABLE_HEADER_SIZE,
    BaseTable,
    check_header,
    delta_candidates,
    delta_capacity_for,
    delta_header,
    delta_upsert,
    encode_entity_base,
    encode_idem_base,
    verify_base,
)
from batpak_mp._values import RestartPolicy

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)
store_ids = st.binary(min_size=16, max_size=16)


# ---- segment header ------------------------------------------------------------------
@given(u32, store_ids, u64, u64)
def test_segment_header_round_trip(segment_id: int, store_id: bytes, first_seq: int, size: int) -> None:
    raw = encode_segment_header(segment_id, store_id, first_seq, size)
    assert len(raw) == SEG_HEADER_SIZE and raw.startswith(SEGMENT_MAGIC)
    assert not any(raw[SEG_HEADER.size:])
    assert decode_segment_header(raw, "x.seg") == (segment_id, store_id, first_seq, size)


@settings(max_examples=60)
@given(store_ids, st.integers(0, SEG_HEADER.size * 8 - 1))
def test_segment_header_any_flipped_bit_is_corrupt(store_id: bytes, bit: int) -> None:
    raw = bytearray(encode_segment_header(3, store_id, 100, 1 << 20))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(bp.CorruptSegment) as ei:
        decode_segment_header(bytes(raw), "x.seg")
    assert ei.value.segment == "x.seg" and ei.value.offset == 0


def test_segment_header_errors() -> None:
    raw = encode_segment_header(1, b"s" * 16, 1, 1 << 20)
    with pytest.raises(bp.CorruptSegment, match="header is 10 bytes"):
        decode_segment_header(raw[:10], "x.seg")
    with pytest.raises(bp.CorruptSegment, match="magic"):
        decode_segment_header(b"NOTASEG\0" + raw[8:], "x.seg")
    # a newer version with a correct checksum: FutureFormat, not corruption
    body = bytearray(raw)
    struct.pack_into("<I", body, 8, FORMAT_VERSION + 1)
    struct.pack_into("<I", body, SEG_HEADER.size - 4, zlib.crc32(body[: SEG_HEADER.size - 4]))
    with pytest.raises(bp.FutureFormat) as ei:
        decode_segment_header(bytes(body), "x.seg")
    assert (ei.value.found, ei.value.supported) == (FORMAT_VERSION + 1, FORMAT_VERSION)
    # the padding after the checksummed part must stay zero
    padded = bytearray(raw)
    padded[SEG_HEADER_SIZE - 1] = 1
    with pytest.raises(bp.CorruptSegment, match="padding"):
        decode_segment_header(bytes(padded), "x.seg")


# ---- trailer and seal footer ---------------------------------------------------------
@given(u64, u64, u32)
def test_trailer_round_trip(footer_offset: int, footer_len: int, crc: int) -> None:
    raw = encode_trailer(footer_offset, footer_len, crc)
    assert len(raw) == SEG_TRAILER_SIZE
    assert decode_trailer(raw) == (footer_offset, footer_len, crc)
    for bit in range(0, SEG_TRAILER_SIZE * 8, 7):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert decode_trailer(bytes(bad)) is None


def test_trailer_absent() -> None:
    assert decode_trailer(b"") is None
    assert decode_trailer(bytes(SEG_TRAILER_SIZE)) is None
    assert decode_trailer(encode_trailer(1, 2, 3)[:-1]) is None


@given(u64, st.lists(st.binary(min_size=RECORD_SIZE, max_size=RECORD_SIZE), max_size=8))
def test_footer_round_trip(first_seq: int, recs: list[bytes]) -> None:
    records = b"".join(recs)
    raw = encode_footer(first_seq, records)
    assert decode_footer(raw, "x.seg", 77) == (first_seq, records)


def test_footer_errors() -> None:
    records = RECORD.pack(1, 1, 64, 200, 0x1007, 1, 5, 6, 0, b"i" * 16) * 3
    raw = encode_footer(1, records)
    cases = {
        "truncated": raw[: FOOTER_HEAD.size - 1],
        "bad magic": b"X" + raw[1:],
        "does not match its count": raw[:-1],
        "checksum mismatch": raw[:-1] + bytes([raw[-1] ^ 1]),
    }
    for what, bad in cases.items():
        with pytest.raises(bp.CorruptSegment, match=what) as ei:
            decode_footer(bad, "x.seg", 77)
        assert ei.value.offset == 77


# ---- checkpoint, meta ----------------------------------------------------------------
@given(u64, u64, u64)
def test_checkpoint_round_trip(seq: int, segment_id: int, end: int) -> None:
    raw = encode_checkpoint(seq, segment_id, end)
    assert len(raw) == CHECKPOINT.size
    decoded = decode_checkpoint(raw)
    assert decoded is not None and decoded[:3] == (seq, segment_id, end)


def test_checkpoint_rejects_damage() -> None:
    raw = encode_checkpoint(10, 2, 4096)
    assert decode_checkpoint(raw[:-1]) is None
    assert decode_checkpoint(raw + b"\0") is None
    assert decode_checkpoint(b"") is None
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        assert decode_checkpoint(bytes(bad)) is None


@given(store_ids, st.integers(0, 1 << 50))
def test_meta_round_trip(store_id: bytes, created_ms: int) -> None:
    raw = encode_meta(store_id, created_ms)
    doc = json.loads(raw)
    assert doc["format_version"] == FORMAT_VERSION and doc["created_ms"] == created_ms
    assert decode_meta(raw, "store.meta") == store_id


def _meta(**changes: object) -> bytes:
    doc: dict[str, object] = {"format": "batpak-mp", "format_version": FORMAT_VERSION,
                              "store_id": "ab" * 16, "created_ms": 1}
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("raw", "match"), [
    (b"", "unreadable"),
    (b"{not json", "unreadable"),
    (b"[1, 2]", "unreadable"),
    (b"\xff\xfe", "unreadable"),
    (_meta(store_id="zz"), "unreadable"),
    (_meta(store_id="ab"), "16 bytes"),
    (_meta(format_version="x"), "unreadable"),
    (_meta(format_version=None), "unreadable"),
    (_meta(format="sqlite"), "not a batpak-mp store"),
])
def test_meta_errors(raw: bytes, match: str) -> None:
    with pytest.raises(bp.CorruptSegment, match=match):
        decode_meta(raw, "store.meta")


def test_meta_future_version() -> None:
    with pytest.raises(bp.FutureFormat) as ei:
        decode_meta(_meta(format_version=FORMAT_VERSION + 1), "store.meta")
    assert ei.value.found == FORMAT_VERSION + 1 and ei.value.path == "store.meta"


@given(st.binary(max_size=200))
def test_meta_decoder_is_total(raw: bytes) -> None:
    try:
        decode_meta(raw, "store.meta")
    except (bp.CorruptSegment, bp.FutureFormat):
        pass


# ---- event ids and hashes ------------------------------------------------------------
@given(st.integers(0, (1 << 48) - 1), st.integers(0, 0xFFFF), u64)
def test_event_id_round_trip(wall_ms: int, tag: int, seq: int) -> None:
    eid = make_event_id(wall_ms, tag, seq)
    assert len(eid) == 16
    assert event_id_sequence(eid) == seq
    assert int.from_bytes(eid[:6], "big") == wall_ms and int.from_bytes(eid[6:8], "big") == tag


@given(st.lists(st.tuples(st.integers(0, (1 << 48) - 1), st.integers(1, 1 << 40)), min_size=2, max_size=20))
def test_event_ids_sort_by_time_then_sequence(pairs: list[tuple[int, int]]) -> None:
    ids = {make_event_id(ms, 7, seq): (ms, seq) for ms, seq in pairs}
    assert [ids[i] for i in sorted(ids)] == sorted(ids.values())


def test_event_id_wall_clock_wraps_to_48_bits() -> None:
    eid = make_event_id((1 << 48) + 5, 1, 9)
    assert int.from_bytes(eid[:6], "big") == 5 and event_id_sequence(eid) == 9


@given(st.binary(max_size=64))
def test_name_hash_is_never_zero(raw: bytes) -> None:
    h = name_hash(raw)
    assert 0 < h < 1 << 64  # 0 marks an empty table slot


def test_idem_hash_separates_str_and_bytes() -> None:
    assert idem_hash("k") != idem_hash(b"k")
    assert idem_hash("k") == idem_hash("k") and len(idem_hash("k")) == 16
    assert idem_hash("é") != idem_hash("é".encode())


def test_idem_hash_of_a_lone_surrogate_is_typed_not_raw() -> None:
    """A str key that is not valid UTF-8 (a lone surrogate) still hashes, distinctly."""
    h = idem_hash("\ud800")
    assert len(h) == 16
    assert h not in {idem_hash("\ud801"), idem_hash(b"\xed\xa0\x80"), idem_hash("?")}


# ---- delta table ---------------------------------------------------------------------
def _delta(capacity: int) -> bytearray:
    buf = bytearray(delta_header(capacity, 1))
    buf += bytes(capacity * DELTA_SLOT_SIZE)
    return buf


def test_delta_capacity_is_a_power_of_two_with_room() -> None:
    for frames in (0, 1, 511, 512, 513, 4333, 100_000):
        cap = delta_capacity_for(frames)
        assert cap >= 1024 and cap & (cap - 1) == 0 and cap >= 2 * frames


def test_delta_header_checks() -> None:
    buf = _delta(1024)
    assert check_header(buf, DELTA_MAGIC, "d") == (1024, 0, 1, bytes(32))
    with pytest.raises(bp.CorruptSegment, match="magic"):
        check_header(buf, ENTITY_BASE_MAGIC, "d")
    with pytest.raises(bp.CorruptSegment, match="shorter"):
        check_header(buf[:10], DELTA_MAGIC, "d")
    future = bytearray(buf)
    struct.pack_into("<I", future, 8, FORMAT_VERSION + 1)
    with pytest.raises(bp.FutureFormat):
        check_header(future, DELTA_MAGIC, "d")


def _slot(cap: int, h: int) -> int:
    return TABLE_HEADER_SIZE + (h & (cap - 1)) * DELTA_SLOT_SIZE


def test_delta_upsert_and_candidates() -> None:
    cap = 1024
    buf = _delta(cap)
    assert list(delta_candidates(buf, cap, 99)) == []
    assert delta_upsert(buf, cap, 99, 1, 0) == _slot(cap, 99)  # the slot's byte offset
    assert delta_upsert(buf, cap, 99, 5, 1) == _slot(cap, 99)  # the entity's next event: same slot
    assert list(delta_candidates(buf, cap, 99)) == [5]
    assert struct.unpack_from("<QQ", buf, _slot(cap, 99)) == (99, 5)
    assert list(delta_candidates(buf, cap, 99 + cap)) == []  # same slot index, other hash


def test_delta_two_entities_with_the_same_hash() -> None:
    """A 64-bit collision: each entity keeps its own slot, told apart by its head."""
    cap = 1024
    buf = _delta(cap)
    h = 0xDEAD_BEEF
    slot_a = delta_upsert(buf, cap, h, 1, 0)  # entity A, first event
    slot_b = delta_upsert(buf, cap, h, 2, 0)  # entity B, first event: another slot
    assert slot_a == _slot(cap, h) and slot_b == slot_a + DELTA_SLOT_SIZE
    assert sorted(delta_candidates(buf, cap, h)) == [1, 2]
    assert delta_upsert(buf, cap, h, 3, 1) == slot_a  # A again: follows its own head (1)
    assert delta_upsert(buf, cap, h, 4, 2) == slot_b  # B again
    assert delta_upsert(buf, cap, h, 6, 3) == slot_a  # A again
    assert sorted(delta_candidates(buf, cap, h)) == [4, 6]
    # an entity whose previous event is in a sealed segment (prev not in the delta)
    assert delta_upsert(buf, cap, h, 7, 77) not in (slot_a, slot_b)
    assert sorted(delta_candidates(buf, cap, h)) == [4, 6, 7]


def test_delta_probing_wraps_around_and_skips_other_hashes() -> None:
    cap = 1024
    buf = _delta(cap)
    hashes = [cap - 1, 2 * cap - 1, 3 * cap - 1]  # all start at the last slot
    offsets = [delta_upsert(buf, cap, h, seq, 0) for seq, h in enumerate(hashes, 1)]
    assert offsets == [_slot(cap, cap - 1), _slot(cap, 0), _slot(cap, 1)]
    for seq, h in enumerate(hashes, 1):
        assert list(delta_candidates(buf, cap, h)) == [seq]
    # the second and third went to slots 0 and 1
    assert struct.unpack_from("<QQ", buf, TABLE_HEADER_SIZE)[0] == hashes[1]
    assert struct.unpack_from("<QQ", buf, TABLE_HEADER_SIZE + DELTA_SLOT_SIZE)[0] == hashes[2]


def test_delta_full_table_raises() -> None:
    cap = 4
    buf = _delta(cap)
    for seq in range(1, cap + 1):
        delta_upsert(buf, cap, seq * 8 + 1, seq, 0)
    with pytest.raises(RuntimeError, match="full"):
        delta_upsert(buf, cap, 1000, 9, 0)
    assert list(delta_candidates(buf, cap, 12345)) == []  # a full table still terminates


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3)), max_size=200))
def test_delta_tracks_the_head_of_every_entity(ops: list[tuple[int, int]]) -> None:
    """Model check: entities (some sharing a hash) append events; the candidates for a
    hash are exactly the heads of the entities with that hash."""
    cap = 1024
    buf = _delta(cap)
    hash_of = {e: 1 + e % 3 for e in range(6)}  # entities 0/3, 1/4, 2/5 collide
    heads: dict[int, int] = {}
    seq = 0
    for entity, n in ops:
        for _ in range(n):
            seq += 1
            delta_upsert(buf, cap, hash_of[entity], seq, heads.get(entity, 0))
            heads[entity] = seq
    for h in set(hash_of.values()):
        want = sorted(s for e, s in heads.items() if hash_of[e] == h)
        assert sorted(delta_candidates(buf, cap, h)) == want


# ---- base tables ---------------------------------------------------------------------
def _q(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def test_entity_base_lookup_with_duplicates() -> None:
    hashes = [3, 7, 7, 7, 20, 1 << 63]
    seqs = [10, 11, 12, 13, 14, 15]
    raw = encode_entity_base(_q(hashes), _q(seqs), through_seq=15)
    count, through = verify_base(raw, ENTITY_BASE_MAGIC, "e.tbl", 2)
    assert (count, through) == (6, 15)
    table = BaseTable(raw, count, 2)
    try:
        assert table.entity_candidates(7) == [11, 12, 13]
        assert table.entity_candidates(3) == [10]
        assert table.entity_candidates(1 << 63) == [15]
        assert table.entity_candidates(0) == [] and table.entity_candidates(8) == []
        assert table.entity_candidates((1 << 64) - 1) == []
    finally:
        table.release()


def test_empty_base_tables() -> None:
    raw = encode_entity_base(b"", b"", through_seq=0)
    assert verify_base(raw, ENTITY_BASE_MAGIC, "e.tbl", 2) == (0, 0)
    table = BaseTable(raw, 0, 2)
    assert table.entity_candidates(5) == []
    raw = encode_idem_base(b"", b"", b"", through_seq=0)
    table = BaseTable(raw, *verify_base(raw, IDEM_BASE_MAGIC, "i.tbl", 3)[:1], 3)
    assert table.idem_lookup(1, 2) == 0


def test_idem_base_lookup() -> None:
    his = [1, 5, 5, 5, 9]
    los = [0, 2, 4, 8, 1]
    seqs = [100, 101, 102, 103, 104]
    raw = encode_idem_base(_q(his), _q(los), _q(seqs), through_seq=104)
    count, _ = verify_base(raw, IDEM_BASE_MAGIC, "i.tbl", 3)
    table = BaseTable(raw, count, 3)
    assert [table.idem_lookup(h, lo) for h, lo in zip(his, los, strict=True)] == seqs
    assert table.idem_lookup(5, 3) == 0 and table.idem_lookup(2, 0) == 0 and table.idem_lookup(10, 1) == 0


def test_base_table_damage_is_detected() -> None:
    raw = encode_entity_base(_q([1, 2]), _q([3, 4]), through_seq=4)
    digest_at = TABLE_HEADER.size - 32
    covered = [*range(0, 12), *range(16, 24), *range(digest_at, TABLE_HEADER.size), *range(TABLE_HEADER_SIZE, len(raw))]
    for i in covered:  # magic, version, count, digest and every byte of the body
        bad = bytearray(raw)
        bad[i] ^= 0x10
        with pytest.raises((bp.CorruptSegment, bp.FutureFormat)):
            verify_base(bytes(bad), ENTITY_BASE_MAGIC, "e.tbl", 2)
    with pytest.raises(bp.CorruptSegment, match="length"):
        verify_base(raw[:-8], ENTITY_BASE_MAGIC, "e.tbl", 2)
    with pytest.raises(bp.CorruptSegment, match="length"):
        verify_base(raw, ENTITY_BASE_MAGIC, "e.tbl", 3)  # wrong column count
    with pytest.raises(bp.CorruptSegment, match="magic"):
        verify_base(raw, IDEM_BASE_MAGIC, "e.tbl", 2)


# ---- restart policy ------------------------------------------------------------------
def test_restart_policy_values_and_specs() -> None:
    once = RestartPolicy.once()
    assert (once.kind, once.max_restarts) == ("once", 1) and once.spec() == "once"
    b = RestartPolicy.bounded(5, 60_000)
    assert (b.kind, b.max_restarts, b.within_ms) == ("bounded", 5, 60_000)
    assert b.spec() == "bounded:5:60000"
    assert RestartPolicy.parse("once") == once
    assert RestartPolicy.parse("bounded:5:60000") == b
    assert RestartPolicy.parse("bounded:0:1") == RestartPolicy.bounded(0, 1)
    assert RestartPolicy.parse("bounded:007:10") == RestartPolicy.bounded(7, 10)
    assert bp.RestartPolicy is RestartPolicy


@given(st.integers(0, 10**9), st.integers(1, 10**12))
def test_restart_policy_spec_round_trips(n: int, ms: int) -> None:
    p = RestartPolicy.bounded(n, ms)
    assert RestartPolicy.parse(p.spec()) == p


@pytest.mark.parametrize("text", [
    "", "ONCE", "once ", "bounded", "bounded:5", "bounded:5:", "bounded::5", "bounded:5:0",
    "bounded:-1:5", "bounded:5:-1", "bounded:a:b", "bounded:1:2:3", "bounded:1.5:2",
    "bounded: 1:2", "exponential:1:2", "bounded:²:5", "bounded:5:٣", "bounded:5:1_000",
])
def test_restart_policy_parse_errors(text: str) -> None:
    with pytest.raises(bp.InvalidArgument) as ei:
        RestartPolicy.parse(text)
    assert isinstance(ei.value, ValueError) and ei.value.name in ("restart", "within_ms", "max_restarts")


@pytest.mark.parametrize(("n", "ms", "name"), [
    (-1, 5, "max_restarts"), (True, 5, "max_restarts"), (1.0, 5, "max_restarts"), ("3", 5, "max_restarts"),
    (1, 0, "within_ms"), (1, -5, "within_ms"), (1, 2.5, "within_ms"), (1, None, "within_ms"),
])
def test_restart_policy_bounded_errors(n: object, ms: object, name: str) -> None:
    with pytest.raises(bp.InvalidArgument) as ei:
        RestartPolicy.bounded(n, ms)  # type: ignore[arg-type]
    assert ei.value.name == name


# ---- layouts declared once: everything else derived ------------------------------------
def test_record_layout_is_derived_from_its_declaration() -> None:
    from batpak_mp._format import record as R

    assert RECORD_SIZE == 64 and RECORD.format == "<QIIIHHQQQ16s"  # FORMAT.md §4
    assert [n for n, _ in R.RECORD_FIELDS] == list(R.Record._fields)
    positions = {n: getattr(R, "R_" + n.upper()) for n in R.Record._fields}
    assert positions == {n: i for i, n in enumerate(R.Record._fields)}
    values = R.Record(7, 2, 4096, 300, 0x1007, 0x9, 11, 12, 5, b"k" * 16)
    rec = RECORD.pack(*values)
    assert R.Record._make(RECORD.unpack(rec)) == values
    assert R.IDEM_OF_RECORD.unpack(rec) == (b"k" * 16,) and R.PREV_OF_RECORD.unpack(rec) == (5,)
    assert R.record_offset(1) == R.RECORDS_HEADER_SIZE and R.record_offset(3) == R.RECORDS_HEADER_SIZE + 128


def test_record_numpy_dtype_reads_packed_records() -> None:
    import numpy as np

    from batpak_mp._format import record as R

    dtype = R.numpy_dtype()
    assert dtype.itemsize == RECORD_SIZE
    rows = [R.Record(i, 1, 64 * i, 200, i & 0xFFFF, i & 0xF, i * 3, i * 5, i - 1, i.to_bytes(16, "little"))
            for i in range(1, 6)]
    recs = np.frombuffer(b"".join(RECORD.pack(*r) for r in rows), dtype=dtype)
    for name in R.Record._fields:
        if name == "idem_hash":
            assert recs["idem_hash_lo"].tolist() == [int.from_bytes(r.idem_hash[:8], "little") for r in rows]
            assert recs["idem_hash_hi"].tolist() == [int.from_bytes(r.idem_hash[8:], "little") for r in rows]
        else:
            assert recs[name].tolist() == [getattr(r, name) for r in rows], name


def test_frame_header_layout_is_derived_from_its_declaration() -> None:
    from batpak_mp._format import frame as F
    from batpak_mp._format.layout import offset_of

    # FORMAT.md §3.2 and §3.4
    assert F.HEADER.format == "<IIHHHHHHIQQQ16s16s16s16s32s32s" and F.HEADER_SIZE == 176
    assert F.HASHED_START == 8 and F.HASH_OFFSET == 144 and F.HASHED_HEADER.size == 136
    assert F.LEN_CRC.format == "<II"
    assert offset_of(F.HEADER_FIELDS, "global_sequence") == 24 and offset_of(F.HEADER_FIELDS, "event_id") == 48
    assert {n: getattr(F, "H_" + n.upper()) for n in F.Header._fields} == {n: i for i, n in enumerate(F.Header._fields)}


def test_event_from_header_unpacks_in_header_order() -> None:
    """event_from_header unpacks the header tuple by position (the readers' hot path): it
    must name each position as the declaration does."""
    from batpak_mp._format import frame as F

    data, ehash = F.encode_frame(flags=F.FLAG_COMMIT_END | F.FLAG_HAS_CAUSATION | F.FLAG_HAS_CORRELATION,
                                 kind=0x1007, payload_version=3, global_sequence=9, entity_clock=4, wall_ms=77,
                                 event_id=b"e" * 16, causation_id=b"c" * 16, correlation_id=b"r" * 16,
                                 idem_hash=b"i" * 16, prev_hash=b"p" * 32, entity=b"ent", scope=b"sc", payload=b"\x01")
    h = F.frame_header(data, 0, len(data))
    assert isinstance(h, tuple)
    named = F.Header._make(h)
    ev = F.event_from_header(data, 0, h, {})
    assert ev is not None
    assert (ev.event_id, ev.global_sequence, ev.entity_clock, ev.wall_ms, ev.payload_version, ev.event_hash,
            ev.prev_hash, ev.causation_id, ev.correlation_id, ev.kind, ev.payload_bytes) == (
        named.event_id, named.global_sequence, named.entity_clock, named.wall_ms, named.payload_version,
        named.event_hash, named.prev_hash, named.causation_id, named.correlation_id, bp.Kind(1, 7), b"\x01")
    assert (ev.coordinate.entity, ev.coordinate.scope) == ("ent", "sc") and ehash == named.event_hash


def test_flag_names() -> None:
    from batpak_mp._format.frame import FLAG_NAMES, KNOWN_FLAGS, flag_names

    assert FLAG_NAMES == {0x1: "COMMIT_END", 0x2: "HAS_CAUSATION", 0x4: "HAS_CORRELATION", 0x8: "FENCED",
                          0x10: "REDACTED"}
    assert KNOWN_FLAGS == 0x1F
    assert flag_names(0x9) == ["COMMIT_END", "FENCED"]
    assert flag_names(0x31) == ["COMMIT_END", "REDACTED", "unknown:0x20"]


def test_inspect_names_a_fenced_frame(tmp_path: Path) -> None:
    """inspect printed FENCED frames as unknown:0x8 (it had its own list of names)."""
    import os

    from batpak_mp._format.directory import SEGMENT_DIR, segment_name
    from batpak_mp._format.frame import FLAG_COMMIT_END, FLAG_FENCED, encode_frame
    from batpak_mp._read.inspect import frames_at

    data = encode_frame(flags=FLAG_COMMIT_END | FLAG_FENCED, kind=1, payload_version=0, global_sequence=1,
                        entity_clock=1, wall_ms=1, event_id=bytes(16), causation_id=bytes(16),
                        correlation_id=bytes(16), idem_hash=bytes(16), prev_hash=bytes(32), entity=b"e",
                        scope=b"s", payload=b"\x01")[0]
    root = os.fspath(tmp_path)
    os.makedirs(os.path.join(root, SEGMENT_DIR))
    size = SEG_HEADER_SIZE + 1024
    with open(os.path.join(root, SEGMENT_DIR, segment_name(1)), "wb") as f:
        f.write(encode_segment_header(1, b"s" * 16, 1, size) + data + bytes(size - SEG_HEADER_SIZE - len(data)))
    first = frames_at(root, 1, None, 1)["positions"][0]
    assert first["status"] == "ok" and first["fields"]["flag_names"] == ["COMMIT_END", "FENCED"]


def test_store_key_and_tag() -> None:
    from batpak_mp._format.ids import store_key_of, store_tag_of

    assert store_tag_of(b"\x01\x02" + bytes(14)) == 0x0102
    assert store_key_of(b"\x01" + bytes(15)) == 1 and store_key_of(bytes(16)) == 1  # never 0
    assert store_key_of(bytes(range(16))) == int.from_bytes(bytes(range(8)), "little")


# ---- is this segment acceptable here ---------------------------------------------------
def _segment(store_id: bytes = b"s" * 16, first_seq: int = 1, size: int = 4096, sealed: bool = False,
             segment_id: int = 1) -> bytearray:
    buf = bytearray(encode_segment_header(segment_id, store_id, first_seq, size).ljust(size, b"\0"))
    if sealed:
        footer = encode_footer(first_seq, b"")
        buf[SEG_HEADER_SIZE:SEG_HEADER_SIZE + len(footer)] = footer
        crc = zlib.crc32(buf[:size - SEG_TRAILER_SIZE])
        buf[size - SEG_TRAILER_SIZE:] = encode_trailer(SEG_HEADER_SIZE, len(footer), crc)
    return buf


def _verdict(buf: bytearray, **kw: object) -> object:
    from batpak_mp._format.segment import segment_verdict

    args: dict[str, object] = {"store_id": b"s" * 16, "first_seq": 1, "unsealed_ok": True, **kw}
    return segment_verdict("seg", bytes(buf[:SEG_HEADER_SIZE]), bytes(buf[-SEG_TRAILER_SIZE:]), len(buf),
                           **args)  # type: ignore[arg-type]


def test_segment_verdict() -> None:
    from batpak_mp._format.segment import SegmentVerdict, sealed_verdict

    ok = _verdict(_segment())
    assert isinstance(ok, SegmentVerdict) and not ok.problems and ok.trailer is None and ok.frames_end == 4096 - 32
    ok.check()
    sealed = _verdict(_segment(sealed=True), unsealed_ok=False)
    assert isinstance(sealed, SegmentVerdict) and not sealed.problems and sealed.frames_end == SEG_HEADER_SIZE
    assert sealed.trailer is not None
    assert sealed_verdict("seg", bytes(_segment(sealed=True)), sealed.trailer).check() == b""
    reasons = {
        "segment belongs to another store": _verdict(_segment(store_id=b"x" * 16)),
        "segment starts at sequence 5, expected 1": _verdict(_segment(first_seq=5)),
        "segment before the last is not sealed": _verdict(_segment(), unsealed_ok=False),
        "header says segment 2, the file name 1": _verdict(_segment(segment_id=2), segment_id=1),
    }
    for reason, verdict in reasons.items():
        assert isinstance(verdict, SegmentVerdict)
        assert [p.reason for p in verdict.problems] == [reason]
        with pytest.raises(bp.CorruptSegment, match=reason):
            verdict.check()
    # checks that are not asked for are not made
    lax = _verdict(_segment(store_id=b"x" * 16, first_seq=5), store_id=None, first_seq=None)
    assert isinstance(lax, SegmentVerdict) and not lax.problems
    with pytest.raises(bp.CorruptSegment):
        _verdict(bytearray(4096))  # no header: nothing can be judged


def test_sealed_verdict_finds_a_changed_byte_and_a_bad_trailer() -> None:
    from batpak_mp._format.segment import decode_trailer as dt
    from batpak_mp._format.segment import sealed_verdict

    buf = _segment(sealed=True)
    trailer = dt(bytes(buf[-SEG_TRAILER_SIZE:]))
    assert trailer is not None
    buf[1000] ^= 1
    assert [p.reason for p in sealed_verdict("seg", bytes(buf), trailer).problems] == [
        "sealed segment checksum mismatch (a byte changed after sealing)"]
    assert not sealed_verdict("seg", bytes(buf), trailer, checksum=False).problems
    outside = trailer._replace(footer_offset=4096)
    assert [p.reason for p in sealed_verdict("seg", bytes(buf), outside, checksum=False).problems] == [
        "trailer points outside the segment"]
    buf = _segment(sealed=True)
    buf[-SEG_TRAILER_SIZE:] = encode_trailer(4000, 500, zlib.crc32(buf[:-SEG_TRAILER_SIZE]))
    verdict = _verdict(buf)
    assert [p.reason for p in verdict.problems] == ["trailer points outside the segment"]  # type: ignore[attr-defined]


# ---- recovery's decision over a scan -----------------------------------------------------
def test_committed_through() -> None:
    from batpak_mp._format.frame import FLAG_COMMIT_END, encode_frame
    from batpak_mp._format.scan import committed_through, scan_segment

    def frame(seq: int, flags: int = FLAG_COMMIT_END) -> bytes:
        return encode_frame(flags=flags, kind=1, payload_version=0, global_sequence=seq, entity_clock=seq,
                            wall_ms=1, event_id=bytes(16), causation_id=bytes(16), correlation_id=bytes(16),
                            idem_hash=bytes(16), prev_hash=bytes(32), entity=b"e", scope=b"s", payload=b"x")[0]

    log = frame(1) + frame(2) + frame(3, 0)  # the third frame's request never ended
    scan = scan_segment(log + bytes(50), 0, len(log) + 50, 1)
    assert committed_through("seg", scan, 1, 0) == 2 and committed_through("seg", scan, 1, 2) == 2
    with pytest.raises(bp.CorruptSegment, match="log ends at sequence 2, but sequence 3 was durable"):
        committed_through("seg", scan, 1, 3)
    torn = scan_segment(log[:-5], 0, len(log) - 5, 1)
    with pytest.raises(bp.CorruptSegment, match="runs past the end"):
        committed_through("seg", torn, 1, 3)  # a torn frame below the durable floor
    middle = bytearray(frame(1) + frame(2) + frame(3))
    middle[len(frame(1)) + 100] ^= 1
    with pytest.raises(bp.CorruptSegment, match="checksum"):
        committed_through("seg", scan_segment(bytes(middle), 0, len(middle), 1), 1, 0)
    future = bytearray(frame(1) + frame(2))
    struct.pack_into("<H", future, len(frame(1)) + 8, 3)  # FRAME_VERSION is 2
    struct.pack_into("<I", future, len(frame(1)) + 4, zlib.crc32(future[len(frame(1)) + 8:]))
    with pytest.raises(bp.FutureFormat):
        committed_through("seg", scan_segment(bytes(future), 0, len(future), 1), 1, 0)
