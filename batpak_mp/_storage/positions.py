"""Per-scope positions, as the writer keeps them: ``positions.idx`` and ``scopeheads.idx``.

Owns: giving every visible event a gap-free position in its scope (1, 2, 3, ... in
*stream order*: an event written in a visibility fence gets its position when its
FENCE_COMMIT reveals it, after every event published before, so no follower that passed a
position ever finds a new event below it; a fence that is never committed takes no
position); the entry of each sequence in positions.idx (position, the sequence of the
previous position, the sequence at ``skip_position`` for O(log n) seeks); each scope's
newest sequence in scopeheads.idx (open addressing, replaced by a larger file when half
full); rebuilding both from records.idx and the fence chain (numpy) when they are
missing, of another store or behind the log; the watermark in the header (every sequence
up to it has its final entry).
Invariants: entries are written before the frontier that shows their events moves
(``index`` runs inside ``IndexFiles.index_group``, ``reveal`` before fences.tbl names
the ranges); an entry of a visible event never changes, except 0 -> its position when a
fence reveals it; the watermark never counts a fence commit whose reveal is not written.
Scopes are told apart by their 64-bit name hash (a collision would share one numbering;
readers check the record's scope hash). Every OS call goes through ``osio.Disk``.
Must not import the engine, the read side or any process role.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from .._errors import BatpakError
from .._format.frame import FLAG_FENCED
from .._format.record import R_FLAGS, R_SCOPE_HASH, RECORDS_HEADER_SIZE, numpy_dtype
from .._format.tables import (
    DELTA_SLOT_SIZE,
    POSITION,
    POSITION_SIZE,
    POSITIONS_FILE,
    POSITIONS_HEADER_SIZE,
    POSITIONS_THROUGH_AT,
    SCOPE_HEADS_FILE,
    SCOPE_HEADS_MAGIC,
    SCOPE_HEADS_MIN_CAPACITY,
    SCOPE_HEADS_MOVED_AT,
    TABLE_HEADER_SIZE,
    check_header,
    delta_candidates,
    delta_upsert,
    encode_positions_header,
    position_offset,
    positions_through,
    scope_heads_header,
    skip_position,
    walk_to_position,
)
from .osio import Disk
from .planning import M_FLAGS, M_KIND, M_SCOPE_HASH, M_SEQ, EventMeta

POSITIONS_GROWTH = 1 << 16  # entries (1.5 MiB) positions.idx grows by at a time
FENCE_COMMIT_KIND = 0x020  # packed kind of SYSTEM_FENCE_COMMIT (category 0): its reveal follows
_u64 = struct.Struct("<Q")
_pack_entry = POSITION.pack_into


class _Scope:
    """What the writer remembers of one scope: its head and the sequences of the positions
    a later entry may skip to (``skip_position`` of any later position is one of them)."""

    __slots__ = ("head", "pos", "skips", "slot")

    def __init__(self, head: int, pos: int, slot: int) -> None:
        self.head = head
        self.pos = pos
        self.slot = slot  # byte offset of its slot in scopeheads.idx (-1: none yet)
        self.skips: dict[int, int] = {}


def _keep(pos: int) -> set[int]:
    """Positions a later entry can skip to, once ``pos`` is the head: every m and m + 1
    with m the latest multiple of 2**k at or below ``pos``, and 1."""
    out = {1}
    for k in range(pos.bit_length() + 1):
        m = (pos >> k) << k
        out.add(m)
        out.add(m + 1)
    return out


class ScopePositions:
    """positions.idx and scopeheads.idx of one data directory (the writer's side)."""

    def __init__(self, disk: Disk, idx_dir: str, store_key: int) -> None:
        self.disk = disk
        self.store_key = store_key
        self.path = os.path.join(idx_dir, POSITIONS_FILE)
        self.heads_path = os.path.join(idx_dir, SCOPE_HEADS_FILE)
        self.fd = -1
        self.map: Any = None
        self.heads_fd = -1
        self.heads_map: Any = None
        self.heads_cap = 0
        self.heads_count = 0
        self.scopes: dict[int, _Scope] = {}
        self.through = 0
        self.pending_reveal = False  # a fence commit was indexed; its reveal is not written yet
        self.rebuilt = False  # the last open rebuilt the files (tests and the recovery report)

    @property
    def opened(self) -> bool:
        return self.map is not None

    # -- files ------------------------------------------------------------------------------
    def close(self) -> None:
        for m in (self.map, self.heads_map):
            if m is not None:
                m.close()
        self.map = self.heads_map = None
        for fd, path in ((self.fd, self.path), (self.heads_fd, self.heads_path)):
            if fd >= 0:
                self.disk.close_quietly(fd, path)
        self.fd = self.heads_fd = -1
        self.scopes = {}

    def _ensure(self, seq: int) -> None:
        """Room for the entry of ``seq``, allocated before it is written through the map."""
        need = position_offset(seq) + POSITION_SIZE
        if self.map is not None and len(self.map) >= need:
            return
        size = len(self.map) if self.map is not None else 0
        size = max(size, POSITIONS_HEADER_SIZE)
        while size < need:
            size += POSITIONS_GROWTH * POSITION_SIZE
        self.disk.allocate(self.fd, size, self.path)
        old = self.map
        self.map = self.disk.map_shared(self.fd, size, self.path, writable=True)
        if old is not None:
            old.close()

    def open(self, records: Any, visible: int, commits: Sequence[tuple[int, Sequence[Sequence[int]]]],
             *, trusted_records: bool) -> None:
        """Map both files; keep them when they are this store's and exactly through
        ``visible`` (with ``trusted_records``), else rebuild them from ``records``
        (records.idx) and ``commits`` (each FENCE_COMMIT's sequence and ranges, in order)."""
        self.close()
        self.fd = self.disk.open(self.path, os.O_RDWR | os.O_CREAT)
        self.map = None
        self._ensure(max(visible, 1))
        through = positions_through(self.map[:POSITIONS_HEADER_SIZE], self.store_key)
        heads = self._map_heads()
        if trusted_records and heads and through == visible:
            self.through = visible
            self.rebuilt = False
            return
        self._rebuild(records, visible, commits)
        self.rebuilt = True

    def _map_heads(self) -> bool:
        """Map an existing scopeheads.idx for writing; False when it is missing or bad."""
        try:
            fd = self.disk.open_existing(self.heads_path, os.O_RDWR)
        except BatpakError:
            return False
        if fd is None:
            return False
        try:
            size = self.disk.fstat(fd, self.heads_path).st_size
            m = self.disk.map_shared(fd, size, self.heads_path, writable=True)
            cap, _, moved, _ = check_header(m, SCOPE_HEADS_MAGIC, self.heads_path)
        except (BatpakError, ValueError):
            self.disk.close_quietly(fd, self.heads_path)
            return False
        if moved or size != TABLE_HEADER_SIZE + cap * DELTA_SLOT_SIZE or cap & (cap - 1):
            m.close()
            self.disk.close_quietly(fd, self.heads_path)
            return False
        self.heads_fd, self.heads_map, self.heads_cap = fd, m, cap
        self.heads_count = sum(1 for i in range(cap) if _u64.unpack_from(m, TABLE_HEADER_SIZE + i * DELTA_SLOT_SIZE)[0])
        return True

    def _new_heads(self, capacity: int, heads: Iterable[tuple[int, int]]) -> None:
        """A fresh scopeheads.idx of ``capacity`` slots holding ``heads`` (hash, sequence),
        renamed over the old one; the old one is then marked moved (readers map anew)."""
        body = bytearray(scope_heads_header(capacity).ljust(TABLE_HEADER_SIZE + capacity * DELTA_SLOT_SIZE, b"\0"))
        count = 0
        slots: dict[int, int] = {}
        for h, seq in heads:
            slots[h] = delta_upsert(body, capacity, h, seq, -1)
            count += 1
        self.disk.write_file_atomic(self.heads_path, bytes(body))
        fd = self.disk.open(self.heads_path, os.O_RDWR)
        try:
            m = self.disk.map_shared(fd, len(body), self.heads_path, writable=True)
        except BaseException:
            self.disk.close_quietly(fd, self.heads_path)
            raise
        old_map, old_fd = self.heads_map, self.heads_fd
        self.heads_fd, self.heads_map, self.heads_cap, self.heads_count = fd, m, capacity, count
        for h, scope in self.scopes.items():
            scope.slot = slots.get(h, -1)
        if old_map is not None:
            _u64.pack_into(old_map, SCOPE_HEADS_MOVED_AT, 1)
            old_map.close()
            self.disk.close_quietly(old_fd, self.heads_path)

    def _set_through(self, seq: int) -> None:
        self.through = seq
        self.map[POSITIONS_THROUGH_AT:POSITIONS_THROUGH_AT + 8] = _u64.pack(seq)

    # -- rebuild ----------------------------------------------------------------------------
    def _rebuild(self, records: Any, visible: int, commits: Sequence[tuple[int, Sequence[Sequence[int]]]]) -> None:
        import numpy as np

        self.map[:POSITIONS_HEADER_SIZE] = encode_positions_header(self.store_key, 0)
        self.scopes = {}
        recs = np.frombuffer(records, dtype=numpy_dtype(), count=visible, offset=RECORDS_HEADER_SIZE)
        seqs = np.arange(1, visible + 1, dtype=np.int64)
        fenced = (recs["flags"] & FLAG_FENCED) != 0
        parts_seq = [seqs[~fenced]]
        parts_k1 = [seqs[~fenced]]
        parts_k2 = [np.zeros(int((~fenced).sum()), dtype=np.int64)]
        for commit_seq, ranges in commits:
            if commit_seq > visible:
                continue
            n = 0
            for first, last in ranges:
                r = np.arange(int(first), min(int(last), visible) + 1, dtype=np.int64)
                r = r[fenced[r - 1]] if len(r) else r
                parts_seq.append(r)
                parts_k1.append(np.full(len(r), commit_seq, dtype=np.int64))
                parts_k2.append(np.arange(n + 1, n + 1 + len(r), dtype=np.int64))
                n += len(r)
        all_seq = np.concatenate(parts_seq)
        order = np.lexsort((np.concatenate(parts_k2), np.concatenate(parts_k1)))
        stream = all_seq[order]  # sequences in stream order
        scope = recs["scope_hash"][stream - 1]
        grouped = np.lexsort((np.arange(len(stream)), scope))
        g_seq = stream[grouped]
        g_scope = scope[grouped]
        count = len(g_seq)
        entries = np.zeros((visible, 3), dtype="<u8")
        heads: list[tuple[int, int]] = []
        if count:
            idx = np.arange(count, dtype=np.int64)
            start = np.ones(count, dtype=bool)
            start[1:] = g_scope[1:] != g_scope[:-1]
            group_start = np.maximum.accumulate(np.where(start, idx, 0))
            pos = idx - group_start + 1
            prev = np.where(pos > 1, g_seq[np.maximum(idx - 1, 0)], 0)
            low1 = (pos - 1) & (pos - 2)
            odd_skip = (low1 & (low1 - 1)) + 1
            even_skip = pos & (pos - 1)
            sp = np.where(pos < 2, 0, np.where(pos & 1, odd_skip, even_skip))
            skip = np.where(sp > 0, g_seq[np.maximum(group_start + sp - 1, 0)], 0)
            entries[g_seq - 1, 0] = pos
            entries[g_seq - 1, 1] = prev
            entries[g_seq - 1, 2] = skip
            is_last = np.ones(count, dtype=bool)
            is_last[:-1] = start[1:]
            for h, s, p in zip(g_scope[is_last].tolist(), g_seq[is_last].tolist(), pos[is_last].tolist(), strict=True):
                heads.append((int(h), int(s)))
                self.scopes[int(h)] = _Scope(int(s), int(p), -1)
        self.map[POSITIONS_HEADER_SIZE:POSITIONS_HEADER_SIZE + visible * POSITION_SIZE] = entries.tobytes()
        del recs, entries
        capacity = SCOPE_HEADS_MIN_CAPACITY
        while capacity < 2 * (len(heads) + 1):
            capacity *= 4
        self._new_heads(capacity, heads)
        self._set_through(visible)

    # -- the commit path --------------------------------------------------------------------
    def _scope(self, h: int) -> _Scope:
        """The writer's state of scope hash ``h``: remembered, else read from the table."""
        scope = self.scopes.get(h)
        if scope is not None:
            return scope
        head = pos = 0
        slot = -1
        for candidate in delta_candidates(self.heads_map, self.heads_cap, h):
            head = candidate
            pos = self.entry(candidate)[0]
            break
        if head:
            slot = self._slot_of(h, head)
        scope = self.scopes[h] = _Scope(head, pos, slot)
        return scope

    def _slot_of(self, h: int, seq: int) -> int:
        mask = self.heads_cap - 1
        i = h & mask
        for _ in range(self.heads_cap):
            off = TABLE_HEADER_SIZE + i * DELTA_SLOT_SIZE
            slot_h, got = struct.unpack_from("<QQ", self.heads_map, off)
            if slot_h == h and got == seq:
                return off
            if slot_h == 0:
                return -1
            i = (i + 1) & mask
        return -1

    def entry(self, seq: int) -> tuple[int, int, int]:
        got: tuple[int, int, int] = POSITION.unpack_from(self.map, position_offset(seq))
        return got

    def _assign(self, h: int, seq: int) -> None:
        """The entry of ``seq``, next in scope hash ``h`` (positions.idx holds room for it:
        ``_ensure`` ran for the group). The per-event hot path of the commit: kept flat."""
        scope = self.scopes.get(h) or self._scope(h)
        p = scope.pos + 1
        sp = skip_position(p)
        skip = (scope.skips.get(sp, 0) or walk_to_position(self.entry, scope.head, scope.pos, sp)) if sp else 0
        _pack_entry(self.map, position_offset(seq), p, scope.head, skip)
        if scope.slot >= 0:
            self.heads_map[scope.slot + 8:scope.slot + 16] = _u64.pack(seq)
        else:
            if 2 * (self.heads_count + 1) > self.heads_cap:
                self._grow_heads()
            scope.slot = delta_upsert(self.heads_map, self.heads_cap, h, seq, scope.head or -1)
            self.heads_count += 1
        scope.head, scope.pos = seq, p
        skips = scope.skips
        skips[p] = seq
        if len(skips) > 4 * p.bit_length() + 16:
            keep = _keep(p)
            scope.skips = {k: v for k, v in skips.items() if k in keep}

    def _grow_heads(self) -> None:
        heads = []
        for i in range(self.heads_cap):
            h, seq = struct.unpack_from("<QQ", self.heads_map, TABLE_HEADER_SIZE + i * DELTA_SLOT_SIZE)
            if h:
                heads.append((h, seq))
        self._new_heads(self.heads_cap * 4, heads)

    def index(self, metas: Sequence[EventMeta]) -> None:
        """Positions for a published group's events (a fenced one waits for its reveal)."""
        if self.map is None:
            return
        commit = False
        self._ensure(metas[-1][M_SEQ])
        assign = self._assign
        for meta in metas:
            if not meta[M_FLAGS] & FLAG_FENCED:
                assign(meta[M_SCOPE_HASH], meta[M_SEQ])
                commit = commit or meta[M_KIND] == FENCE_COMMIT_KIND
        if commit:
            self.pending_reveal = True
        if not self.pending_reveal:
            self._set_through(metas[-1][M_SEQ])

    def reveal(self, ranges: Sequence[Sequence[int]], record: Any, last_seq: int) -> None:
        """Positions for the events a fence commit reveals, in the order of its ranges
        (``record(seq)`` is the index record of a sequence; ``last_seq`` the newest
        published sequence)."""
        if self.map is None:
            return
        for first, last in ranges:
            self._ensure(int(last))
            for seq in range(int(first), int(last) + 1):
                rec = record(seq)
                if rec[R_FLAGS] & FLAG_FENCED and not self.entry(seq)[0]:
                    self._assign(rec[R_SCOPE_HASH], seq)
        self.pending_reveal = False
        self._set_through(last_seq)
