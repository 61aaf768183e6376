"""Segment files: the active segment's state and each file's life, from creation to seal.

Owns: ``ActiveSegment`` (the file frames are written to: its descriptor and the written,
published and checksummed ends); listing the segments of a directory; creating one
(preallocated, header fsynced, directory fsynced); sealing one (index footer, trailer
with the whole-file checksum, fsync); the mechanics of rotation (the next segment after
a sealed one, retiring the sealed one's descriptor); dropping a newest file whose header
never landed; asking ``_format.segment``'s one rule whether a segment is acceptable
(``segment_verdict``, ``sealed_verdict``: the rule verify applies too); checksums.
Invariants: a segment is never truncated or shrunk (readers may map it); nothing is
written after its seal; a created segment's header is on disk before any frame goes in.
Every OS call goes through ``osio.Disk``. Must not import the engine, the index files,
recovery, the read side or any process role.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .._format.directory import parse_segment_name, segment_name
from .._format.segment import (
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    SegmentVerdict,
    Trailer,
    encode_footer,
    encode_segment_header,
    encode_trailer,
    sealed_verdict,
    segment_verdict,
)
from .osio import Disk

UNBORN_CHUNK = 1 << 20  # bytes read per call when checking that a newest segment is all zeros


@dataclass
class ActiveSegment:
    """The segment frames are written to (or, at recovery, one being looked at)."""

    segment_id: int
    first_seq: int
    size: int
    fd: int
    path: str
    end: int  # offset just past the last frame written (published or pending)
    count: int  # frames written in it
    crc: int = 0  # crc32 of the published bytes [64, pub_end): the checkpoint carries it
    sealed: bool = False  # footer and trailer written: nothing more may go in (a failed rotation retries)
    pub_end: int = -1  # offset just past the last published frame (-1: same as end)
    write_crc: int = -1  # crc32 of the written bytes [64, end) (-1: same as crc)

    def __post_init__(self) -> None:
        if self.pub_end < 0:
            self.pub_end = self.end
        if self.write_crc < 0:
            self.write_crc = self.crc

    @property
    def next_seq(self) -> int:
        """The sequence the next frame written here gets."""
        return self.first_seq + self.count


class OpenedSegment(NamedTuple):
    """A segment file opened for a look (the opener closes ``fd``)."""

    fd: int
    path: str
    stat: os.stat_result

    @property
    def size(self) -> int:
        return self.stat.st_size


class SegmentFiles:
    """The segment files of one data directory."""

    def __init__(self, disk: Disk, seg_dir: str, store_id: bytes) -> None:
        self.disk = disk
        self.dir = seg_dir
        self.store_id = store_id

    def path(self, segment_id: int) -> str:
        return os.path.join(self.dir, segment_name(segment_id))

    def ids(self) -> list[int]:
        """Segment ids in the directory, oldest first (other files are ignored)."""
        return sorted(sid for sid in map(parse_segment_name, self.disk.listdir(self.dir)) if sid is not None)

    # -- creation, seal, rotation ---------------------------------------------------------
    def create(self, segment_id: int, first_seq: int, size: int) -> ActiveSegment:
        """A new preallocated segment whose header (and directory entry) is on disk."""
        d = self.disk
        path = self.path(segment_id)
        fd = d.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            d.allocate(fd, size, path)
            d.pwrite(fd, encode_segment_header(segment_id, self.store_id, first_seq, size), 0, path)
            d.fsync(fd, path)
            d.fsync_dir(self.dir)
        except BaseException:
            d.close_quietly(fd, path)
            d.unlink(path)
            raise
        return ActiveSegment(segment_id, first_seq, size, fd, path, SEG_HEADER_SIZE, 0)

    def seal(self, seg: ActiveSegment, records: bytes, fsync: Callable[[int, str], None]) -> os.stat_result:
        """Write the index footer (``records``: one per frame) and the trailer of a full
        segment, then ``fsync`` it. Returns its stat as sealed (for the checksum stamps)."""
        d = self.disk
        footer = encode_footer(seg.first_seq, records)
        d.pwrite(seg.fd, footer, seg.end, seg.path)
        crc = self.checksum(seg.fd, seg.path, seg.size)
        d.pwrite(seg.fd, encode_trailer(seg.end, len(footer), crc), seg.size - SEG_TRAILER_SIZE, seg.path)
        fsync(seg.fd, seg.path)
        seg.sealed = True
        return d.fstat(seg.fd, seg.path)

    def next_after(self, sealed: ActiveSegment, size: int) -> ActiveSegment:
        """Rotation: the segment that follows ``sealed``, created with ``size`` bytes."""
        return self.create(sealed.segment_id + 1, sealed.next_seq, size)

    def retire(self, seg: ActiveSegment) -> None:
        """Close a segment that is sealed and fsynced (nothing of it can be lost now, so
        a failed close has nothing to report)."""
        self.disk.close_quietly(seg.fd, seg.path)

    def drop_unborn(self, segment_id: int) -> bool:
        """A kill while a segment was being created (rotation) can leave the newest file
        empty or all zeros: its header is fsynced before any frame goes in, so it holds no
        event. Remove it (True); a file with any non-zero byte is left to the checks."""
        d = self.disk
        path = self.path(segment_id)
        fd = d.open(path, os.O_RDONLY)
        try:
            size = d.fstat(fd, path).st_size
            off = 0
            while off < size:
                chunk = d.pread(fd, min(UNBORN_CHUNK, size - off), off, path)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):
                    return False
                off += len(chunk)
        finally:
            d.close_quietly(fd, path)
        d.unlink(path)
        d.fsync_dir(self.dir)
        return True

    # -- reading ends and checksums -------------------------------------------------------
    def open(self, segment_id: int, flags: int) -> OpenedSegment:
        """Open a segment and stat it."""
        d = self.disk
        path = self.path(segment_id)
        fd = d.open(path, flags)
        try:
            return OpenedSegment(fd, path, d.fstat(fd, path))
        except BaseException:
            d.close_quietly(fd, path)
            raise

    def judge(self, seg: OpenedSegment, *, first_seq: int | None, unsealed_ok: bool = True) -> SegmentVerdict:
        """The one rule of whether a segment is acceptable (``segment_verdict``, as
        verify applies it): this store's, starting at ``first_seq`` (None: not checked),
        a trailer pointing inside it, sealed unless ``unsealed_ok``. Raises the first
        problem; returns its header and trailer (None: not sealed)."""
        d = self.disk
        head = d.pread(seg.fd, SEG_HEADER_SIZE, 0, seg.path)
        tail = d.pread(seg.fd, SEG_TRAILER_SIZE, seg.size - SEG_TRAILER_SIZE, seg.path)
        verdict = segment_verdict(seg.path, head, tail, seg.size, store_id=self.store_id, first_seq=first_seq,
                                  unsealed_ok=unsealed_ok)
        verdict.check()
        return verdict

    def check_sealed(self, seg: OpenedSegment, trailer: Trailer, *, footer: bool) -> bytes:
        """Check a sealed segment's whole-file checksum (``sealed_verdict``); with
        ``footer``, its footer too, and return the index records it holds (else b"")."""
        body = self.disk.map_shared(seg.fd, seg.size, seg.path, writable=False)
        try:
            records = sealed_verdict(seg.path, body, trailer, footer=footer).check()
        finally:
            body.close()
        return records or b""

    def checksum(self, fd: int, path: str, size: int) -> int:
        """crc32 of a segment file of ``size`` bytes, all but its trailer."""
        body = self.disk.map_shared(fd, size, path, writable=False)
        try:
            return zlib.crc32(memoryview(body)[: size - SEG_TRAILER_SIZE])
        finally:
            body.close()

    def frames_crc(self, fd: int, path: str, end: int) -> int:
        """crc32 of the frames [SEG_HEADER_SIZE, end) of a segment."""
        if end <= SEG_HEADER_SIZE:
            return 0
        mm = self.disk.map_shared(fd, end, path, writable=False)
        try:
            return zlib.crc32(memoryview(mm)[SEG_HEADER_SIZE:end])
        finally:
            mm.close()
