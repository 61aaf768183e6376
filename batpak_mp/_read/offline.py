"""Read-only offline open of a data directory: no lock, no recovery, no writes.

Owns: ``OfflineStore.open(data_dir)``, which reads a stopped store (or one beside a live
or starting writer) the way the CLI's ``get``/``history``/``tail`` and tools need, and
``find_frontier``, which decides how far it may read. It answers ``get``, ``history``,
``query_after``, ``walk_ancestors`` and ``scan`` through the same ``Reader`` every client
uses, bounded by a frontier it finds itself:

- every segment is judged by ``segment_verdict`` (this store, continuing the log); a
  sealed one contributes its footer's count; an unsealed one is scanned read-only with
  the pure recovery scan (from the checkpoint's offset when the checksum of the bytes
  below it still matches) and decided by ``committed_through``, exactly as recovery
  would: whole commits only, ``CorruptSegment`` for damage in the middle of the log or a
  log that ends below the durable checkpoint, ``FutureFormat`` for a newer frame;
- ``records.idx`` is used when its header is this store's, and trusted only as far as the
  records of the scanned frames match them (a record not yet written ends the frontier at
  the commit before it); otherwise the records are rebuilt in memory from the seal
  footers and the scans;
- entity heads come from the records themselves (a search of the ``entity_hash`` column,
  numpy), not from the writer's lookup tables, whose generation cannot be told apart
  from files alone; revealed fence ranges come from the fence chain's FENCE_COMMIT
  events up to the frontier, not from ``fences.tbl``.

Invariants: every file is opened ``O_RDONLY`` or mapped ``PROT_READ``; nothing is
written, zeroed, renamed, locked or probed (``writer.lock`` is never opened), so a
writer starting beside it cannot fail with ``StoreLocked`` because of it. A frame the
writer has written but not yet indexed is not shown. Must not import the write side
(``_storage``), the IPC layer or any process role.
"""

from __future__ import annotations

import functools
import mmap
import os
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from .._errors import CorruptSegment, InvalidArgument, StorageError
from .._format.checkpoint import Checkpoint, decode_checkpoint
from .._format.directory import (
    CHECKPOINT_FILE,
    INDEX_DIR,
    META_FILE,
    RECORDS_FILE,
    SEGMENT_DIR,
    name_hash,
    parse_segment_name,
    segment_name,
)
from .._format.fences import commit_ranges
from .._format.frame import FLAG_COMMIT_END
from .._format.ids import store_key_of
from .._format.meta import decode_meta, inherited_of
from .._format.record import (
    R_ENTITY_CLOCK,
    R_ENTITY_HASH,
    R_FLAGS,
    R_FRAME_LEN,
    R_IDEM_HASH,
    R_KIND,
    R_OFFSET,
    R_PREV_IN_ENTITY,
    R_SCOPE_HASH,
    R_SEGMENT_ID,
    RECORD,
    RECORD_SIZE,
    RECORDS_HEADER_SIZE,
    numpy_dtype,
    record_offset,
    records_header_matches,
)
from .._format.scan import ScannedFrame, committed_through
from .._format.segment import (
    FOOTER_HEAD,
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    footer_count,
    sealed_verdict,
    segment_verdict,
)
from .._native import scan_segment  # the active codec: C when built, else _format's
from .._query import Region
from .._values import FENCE_ENTITY, Event, Kind, Page
from .reader import Reader, StaleView, View, map_readonly, unborn_segment

_dtype = functools.cache(numpy_dtype)


class Frontier(NamedTuple):
    """How far the offline reader reads, and the records it reads through."""

    store_id: bytes
    visible: int  # last sequence of the last whole commit that is indexed
    records: mmap.mmap | bytes  # records.idx (mapped) or records rebuilt in memory
    records_from_file: bool


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError("read", path, exc) from exc


def _not_a_store(path: str, why: str) -> InvalidArgument:
    return InvalidArgument("data_dir", path, f"is not a batpak-mp data directory ({why})")


def _load_checkpoint(root: str) -> Checkpoint | None:
    """The checkpoint, None when there is none; a damaged one is refused, as the writer
    refuses it (it would lower the durable floor)."""
    path = os.path.join(root, CHECKPOINT_FILE)
    raw = _read_file(path)
    ckpt = decode_checkpoint(raw) if raw is not None else None
    if raw is not None and ckpt is None:
        raise CorruptSegment(path, 0, "the durable checkpoint is damaged (it is written whole, by rename)")
    return ckpt


class _Log:
    """The state ``find_frontier`` builds while it walks the segments in order."""

    def __init__(self, root: str, records: mmap.mmap | None, ckpt: Checkpoint | None, hint: int) -> None:
        self.root = root
        self.records = records  # records.idx when it is this store's, else None
        self.rebuilt = bytearray(RECORDS_HEADER_SIZE)  # records.idx's image when it is not
        self.ckpt = ckpt
        self.floor = max(hint, ckpt.seq if ckpt is not None else 0)  # the durable sequence
        self.next_seq = 1
        self.stop = False  # a record that is not written yet ended the frontier early

    def sealed(self, name: str, m: mmap.mmap, count: int, trailer: Any) -> None:
        if self.records is None:
            records = sealed_verdict(name, m, trailer, checksum=False).check()
            assert records is not None
            self.rebuilt += records
        self.next_seq += count

    def unsealed(self, name: str, sid: int, m: mmap.mmap, frames_end: int) -> None:
        first = self.next_seq
        start, expect = SEG_HEADER_SIZE, first
        ck = self.ckpt
        if (self.records is not None and ck is not None and ck.segment_id == sid and first - 1 <= ck.visible
                and SEG_HEADER_SIZE <= ck.end_offset <= frames_end and _crc_matches(m, ck)):
            start, expect = ck.end_offset, ck.visible + 1  # the frames below it are the checkpoint's
        scan = scan_segment(m, start, frames_end, expect)
        last = committed_through(os.path.join(self.root, SEGMENT_DIR, name), scan, expect, self.floor)
        kept = scan.frames[: last - expect + 1]
        if self.records is not None:
            indexed = _indexed_prefix(self.records, sid, kept)
            if indexed < len(kept):
                self.stop = True
                kept = kept[:indexed]
                while kept and not kept[-1].flags & FLAG_COMMIT_END:
                    kept.pop()
        else:
            self.rebuilt += _derive_records(self.rebuilt, sid, kept)
        self.next_seq = expect + len(kept)


def _crc_matches(m: mmap.mmap, ck: Checkpoint) -> bool:
    return zlib.crc32(memoryview(m)[SEG_HEADER_SIZE:ck.end_offset]) == ck.frames_crc


def _indexed_prefix(records: mmap.mmap, sid: int, frames: list[ScannedFrame]) -> int:
    """How many of ``frames`` (in order) have their record written in ``records.idx`` as
    the writer writes it (prev_in_entity is not compared: the reader follows it checked)."""
    for i, f in enumerate(frames):
        off = record_offset(f.seq)
        if len(records) < off + RECORD_SIZE:
            return i
        rec = RECORD.unpack_from(records, off)
        if (rec[R_SEGMENT_ID] != sid or rec[R_OFFSET] != f.offset or rec[R_FRAME_LEN] != f.frame_len
                or rec[R_ENTITY_CLOCK] != f.clock or rec[R_KIND] != f.kind or rec[R_FLAGS] != f.flags
                or rec[R_ENTITY_HASH] != name_hash(f.entity) or rec[R_SCOPE_HASH] != name_hash(f.scope)
                or rec[R_IDEM_HASH] != f.idem_hash):
            return i
    return len(frames)


def _derive_records(image: bytearray, sid: int, frames: list[ScannedFrame]) -> bytes:
    """The records of scanned frames, as the writer's recovery writes them. An entity's
    predecessor before these frames is found as recovery finds it: the newest record in
    ``image`` (the records so far) with the entity's hash, then back along
    ``prev_in_entity`` to the clock before."""
    out = bytearray()
    last: dict[bytes, int] = {}
    heads = _heads(image) if frames else {}
    for f in frames:
        prev = last.get(f.entity)
        if prev is None:
            prev = _clock_before(image, heads.get(name_hash(f.entity), 0), f.clock) if f.clock > 1 else 0
        last[f.entity] = f.seq
        out += RECORD.pack(f.clock, sid, f.offset, f.frame_len, f.kind, f.flags, name_hash(f.entity),
                           name_hash(f.scope), prev, f.idem_hash)
    return bytes(out)


def _heads(image: bytearray) -> dict[int, int]:
    """entity hash -> newest sequence carrying it, over the records in ``image``."""
    import numpy as np

    count = (len(image) - RECORDS_HEADER_SIZE) // RECORD_SIZE
    if not count:
        return {}
    hashes = np.frombuffer(image, dtype=_dtype(), count=count, offset=RECORDS_HEADER_SIZE)["entity_hash"][::-1]
    uniq, first_from_end = np.unique(hashes, return_index=True)
    del hashes  # (a live view would keep the bytearray from growing)
    return dict(zip(uniq.tolist(), (count - first_from_end).tolist(), strict=True))


def _clock_before(image: bytearray, seq: int, clock: int) -> int:
    while seq:
        rec = RECORD.unpack_from(image, record_offset(seq))
        if rec[R_ENTITY_CLOCK] <= clock - 1:
            return seq if rec[R_ENTITY_CLOCK] == clock - 1 else 0
        seq = rec[R_PREV_IN_ENTITY]
    return 0


def find_frontier(data_dir: str, durable_hint: tuple[int, int] | None = None) -> Frontier:
    """Find how far ``data_dir`` can be read with no writer: the last whole commit that
    is indexed. ``durable_hint``: (store key, durable sequence) from a stale control
    block, a floor like the checkpoint's (as ``Engine.open`` takes it). Typed errors:
    ``InvalidArgument`` (not a store), ``CorruptSegment`` and ``FutureFormat`` (as the
    writer's recovery would raise them), ``StorageError``."""
    root = os.path.abspath(data_dir)
    if not os.path.isdir(root):
        raise _not_a_store(root, "no such directory")
    meta_path = os.path.join(root, META_FILE)
    raw = _read_file(meta_path)
    if raw is None:
        raise _not_a_store(root, f"no {META_FILE}")
    store_id = decode_meta(raw, meta_path)
    inherited = inherited_of(raw, meta_path)  # a fork's segments of its parent (FORMAT.md §8.1)
    ckpt = _load_checkpoint(root)
    records = map_readonly(os.path.join(root, INDEX_DIR, RECORDS_FILE))
    if records is not None and not records_header_matches(records[:RECORDS_HEADER_SIZE], store_key_of(store_id)):
        records.close()
        records = None
    hint = durable_hint[1] if durable_hint and durable_hint[0] == store_key_of(store_id) else 0
    log = _Log(root, records, ckpt, hint)
    try:
        _walk_segments(root, store_id, log, inherited)
    except BaseException:
        if records is not None:
            records.close()
        raise
    if records is not None and log.stop and log.next_seq - 1 < log.floor:
        # records.idx lacks records the checkpoint says were published: not the writer's
        # current file (restored, or left by another store); read without it
        records.close()
        records = None
        log = _Log(root, None, ckpt, hint)
        _walk_segments(root, store_id, log, inherited)
    visible = log.next_seq - 1
    if visible < log.floor:
        raise CorruptSegment(os.path.join(root, SEGMENT_DIR), 0,
                             f"log ends at sequence {visible}, but sequence {log.floor} was durable")
    if records is not None:
        return Frontier(store_id, visible, records, True)
    return Frontier(store_id, visible, bytes(log.rebuilt), False)


def _walk_segments(root: str, store_id: bytes, log: _Log, inherited: tuple[tuple[bytes, int], ...] = ()) -> None:
    seg_dir = os.path.join(root, SEGMENT_DIR)
    try:
        ids = sorted(sid for sid in map(parse_segment_name, os.listdir(seg_dir)) if sid is not None)
    except FileNotFoundError:
        ids = []
    if ids and unborn_segment(os.path.join(seg_dir, segment_name(ids[-1]))):
        ids.pop()  # being created by a rotation (or cut short): it holds no event
    for sid in ids:
        name = segment_name(sid)
        path = os.path.join(seg_dir, name)
        m = map_readonly(path)
        if m is None:
            raise CorruptSegment(path, 0, "segment is empty")
        try:
            size = len(m)
            verdict = segment_verdict(path, m[:SEG_HEADER_SIZE], m[size - SEG_TRAILER_SIZE:], size,
                                      store_id=store_id, first_seq=log.next_seq, unsealed_ok=True,
                                      inherited=inherited)
            verdict.check()
            trailer = verdict.trailer
            if trailer is not None:
                count = footer_count(m[trailer.footer_offset:trailer.footer_offset + trailer.footer_len])
                if count is None or trailer.footer_len != FOOTER_HEAD.size + count * RECORD_SIZE:
                    raise CorruptSegment(path, trailer.footer_offset, "seal footer does not match its trailer")
                log.sealed(path, m, count, trailer)
            else:
                log.unsealed(name, sid, m, verdict.frames_end)
        finally:
            m.close()
        if log.stop:
            return


class _OfflineReader(Reader):
    """A ``Reader`` over a fixed frontier and fixed records, with entity heads found in
    the records and revealed ranges taken from the fence chain."""

    def __init__(self, data_dir: str, frontier: Frontier) -> None:
        super().__init__(data_dir, self._fixed_view)
        self.tags = None  # runs a writer built are trusted only by a writer's own recovery: scan
        self._frontier = frontier
        self._records = frontier.records
        self._ranges: list[tuple[int, int]] = []
        self.refresh()
        self._ranges = commit_ranges(self.history(FENCE_ENTITY))  # the fence chain is never fenced
        self.refresh()

    def _fixed_view(self) -> View:
        return View(self._frontier.visible, 0, 0, len(self._ranges))

    def _records_map(self, seq: int) -> mmap.mmap | bytes:
        if len(self._frontier.records) < record_offset(seq) + RECORD_SIZE:
            raise StaleView(RECORDS_FILE)
        return self._frontier.records

    def _load_fences(self, count: int) -> None:
        ranges = sorted(self._ranges[:count])
        self._revealed_first = [a for a, _ in ranges]
        self._revealed_last = [b for _, b in ranges]

    def head_of(self, entity_raw: bytes) -> int:
        """Newest sequence (up to the frontier) whose record carries the entity's hash and
        whose frame names the entity."""
        import numpy as np

        visible = self.view.visible
        if not visible:
            return 0
        recs = np.frombuffer(self._frontier.records, dtype=_dtype(), count=visible, offset=RECORDS_HEADER_SIZE)
        hits = np.flatnonzero(recs["entity_hash"] == name_hash(entity_raw))
        del recs  # (a live numpy view would keep the mapping from closing)
        for i in reversed(hits.tolist()):
            if self.frame(i + 1).entity == entity_raw:
                return int(i) + 1
        return 0

    def close(self) -> None:
        super().close()
        if isinstance(self._frontier.records, mmap.mmap):
            self._frontier.records.close()


class OfflineStore:
    """Read-only access to a data directory with no writer: the read API of ``Engine``
    (``get``, ``history``, ``query_after``, ``walk_ancestors``, ``scan``), bounded by the
    frontier found at open (``visible``). Writes nothing; safe beside a live writer."""

    def __init__(self, data_dir: str, reader: Reader, frontier: Frontier) -> None:
        self.data_dir = data_dir
        self.reader = reader
        self.visible = frontier.visible
        self.store_id = frontier.store_id
        self.records_from_file = frontier.records_from_file  # False: rebuilt in memory from the segments

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], *, durable_hint: tuple[int, int] | None = None) -> OfflineStore:
        """Open ``data_dir`` read-only (see ``find_frontier`` for the errors)."""
        root = os.path.abspath(os.fspath(data_dir))
        frontier = find_frontier(root, durable_hint)
        try:
            reader = _OfflineReader(root, frontier)
        except BaseException:
            if isinstance(frontier.records, mmap.mmap):
                frontier.records.close()
            raise
        return cls(root, reader, frontier)

    def get(self, event_id: bytes) -> Event:
        return self.reader.get(event_id)

    def history(self, entity: str, *, after_clock: int | None = None, limit: int | None = None) -> list[Event]:
        return self.reader.history(entity, after_clock, limit)

    def query_after(self, after: int = 0, *, limit: int = 1000, entity: str | None = None,
                    scope: str | None = None, kind: Kind | None = None, kinds: Iterable[Kind] | None = None,
                    upto: int | None = None, region: Region | None = None) -> Page:
        return self.reader.query_after(after, limit, entity, scope, kind, kinds=kinds, upto=upto, region=region)

    def walk_ancestors(self, event_id: bytes, *, limit: int | None = None) -> Iterator[Event]:
        return self.reader.walk_ancestors(event_id, limit)

    def scan(self, after: int = 0) -> Iterator[Event]:
        return self.reader.scan(after)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> OfflineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
