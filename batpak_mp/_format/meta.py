"""``store.meta`` (docs/FORMAT.md §8): the store id and the directory's format version.

Owns: its JSON document, encoder and decoder. Pure: no I/O. Must not import os, mmap,
posix_ipc or anything with a clock.
"""

from __future__ import annotations

import json

from .._errors import CorruptSegment, FutureFormat
from .directory import FORMAT_VERSION


def encode_meta(store_id: bytes, created_ms: int) -> bytes:
    doc = {"format": "batpak-mp", "format_version": FORMAT_VERSION,
           "store_id": store_id.hex(), "created_ms": created_ms}
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
