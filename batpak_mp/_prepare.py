"""Caller input checked and encoded for the commit path, in whichever process takes it.

Owns: ``Prepared`` (one event ready for the commit path: names as bytes, packed kind,
msgpack payload, idempotency hash, guards) and ``prepare``, which validates a caller's
arguments into one, raising the typed error that names the value at fault. The client
prepares before sending (so bad input never reaches the writer) and the in-process
engine prepares before committing: one validation for both.
Invariants: pure (no I/O, no clock); a ``Prepared`` always holds valid values.
Must not import the storage, IPC or read layers, or any process role.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from ._errors import InvalidArgument, InvalidPayload, PayloadTooLarge, ReservedKind
from ._format.frame import ZERO_ID
from ._native import idem_hash  # the active codec: C when built, else _format.directory's
from ._values import RESERVED_CATEGORIES, STORE_KINDS, BatchItem, Coordinate, Kind, check_kind, payload_version_for


class Prepared(NamedTuple):
    """One event ready for the commit path (payload already msgpack-encoded)."""

    entity: bytes
    scope: bytes
    kind: int
    payload: bytes
    payload_version: int
    idem: bytes  # 16-byte idempotency hash
    expected_clock: int | None
    causation: bytes
    correlation: bytes


_new_tuple = tuple.__new__  # builds a Prepared without its Python-level __new__ (one per event)
_tls = threading.local()  # one msgpack Packer per thread (a Packer is not thread-safe)
_checked_kinds: dict[Any, int] = {}  # caller kinds already validated (never reserved ones)


def encode_payload(payload: Any, limit: int) -> bytes:
    packer = getattr(_tls, "packer", None)
    if packer is None:
        packer = _tls.packer = msgpack.Packer(use_bin_type=True)
    try:
        raw: bytes = packer.pack(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        _tls.packer = None  # a failed pack may leave the packer's buffer dirty
        raise InvalidPayload(str(exc)) from None
    if len(raw) > limit:
        raise PayloadTooLarge(len(raw), limit)
    return raw


def _check_id(name: str, value: object) -> bytes:
    if value is None:
        return ZERO_ID
    if isinstance(value, (bytes, bytearray)) and len(value) == 16 and any(value):
        return bytes(value)
    raise InvalidArgument(name, value, "must be a 16-byte event id")


def _check_clock(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidArgument("expected_clock", value, "must be an int >= 0")
    return value


def prepare(
    coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None,
    expected_clock: int | None, causation_id: bytes | None, correlation_id: bytes | None,
    max_payload: int, allow_reserved: bool = False, payload_is_encoded: bool = False,
    payload_version: int = 0,
) -> Prepared:
    """Validate caller input and encode it for the commit path (pure)."""
    if not isinstance(coord, Coordinate):
        raise InvalidArgument("coord", coord, "must be a bp.Coordinate")
    # the cache is keyed by the tuple, and Kind(True, 7) == Kind(1, 7): only plain ints use it
    cacheable = type(kind) is Kind and type(kind[0]) is int and type(kind[1]) is int
    packed_kind = _checked_kinds.get(kind) if cacheable else None
    if packed_kind is None:
        packed_kind = check_kind(kind, allow_reserved=allow_reserved)
        if cacheable and (packed_kind >> 12) not in RESERVED_CATEGORIES and len(_checked_kinds) < 65536:
            _checked_kinds[kind] = packed_kind
    if payload_is_encoded:
        raw = bytes(payload)
        if len(raw) > max_payload:
            raise PayloadTooLarge(len(raw), max_payload)
    else:
        raw = encode_payload(payload, max_payload)
    if idempotency_key is None:
        idem = ZERO_ID  # no key: nothing to deduplicate (clients always send one, see _client)
    elif isinstance(idempotency_key, (str, bytes)) and 0 < len(idempotency_key) <= 1024:
        idem = idem_hash(idempotency_key)
    else:
        raise InvalidArgument("idempotency_key", idempotency_key, "must be a non-empty str or bytes of at most 1024")
    if not 0 <= payload_version <= 0xFFFF:
        raise InvalidArgument("payload_version", payload_version, "must be 0..65535")
    return _new_tuple(Prepared, (
        coord._entity_bytes, coord._scope_bytes, packed_kind, raw, payload_version, idem,
        None if expected_clock is None else _check_clock(expected_clock),
        ZERO_ID if causation_id is None else _check_id("causation_id", causation_id),
        ZERO_ID if correlation_id is None else _check_id("correlation_id", correlation_id),
    ))




def prepare_items(items: Sequence[BatchItem], *, max_payload: int, store_kinds: bool = False) -> list[Prepared]:
    """Validate and encode a batch, all or nothing: the one batch check the engine and
    the client share. Each item's payload version defaults to its kind's registered one.
    ``store_kinds``: the store's own allowlisted reserved kinds (cursor positions, gate
    audit records) are accepted too; any other reserved kind is ``ReservedKind``."""
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise InvalidArgument("items", items, "must be a sequence of bp.BatchItem")
    if not items:
        raise InvalidArgument("items", [], "a batch needs at least one event")
    prepared = []
    for i, it in enumerate(items):
        if not isinstance(it, BatchItem):
            raise InvalidArgument(f"items[{i}]", it, "must be a bp.BatchItem")
        reserved = store_kinds and it.kind[0] in RESERVED_CATEGORIES
        if reserved and ((it.kind[0] << 12) | it.kind[1]) not in STORE_KINDS:
            raise ReservedKind(it.kind[0], it.kind[1])
        prepared.append(prepare(
            it.coord, it.kind, it.payload, idempotency_key=it.idempotency_key, expected_clock=it.expected_clock,
            causation_id=it.causation_id, correlation_id=it.correlation_id, max_payload=max_payload,
            allow_reserved=reserved,
            payload_version=payload_version_for(it.kind) if it.payload_version is None else it.payload_version))
    return prepared
