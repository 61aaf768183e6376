"""``fences.tbl`` upkeep: the revealed sequence ranges of committed visibility fences.

Owns: the writer's list of revealed ranges and the file readers find them in: rebuilt
whole at open from the log's fence chain (every FENCE_COMMIT event), then appended to in
place as fences commit (the ranges first, the header's count last, so a reader never
counts a range that is not there yet).
Invariants: the FENCE_COMMIT events are the authority; this file is derived data that
only lets readers find out fast, and it is never fsynced (open rebuilds it).
Every OS call goes through ``osio.Disk``. Must not import the engine, the read side or
any process role.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from .._format.directory import FENCES_FILE
from .._format.fences import encode_fences, encode_fences_header, encode_ranges, range_offset
from .._values import CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT, Event
from .osio import Disk


class FenceTable:
    """The revealed ranges and fences.tbl of one data directory."""

    def __init__(self, disk: Disk, idx_dir: str) -> None:
        self.disk = disk
        self.path = os.path.join(idx_dir, FENCES_FILE)
        self.revealed: list[tuple[int, int]] = []  # (first, last) sequences, in commit order

    def rebuild(self, fence_chain: Iterable[Event]) -> None:
        """Rebuild from the fence entity's events, into a fresh file replaced by rename."""
        ranges: list[tuple[int, int]] = []
        for ev in fence_chain:
            if ev.kind == (CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT):
                ranges += [(int(a), int(b)) for a, b in ev.payload["ranges"]]
        self.revealed = ranges
        self.disk.write_file_atomic(self.path, encode_fences(ranges))

    def reveal(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Append the ranges of a committed fence."""
        d = self.disk
        fd = d.open(self.path, os.O_RDWR)
        try:
            added = [(int(a), int(b)) for a, b in ranges]
            d.pwrite(fd, encode_ranges(added), range_offset(len(self.revealed)), self.path)
            self.revealed = self.revealed + added
            d.pwrite(fd, encode_fences_header(len(self.revealed)), 0, self.path)
        finally:
            d.close_quietly(fd, self.path)  # derived data, never fsynced: a close has nothing to add
