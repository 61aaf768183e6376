"""Checking a receipt against the stored event it names.

Owns: ``receipt_matches``, shared by the in-process engine and the client.
Must not import the write side, the IPC layer or any process role.
"""

from __future__ import annotations

from .._errors import BatpakError
from .._signing import Signer
from .._values import Receipt
from .reader import Reader


def receipt_matches(reader: Reader, receipt: Receipt, signer: Signer | None) -> bool:
    """True when ``receipt`` describes the stored event exactly (and its signature, when
    present, verifies). Shared by the engine and the client."""
    try:
        ev = reader.get(receipt.event_id)
    except BatpakError:
        return False
    same = (
        ev.global_sequence == receipt.global_sequence and ev.coordinate.entity == receipt.entity
        and ev.coordinate.scope == receipt.scope and ev.entity_clock == receipt.entity_clock
        and ev.event_hash == receipt.event_hash and ev.prev_hash == receipt.prev_hash
        and ev.wall_ms == receipt.wall_ms
    )
    if not same:
        return False
    if receipt.signature is not None:
        if signer is None:
            return True  # nothing to check it against here; see bp.verify_receipt_signature
        return signer.verify(receipt)
    return True
