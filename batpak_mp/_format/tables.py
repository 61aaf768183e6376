"""Lock-free lookup tables that the writer maintains and every reader maps.

Owns: the byte layout and the probe logic of
- the *delta* table: open addressing, entity hash -> newest sequence, for events of the
  active segment (written in place by the writer, read concurrently by clients);
- the *base* tables: sorted arrays built at sealing, immutable once published
  (entity hash -> head sequence; idempotency hash -> sequence).
Readers never trust a slot: every candidate sequence is checked against the visible
frontier and the frame it names (see ``_reader``). Pure over buffers: callers pass the
mmap; no file I/O here. Must not import the engine, writer or client.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Iterator
from typing import Any

from .._errors import CorruptSegment, FutureFormat
from .directory import FORMAT_VERSION

TABLE_HEADER = struct.Struct("<8sIIQQQ32s")  # magic, version, reserved, count/capacity, through_seq, aux, digest
TABLE_HEADER_SIZE = 128

DELTA_MAGIC = b"BPMPDLTA"
DELTA_SLOT = struct.Struct("<QQ")  # entity hash (0 = empty), head sequence
DELTA_SLOT_SIZE = 16
DELTA_MAX_LOAD = 0.5  # a delta past half full is not allowed: the writer rotates first

ENTITY_BASE_MAGIC = b"BPMPENTB"
IDEM_BASE_MAGIC = b"BPMPIDMB"


def delta_capacity_for(max_frames: int) -> int:
    """A power of two at least twice the most frames one segment can hold."""
    cap = 1024
    while cap < 2 * max_frames:
        cap *= 2
    return cap


def delta_header(capacity: int, generation: int) -> bytes:
    return TABLE_HEADER.pack(DELTA_MAGIC, FORMAT_VERSION, 0, capacity, 0, generation, bytes(32)).ljust(
        TABLE_HEADER_SIZE, b"\0")


def check_header(buf: Any, magic: bytes, name: str) -> tuple[int, int, int, bytes]:
    """(count_or_capacity, through_seq, aux, digest) of a table; typed errors otherwise."""
    if len(buf) < TABLE_HEADER_SIZE:
        raise CorruptSegment(name, 0, "index table shorter than its header")
    got_magic, version, _, count, through, aux, digest = TABLE_HEADER.unpack_from(buf, 0)
    if got_magic != magic:
        raise CorruptSegment(name, 0, "index table has a bad magic")
    if version > FORMAT_VERSION:
        raise FutureFormat(name, version, FORMAT_VERSION)
    return count, through, aux, digest


def delta_candidates(buf: Any, capacity: int, h: int) -> Iterator[int]:
    """Head sequences stored under entity hash ``h`` (several only on a hash collision)."""
    mask = capacity - 1
    i = h & mask
    unpack = DELTA_SLOT.unpack_from
    for _ in range(capacity):
        slot_h, seq = unpack(buf, TABLE_HEADER_SIZE + i * DELTA_SLOT_SIZE)
        if slot_h == 0:
            return
        if slot_h == h and seq:
            yield seq
        i = (i + 1) & mask


def delta_upsert(buf: Any, capacity: int, h: int, seq: int, prev_seq: int) -> int:
    """Point entity hash ``h`` at ``seq``. The entity's slot is the one with hash ``h``
    holding ``prev_seq`` (its previous event); another entity with the same 64-bit hash
    holds another sequence. Writes the sequence before the hash, so a reader that sees
    the hash always sees a sequence. Returns the slot's byte offset (the writer caches
    it and updates the slot in place from then on)."""
    mask = capacity - 1
    i = h & mask
    unpack = DELTA_SLOT.unpack_from
    for _ in range(capacity):
        off = TABLE_HEADER_SIZE + i * DELTA_SLOT_SIZE
        slot_h, old = unpack(buf, off)
        if slot_h == 0:
            buf[off + 8:off + 16] = struct.pack("<Q", seq)
            buf[off:off + 8] = struct.pack("<Q", h)
            return off
        if slot_h == h and old == prev_seq:
            buf[off + 8:off + 16] = struct.pack("<Q", seq)
            return off
        i = (i + 1) & mask
    raise RuntimeError("delta table full")  # the writer rotates long before this


# ---- base tables: sorted arrays, built by the writer at sealing -----------------------
def _digest(body: bytes | memoryview) -> bytes:
    return hashlib.blake2b(body, digest_size=32).digest()


def encode_entity_base(hashes: bytes, seqs: bytes, through_seq: int) -> bytes:
    """Header + sorted u64 hashes + u64 head sequences (same order)."""
    count = len(hashes) // 8
    body = hashes + seqs
    head = TABLE_HEADER.pack(ENTITY_BASE_MAGIC, FORMAT_VERSION, 0, count, through_seq, 0, _digest(body))
    return head.ljust(TABLE_HEADER_SIZE, b"\0") + body


def encode_idem_base(his: bytes, los: bytes, seqs: bytes, through_seq: int) -> bytes:
    """Header + sorted u64 high halves + u64 low halves + u64 sequences."""
    count = len(his) // 8
    body = his + los + seqs
    head = TABLE_HEADER.pack(IDEM_BASE_MAGIC, FORMAT_VERSION, 0, count, through_seq, 0, _digest(body))
    return head.ljust(TABLE_HEADER_SIZE, b"\0") + body


def verify_base(buf: Any, magic: bytes, name: str, columns: int, *, digest: bool = True) -> tuple[int, int]:
    """Check a base table's length and (unless ``digest`` is off: a same-boot restart
    whose tables were verified in this boot) its digest; return (count, through_seq)."""
    count, through, _, stored = check_header(buf, magic, name)
    body = memoryview(buf)[TABLE_HEADER_SIZE:]
    try:
        if len(body) != count * 8 * columns:
            raise CorruptSegment(name, 0, "index table length does not match its count")
        if digest and _digest(body) != stored:
            raise CorruptSegment(name, 0, "index table checksum mismatch")
    finally:
        body.release()
    return count, through


class BaseTable:
    """Read side of a base table over a mapped buffer: O(log n) C-speed bisect."""

    def __init__(self, buf: Any, count: int, columns: int) -> None:
        self.count = count
        mv = memoryview(buf)
        self.cols = [
            mv[TABLE_HEADER_SIZE + c * count * 8: TABLE_HEADER_SIZE + (c + 1) * count * 8].cast("Q")
            for c in range(columns)
        ]

    def release(self) -> None:
        for col in self.cols:
            col.release()
        self.cols = []

    def entity_candidates(self, h: int) -> list[int]:
        keys, seqs = self.cols[0], self.cols[1]
        i = bisect.bisect_left(keys, h)
        out = []
        while i < self.count and keys[i] == h:
            out.append(seqs[i])
            i += 1
        return out

    def idem_lookup(self, hi: int, lo: int) -> int:
        his, los, seqs = self.cols
        i = bisect.bisect_left(his, hi)
        while i < self.count and his[i] == hi:
            if los[i] == lo:
                return int(seqs[i])
            i += 1
        return 0


# ---- per-scope positions (FORMAT.md §12.4): positions.idx and scopeheads.idx ---------------
# Index layout 2 added these two files (layout 1: records.idx, the delta and base tables
# only). Both are derived data: a writer that finds them missing, of another store or
# behind its log rebuilds them from records.idx and the fence chain.
INDEX_LAYOUT = 2
POSITIONS_FILE = "positions.idx"  # per global sequence: (scope position, previous in scope, skip)
SCOPE_HEADS_FILE = "scopeheads.idx"  # open addressing: scope hash -> newest sequence in stream order
POSITIONS_MAGIC = b"BPMPPOSN"
SCOPE_HEADS_MAGIC = b"BPMPSCPH"
POSITIONS_HEADER = struct.Struct("<8sIIQQ")  # magic, layout, reserved, store key, through (watermark)
POSITIONS_HEADER_SIZE = 64
POSITION = struct.Struct("<QQQ")  # scope position (0: none yet), sequence of position - 1, sequence at skip_position
POSITION_SIZE = POSITION.size  # 24
POSITIONS_THROUGH_AT = 24  # byte offset of the watermark in the header
SCOPE_HEADS_MOVED_AT = 32  # byte offset of the header's aux word: 1 once the table was replaced (map anew)
SCOPE_HEADS_MIN_CAPACITY = 4096  # slots (64 KiB); the table is replaced by one 4x larger past half full


def position_offset(seq: int) -> int:
    """Byte offset of the entry of global sequence ``seq`` (>= 1) in positions.idx."""
    return POSITIONS_HEADER_SIZE + (seq - 1) * POSITION_SIZE


def encode_positions_header(store_key: int, through: int) -> bytes:
    return POSITIONS_HEADER.pack(POSITIONS_MAGIC, INDEX_LAYOUT, 0, store_key, through).ljust(POSITIONS_HEADER_SIZE, b"\0")


def positions_through(data: Any, store_key: int) -> int | None:
    """The watermark of a positions.idx header of this store and layout (every sequence up
    to it has its final entry); None when the file is another store's, older or unlabelled;
    FutureFormat when newer."""
    if len(data) < POSITIONS_HEADER.size:
        return None
    magic, layout, _, key, through = POSITIONS_HEADER.unpack_from(data, 0)
    if magic == POSITIONS_MAGIC and layout > INDEX_LAYOUT:
        raise FutureFormat(POSITIONS_FILE, layout, INDEX_LAYOUT)
    if magic != POSITIONS_MAGIC or layout != INDEX_LAYOUT or key != store_key:
        return None
    return int(through)


def scope_heads_header(capacity: int) -> bytes:
    return TABLE_HEADER.pack(SCOPE_HEADS_MAGIC, INDEX_LAYOUT, 0, capacity, 0, 0, bytes(32)).ljust(TABLE_HEADER_SIZE, b"\0")


def _clear_lowest(n: int) -> int:
    return n & (n - 1)


def skip_position(p: int) -> int:
    """The position an entry at scope position ``p`` skips back to (0: none): a
    deterministic skip list (the height rule of Bitcoin's block index), so that reaching
    any earlier position takes O(log p) steps along (prev, skip) links."""
    if p < 2:
        return 0
    return _clear_lowest(_clear_lowest(p - 1)) + 1 if p & 1 else _clear_lowest(p)


def walk_to_position(entry: Any, seq: int, pos: int, target: int) -> int:
    """The sequence of scope position ``target`` (1 <= target <= pos), starting from the
    entry at ``seq`` holding position ``pos``; ``entry(seq)`` gives its (position, prev,
    skip) triple. Returns 0 when a link is missing or the positions disagree (a stale
    entry: the caller refreshes)."""
    while pos > target:
        got, prev, skip = entry(seq)
        if got != pos:
            return 0
        sp = skip_position(pos)
        spp = skip_position(pos - 1)
        if skip and (sp == target or (sp > target and not (spp < sp - 2 and spp >= target))):
            seq, pos = skip, sp
        else:
            seq, pos = prev, pos - 1
        if not seq:
            return 0
    return seq
