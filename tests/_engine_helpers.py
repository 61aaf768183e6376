"""Helpers shared by the engine's fault, recovery and property tests.

Everything here works on real files: copying a data directory, flipping a bit at an
offset, zeroing a range in place (the file keeps its size, as preallocated segments do),
and reading the frame layout of a segment back with the pure recovery scan.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from typing import NamedTuple

import batpak_mp as bp
from batpak_mp._format.directory import SEGMENT_DIR, parse_segment_name, segment_name
from batpak_mp._format.frame import FLAG_COMMIT_END, HASHED_START
from batpak_mp._format.scan import ScannedFrame, scan_segment
from batpak_mp._format.segment import (
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    SegmentHeader,
    Trailer,
    decode_segment_header,
    decode_trailer,
)


def segment_path(data_dir: str, segment_id: int) -> str:
    return os.path.join(data_dir, SEGMENT_DIR, segment_name(segment_id))


def segment_ids(data_dir: str) -> list[int]:
    names = os.listdir(os.path.join(data_dir, SEGMENT_DIR))
    return sorted(sid for sid in map(parse_segment_name, names) if sid is not None)


_CHUNK = 1 << 16


def _copy_sparse(src: str, dst: str) -> None:
    """Copy a file, leaving all-zero chunks as holes (index files are mostly empty)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        zeros = bytes(_CHUNK)
        pos = 0
        while pos < size:
            chunk = fin.read(_CHUNK)
            if chunk != zeros[: len(chunk)]:
                fout.seek(pos)
                fout.write(chunk)
            pos += len(chunk)


def copy_store(src: str, dst: str) -> str:
    """A byte-for-byte copy of a closed data directory (every file keeps its size)."""
    shutil.copytree(src, dst, copy_function=_copy_sparse)
    return dst


def flip_bit(path: str, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ (1 << bit)]))


def zero_range(path: str, start: int, end: int) -> None:
    """Zero [start, end) in place: a torn write of a preallocated file."""
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


def set_frame_field(frame: bytes | bytearray, fmt: str, offset: int, value: int) -> bytes:
    """Overwrite a header field of an encoded frame and recompute its CRC, so only
    that field is "wrong"."""
    buf = bytearray(frame)
    struct.pack_into(fmt, buf, offset, value)
    struct.pack_into("<I", buf, 4, zlib.crc32(memoryview(buf)[HASHED_START:]))
    return bytes(buf)


class SegmentLayout(NamedTuple):
    header: SegmentHeader
    size: int
    frames: list[ScannedFrame]  # committed frames, in order
    trailer: Trailer | None

    @property
    def end(self) -> int:
        """Offset just past the last committed frame."""
        return self.frames[-1].offset + self.frames[-1].frame_len if self.frames else SEG_HEADER_SIZE

    def commits(self) -> list[list[ScannedFrame]]:
        """The frames grouped by commit (each group ends with a COMMIT_END frame)."""
        out: list[list[ScannedFrame]] = []
        cur: list[ScannedFrame] = []
        for f in self.frames:
            cur.append(f)
            if f.flags & FLAG_COMMIT_END:
                out.append(cur)
                cur = []
        assert not cur, "a committed frame list ends with COMMIT_END"
        return out


def read_layout(path: str) -> SegmentLayout:
    with open(path, "rb") as f:
        data = f.read()
    header = decode_segment_header(data[: SEG_HEADER_SIZE], path)
    trailer = decode_trailer(data[-SEG_TRAILER_SIZE:])
    limit = trailer.footer_offset if trailer else len(data) - SEG_TRAILER_SIZE
    scan = scan_segment(data, SEG_HEADER_SIZE, limit, header.first_seq, check_hash=True)
    assert not scan.hash_errors
    return SegmentLayout(header, len(data), scan.frames[: scan.committed], trailer)


def all_events(engine: bp.Engine) -> list[bp.Event]:
    out: list[bp.Event] = []
    after = 0
    while True:
        page = engine.query_after(after, limit=500)
        if not page.events:
            return out
        out += page.events
        after = page.next_after


def assert_holds_exactly(engine: bp.Engine, receipts: list[bp.Receipt]) -> None:
    """The store holds exactly the acknowledged events, in order, and each receipt
    matches its stored event."""
    events = all_events(engine)
    assert [e.event_id for e in events] == [r.event_id for r in receipts]
    assert engine.visible == len(receipts)
    for r in receipts:
        assert engine.verify_receipt(r), r
