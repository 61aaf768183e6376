"""``fences.tbl`` (docs/FORMAT.md §14): the revealed sequence ranges of committed
visibility fences, derived from the log's FENCE_COMMIT events.

Owns: its header and range layout, with an encoder, and ``commit_ranges``: the ranges
the fence chain's FENCE_COMMIT events reveal (what the file is rebuilt from, and what a
reader without the file uses). Pure: no I/O. Must not import os, mmap, posix_ipc or
anything with a clock.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .._errors import CorruptSegment
from .._values import CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT, Event
from .directory import FENCES_FILE, FORMAT_VERSION

FENCES_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, count of ranges
FENCES_MAGIC = b"BPMPFNCS"
FENCE_RANGE = struct.Struct("<QQ")  # first, last (inclusive)


def encode_fences(ranges: list[tuple[int, int]]) -> bytes:
    """The whole file for ``ranges`` (header, then one (first, last) pair each)."""
    return encode_fences_header(len(ranges)) + encode_ranges(ranges)


def encode_fences_header(count: int) -> bytes:
    return FENCES_HEADER.pack(FENCES_MAGIC, FORMAT_VERSION, 0, count)


def encode_ranges(ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(FENCE_RANGE.pack(a, b) for a, b in ranges)


def range_offset(index: int) -> int:
    """Byte offset of range number ``index`` in the file."""
    return FENCES_HEADER.size + index * FENCE_RANGE.size


def commit_ranges(chain: Iterable[Event]) -> list[tuple[int, int]]:
    """Every (first, last) range revealed by the FENCE_COMMIT events among ``chain`` (the
    events of the fence entity, oldest first), in commit order. A commit event whose
    payload has no readable ranges is ``CorruptSegment``."""
    ranges: list[tuple[int, int]] = []
    for ev in chain:
        if ev.kind != (CATEGORY_SYSTEM, SYSTEM_FENCE_COMMIT):
            continue
        try:
            ranges += [(int(a), int(b)) for a, b in ev.payload["ranges"]]
        except Exception as exc:  # a payload the writer never writes: report where it is
            raise CorruptSegment(FENCES_FILE, 0, f"fence commit at sequence {ev.global_sequence} has no "
                                 f"readable ranges ({exc!r})") from None
    return ranges
