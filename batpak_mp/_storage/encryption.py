"""The writer's side of payload encryption (issue 13; OPERATIONS.md §11.4): the key
table of an open directory, kept through the ``Disk`` seam.

Owns: opening ``keys.tbl`` at engine open (``open_encryption``: a missing or wrong master
key is ``MasterKeyError`` before anything is written), turning it on (``enable``),
and the commit path's hook (``apply``): the payload of each event of an encrypted
entity is encrypted under its entity's data key (made, and the table written and
fsynced, before the frame that needs it), and a ``SYSTEM_SHRED`` event destroys its key
(the table rewritten without it, atomically) before the event is written. Invariants: a
data key is on disk before any frame encrypted under it; a shred's key is gone from disk
before its event exists. Every OS call goes through ``osio.Disk``. Must not import the
writer, the client, the IPC layer or the read side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import msgpack

from .._crypto import KEYS_FILE, Keyring, load_master_key
from .._errors import InvalidArgument
from .._format.ids import store_tag_of
from .._prepare import Prepared
from .._values import CATEGORY_SYSTEM, SYSTEM_SHRED, register_cipher
from .osio import Disk

SHRED_KIND = (CATEGORY_SYSTEM << 12) | SYSTEM_SHRED
ENCRYPTED_MARK = 0xC1  # the first byte of an encrypted payload (_crypto.MARK)


class Encryption:
    """The key table of one open directory (``ring`` None: the store encrypts nothing)."""

    def __init__(self, disk: Disk, data_dir: str, ring: Keyring | None) -> None:
        self.disk = disk
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, KEYS_FILE)
        self.ring = ring

    @classmethod
    def open(cls, disk: Disk, data_dir: str) -> Encryption:
        """Read ``keys.tbl`` (if any) with the master key from the environment."""
        raw = disk.read_file(os.path.join(data_dir, KEYS_FILE))
        ring = Keyring.decode(data_dir, load_master_key(data_dir), raw) if raw is not None else None
        return cls(disk, data_dir, ring)

    def register(self, store_tag: int, inherited: Sequence[tuple[bytes, int]] = ()) -> None:
        """This process's readers decrypt through this table (shreds are seen at once),
        also the events a fork inherited (their ids carry the parent's store tag)."""
        if self.ring is not None:
            ring = self.ring
            for tag in (store_tag, *(store_tag_of(sid) for sid, _ in inherited)):
                register_cipher(tag, lambda entity, data: ring.decrypt(entity, data))

    def enable(self, prefixes: Sequence[str]) -> None:
        """Encrypt the payloads of entities starting with any of ``prefixes`` from now on
        (events already written stay as they are)."""
        if isinstance(prefixes, str) or not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise InvalidArgument("entity_prefixes", prefixes, "must be a non-empty list of non-empty str")
        if self.ring is None:
            self.ring, data = Keyring.create(self.data_dir, load_master_key(self.data_dir), tuple(prefixes))
        else:
            self.ring.prefixes = tuple(prefixes)
            data = self.ring.encode()
        self.disk.write_file_atomic(self.path, data)

    def apply(self, items: Sequence[Prepared]) -> Sequence[Prepared]:
        """The commit path's hook for one request (see the module docstring)."""
        ring = self.ring
        if ring is None:
            return items
        out: list[Prepared] = []
        changed = False
        for p in items:
            if p.kind == SHRED_KIND:
                key = msgpack.unpackb(p.payload, raw=False).get("key")
                if not isinstance(key, bytes) or len(key) != 16:
                    raise InvalidArgument("key", key, "a shred names a 16-byte key id")
                changed |= ring.shred(key)
            elif ring.encrypts(p.entity) and p.payload[:1] != bytes((ENCRYPTED_MARK,)):
                changed |= ring.new_key(p.entity)
                p = p._replace(payload=ring.encrypt(p.entity, p.payload))
            out.append(p)
        if changed:  # new data keys, or a destroyed one: on disk before any frame of this request
            self.disk.write_file_atomic(self.path, ring.encode())
        return out

