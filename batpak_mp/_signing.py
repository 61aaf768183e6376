"""Ed25519 signing of receipts, so a receipt can be checked without the store.

Owns: the canonical bytes a receipt signature covers and sign/verify over them.
``cryptography`` is imported only when signing is configured, so clients that do not
sign pay nothing for it. Must not import the engine, writer or client.
"""

from __future__ import annotations

import struct
from typing import Any

from ._errors import InvalidArgument
from ._values import Receipt

DOMAIN = b"batpak-mp receipt v1\0"


def receipt_message(event_id: bytes, seq: int, entity: bytes, scope: bytes, clock: int,
                    event_hash: bytes, prev_hash: bytes, wall_ms: int) -> bytes:
    """What a receipt signature covers: every field that identifies the stored event."""
    return b"".join((
        DOMAIN, event_id, struct.pack("<QQQHH", seq, clock, wall_ms, len(entity), len(scope)),
        entity, scope, event_hash, prev_hash,
    ))


class Signer:
    """Signs receipts with a raw 32-byte Ed25519 private key."""

    def __init__(self, private_key: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise InvalidArgument("signing_key", "<redacted>", "must be 32 raw Ed25519 private key bytes")
        self._key: Any = Ed25519PrivateKey.from_private_bytes(private_key)
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self.public_key: bytes = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, event_id: bytes, seq: int, entity: bytes, scope: bytes, clock: int,
             event_hash: bytes, prev_hash: bytes, wall_ms: int) -> bytes:
        sig: bytes = self._key.sign(receipt_message(event_id, seq, entity, scope, clock, event_hash,
                                                    prev_hash, wall_ms))
        return sig

    def verify(self, receipt: Receipt) -> bool:
        return verify_receipt_signature(receipt, self.public_key)


def verify_receipt_signature(receipt: Receipt, public_key: bytes) -> bool:
    """Check a signed receipt against a raw 32-byte Ed25519 public key, offline."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if receipt.signature is None:
        return False
    msg = receipt_message(receipt.event_id, receipt.global_sequence, receipt.entity.encode(),
                          receipt.scope.encode(), receipt.entity_clock, receipt.event_hash,
                          receipt.prev_hash, receipt.wall_ms)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(receipt.signature, msg)
        return True
    except (InvalidSignature, ValueError):
        return False
