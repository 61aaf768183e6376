"""Segment files: the active segment's state and each file's life, from creation to seal.

Owns: ``ActiveSegment`` (the file frames are written to: its descriptor and the written,
published and checksummed ends); listing the segments of a directory; creating one
(preallocated, header fsynced, directory fsynced); sealing one (index footer, trailer
with the whole-file checksum, each fsynced in turn); the mechanics of rotation (the next segment after
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
SECTOR = 512  # bytes: the smallest write a disk makes whole or not at all (what a power cut can tear)
ZERO_CHUNK = 1 << 20  # bytes checked or checksummed at a time when a range must be (or reads as) zeros


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

    def __init__(self, disk: Disk, seg_dir: str, store_id: bytes, inherited: tuple[tuple[bytes, int], ...] = ()) -> None:
        self.disk = disk
        self.dir = seg_dir
        self.store_id = store_id
        self.inherited = inherited  # a fork's inherited segments (FORMAT.md §8.1)

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
        """Write the index footer (``records``: one per frame) of a full segment and
        ``fsync`` it, then its trailer and ``fsync`` again (FORMAT.md §3.6): a power cut
        can leave a footer without its trailer (not sealed: the footer is cut as a torn
        tail) but never a trailer whose footer is not on disk. Returns its stat as
        sealed (for the checksum stamps)."""
        d = self.disk
        footer = encode_footer(seg.first_seq, records)
        d.pwrite(seg.fd, footer, seg.end, seg.path)
        fsync(seg.fd, seg.path)
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
                                  unsealed_ok=unsealed_ok, inherited=self.inherited)
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

    def seal_matches(self, seg: OpenedSegment, trailer: Trailer, first_seq: int, records: bytes) -> bool:
        """Whether ``trailer`` is the seal of the frames whose index records are
        ``records``, torn by a power cut and nothing else: the footer they make has the
        trailer's length; each sector from the footer to the trailer reads as that seal
        wrote it or as zeros (not written yet: the space past the frames is zero until the
        seal); and the whole-file checksum of the finished seal is the trailer's. A flipped
        bit is neither what was written nor zeros, so it stays corruption."""
        footer = encode_footer(first_seq, records)
        start, limit = trailer.footer_offset, seg.size - SEG_TRAILER_SIZE
        if len(footer) != trailer.footer_len or start + len(footer) > limit:
            return False
        mm = self.disk.map_shared(seg.fd, seg.size, seg.path, writable=False)
        body = memoryview(mm)
        try:
            return (_written_or_zero(body, start, footer) and _all_zero(body, start + len(footer), limit)
                    and _crc_with_zeros(zlib.crc32(footer, zlib.crc32(body[:start])), limit - start - len(footer))
                    == trailer.segment_crc)
        finally:
            body.release()
            mm.close()

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


def _written_or_zero(body: memoryview, start: int, data: bytes) -> bool:
    """Each sector of ``body[start:start+len(data)]`` holds ``data``'s bytes or zeros."""
    end = start + len(data)
    off = start
    while off < end:
        nxt = min(end, (off // SECTOR + 1) * SECTOR)
        got = bytes(body[off:nxt])
        if got != data[off - start:nxt - start] and got.count(0) != len(got):
            return False
        off = nxt
    return True


def _all_zero(body: memoryview, start: int, end: int) -> bool:
    for off in range(start, end, ZERO_CHUNK):
        chunk = bytes(body[off:min(end, off + ZERO_CHUNK)])
        if chunk.count(0) != len(chunk):
            return False
    return True


def _crc_with_zeros(crc: int, zeros: int) -> int:
    """``crc`` continued over ``zeros`` zero bytes."""
    block = bytes(min(ZERO_CHUNK, max(zeros, 0)))
    while zeros > 0:
        n = min(zeros, len(block))
        crc = zlib.crc32(memoryview(block)[:n], crc)
        zeros -= n
    return crc
