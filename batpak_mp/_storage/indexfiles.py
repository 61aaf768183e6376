"""The index files of a data directory, as the writer keeps them.

Owns: ``records.idx`` (one 64-byte record per global sequence: open, grow, write the
records of a published group, of a scanned segment or from a sealed segment's footer),
the delta table of the active segment (entity hash -> newest sequence: a fresh
generation per segment, or the existing one mapped again on a same-boot restart), the
base tables of the sealed segments (entity heads and idempotency keys: map, verify,
build with numpy, prune old generations), and the writer's in-memory view of the
active segment's keys and delta slots.
Invariants: index files are derived data: anything that does not verify is rebuilt from
the segments, never trusted; a file written through a mapping (records.idx, the delta
table) is allocated before it is mapped or grown (on a full disk a write to a hole of a
mapping is SIGBUS; allocating first turns it into ``DiskFull``); a record is written
before the delta slot that names it (a reader that sees the slot finds the record); the base tables cover sealed segments
only and the delta table the active one; a table file is replaced, never rewritten in
place, except the delta table, which is written only past readers' frontier.
Every OS call goes through ``osio.Disk``. Must not import the engine, segments,
recovery, the read side or any process role.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import BatpakError, CorruptSegment
from .._format.directory import (
    FENCES_FILE,
    RECORDS_FILE,
    VERIFIED_FILE,
    delta_name,
    entities_base_name,
    idem_base_name,
    parse_delta_name,
)
from .._format.frame import MIN_FRAME, OK, ZERO_ID, Frame
from .._format.record import (
    IDEM_OF_RECORD,
    R_ENTITY_CLOCK,
    R_ENTITY_HASH,
    R_FRAME_LEN,
    R_OFFSET,
    R_PREV_IN_ENTITY,
    R_SEGMENT_ID,
    RECORD,
    RECORD_SIZE,
    RECORDS_HEADER_SIZE,
    encode_records_header,
    numpy_dtype,
    record_offset,
    records_header_matches,
)
from .._format.scan import ScannedFrame
from .._format.tables import (
    DELTA_MAGIC,
    DELTA_SLOT_SIZE,
    ENTITY_BASE_MAGIC,
    IDEM_BASE_MAGIC,
    POSITIONS_FILE,
    SCOPE_HEADS_FILE,
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
from .._native import index_group, name_hash, scan_frame, unpack_record  # the active codec
from .osio import Disk
from .planning import M_IDEM, M_SEQ, EventMeta
from .positions import ScopePositions
from .tagindex import TagIndex

RECORDS_GROWTH = 1 << 16  # records.idx grows by this many records (4 MiB) at a time
_u64 = struct.Struct("<Q")
_SLOT_HEAD_AT = 8  # a delta slot's head sequence follows its entity hash (tables.DELTA_SLOT)
_two_u64 = struct.Struct("<QQ")  # an idempotency hash as the (lo, hi) halves the idem base sorts by


class IndexFiles:
    """records.idx, the delta table and the base tables of one data directory."""

    def __init__(self, disk: Disk, idx_dir: str, seg_dir: str, store_key: int) -> None:
        self.disk = disk
        self.dir = idx_dir
        self._seg_dir = seg_dir  # named by errors about the log itself
        self.store_key = store_key
        self.records_path = os.path.join(idx_dir, RECORDS_FILE)
        self.records_fd = -1
        self.records_map: Any = None
        self.records_trusted = False  # its header is this store's: its records may be trusted (same boot)
        self.delta_fd = -1
        self.delta_map: Any = None
        self.delta_cap = 0
        self.delta_gen = 0
        self.delta_slots: dict[bytes, int] = {}  # entity -> its slot offset in the delta table
        self.idem_active: dict[bytes, int] = {}  # keys written in the active segment -> sequence
        self.base_segment = 0  # newest sealed segment the base tables cover (0: none)
        self.entity_base: BaseTable | None = None
        self.idem_base: BaseTable | None = None
        self._base_maps: list[Any] = []
        self.positions = ScopePositions(disk, idx_dir, store_key)  # per-scope positions (opened after recovery)
        self.tags = TagIndex(disk, idx_dir, store_key)  # postings by prefix, scope, kind, category (opened after recovery)

    def close(self) -> None:
        self.positions.close()
        self.tags.close()
        self.close_bases()
        for m in (self.records_map, self.delta_map):
            if m is not None:
                m.close()
        self.records_map = self.delta_map = None
        for fd, path in ((self.records_fd, self.records_path), (self.delta_fd, delta_name(self.delta_gen))):
            if fd >= 0:
                self.disk.close_quietly(fd, path)
        self.records_fd = self.delta_fd = -1

    # -- records.idx ----------------------------------------------------------------------
    def open_records(self) -> None:
        path = self.records_path
        self.records_fd = self.disk.open(path, os.O_RDWR | os.O_CREAT)
        size = max(self.disk.fstat(self.records_fd, path).st_size, RECORDS_HEADER_SIZE + RECORDS_GROWTH * RECORD_SIZE)
        self.disk.allocate(self.records_fd, size, path)  # written through the mapping: no holes
        self.records_map = self.disk.map_shared(self.records_fd, size, path, writable=True)
        self.records_trusted = records_header_matches(self.records_map[:RECORDS_HEADER_SIZE], self.store_key)
        if not self.records_trusted:
            # another store's or an unlabelled file: its records are rewritten by the full recovery
            self.records_map[:RECORDS_HEADER_SIZE] = encode_records_header(self.store_key)

    def ensure_records(self, seq: int) -> None:
        """Room in records.idx for the record of ``seq``, allocated (a full disk is
        ``DiskFull`` here, never SIGBUS on a write through the mapping)."""
        need = record_offset(seq) + RECORD_SIZE
        if len(self.records_map) >= need:
            return
        size = len(self.records_map)
        while size < need:
            size += RECORDS_GROWTH * RECORD_SIZE
        self.disk.allocate(self.records_fd, size, self.records_path)
        old = self.records_map
        self.records_map = self.disk.map_shared(self.records_fd, size, self.records_path, writable=True)
        old.close()

    def holds_records_through(self, seq: int) -> bool:
        return bool(len(self.records_map) >= record_offset(seq) + RECORD_SIZE)

    def record(self, seq: int) -> tuple[Any, ...]:
        return unpack_record(self.records_map, seq)

    def records_of(self, first_seq: int, count: int) -> bytes:
        """The records of ``count`` sequences from ``first_seq`` (a segment's footer)."""
        start = record_offset(first_seq)
        return bytes(self.records_map[start:start + count * RECORD_SIZE])

    def adopt_records(self, first_seq: int, records: bytes) -> int:
        """Make records.idx agree with a sealed segment's footer; returns how many
        records it holds."""
        count = len(records) // RECORD_SIZE
        self.ensure_records(first_seq + count)
        start = record_offset(first_seq)
        if self.records_map[start:start + len(records)] != records:
            self.records_map[start:start + len(records)] = records
        return count

    def index_group(self, metas: Sequence[EventMeta], segment_id: int, offset: int) -> None:
        """Index a published group whose first frame is at ``offset``: its records, then
        the delta slots of its entities, each pointed at the entity's newest event of the
        group (a reader that sees a slot finds its record). One call of the active codec."""
        self.ensure_records(metas[-1][M_SEQ])
        index_group(self.records_map, metas, segment_id, offset, self.delta_map, self.delta_slots, self._upsert)
        self.positions.index(metas)  # before the frontier moves, as the records
        self.tags.note(metas, self.records_map, metas[-1][M_SEQ])

    def open_positions(self, visible: int, commits: Sequence[tuple[int, Sequence[Sequence[int]]]]) -> None:
        """Open (or rebuild) the per-scope positions through ``visible`` once recovery is
        done; ``commits``: every FENCE_COMMIT's sequence and ranges, in order."""
        self.positions.open(self.records_map, visible, commits, trusted_records=self.records_trusted)

    def open_tags(self, visible: int, *, trusted: bool, entity_of: Callable[[int], bytes], enabled: bool = True) -> None:
        """Open the tag index (keeping runs only when ``trusted``: a same-boot recovery)
        and file the events through ``visible`` it does not hold yet; with ``enabled``
        False, remove it instead (readers then filter the records)."""
        if not enabled:
            self.tags.remove()
            return
        self.tags.open(self.records_map, visible, trusted=trusted and self.records_trusted, entity_of=entity_of)

    def build_tags(self, last_seq: int) -> None:
        """File every event through ``last_seq`` in the tag index now (idle, close)."""
        self.tags.build(self.records_map, last_seq)

    def reveal_positions(self, ranges: Sequence[Sequence[int]], last_seq: int) -> None:
        """Positions for the events a committed fence reveals (before fences.tbl names them)."""
        self.positions.reveal(ranges, self.record, last_seq)

    def _upsert(self, entity_hash: int, seq: int, prev_seq: int) -> int:
        """The delta slot of an entity met for the first time in this segment."""
        return delta_upsert(self.delta_map, self.delta_cap, entity_hash, seq, prev_seq)

    def written(self, metas: Sequence[EventMeta]) -> None:
        """A group was written to the active segment: its keys are taken from now on."""
        idem_active = self.idem_active
        for meta in metas:
            if meta[M_IDEM] != ZERO_ID:
                idem_active[meta[M_IDEM]] = meta[M_SEQ]

    def write_scanned(self, segment_id: int, frames: list[ScannedFrame]) -> None:
        """Rebuild the records of a scanned (unsealed) segment's frames."""
        if not frames:
            return
        self.ensure_records(frames[-1].seq)
        last_in_entity: dict[bytes, int] = {}
        pack = RECORD.pack_into
        m = self.records_map
        for f in frames:
            prev = last_in_entity.get(f.entity)
            if prev is None:
                prev = self._head_before(f.entity, f.clock) if f.clock > 1 else 0
            last_in_entity[f.entity] = f.seq
            pack(m, RECORDS_HEADER_SIZE + (f.seq - 1) * RECORD_SIZE, f.clock, segment_id,
                 f.offset, f.frame_len, f.kind, f.flags, name_hash(f.entity), name_hash(f.scope),
                 prev, f.idem_hash)

    def _head_before(self, entity: bytes, clock: int) -> int:
        """Sequence of an entity's event with clock ``clock - 1``, found through the lookup
        tables (the delta, when recovery kept it, then the base) and the records' back
        links. The index records below the scanned frames are trusted here."""
        h = name_hash(entity)
        candidates: list[int] = []
        if self.delta_map is not None:
            candidates += delta_candidates(self.delta_map, self.delta_cap, h)
        if self.entity_base is not None:
            candidates += self.entity_base.entity_candidates(h)
        for seq in candidates:
            while seq:
                rec = self.record(seq)
                if rec[R_ENTITY_HASH] != h or rec[R_ENTITY_CLOCK] < clock - 1:
                    break
                if rec[R_ENTITY_CLOCK] == clock - 1:
                    return int(seq)
                seq = rec[R_PREV_IN_ENTITY]
        raise CorruptSegment(self._seg_dir, 0, f"predecessor of entity {entity!r} clock {clock} not found")

    def record_matches_frame(self, segment: Any, seq: int, segment_id: int) -> bool:
        """Whether the record of ``seq`` names a whole frame of ``seq`` in ``segment``."""
        rec = self.record(seq)
        if rec[R_SEGMENT_ID] != segment_id:
            return False
        off = rec[R_OFFSET]
        status, frame = scan_frame(segment, off, off + rec[R_FRAME_LEN])
        return status == OK and isinstance(frame, Frame) and frame.global_sequence == seq

    # -- keys -----------------------------------------------------------------------------
    def idem_seq(self, idem: bytes) -> int:
        """The sequence ``idem`` was written under (active segment, then base); 0: never."""
        seq = self.idem_active.get(idem)
        if seq:
            return seq
        base = self.idem_base
        if base is not None:
            lo, hi = _two_u64.unpack(idem)
            return base.idem_lookup(hi, lo)
        return 0

    # -- the delta table ------------------------------------------------------------------
    def new_delta(self, frames: list[ScannedFrame], segment_bytes: int) -> None:
        """A fresh delta table (new generation) for an active segment of ``segment_bytes``,
        filled from ``frames`` (the scan of that segment at recovery)."""
        existing = [g for g in map(parse_delta_name, self.disk.listdir(self.dir)) if g is not None]
        gen = max([*existing, self.delta_gen]) + 1
        max_frames = segment_bytes // (MIN_FRAME + RECORD_SIZE) + 1  # the delta never passes half full
        cap = delta_capacity_for(max_frames)
        path = os.path.join(self.dir, delta_name(gen))
        size = TABLE_HEADER_SIZE + cap * DELTA_SLOT_SIZE
        fd = self.disk.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            self.disk.allocate(fd, size, path)  # written through the mapping: no holes
            self.disk.pwrite(fd, delta_header(cap, gen), 0, path)
            m = self.disk.map_shared(fd, size, path, writable=True)
        except BaseException:
            self.disk.close_quietly(fd, path)
            self.disk.unlink_quietly(path)  # a half-made table holds space a full disk needs back
            raise
        self._drop_delta()
        self.delta_fd, self.delta_map, self.delta_cap, self.delta_gen = fd, m, cap, gen
        self.idem_active = {}
        self.delta_slots = {}
        heads: dict[bytes, int] = {}
        for f in frames:
            prev = heads.get(f.entity, -1)
            self.delta_slots[f.entity] = delta_upsert(m, cap, name_hash(f.entity), f.seq, prev)
            heads[f.entity] = f.seq
            if f.idem_hash != ZERO_ID:
                self.idem_active[f.idem_hash] = f.seq

    def map_delta(self, generation: int) -> bool:
        """Map an existing delta table for writing (the same-boot restart path); False
        when it is missing or not the one named."""
        path = os.path.join(self.dir, delta_name(generation))
        try:
            fd = self.disk.open_existing(path, os.O_RDWR)
        except BatpakError:
            return False
        if fd is None:
            return False
        m = None
        try:
            size = self.disk.fstat(fd, path).st_size
            m = self.disk.map_shared(fd, size, path, writable=True)
            cap, _, gen, _ = check_header(m, DELTA_MAGIC, path)
            if gen != generation or size != TABLE_HEADER_SIZE + cap * DELTA_SLOT_SIZE:
                raise CorruptSegment(path, 0, "not the delta table the checkpoint names")
            self.disk.allocate(fd, size, path)  # made sparse by an older writer: fill its holes
        except (BatpakError, ValueError):
            if m is not None:
                m.close()
            self.disk.close_quietly(fd, path)
            return False
        self._drop_delta()
        self.delta_fd, self.delta_map, self.delta_cap, self.delta_gen = fd, m, cap, generation
        return True

    def resume_delta(self, first: int, trusted: int, tail: list[ScannedFrame]) -> None:
        """Same-boot restart: the active segment's keys from its trusted records
        ``first..trusted``, then the scanned ``tail`` (already in records.idx) into the
        mapped delta table and the keys."""
        start = record_offset(first)
        keys = self.records_map[start:start + (trusted - first + 1) * RECORD_SIZE]
        self.idem_active = {k: first + i for i, (k,) in enumerate(IDEM_OF_RECORD.iter_unpack(keys)) if k != ZERO_ID}
        self.delta_slots = {}
        for f in tail:
            delta_upsert(self.delta_map, self.delta_cap, name_hash(f.entity), f.seq, self.record(f.seq)[R_PREV_IN_ENTITY])
            if f.idem_hash != ZERO_ID:
                self.idem_active[f.idem_hash] = f.seq

    def _drop_delta(self) -> None:
        if self.delta_map is not None:
            self.delta_map.close()
            self.disk.close_quietly(self.delta_fd, delta_name(self.delta_gen))
        self.delta_map, self.delta_fd = None, -1

    # -- base tables ----------------------------------------------------------------------
    def open_bases(self, through_segment: int, through_seq: int, *, verify: bool = True) -> None:
        """Map the base tables for the sealed segments through ``through_segment``,
        rebuilding them when missing/bad (with ``verify`` off: a same-boot restart;
        missing or bad is CorruptSegment). All or nothing: when it fails, the tables
        mapped before stay (a rotation that fails here leaves a consistent index)."""
        mapped: list[tuple[BaseTable, Any]] = []
        try:
            if through_segment:
                for name, magic, cols in ((entities_base_name(through_segment), ENTITY_BASE_MAGIC, 2),
                                          (idem_base_name(through_segment), IDEM_BASE_MAGIC, 3)):
                    mapped.append(self._map_or_build(name, magic, cols, through_segment, through_seq, verify))
        except BaseException:
            for base, m in mapped:
                base.release()
                m.close()
            raise
        self.close_bases()
        self.base_segment = through_segment
        if mapped:
            (self.entity_base, entity_map), (self.idem_base, idem_map) = mapped
            self._base_maps = [entity_map, idem_map]

    def _map_or_build(self, name: str, magic: bytes, cols: int, through_segment: int, through_seq: int,
                      verify: bool) -> tuple[BaseTable, Any]:
        path = os.path.join(self.dir, name)
        got = self._map_base(path, name, magic, cols, through_seq, verify)
        if got is None and not verify:
            raise CorruptSegment(path, 0, "index table missing or not for this log")
        if got is None:
            self.build_bases(through_segment, through_seq)
            got = self._map_base(path, name, magic, cols, through_seq)
            if got is None:
                raise CorruptSegment(path, 0, "rebuilt index table does not verify")
        return got

    def close_bases(self) -> None:
        for table in (self.entity_base, self.idem_base):
            if table is not None:
                table.release()
        self.entity_base = self.idem_base = None
        for m in self._base_maps:
            m.close()
        self._base_maps = []

    def _map_base(self, path: str, name: str, magic: bytes, cols: int, through_seq: int,
                  verify: bool = True) -> tuple[BaseTable, Any] | None:
        """A verified base table and its mapping, or None when missing, bad or not
        through ``through_seq``."""
        m = self.disk.map_readonly(path)  # the same read-only mapping every reader makes
        if m is None:
            return None
        try:
            count, through = verify_base(m, magic, name, cols, digest=verify)
        except CorruptSegment:
            m.close()
            return None
        if through != through_seq:
            m.close()
            return None
        return BaseTable(m, count, cols), m

    def build_bases(self, through_segment: int, through_seq: int) -> None:
        """Fold every record up to ``through_seq`` into fresh base tables (numpy). The
        files are written after the arrays over records.idx are gone: a failed write's
        traceback must not keep a view of the mapping alive (it could not be remapped)."""
        ent_body, idem_body = self._base_bodies(through_seq)
        self.disk.write_file_atomic(os.path.join(self.dir, entities_base_name(through_segment)), ent_body)
        self.disk.write_file_atomic(os.path.join(self.dir, idem_base_name(through_segment)), idem_body)

    def _base_bodies(self, through_seq: int) -> tuple[bytes, bytes]:
        """The entity and idempotency base tables through ``through_seq``, encoded."""
        import numpy as np

        recs = np.frombuffer(self.records_map, dtype=numpy_dtype(), count=through_seq, offset=RECORDS_HEADER_SIZE)
        seqs = np.arange(1, through_seq + 1, dtype="<u8")
        # heads: sequences no later event of the same entity points back to (exact even
        # when two entities share a 64-bit hash)
        is_head = np.ones(through_seq + 1, dtype=bool)
        prev = recs["prev_in_entity"]
        is_head[prev[prev > 0]] = False
        heads = seqs[is_head[1:]]
        ent = recs["entity_hash"][heads - 1]
        order = np.argsort(ent, kind="stable")
        ent_body = encode_entity_base(ent[order].astype("<u8").tobytes(), heads[order].astype("<u8").tobytes(),
                                      through_seq)
        keyed = (recs["idem_hash_lo"] != 0) | (recs["idem_hash_hi"] != 0)
        # idem hash bytes are stored as 16 bytes: compare as (hi, lo) of their u64 halves
        lo = recs["idem_hash_lo"][keyed]
        hi = recs["idem_hash_hi"][keyed]
        kseq = seqs[keyed]
        order = np.lexsort((lo, hi))
        idem_body = encode_idem_base(hi[order].astype("<u8").tobytes(), lo[order].astype("<u8").tobytes(),
                                     kseq[order].astype("<u8").tobytes(), through_seq)
        return ent_body, idem_body

    def prune(self) -> None:
        """Remove table files of older generations (mapped readers keep their inode)."""
        keep = {entities_base_name(self.base_segment), idem_base_name(self.base_segment),
                RECORDS_FILE, FENCES_FILE, VERIFIED_FILE, POSITIONS_FILE, SCOPE_HEADS_FILE}
        if self.delta_gen:
            keep.add(delta_name(self.delta_gen))
        for name in self.disk.listdir(self.dir):
            if name not in keep and (name.endswith(".tbl") or name.endswith(".tmp")):
                self.disk.unlink(os.path.join(self.dir, name))
