"""Offline integrity check of a whole data directory: ``bp.verify(data_dir)``.

Owns: reading every segment read-only and reporting every problem with segment, offset
and what is wrong: checksums, the cumulative hash chain of each entity, sequence
continuity, seal footers, and agreement of ``records.idx`` with the log. Never writes,
never takes the writer's lock (it may run beside a live writer; the unpublished tail of
the active segment is then not a problem). Must not import the engine, writer, client.
"""

from __future__ import annotations

import mmap
import os
from typing import NamedTuple

from .._errors import BatpakError
from .._format.checkpoint import decode_checkpoint
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
from .._format.frame import FLAG_FENCED, ZERO_HASH
from .._format.meta import decode_meta, inherited_of
from .._format.record import RECORD, record_offset
from .._format.segment import SEG_HEADER_SIZE, SEG_TRAILER_SIZE, sealed_verdict, segment_verdict
from .._native import scan_segment  # the active codec: C when built, else _format's
from .._values import Problem, VerifyReport
from .reader import map_readonly, unborn_segment


class _Head(NamedTuple):
    clock: int
    event_hash: bytes
    seq: int


def verify(data_dir: str | os.PathLike[str]) -> VerifyReport:
    """Check everything in ``data_dir`` that can be checked; never raises for damage."""
    root = os.fspath(data_dir)
    report = VerifyReport()
    meta_path = os.path.join(root, META_FILE)
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
        store_id = decode_meta(raw, meta_path)
        inherited = inherited_of(raw, meta_path)  # a fork's segments of its parent (FORMAT.md §8.1)
    except FileNotFoundError:
        report.problems.append(Problem(META_FILE, 0, "store.meta is missing"))
        return report
    except BatpakError as exc:
        report.problems.append(Problem(META_FILE, 0, str(exc)))
        return report
    # the durable floor, read before the segments: a live writer only moves it forward
    durable = _checkpoint_seq(os.path.join(root, CHECKPOINT_FILE), report)
    seg_dir = os.path.join(root, SEGMENT_DIR)
    try:
        names = [segment_name(sid) for sid in sorted(filter(None, map(parse_segment_name, os.listdir(seg_dir))))]
    except FileNotFoundError:
        names = []
    records = map_readonly(os.path.join(root, INDEX_DIR, RECORDS_FILE))
    heads: dict[bytes, _Head] = {}
    next_seq = 1
    end_name, end_offset = CHECKPOINT_FILE, 0  # where the log ends
    if names and unborn_segment(os.path.join(seg_dir, names[-1])):
        names.pop()  # being created (or a crash cut its creation short): it holds no event
    for pos, name in enumerate(names):
        path = os.path.join(seg_dir, name)
        report.segments_checked += 1
        m = map_readonly(path)
        if m is None:
            report.problems.append(Problem(name, 0, "segment is empty"))
            continue
        try:
            next_seq, end_offset = _verify_segment(name, m, store_id, next_seq, pos == len(names) - 1,
                                                   heads, records, report, inherited)
            end_name = name
        except BatpakError as exc:
            report.problems.append(Problem(name, getattr(exc, "offset", 0), str(exc)))
        finally:
            m.close()
    if records is not None:
        records.close()
    if next_seq - 1 < durable:
        report.problems.append(Problem(end_name, end_offset, f"log ends at sequence {next_seq - 1}, but the "
                                       f"checkpoint says sequence {durable} was durable"))
    return report


def _checkpoint_seq(path: str, report: VerifyReport) -> int:
    """The durable floor the checkpoint promises; a damaged or newer checkpoint is a
    problem (the writer refuses to open over it) and gives no floor."""
    try:
        with open(path, "rb") as f:
            ckpt = decode_checkpoint(f.read())
    except FileNotFoundError:
        return 0
    except BatpakError as exc:
        report.problems.append(Problem(CHECKPOINT_FILE, 0, str(exc)))
        return 0
    if ckpt is None:
        report.problems.append(Problem(CHECKPOINT_FILE, 0, "the durable checkpoint is damaged"))
        return 0
    return ckpt[0]


def _verify_segment(
    name: str, m: mmap.mmap, store_id: bytes, next_seq: int, is_last: bool,
    heads: dict[bytes, _Head], records: mmap.mmap | None, report: VerifyReport,
    inherited: tuple[tuple[bytes, int], ...] = (),
) -> tuple[int, int]:
    """Check one segment; return the next sequence and the offset where its committed
    frames end."""
    size = len(m)
    verdict = segment_verdict(name, m[:SEG_HEADER_SIZE], m[size - SEG_TRAILER_SIZE:], size, store_id=store_id,
                              first_seq=next_seq, unsealed_ok=is_last, inherited=inherited)
    header, trailer, limit = verdict.header, verdict.trailer, verdict.frames_end
    report.problems.extend(Problem(name, p.offset, p.reason) for p in verdict.problems)
    next_seq = header.first_seq  # a gap or overlap is reported above; check the rest from where it says
    footer_records: bytes | None = None
    if trailer is not None:
        # the footer is read only where the trailer points inside the segment (else said above)
        sealed = sealed_verdict(name, m, trailer, footer=limit == trailer.footer_offset)
        report.problems.extend(Problem(name, p.offset, p.reason) for p in sealed.problems)
        footer_records = sealed.records
    scan = scan_segment(m, SEG_HEADER_SIZE, limit, next_seq, check_hash=True)
    for off, what in scan.hash_errors:
        report.problems.append(Problem(name, off, what))
    frames = scan.frames
    if trailer is not None:
        if scan.stop_offset != limit or scan.committed != len(frames):
            report.problems.append(Problem(name, scan.stop_offset, f"sealed segment frames end early: {scan.stop_reason}"))
    else:
        if scan.damage_mid_log:
            report.problems.append(Problem(name, scan.stop_offset, f"damaged frame inside the log: {scan.stop_reason}"))
        # otherwise what follows the last commit is an unpublished or torn tail: recovery cuts it
        frames = frames[: scan.committed]
    derived = bytearray()
    for f in frames:
        prev = heads.get(f.entity)
        if prev is None:
            if f.clock != 1 or f.prev_hash != ZERO_HASH:
                report.problems.append(Problem(name, f.offset, f"entity {f.entity!r} starts at clock {f.clock} "
                                               "or links to a predecessor that does not exist"))
            prev_seq = 0
        else:
            if f.clock != prev.clock + 1:
                report.problems.append(Problem(name, f.offset, f"entity {f.entity!r} clock {f.clock} follows {prev.clock}"))
            if f.prev_hash != prev.event_hash:
                report.problems.append(Problem(name, f.offset, f"hash chain of entity {f.entity!r} broken at sequence {f.seq}"))
            prev_seq = prev.seq
        heads[f.entity] = _Head(f.clock, f.event_hash, f.seq)
        derived += RECORD.pack(f.clock, header.segment_id, f.offset, f.frame_len, f.kind, f.flags,
                                 name_hash(f.entity), name_hash(f.scope), prev_seq, f.idem_hash)
    report.events_checked += len(frames)
    report.events_fenced += sum(1 for f in frames if f.flags & FLAG_FENCED)
    if footer_records is not None and footer_records != bytes(derived):
        report.problems.append(Problem(name, limit, "seal footer does not match the segment's frames"))
    if records is not None and frames:
        start = record_offset(next_seq)
        if records[start:start + len(derived)] != bytes(derived):
            report.problems.append(Problem(RECORDS_FILE, start, f"index records of {name} do not match the log"))
    end = frames[-1].offset + frames[-1].frame_len if frames else SEG_HEADER_SIZE
    return next_seq + len(frames), end
