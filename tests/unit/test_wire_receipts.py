"""Receipts on the wire (docs/PROTOCOL.md §8.1): compact when they answer the request item's
own coordinate, naming entity and scope when they are another event's."""

from __future__ import annotations

import batpak_mp as bp
from batpak_mp._ipc import wire as W

RECEIPT = bp.Receipt(b"\x01" * 16, 7, "player:alice", "room:1", 3, b"\x02" * 32, b"\x03" * 32, 1234, True, None)


def test_a_receipt_for_the_requested_coordinate_leaves_it_out() -> None:
    fields = W.receipt_fields(RECEIPT, b"player:alice", b"room:1")
    assert fields == [b"\x01" * 16, 7, 3, b"\x02" * 32, b"\x03" * 32, 1234, True, None]


def test_a_receipt_of_another_coordinate_names_it() -> None:
    """A duplicate key sent with another coordinate is answered with the stored event's receipt."""
    for entity, scope in ((b"player:bob", b"room:1"), (b"player:alice", b"room:2")):
        assert W.receipt_fields(RECEIPT, entity, scope)[8:] == ["player:alice", "room:1"]
