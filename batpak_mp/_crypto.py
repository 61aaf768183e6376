"""Payload encryption with a key per entity, and crypto-shredding (issue 13;
OPERATIONS.md §11.4, FORMAT.md §3.10).

Owns: the master key (32 bytes the operator provides in a file named by
``BATPAK_MP_MASTER_KEY_FILE`` or as hex in ``BATPAK_MP_MASTER_KEY``; never inside the data
directory), the key table ``keys.tbl`` (msgpack: a check value proving the master key,
the entity prefixes whose payloads are encrypted, and each entity's data key wrapped by
the master key, under a 16-byte hash of the entity name), the encrypted payload
(``0xC1 || 0x01 || nonce(12) || AES-256-GCM(data key, payload, aad = "bp-payload:" +
entity)``; 0xC1 is the one byte msgpack never uses, so no plain payload starts with it),
and a process-wide registry of keyrings by store tag, through which ``Event.payload``
decrypts (``_values.register_cipher``).
Invariants: the nonce is derived from the data key and the payload (deterministic: a
retry of the same request encrypts to the same bytes), so the same payload of one entity
encrypts the same; a data key leaves the table only by ``shred``, which rewrites the
table without it; once shredded, an entity's payloads read as shredded (``payload``
None, ``Event.shredded``), never as bytes or a raw exception; the hash chain covers the
ciphertext, so ``bp.verify`` needs no key. Bytes and files in, values out; the writer
writes the table through ``write``'s caller (osio); readers read it with ``open``.
Must not import the storage, the IPC layer or any process role.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._errors import MasterKeyError
from ._format.directory import META_FILE
from ._format.ids import store_tag_of
from ._format.meta import decode_meta, inherited_of
from ._values import register_cipher

KEYS_FILE = "keys.tbl"  # in the data directory: wrapped data keys (useless without the master key)
KEY_FILE_ENV = "BATPAK_MP_MASTER_KEY_FILE"  # a file holding the 32-byte master key (raw or 64 hex digits)
KEY_HEX_ENV = "BATPAK_MP_MASTER_KEY"  # or the master key itself, 64 hex digits
MARK = b"\xc1\x01"  # an encrypted payload starts with these (0xC1: never a msgpack byte)
NONCE = 12  # bytes: AES-GCM's standard nonce
CHECK = b"batpak-mp master key check"  # encrypted under the master key in keys.tbl: proves a key is the one
KEY_SIZE = 32  # AES-256


def entity_key_id(entity: bytes) -> bytes:
    """The 16 bytes an entity's data key is filed under (the name itself is not stored)."""
    return hashlib.blake2b(entity, digest_size=16, person=b"bp-dk").digest()


def load_master_key(data_dir: str, environ: dict[str, str] | None = None) -> bytes:
    """The master key from the environment; ``MasterKeyError`` when it is missing,
    malformed, or kept inside the data directory."""
    env = os.environ if environ is None else environ
    path, hexkey = env.get(KEY_FILE_ENV), env.get(KEY_HEX_ENV)
    if path:
        real, root = os.path.realpath(path), os.path.realpath(data_dir)
        if real == root or real.startswith(root + os.sep):
            raise MasterKeyError(data_dir, f"{KEY_FILE_ENV} names a file inside the data directory: keep the "
                                           "master key elsewhere (a backup would carry it along)")
        try:
            with open(path, "rb") as f:
                raw = f.read(200)
        except OSError as exc:
            raise MasterKeyError(data_dir, f"cannot read {KEY_FILE_ENV}={path!r}: {exc.strerror}") from None
        key = raw if len(raw) == KEY_SIZE else _hex_key(raw.strip().decode("ascii", "replace"), data_dir)
    elif hexkey:
        key = _hex_key(hexkey.strip(), data_dir)
    else:
        raise MasterKeyError(data_dir, f"the store encrypts payloads: set {KEY_FILE_ENV} (or {KEY_HEX_ENV})")
    return key


def _hex_key(text: str, data_dir: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise MasterKeyError(data_dir, f"the master key must be {KEY_SIZE} bytes (raw, or {2 * KEY_SIZE} hex digits)")
    return key


class Keyring:
    """The key table of one store, opened with its master key."""

    def __init__(self, data_dir: str, master: bytes, table: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self._master = AESGCM(master)
        self.prefixes: tuple[str, ...] = tuple(table.get("prefixes", ()))
        self.keys: dict[bytes, bytes] = dict(table.get("keys", {}))  # key id -> wrapped data key
        self._plain: dict[bytes, tuple[AESGCM, bytes]] = {}  # key id -> (its AEAD, the raw key)
        try:
            self._master.decrypt(table["check"][:NONCE], table["check"][NONCE:], CHECK)
        except (InvalidTag, KeyError, TypeError, ValueError):
            raise MasterKeyError(data_dir, "the master key is not the one this store's keys were wrapped with") from None

    @classmethod
    def create(cls, data_dir: str, master: bytes, prefixes: tuple[str, ...]) -> tuple[Keyring, bytes]:
        """A new key table (and its bytes, for the caller to write) encrypting ``prefixes``."""
        nonce = secrets.token_bytes(NONCE)
        check = nonce + AESGCM(master).encrypt(nonce, CHECK, CHECK)
        ring = cls(data_dir, master, {"v": 1, "check": check, "prefixes": list(prefixes), "keys": {}})
        return ring, ring.encode(check)

    @classmethod
    def decode(cls, data_dir: str, master: bytes, raw: bytes) -> Keyring:
        try:
            table = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            if not isinstance(table, dict) or table.get("v") != 1:
                raise ValueError("not a version-1 key table")
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise MasterKeyError(data_dir, f"{KEYS_FILE} is unreadable: {exc}") from None
        ring = cls(data_dir, master, table)
        ring._check = table["check"]
        return ring

    _check = b""

    def encode(self, check: bytes | None = None) -> bytes:
        data: bytes = msgpack.packb({"v": 1, "check": check or self._check, "prefixes": list(self.prefixes),
                                     "keys": self.keys}, use_bin_type=True)
        if check:
            self._check = check
        return data

    def encrypts(self, entity: bytes) -> bool:
        try:
            name = entity.decode()
        except UnicodeDecodeError:
            return False
        return any(name.startswith(p) for p in self.prefixes)

    def _data_key(self, kid: bytes) -> tuple[AESGCM, bytes] | None:
        hit = self._plain.get(kid)
        if hit is None:
            wrapped = self.keys.get(kid)
            if wrapped is None:
                return None
            raw = self._master.decrypt(wrapped[:NONCE], wrapped[NONCE:], b"bp-dk:" + kid)
            hit = self._plain[kid] = (AESGCM(raw), raw)
        return hit

    def new_key(self, entity: bytes) -> bool:
        """Make the entity's data key if it has none (True: the table changed, write it
        before any payload encrypted under it)."""
        kid = entity_key_id(entity)
        if kid in self.keys:
            return False
        nonce = secrets.token_bytes(NONCE)
        self.keys[kid] = nonce + self._master.encrypt(nonce, secrets.token_bytes(KEY_SIZE), b"bp-dk:" + kid)
        return True

    def shred(self, kid: bytes) -> bool:
        """Forget the data key filed under ``kid`` (``entity_key_id``; True: the table
        changed: write it)."""
        self._plain.pop(kid, None)
        return self.keys.pop(kid, None) is not None

    def encrypt(self, entity: bytes, payload: bytes) -> bytes:
        hit = self._data_key(entity_key_id(entity))
        if hit is None:
            raise MasterKeyError(self.data_dir, "no data key for this entity (shredded, or not made yet)")
        nonce = hmac.new(hit[1], payload, hashlib.blake2b).digest()[:NONCE]
        return MARK + nonce + hit[0].encrypt(nonce, payload, b"bp-payload:" + entity)

    def decrypt(self, entity: bytes, data: bytes) -> bytes | None:
        """The payload, or None when the entity's key is gone (shredded)."""
        hit = self._data_key(entity_key_id(entity))
        if hit is None:
            return None
        body = data[len(MARK):]
        try:
            return hit[0].decrypt(body[:NONCE], body[NONCE:], b"bp-payload:" + entity)
        except InvalidTag:
            return None


class ReadKeys:
    """A reader's view of a store's key table: read again whenever the file changes
    (a shred rewrites it), so a shredded key is gone here too at the next read."""

    def __init__(self, data_dir: str, master: bytes) -> None:
        self.path = os.path.join(data_dir, KEYS_FILE)
        self.data_dir = data_dir
        self.master = master
        self.stamp: tuple[int, int, int] | None = None
        self.ring: Keyring | None = None

    def current(self) -> Keyring | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self.stamp:
            with open(self.path, "rb") as f:
                self.ring = Keyring.decode(self.data_dir, self.master, f.read())
            self.stamp = stamp
        return self.ring

    def decrypt(self, entity: bytes, data: bytes) -> bytes | None:
        ring = self.current()
        return ring.decrypt(entity, data) if ring is not None else None


def open_for_reading(data_dir: str, store_tag: int | None = None) -> None:
    """Register this process's decryption of ``data_dir``'s payloads (when it has a key
    table): ``Event.payload`` of an encrypted event decrypts through it. A missing or
    wrong master key is ``MasterKeyError`` here, at open. ``store_tag``: read from
    store.meta when not given."""
    path = os.path.join(data_dir, KEYS_FILE)
    if not os.path.exists(path):
        return
    keys = ReadKeys(data_dir, load_master_key(data_dir))
    keys.current()  # proves the master key now
    with open(os.path.join(data_dir, META_FILE), "rb") as f:
        meta = f.read()
    tags = [store_tag if store_tag is not None else store_tag_of(decode_meta(meta, META_FILE))]
    tags += [store_tag_of(sid) for sid, _ in inherited_of(meta, META_FILE)]  # a fork's inherited events
    decrypt: Callable[[bytes, bytes], bytes | None] = keys.decrypt
    for tag in tags:
        register_cipher(tag, decrypt)


def shred_payload(entity: str) -> dict[str, bytes]:
    """The payload of the ``SYSTEM_SHRED`` event that destroys ``entity``'s data key: its
    key id, not its name (the log keeps no name the shred was meant to forget)."""
    return {"key": entity_key_id(entity.encode("utf-8", "surrogatepass"))}
