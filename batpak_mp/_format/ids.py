"""Event ids (docs/FORMAT.md §2): 48-bit wall ms, 16-bit store tag, 64-bit sequence;
and the two numbers derived from a store id (§1): the store tag and the store key.

Owns: building an event id and reading the sequence back out of one (readers slice no
id by hand); ``store_tag_of`` and ``store_key_of``. Pure. Must not import os, mmap,
posix_ipc or anything with a clock.
"""

from __future__ import annotations


def make_event_id(wall_ms: int, store_tag: int, seq: int) -> bytes:
    """16 bytes: 48-bit wall ms, 16-bit store tag, 64-bit global sequence (big-endian,
    so ids sort by time, then by commit order). ``get`` finds the record in O(1)."""
    return (wall_ms & 0xFFFFFFFFFFFF).to_bytes(6, "big") + store_tag.to_bytes(2, "big") + seq.to_bytes(8, "big")


def event_id_sequence(event_id: bytes) -> int:
    return int.from_bytes(event_id[8:16], "big")


def event_id_prefix(wall_ms: int, store_tag: int) -> bytes:
    """The first 8 bytes of every event id of one commit group (wall ms, store tag)."""
    return (wall_ms & 0xFFFFFFFFFFFF).to_bytes(6, "big") + store_tag.to_bytes(2, "big")


def store_tag_of(store_id: bytes) -> int:
    """The 16-bit tag of a store id that every event id carries."""
    return int.from_bytes(store_id[:2], "big")


def store_key_of(store_id: bytes) -> int:
    """The 64-bit key of a store id in the ``records.idx`` header and the control block
    (never 0: 0 means "no store")."""
    return int.from_bytes(store_id[:8], "little") or 1
