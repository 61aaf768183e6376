"""The tag index: sorted runs of (tag, sequence) postings (docs/FORMAT.md §6.4).

Owns: what a *tag* is (a 64-bit key every event is filed under several times: each entity
prefix at a ``:`` boundary, its scope and its kind; a kind's category is the range of its
kinds' tags), the tags of an
entity name and of a ``Region``, the byte layout of a run file
(``index/tags-<lo>-<hi>.run``: the postings of sequences ``lo..hi``, sorted by tag then
sequence, as two u64 columns) and of the manifest ``index/tags.man`` (which runs are
current), and the binary searches over a run's columns.
Invariants: the runs a manifest names cover ``1..through`` with no gap and no overlap, in
ascending order; within a run, postings are sorted by (tag, sequence). A tag may be shared
by two keys (a 64-bit hash collision): readers check every candidate against its record and
frame, so a tag only ever narrows where to look, never decides.
Pure over buffers: no I/O, clock or randomness. Must not import os, mmap or posix_ipc.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from .._errors import CorruptSegment, FutureFormat
from .directory import name_hash

__all__ = [
    "MAX_PREFIX_DEPTH",
    "RUN_HEADER_SIZE",
    "TAGS_MANIFEST",
    "category_range",
    "decode_manifest",
    "decode_run_header",
    "encode_run_header",
    "entity_prefixes",
    "kind_tag",
    "manifest_body",
    "manifest_generation",
    "manifest_header",
    "prefix_tag",
    "prefix_tags",
    "region_tag_options",
    "run_name",
    "scope_and_kind_tags",
    "scope_tag",
    "seq_span",
    "tag_spans",
]

TAGS_LAYOUT = 2  # of run files and the manifest (a reader refuses a newer one, a writer rebuilds an older one)
# 2: no category tags (a category is a range of kind tags)
TAGS_MANIFEST = "tags.man"
RUN_MAGIC = b"BPMPTAGR"
MANIFEST_MAGIC = b"BPMPTAGM"
RUN_HEADER = struct.Struct("<8sIIQQQQ")  # magic, layout, reserved, store key, lo, hi, postings
RUN_HEADER_SIZE = 64  # then tags u64[postings], then sequences u64[postings]
_PAIR = struct.Struct("<QQ")

MAX_PREFIX_DEPTH = 8  # ``:``-components an entity is filed under (a deeper prefix narrows by its first 8)
SEP = b":"
# Scope and kind tags live in their own corners of the 64-bit space: a scope's tag is its
# name hash mixed with a constant (so scope ``a`` and entity prefix ``a`` differ); a kind's is
# a fixed high word plus the packed kind, so the kinds of one category are one range of tags.
SCOPE_SALT = 0x9E3779B97F4A7C15  # any odd constant; the golden-ratio one
KIND_BASE = 0xB47C_0000_0000_0000  # | packed kind (16 bits: category << 12 | type id)
TagRange = tuple[int, int]  # first and last tag, inclusive


def run_name(lo: int, hi: int) -> str:
    return f"tags-{lo:012d}-{hi:012d}.run"


def entity_prefixes(entity: bytes) -> list[bytes]:
    """The prefixes an entity is filed under: each ``:``-boundary prefix and the whole name,
    at most ``MAX_PREFIX_DEPTH`` of them (``a:b:c`` -> ``a``, ``a:b``, ``a:b:c``)."""
    parts = entity.split(SEP, MAX_PREFIX_DEPTH)
    out = []
    for i in range(1, min(len(parts), MAX_PREFIX_DEPTH) + 1):
        out.append(SEP.join(parts[:i]))
    return out


def prefix_tags(entity: bytes) -> tuple[int, ...]:
    """The prefix tags of an entity (the whole name's is its entity hash)."""
    return tuple(name_hash(p) for p in entity_prefixes(entity))


def prefix_tag(prefix: str) -> int:
    """The tag a prefix query looks under: the prefix's own, or for a prefix deeper than
    ``MAX_PREFIX_DEPTH`` components that of its first ``MAX_PREFIX_DEPTH`` (a superset)."""
    return name_hash(entity_prefixes(prefix.encode())[-1])


def scope_tag(scope_hash: int) -> int:
    return (scope_hash ^ SCOPE_SALT) or 1


def kind_tag(packed_kind: int) -> int:
    return KIND_BASE | packed_kind


def scope_and_kind_tags(scope_hashes: Any, kinds: Any) -> tuple[Any, Any]:
    """``scope_tag`` and ``kind_tag`` of whole numpy columns (scope hashes, packed kinds)
    at once: the writer files a chunk of records with them (numpy is imported here)."""
    import numpy as np

    scope = scope_hashes ^ np.uint64(SCOPE_SALT)
    scope[scope == 0] = 1
    return scope, kinds.astype(np.uint64) | np.uint64(KIND_BASE)


def category_range(category: int) -> TagRange:
    """The tags of every kind of ``category``: one range."""
    return KIND_BASE | category << 12, KIND_BASE | category << 12 | 0xFFF


def region_tag_options(region: Any) -> list[tuple[TagRange, ...]] | None:
    """The ways the tag index can narrow a ``Region`` (``_query.Region``): each option is a
    set of tag ranges whose postings together hold every event the region selects (the
    reader takes the cheapest). None: the region names nothing the tag index files (every
    event is a candidate). An option with no range: the region selects nothing."""
    options: list[tuple[TagRange, ...]] = []
    if region.entity_prefix is not None:
        t = prefix_tag(region.entity_prefix)
        options.append(((t, t),))
    if region.scope is not None:
        t = scope_tag(name_hash(region.scope.encode()))
        options.append(((t, t),))
    packed = region.packed_kinds()
    if packed is not None:
        options.append(tuple((kind_tag(k), kind_tag(k)) for k in sorted(packed)))
    elif region.category is not None:
        options.append((category_range(region.category),))
    return options or None


def tag_spans(tags: Sequence[int], first_tag: int, last_tag: int) -> list[tuple[int, int]]:
    """[first, end) of each tag's postings in ``first_tag..last_tag`` in a run's sorted
    tag column (one binary search per tag found, and one more)."""
    out = []
    i = bisect.bisect_left(tags, first_tag)
    end = bisect.bisect_right(tags, last_tag, i)
    while i < end:
        j = bisect.bisect_right(tags, tags[i], i, end)
        out.append((i, j))
        i = j
    return out


def _header(layout_struct: struct.Struct, buf: Any, magic: bytes, name: str, what: str) -> tuple[Any, ...]:
    """The fields of a header whose magic is ``magic`` and layout not newer than ours."""
    if len(buf) < layout_struct.size:
        raise CorruptSegment(name, 0, f"{what} shorter than its header")
    fields = layout_struct.unpack_from(buf, 0)
    if fields[0] != magic:
        raise CorruptSegment(name, 0, f"{what} has a bad magic")
    if fields[1] > TAGS_LAYOUT:
        raise FutureFormat(name, fields[1], TAGS_LAYOUT)
    return tuple(fields)


# -- run files --------------------------------------------------------------------------------
def encode_run_header(store_key: int, lo: int, hi: int, postings: int) -> bytes:
    return RUN_HEADER.pack(RUN_MAGIC, TAGS_LAYOUT, 0, store_key, lo, hi, postings).ljust(RUN_HEADER_SIZE, b"\0")


def decode_run_header(head: Any, size: int, name: str) -> tuple[int, int, int, int]:
    """(store key, lo, hi, postings) of a run file of ``size`` bytes whose header is
    ``head``; typed errors when the header is bad or does not match the size."""
    _, layout, _, key, lo, hi, postings = _header(RUN_HEADER, head, RUN_MAGIC, name, "tag run")
    if layout != TAGS_LAYOUT or not 1 <= lo <= hi or size != RUN_HEADER_SIZE + 16 * postings:
        raise CorruptSegment(name, 0, "tag run header does not match its size")
    return key, lo, hi, postings


def seq_span(seqs: Sequence[int], first: int, end: int, after: int, upto: int) -> tuple[int, int]:
    """[i, j) of the postings in ``seqs[first:end]`` (ascending) with ``after < seq <= upto``."""
    i = bisect.bisect_right(seqs, after, first, end)
    return i, bisect.bisect_right(seqs, upto, i, end)


# -- the manifest -----------------------------------------------------------------------------
# A fixed-size file updated in place under a generation counter (a seqlock): the writer makes
# the generation odd, writes the runs, then writes the header with the count, a CRC and the
# next even generation. A reader that maps it reads the generation (no system call), and
# when it changed copies the runs and keeps them only when the generation was even and the
# same before and after, and the CRC matches. The file never shrinks (a mapping stays valid).
MANIFEST_HEADER = struct.Struct("<8sIIQQQI")  # magic, layout, reserved, store key, generation, runs, crc32
MANIFEST_HEADER_SIZE = 64  # then (lo u64, hi u64) per run, ascending
MANIFEST_GENERATION_AT = 24
MANIFEST_MAX_RUNS = 65_535  # (1 MiB, sparse): past ~2M postings runs stop merging, so this is ~30G events
MANIFEST_SIZE = MANIFEST_HEADER_SIZE + 16 * MANIFEST_MAX_RUNS
_u64 = struct.Struct("<Q")


def manifest_body(runs: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(_PAIR.pack(lo, hi) for lo, hi in runs)


def manifest_header(store_key: int, generation: int, runs: Sequence[tuple[int, int]]) -> bytes:
    """The header naming ``runs`` (their body written first) at an even ``generation``."""
    crc = zlib.crc32(manifest_body(runs), zlib.crc32(_u64.pack(store_key) + _u64.pack(generation)))
    return MANIFEST_HEADER.pack(MANIFEST_MAGIC, TAGS_LAYOUT, 0, store_key, generation, len(runs), crc).ljust(
        MANIFEST_HEADER_SIZE, b"\0")


def manifest_generation(buf: Any) -> int:
    """The generation word of a mapped manifest (odd: an update is under way)."""
    got: int = _u64.unpack_from(buf, MANIFEST_GENERATION_AT)[0]
    return got


def decode_manifest(buf: Any, name: str) -> tuple[int, int, list[tuple[int, int]]]:
    """(store key, generation, runs) of a manifest whose runs cover ``1..through`` in order
    and whose CRC matches; typed errors otherwise (a torn read among them: retry)."""
    _, layout, _, key, generation, count, crc = _header(MANIFEST_HEADER, buf, MANIFEST_MAGIC, name, "tag manifest")
    if layout != TAGS_LAYOUT or count > MANIFEST_MAX_RUNS or len(buf) < MANIFEST_HEADER_SIZE + 16 * count:
        raise CorruptSegment(name, 0, "tag manifest header does not match its size")
    body = bytes(buf[MANIFEST_HEADER_SIZE:MANIFEST_HEADER_SIZE + 16 * count])
    if generation & 1 or zlib.crc32(body, zlib.crc32(_u64.pack(key) + _u64.pack(generation))) != crc:
        raise CorruptSegment(name, 0, "tag manifest is being written or torn")
    runs = [(int(lo), int(hi)) for lo, hi in _PAIR.iter_unpack(body)]
    expect = 1
    for lo, hi in runs:
        if lo != expect or hi < lo:
            raise CorruptSegment(name, 0, f"tag runs leave a gap or overlap at sequence {expect}")
        expect = hi + 1
    return key, generation, runs
