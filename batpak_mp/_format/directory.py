"""The data directory: its format version, file and folder names, and the name hashes
(docs/FORMAT.md §1).

Owns: ``FORMAT_VERSION``; the names of every file in a data directory and how segment
and table names are built and parsed; the 64-bit name hash of entities and scopes and the
128-bit idempotency hash. Pure: no I/O. Must not import os, mmap or posix_ipc.
"""

from __future__ import annotations

import hashlib

FORMAT_VERSION = 2  # of the whole directory; store.meta, segments and index files carry it
# 2: frames chain a digest of the payload (stubs, FORMAT.md §3.4); a version-1 store is upgraded when a writer opens it
FORMAT_VERSION_MIN = 1  # the oldest directory version still opened, read and verified

META_FILE = "store.meta"
LOCK_FILE = "writer.lock"
CHECKPOINT_FILE = "durable.ckpt"
SEGMENT_DIR = "segments"
INDEX_DIR = "index"
RECORDS_FILE = "records.idx"
VERIFIED_FILE = "verified.tbl"  # sealed segments checksummed in this boot (derived, msgpack)
FENCES_FILE = "fences.tbl"  # revealed sequence ranges of committed fences (derived from the log)
COMPACTION_MARKER = "compaction.pending"  # index/: a segment swap whose records.idx update may be unfinished
COMPACT_SUFFIX = ".compact"  # segments/<segment name>.compact: a compacted copy being written (FORMAT.md §3.9)


def segment_name(segment_id: int) -> str:
    return f"{segment_id:012d}.seg"


def entities_base_name(through_segment: int) -> str:
    return f"entities-{through_segment:012d}.tbl"


def idem_base_name(through_segment: int) -> str:
    return f"idem-{through_segment:012d}.tbl"


def delta_name(generation: int) -> str:
    return f"delta-{generation:012d}.tbl"


def parse_segment_name(name: str) -> int | None:
    """The segment id of a file name made by ``segment_name``, else None."""
    if len(name) == 16 and name.endswith(".seg") and name[:12].isascii() and name[:12].isdigit():
        return int(name[:12])
    return None


def compact_temp_name(segment_id: int) -> str:
    """The compacted copy of a segment while it is written, before the rename swaps it in."""
    return segment_name(segment_id) + COMPACT_SUFFIX


def parse_compact_temp_name(name: str) -> int | None:
    """The segment id of a name made by ``compact_temp_name``, else None."""
    return parse_segment_name(name[:-len(COMPACT_SUFFIX)]) if name.endswith(COMPACT_SUFFIX) else None


def parse_delta_name(name: str) -> int | None:
    """The generation of a file name made by ``delta_name``, else None."""
    if name.startswith("delta-") and name.endswith(".tbl") and name[6:-4].isascii() and name[6:-4].isdigit():
        return int(name[6:-4])
    return None


def name_hash(raw: bytes) -> int:
    """The 64-bit hash of an entity or scope name used by the index (0 means empty)."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") or 1


def idem_hash(key: str | bytes) -> bytes:
    """The 128-bit hash an idempotency key is stored and matched under."""
    # surrogatepass: a str with a lone surrogate still gets its own hash (valid UTF-8
    # never contains an encoded surrogate, so no other key can collide with it)
    raw = b"s" + key.encode("utf-8", "surrogatepass") if isinstance(key, str) else b"b" + bytes(key)
    return hashlib.blake2b(raw, digest_size=16, person=b"bp-idem").digest()
