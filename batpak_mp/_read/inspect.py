"""Offline, read-only inspection of a data directory, behind ``batpak-mp inspect``.

Owns: a summary of what a data directory holds (``store.meta``, the checkpoint, the pid
in ``writer.lock``, every segment with its header, seal footer, frame count and where
its data ends, the index files) and the decoding of frames at any byte offset of a
segment, damaged ones included: every header field that can be read, whether the CRC
and the event hash match, the entity, scope and a payload preview. Also owns
``jsonable``, the JSON rendering of stored values (bytes as hex) the CLI shares.

Invariants: never writes and never takes a lock, not even a probe of ``writer.lock``
(a probe could make a writer that is starting at that moment fail with StoreLocked), so
it is safe beside a live writer; every file is mapped read-only and every read is
bounded by the file's size. Segment summaries read headers, footers and trailers; only
an unsealed segment is scanned frame by frame (its frames have no footer yet). Checking
checksums of whole segments and hash chains is ``bp.verify``'s job, not this module's.
Must not import the engine, the writer, the client or the supervisor.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import psutil

from .._errors import BatpakError, InvalidArgument
from .._format.checkpoint import decode_checkpoint
from .._format.directory import (
    CHECKPOINT_FILE,
    INDEX_DIR,
    LOCK_FILE,
    META_FILE,
    SEGMENT_DIR,
    parse_segment_name,
    segment_name,
)
from .._format.frame import (
    BAD,
    CHECKSUM_MISMATCH,
    EMPTY,
    HEADER_SIZE,
    LEN_CRC,
    MAX_FRAME,
    MIN_FRAME,
    NEED_MORE,
    OK,
    flag_names,
    frame_hash,
    header_fields,
    scan_frame,
)
from .._format.meta import decode_meta
from .._format.record import RECORD_SIZE
from .._format.scan import scan_segment
from .._format.segment import (
    FOOTER_HEAD,
    SEG_HEADER_SIZE,
    SEG_TRAILER_SIZE,
    Trailer,
    decode_footer,
    decode_trailer,
    footer_count,
    sealed_verdict,
    segment_verdict,
)
from .reader import map_readonly

__all__ = [
    "FrameInfo", "SegmentInfo", "checkpoint_seq", "decode_at", "flag_names", "frames_at", "is_data_dir", "jsonable",
    "payload_preview", "segment_ids", "segment_info", "segment_path", "summary",
]

PREVIEW_CHARS = 120  # payload previews are cut to this many characters (JSON text)


def jsonable(value: Any) -> Any:
    """``value`` (a decoded msgpack payload, or a document of ours) as plain JSON types:
    bytes become hex strings, tuples lists, keys that JSON cannot hold their ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            key = k if isinstance(k, (str, int, float, bool)) or k is None else jsonable(k)
            out[key if isinstance(key, (str, int, float, bool)) or key is None else str(key)] = jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return repr(value)  # msgpack ExtType, Timestamp, ...


def payload_preview(raw: bytes, limit: int = PREVIEW_CHARS) -> str:
    """A one-line preview of msgpack payload bytes (hex when they do not decode)."""
    try:
        text = json.dumps(jsonable(msgpack.unpackb(raw, raw=False, strict_map_key=False)), ensure_ascii=False)
    except Exception:  # any byte string must give a preview, never an error
        text = "<not msgpack> " + raw[:limit // 2].hex()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def checkpoint_seq(data_dir: str) -> int | None:
    """The sequence in ``durable.ckpt`` (None when it is missing or not valid)."""
    raw = _read(os.path.join(data_dir, CHECKPOINT_FILE))
    try:
        decoded = decode_checkpoint(raw) if raw is not None else None
    except BatpakError:
        return None
    return decoded[0] if decoded else None


def is_data_dir(data_dir: str) -> bool:
    """True when ``data_dir`` looks like a batpak-mp data directory (has store.meta)."""
    return os.path.isfile(os.path.join(data_dir, META_FILE))


# ---- segment summaries ------------------------------------------------------------------
@dataclass
class SegmentInfo:
    """What ``inspect`` says about one segment file."""

    segment_id: int
    file: str
    size: int
    state: str  # sealed | active | unsealed (only the newest may be) | unborn | unreadable
    first_seq: int | None = None
    last_seq: int | None = None  # None: no committed frame
    frames: int = 0  # committed frames (from the footer when sealed, else from a scan)
    data_end: int | None = None  # offset just past the last committed frame
    footer_offset: int | None = None
    footer_len: int | None = None
    footer_ok: bool | None = None
    tail: str | None = None  # unsealed only: what follows the committed frames
    problem: str | None = None


def segment_ids(data_dir: str) -> list[int]:
    seg_dir = os.path.join(data_dir, SEGMENT_DIR)
    try:
        names = os.listdir(seg_dir)
    except FileNotFoundError:
        return []
    return sorted(sid for sid in map(parse_segment_name, names) if sid is not None)


def segment_path(data_dir: str, segment_id: int) -> str:
    """The path of segment ``segment_id``; InvalidArgument when there is no such file."""
    path = os.path.join(data_dir, SEGMENT_DIR, segment_name(segment_id))
    if not os.path.isfile(path):
        ids = segment_ids(data_dir)
        have = f"segments {ids[0]}..{ids[-1]}" if ids else "no segments"
        raise InvalidArgument("segment", segment_id, f"no such segment in {data_dir!r} (it has {have})")
    return path


def segment_info(data_dir: str, segment_id: int, newest: bool) -> SegmentInfo:
    path = segment_path(data_dir, segment_id)
    name = segment_name(segment_id)
    m = map_readonly(path)
    if m is None:
        return SegmentInfo(segment_id, name, 0, "unborn", problem="empty file (a rotation was cut short)")
    try:
        return _segment_info(m, segment_id, name, newest)
    finally:
        m.close()


def _segment_info(m: mmap.mmap, segment_id: int, name: str, newest: bool) -> SegmentInfo:
    size = len(m)
    info = SegmentInfo(segment_id, name, size, "unreadable")
    if not any(m[:SEG_HEADER_SIZE + 8]):
        info.state, info.problem = "unborn", "no header (a rotation was cut short)"
        return info
    try:
        verdict = segment_verdict(name, m[:SEG_HEADER_SIZE], m[size - SEG_TRAILER_SIZE:], size, store_id=None,
                                  first_seq=None, unsealed_ok=newest, segment_id=segment_id)
    except BatpakError as exc:
        info.problem = str(exc)
        return info
    header, trailer = verdict.header, verdict.trailer
    info.first_seq = header.first_seq
    problems = [p.reason for p in verdict.problems]
    if trailer is not None:
        info.state = "sealed"
        info.footer_offset, info.footer_len = trailer.footer_offset, trailer.footer_len
        info.data_end = trailer.footer_offset
        inside = verdict.frames_end == trailer.footer_offset
        sealed = sealed_verdict(name, m, trailer, checksum=False, footer=inside)  # whole-file CRC: verify's job
        info.footer_ok = inside and not sealed.problems
        problems += [p.reason for p in sealed.problems]
        if sealed.records is not None:
            info.frames = len(sealed.records) // RECORD_SIZE
        elif inside:
            info.frames = footer_count(m[trailer.footer_offset:trailer.footer_offset + FOOTER_HEAD.size]) or 0
    else:
        info.state = "active" if newest else "unsealed"
        scan = scan_segment(m, SEG_HEADER_SIZE, verdict.frames_end, header.first_seq)
        info.frames = scan.committed
        info.data_end = scan.commit_end
        uncommitted = len(scan.frames) - scan.committed
        if scan.stop_status == EMPTY and not uncommitted:
            info.tail = "clean"
        else:
            what = f"{uncommitted} frame(s) without COMMIT_END, then " if uncommitted else ""
            info.tail = f"{what}{scan.stop_reason} at offset {scan.stop_offset}"
    info.problem = "; ".join(problems) or None
    if info.frames:
        info.last_seq = header.first_seq + info.frames - 1
    return info


def summary(data_dir: str) -> dict[str, Any]:
    """Everything ``inspect`` lists for a directory, as a JSON-ready document."""
    root = os.path.abspath(data_dir)
    doc: dict[str, Any] = {"data_dir": root}
    raw = _read(os.path.join(root, META_FILE))
    meta: dict[str, Any] = {"present": raw is not None}
    if raw is not None:
        try:
            decoded = json.loads(raw)
            meta.update({k: decoded.get(k) for k in ("format", "format_version", "store_id", "created_ms")})
            decode_meta(raw, META_FILE)
            meta["ok"] = True
        except (ValueError, AttributeError, BatpakError) as exc:
            meta["ok"], meta["problem"] = False, str(exc)
    doc["meta"] = meta
    ckpt_raw = _read(os.path.join(root, CHECKPOINT_FILE))
    ckpt: dict[str, Any] | None = None
    if ckpt_raw is not None:
        try:
            decoded_ckpt = decode_checkpoint(ckpt_raw)
        except BatpakError as exc:
            decoded_ckpt, ckpt = None, {"ok": False, "problem": str(exc)}
        if decoded_ckpt is not None:
            ckpt = {"ok": True, "seq": decoded_ckpt[0], "segment_id": decoded_ckpt[1], "end_offset": decoded_ckpt[2]}
        elif ckpt is None:
            ckpt = {"ok": False, "problem": "not a valid checkpoint (ignored by recovery)"}
    doc["checkpoint"] = ckpt
    lock_raw = _read(os.path.join(root, LOCK_FILE))
    pid = 0
    if lock_raw:
        try:
            pid = int(lock_raw.split(b"\n")[0] or 0)
        except ValueError:
            pid = 0
    doc["writer_lock"] = {"pid": pid or None, "alive": bool(pid) and psutil.pid_exists(pid)}
    ids = segment_ids(root)
    doc["segments"] = [asdict(segment_info(root, sid, pos == len(ids) - 1)) for pos, sid in enumerate(ids)]
    idx_dir = os.path.join(root, INDEX_DIR)
    try:
        names = sorted(os.listdir(idx_dir))
    except FileNotFoundError:
        names = []
    files = []
    for n in names:
        try:
            files.append({"name": n, "size": os.stat(os.path.join(idx_dir, n)).st_size})
        except FileNotFoundError:  # the writer pruned it while we listed
            continue
    doc["index_files"] = files
    return doc


# ---- frames at an offset ------------------------------------------------------------------
@dataclass
class FrameInfo:
    """One decoded position of a segment: a frame (maybe damaged), the seal footer, or
    the end of the written data."""

    offset: int
    what: str  # frame | footer | trailer | end
    status: str  # ok | bad | truncated | end | footer
    detail: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    next_offset: int | None = None  # where the next frame would start (None: stop here)


def frames_at(data_dir: str, segment_id: int, offset: int | None, count: int) -> dict[str, Any]:
    """Decode up to ``count`` positions of segment ``segment_id`` from ``offset``
    (default: the first frame), following frame lengths while they are sane."""
    if count < 1:
        raise InvalidArgument("count", count, "must be >= 1")
    path = segment_path(data_dir, segment_id)
    m = map_readonly(path)
    if m is None:
        raise InvalidArgument("segment", segment_id, "is an empty file")
    try:
        size = len(m)
        off = SEG_HEADER_SIZE if offset is None else offset
        if not 0 <= off < size:
            raise InvalidArgument("offset", off, f"is outside the segment (0..{size - 1})")
        trailer = decode_trailer(m[size - SEG_TRAILER_SIZE:]) if size >= SEG_TRAILER_SIZE else None
        footer_at = trailer.footer_offset if trailer is not None else None
        limit = size - SEG_TRAILER_SIZE if size >= SEG_TRAILER_SIZE else size
        out: list[FrameInfo] = []
        pos: int | None = off
        while pos is not None and len(out) < count:
            if trailer is not None and pos == footer_at:
                info = _footer_at(m, pos, trailer)
            elif pos >= limit:
                info = FrameInfo(pos, "trailer", "end", "the last 32 bytes of a segment hold its seal trailer")
                if trailer is not None:
                    info.fields = {"footer_offset": trailer.footer_offset, "footer_len": trailer.footer_len,
                                   "segment_crc": f"{trailer.segment_crc:08x}"}
            else:
                info = decode_at(m, pos, limit)
            out.append(info)
            pos = info.next_offset
        return {"segment_id": segment_id, "file": segment_name(segment_id), "size": size,
                "sealed": trailer is not None, "positions": [asdict(i) for i in out]}
    finally:
        m.close()


def _footer_at(m: mmap.mmap, off: int, trailer: Trailer) -> FrameInfo:
    info = FrameInfo(off, "footer", "footer", "seal footer")
    data = m[off:off + trailer.footer_len]
    if len(data) >= FOOTER_HEAD.size:
        magic, first_seq, count, _digest = FOOTER_HEAD.unpack_from(data, 0)
        info.fields = {"magic": magic.decode("latin-1"), "first_seq": first_seq, "count": count,
                       "footer_len": trailer.footer_len}
    try:
        decode_footer(data, "segment", off)
        info.fields["ok"] = True
    except BatpakError as exc:
        info.fields["ok"] = False
        info.detail = str(exc)
    return info


def decode_at(buf: Any, off: int, limit: int) -> FrameInfo:
    """Decode the frame at ``off`` as far as its bytes allow; never raises for any
    bytes. ``limit``: where frames must end (the trailer of a segment starts there). The
    verdict is ``scan_frame``'s (the frame validity rule every decoder shares); the fields
    are whatever the header bytes say, shown even when the frame is bad."""
    size = min(len(buf), limit)
    status, value = scan_frame(buf, off, size, final=True)
    if status == EMPTY:
        detail = ("zeros up to the end of the segment" if size - off < 8
                  else "zero length word: the end of the written data")
        return FrameInfo(off, "end", "end", detail)
    info = FrameInfo(off, "frame", {OK: "ok", BAD: "bad", NEED_MORE: "truncated"}.get(status, "bad"))
    if status == BAD:
        info.detail = str(value)
    elif status == NEED_MORE:
        info.detail = ("a length word cut by the end of the segment" if size - off < 8
                       else f"the frame needs {value} bytes, {size - off} remain")
    if size - off < 8:
        return info
    frame_len, crc = LEN_CRC.unpack_from(buf, off)
    fields = header_fields(buf, off, size)
    f: dict[str, Any] = {"frame_len": frame_len, "crc": f"{crc:08x}"}
    sane_len = MIN_FRAME <= frame_len <= MAX_FRAME and off + frame_len <= size
    if sane_len:
        info.next_offset = off + frame_len
    # a whole frame fails its CRC first, or gets past it (OK, or bad for a later reason)
    f["crc_ok"] = sane_len and value != CHECKSUM_MISMATCH
    if fields is not None:
        elen, slen, plen = fields["entity_len"], fields["scope_len"], fields["payload_len"]
        f.update({
            "version": fields["version"], "flags": fields["flags"], "flag_names": flag_names(fields["flags"]),
            "kind": f"{fields['kind'] >> 12}:{fields['kind'] & 0xFFF}", "entity_len": elen, "scope_len": slen,
            "payload_version": fields["payload_version"], "payload_len": plen,
            "global_sequence": fields["global_sequence"], "entity_clock": fields["entity_clock"],
            "wall_ms": fields["wall_ms"],
        })
        f.update({k: fields[k].hex() for k in ("event_id", "causation_id", "correlation_id", "idem_hash",
                                                "prev_hash", "event_hash")})
        if sane_len and HEADER_SIZE + elen + slen + plen == frame_len:
            e_end = off + HEADER_SIZE + elen
            s_end = e_end + slen
            f["entity"] = bytes(buf[off + HEADER_SIZE:e_end]).decode("utf-8", "replace")
            f["scope"] = bytes(buf[e_end:s_end]).decode("utf-8", "replace")
            f["payload_preview"] = payload_preview(bytes(buf[s_end:off + frame_len]))
            f["hash_ok"] = frame_hash(buf, off, frame_len) == fields["event_hash"]
        else:
            f["hash_ok"] = False
            if not info.detail:
                info.detail = "field lengths do not add up to the frame length"
    info.fields = f
    return info
