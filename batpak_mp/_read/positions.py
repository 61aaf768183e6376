"""The read side of the per-scope positions: ``positions.idx`` and ``scopeheads.idx``
mapped read-only (docs/FORMAT.md §12.4; the writer's side is ``_storage/positions``).

Owns: mapping both files (again when positions.idx grew, or when the writer replaced
scopeheads.idx: it marks the old file moved first), an entry by sequence, and the
candidate heads of a scope hash. Nothing here is trusted: ``_read/queries`` checks every
entry against the visible frontier, the fences and the record's scope hash.
Invariants: a file is never mapped writable here; a missing file reads as "no positions"
(a store last served before index layout 2: its writer builds them at its next open).
Must not import the engine, writer or client.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable

from .._format.tables import (
    DELTA_SLOT_SIZE,
    POSITION,
    POSITION_SIZE,
    POSITIONS_FILE,
    POSITIONS_HEADER_SIZE,
    SCOPE_HEADS_FILE,
    SCOPE_HEADS_MAGIC,
    SCOPE_HEADS_MOVED_AT,
    TABLE_HEADER_SIZE,
    check_header,
    delta_candidates,
)

__all__ = ["ScopeMaps"]

_entry = POSITION.unpack_from
_u64 = struct.Struct("<Q")
NO_ENTRY = (0, 0, 0)


class ScopeMaps:
    """positions.idx and scopeheads.idx of one directory, mapped read-only."""

    def __init__(self, idx_dir: str, map_readonly: Callable[[str], mmap.mmap | None]) -> None:
        self._map = map_readonly  # the reader's (it imports this module, so it hands it in)
        self._positions_path = os.path.join(idx_dir, POSITIONS_FILE)
        self._heads_path = os.path.join(idx_dir, SCOPE_HEADS_FILE)
        self.positions: mmap.mmap | None = None
        self._heads: mmap.mmap | None = None
        self._heads_cap = 0

    def close(self) -> None:
        for m in (self.positions, self._heads):
            if m is not None:
                m.close()
        self.positions = self._heads = None

    def cover(self, seq: int) -> bool:
        """Map positions.idx so that it holds the entry of ``seq``; False when it does not."""
        m = self.positions
        if m is not None and len(m) >= POSITIONS_HEADER_SIZE + seq * POSITION_SIZE:
            return True
        if m is not None:
            m.close()
        self.positions = m = self._map(self._positions_path)
        return m is not None and len(m) >= POSITIONS_HEADER_SIZE + seq * POSITION_SIZE

    def entry(self, seq: int) -> tuple[int, int, int]:
        """(scope position, sequence of the previous position, skip sequence) of ``seq``;
        zeros when positions.idx does not hold it."""
        if seq < 1 or not self.cover(seq):
            return NO_ENTRY
        assert self.positions is not None
        got: tuple[int, int, int] = _entry(self.positions, POSITIONS_HEADER_SIZE + (seq - 1) * POSITION_SIZE)
        return got

    def position(self, seq: int) -> int | None:
        """The scope position of ``seq`` as far as the mapped file knows (the reader's hot
        path: no remapping here; ``Reader.refresh`` keeps the map current)."""
        m = self.positions
        off = POSITIONS_HEADER_SIZE + (seq - 1) * POSITION_SIZE
        if m is None or len(m) < off + POSITION_SIZE:
            return None
        return _u64.unpack_from(m, off)[0] or None

    def head_candidates(self, h: int) -> list[int]:
        """Sequences scopeheads.idx holds under scope hash ``h`` (several only on a collision)."""
        m = self._heads
        if m is None or _u64.unpack_from(m, SCOPE_HEADS_MOVED_AT)[0]:
            if m is not None:
                m.close()
            self._heads = m = self._map(self._heads_path)
            if m is None:
                return []
            self._heads_cap = check_header(m, SCOPE_HEADS_MAGIC, SCOPE_HEADS_FILE)[0]
            if len(m) < TABLE_HEADER_SIZE + self._heads_cap * DELTA_SLOT_SIZE:
                return []
        return list(delta_candidates(m, self._heads_cap, h))
