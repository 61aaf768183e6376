"""The backup manifest (docs/FORMAT.md §16) and the copy plan of a backup or a fork.

Owns: ``backup.manifest``, the small JSON file ``bp.backup`` leaves in its destination
(store id, last sequence, the segment files it holds) so that the next backup recognises
"a backup of the same store" and copies only what is new; and ``plan_segments``, the pure
decision of what happens to each source segment: reused from the previous backup, copied
whole, hard-linked (a fork), or copied as a prefix ending at the frontier.
Invariants: a sealed segment never changes (FORMAT.md §3.6), so one whose size, header
and trailer (which carries the whole-file checksum) equal the previous backup's copy is
that copy; a segment a fork may write into (the one holding its fork point, unless it
ends there sealed) is never shared. Pure: no I/O, no clock. Must not import os, mmap,
posix_ipc.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

from .._errors import CorruptSegment, FutureFormat

MANIFEST_FILE = "backup.manifest"  # in the root of a backup; a store ignores it
MANIFEST_FORMAT = "batpak-mp-backup"
MANIFEST_VERSION = 1


class ManifestFile(NamedTuple):
    name: str  # path inside the backup, "/"-separated ("segments/000000000001.seg")
    size: int  # bytes
    seal: str  # hex of the segment's header and trailer when it is sealed, "" otherwise


class Manifest(NamedTuple):
    store_id: bytes
    last_seq: int  # the backup holds sequences 1..last_seq, every one whole and checked
    created_ms: int  # Unix milliseconds when the backup was published (informational)
    files: tuple[ManifestFile, ...]


def encode_manifest(m: Manifest) -> bytes:
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "store_id": m.store_id.hex(),
           "last_seq": m.last_seq, "created_ms": m.created_ms,
           "files": [{"name": f.name, "size": f.size, "seal": f.seal} for f in m.files]}
    return (json.dumps(doc, indent=1) + "\n").encode()


def decode_manifest(data: bytes, path: str) -> Manifest:
    """The manifest; ``CorruptSegment`` when it is not one, ``FutureFormat`` when newer."""
    try:
        doc = json.loads(data)
        if doc.get("format") != MANIFEST_FORMAT:
            raise ValueError("not a batpak-mp backup manifest")
        version = int(doc["version"])
        files = tuple(ManifestFile(str(f["name"]), int(f["size"]), str(f["seal"])) for f in doc["files"])
        m = Manifest(bytes.fromhex(doc["store_id"]), int(doc["last_seq"]), int(doc["created_ms"]), files)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptSegment(path, 0, f"backup manifest is unreadable: {exc}") from None
    if version > MANIFEST_VERSION:
        raise FutureFormat(path, version, MANIFEST_VERSION)
    if len(m.store_id) != 16 or m.last_seq < 0:
        raise CorruptSegment(path, 0, "backup manifest names a store id that is not 16 bytes or a negative sequence")
    return m


class SourceSegment(NamedTuple):
    """What the planner needs to know of one source segment, in log order."""

    segment_id: int
    size: int
    first_seq: int
    last_seq: int  # sealed: from its footer; unsealed: 0 (not known without a scan)
    seal: str  # hex of header + trailer when sealed, "" when not


Action = Literal["reuse", "copy", "link", "prefix"]


class Step(NamedTuple):
    segment: SourceSegment
    action: Action  # reuse: link the previous backup's copy; copy: whole file; link: hard link; prefix: frames to `through`
    through: int  # the last sequence the copy holds


def plan_segments(segments: Sequence[SourceSegment], frontier: int, *, previous: Mapping[str, ManifestFile],
                  names: Mapping[int, str], fork: bool) -> list[Step]:
    """What to do with each segment so that the copy holds the log through ``frontier``
    (at least; a whole sealed segment may hold more, all of it committed): segments
    after the one holding ``frontier`` are left out. ``previous``: the last backup's
    files by name (a backup only); ``names``: segment id -> its name in the copy.
    A backup copies the segment holding the frontier as a prefix when it is unsealed;
    a fork (``fork=True``) shares a sealed segment that ends at or before the frontier
    (``link``) and takes a private prefix of the one that holds it otherwise, which it
    then seals (the fork writes its own segments after it)."""
    steps: list[Step] = []
    for seg in segments:
        if seg.first_seq > frontier:
            break  # nothing of it is needed (an empty store's first segment holds nothing either)
        sealed = bool(seg.seal)
        if fork:
            if sealed and seg.last_seq <= frontier:
                steps.append(Step(seg, "link", seg.last_seq))
            else:
                steps.append(Step(seg, "prefix", frontier))
        elif sealed:
            old = previous.get(names[seg.segment_id])
            same = old is not None and old.size == seg.size and old.seal == seg.seal
            steps.append(Step(seg, "reuse" if same else "copy", seg.last_seq))
        else:
            steps.append(Step(seg, "prefix", frontier))  # the copier finds the frontier's frame in it
        if steps[-1].through >= frontier:
            break
    return steps
