"""Checking a receipt against the stored event it names.

Owns: ``receipt_matches``, shared by the in-process engine and the client.
Must not import the write side, the IPC layer or any process role.
"""

from __future__ import annotations

from collections.abc import Callable

from .._errors import BatpakError
from .._values import Receipt
from .reader import Reader


def receipt_matches(reader: Reader, receipt: Receipt,
                    verify_signature: Callable[[Receipt], bool] | None) -> bool:
    """True when ``receipt`` describes the stored event exactly. ``verify_signature``:
    the store signs its receipts (pass the check of its key), so a receipt must carry a
    signature that verifies; a receipt stripped of its signature does not match. None:
    the store does not sign, and any signature field is not checked. Shared by the
    engine and the client."""
    if not isinstance(receipt, Receipt):
        return False
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
    if verify_signature is None:
        return True
    return receipt.signature is not None and verify_signature(receipt)
