"""The checkpoint, ``durable.ckpt`` (docs/FORMAT.md §7): the durable floor recovery holds
the log to, and what a same-boot restart needs to trust the index files.

Owns: its layout, encoder and decoder. Pure: no I/O. Must not import os, mmap,
posix_ipc or anything with a clock.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from .._errors import FutureFormat
from .directory import CHECKPOINT_FILE, FORMAT_VERSION

# magic, version, durable seq, active segment, end offset of the visible log, visible seq,
# boot id, delta generation, base segment, crc32 of the active segment's frames, crc
CHECKPOINT = struct.Struct("<8sIQQQQ16sQQII")
CHECKPOINT_MAGIC = b"BPMPCKPT"


class Checkpoint(NamedTuple):
    """What the writer last persisted about its state. ``seq`` is the durable floor
    recovery holds the log to; the rest lets a restart in the same boot (page cache
    intact) trust the index files through ``visible`` and scan only the tail."""

    seq: int
    segment_id: int
    end_offset: int
    visible: int = 0
    boot_id: bytes = bytes(16)
    delta_gen: int = 0
    base_segment: int = 0
    frames_crc: int = 0  # crc32 of the active segment's bytes [64, end_offset)


def encode_checkpoint(seq: int, segment_id: int, end_offset: int, visible: int = 0, boot_id: bytes = bytes(16),
                      delta_gen: int = 0, base_segment: int = 0, frames_crc: int = 0) -> bytes:
    head = CHECKPOINT.pack(CHECKPOINT_MAGIC, FORMAT_VERSION, seq, segment_id, end_offset, visible, boot_id,
                           delta_gen, base_segment, frames_crc, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def decode_checkpoint(data: bytes) -> Checkpoint | None:
    """The checkpoint, or None when the bytes are not a whole checkpoint (the engine
    refuses to open over a damaged one: it would lower the durable floor)."""
    if len(data) != CHECKPOINT.size:
        return None
    magic, version, seq, segment_id, end_offset, visible, boot_id, delta_gen, base_segment, frames_crc, crc = \
        CHECKPOINT.unpack(data)
    if magic != CHECKPOINT_MAGIC or zlib.crc32(data[:-4]) != crc:
        return None
    if version > FORMAT_VERSION:
        raise FutureFormat(CHECKPOINT_FILE, version, FORMAT_VERSION)
    return Checkpoint(seq, segment_id, end_offset, visible, boot_id, delta_gen, base_segment, frames_crc)
