"""``fences.tbl`` (docs/FORMAT.md §14): the revealed sequence ranges of committed
visibility fences, derived from the log's FENCE_COMMIT events.

Owns: its header and range layout, with an encoder and a total decoder. Pure: no I/O.
"""

from __future__ import annotations

import struct

from .directory import FORMAT_VERSION

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
