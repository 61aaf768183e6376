"""``store.meta`` (docs/FORMAT.md §8): the store id and the directory's format version.

Owns: its JSON document, encoder and decoder, and a fork's lineage record (``Lineage``:
the parent store id, the fork point, and the store ids whose segments the fork inherits,
FORMAT.md §8.1). Pure: no I/O. Must not import os, mmap,
posix_ipc or anything with a clock.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from .._errors import CorruptSegment, FutureFormat
from .directory import FORMAT_VERSION


class Lineage(NamedTuple):
    """A fork's lineage record (FORMAT.md §8.1): made by ``bp.fork``, never changed."""

    parent_store_id: bytes
    fork_seq: int  # the last sequence of the parent's history the fork holds
    inherited: tuple[tuple[bytes, int], ...]  # (store id, last sequence taken from it): whose segment headers it keeps


def encode_meta(store_id: bytes, created_ms: int, lineage: Lineage | None = None) -> bytes:
    doc: dict[str, object] = {"format": "batpak-mp", "format_version": FORMAT_VERSION,
                              "store_id": store_id.hex(), "created_ms": created_ms}
    if lineage is not None:
        doc["lineage"] = {"parent_store_id": lineage.parent_store_id.hex(), "fork_seq": lineage.fork_seq,
                          "inherited": [[sid.hex(), through] for sid, through in lineage.inherited]}
    return (json.dumps(doc, indent=2) + "\n").encode()


def decode_meta(data: bytes, path: str) -> bytes:
    """The store id from store.meta; FutureFormat or CorruptSegment when it is wrong."""
    try:
        doc = json.loads(data)
        version = int(doc["format_version"])
        store_id = bytes.fromhex(doc["store_id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptSegment(path, 0, f"store.meta is unreadable: {exc}") from None
    if doc.get("format") != "batpak-mp":
        raise CorruptSegment(path, 0, "store.meta is not a batpak-mp store")
    if version > FORMAT_VERSION:
        raise FutureFormat(path, version, FORMAT_VERSION)
    if len(store_id) != 16:
        raise CorruptSegment(path, 0, "store.meta store_id is not 16 bytes")
    return store_id


def decode_lineage(data: bytes, path: str) -> Lineage | None:
    """A fork's lineage record from store.meta (None for a store that is no fork);
    CorruptSegment when it is malformed. Call after ``decode_meta`` accepted ``data``."""
    try:
        doc = json.loads(data).get("lineage")
        if doc is None:
            return None
        inherited = tuple((bytes.fromhex(sid), int(through)) for sid, through in doc["inherited"])
        lineage = Lineage(bytes.fromhex(doc["parent_store_id"]), int(doc["fork_seq"]), inherited)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptSegment(path, 0, f"store.meta lineage is unreadable: {exc}") from None
    if len(lineage.parent_store_id) != 16 or any(len(sid) != 16 or t < 0 for sid, t in inherited) or lineage.fork_seq < 0:
        raise CorruptSegment(path, 0, "store.meta lineage names a store id that is not 16 bytes or a negative sequence")
    return lineage


def inherited_of(data: bytes, path: str) -> tuple[tuple[bytes, int], ...]:
    """The (store id, through sequence) pairs whose segments this store holds besides its
    own: ``segment_verdict``'s ``inherited`` (empty for a store that is no fork)."""
    lineage = decode_lineage(data, path)
    return lineage.inherited if lineage is not None else ()


def upgraded_meta(data: bytes) -> bytes | None:
    """store.meta's bytes at ``FORMAT_VERSION``, every other key kept, when ``data`` (a
    document ``decode_meta`` accepted) is of an older version; None when it is current.
    A writer opening an older store writes it before anything else (FORMAT.md §9)."""
    doc = json.loads(data)
    if int(doc["format_version"]) >= FORMAT_VERSION:
        return None
    doc["format_version"] = FORMAT_VERSION
    return (json.dumps(doc, indent=2) + "\n").encode()
