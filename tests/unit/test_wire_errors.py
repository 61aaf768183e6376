"""Typed errors cross the wire with the value they name: plain data (None, bool, int,
float, str, bytes) as it is, so a client's error equals the one the writer raised;
anything else as its repr (data only, never code)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from batpak_mp import _errors as E
from batpak_mp._ipc import wire as W


def _across(exc: E.BatpakError) -> E.BatpakError:
    reply = W.Reply(1, 1, W.STATUS_ERROR, W.error_to_wire(exc))
    return W.error_from_wire(W.decode_reply(W.encode_reply(reply)).data)


@pytest.mark.parametrize("value", [None, True, 10_001, -1, 1.5, "abc", b"\x00\xff", "k" * 1024])
def test_a_plain_value_arrives_as_it_was(value: Any) -> None:
    got = _across(E.InvalidArgument("items", value, "why"))
    assert type(got) is E.InvalidArgument and (got.name, got.value, got.reason) == ("items", value, "why")


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, object(), 1 << 70, "k" * 1025])
def test_anything_else_arrives_as_its_repr(value: Any) -> None:
    got = _across(E.InvalidArgument("items", value, "why"))
    assert isinstance(got, E.InvalidArgument) and got.value == repr(value)[:1024]


def test_kind_and_coordinate_errors_keep_their_values() -> None:
    kind = _across(E.InvalidKind(16, 4096, "out of range"))
    assert isinstance(kind, E.InvalidKind) and (kind.category, kind.type_id) == (16, 4096)
    coord = _across(E.InvalidCoordinate("entity", b"\xff" * 8, "is not valid UTF-8"))
    assert isinstance(coord, E.InvalidCoordinate) and coord.value == b"\xff" * 8


def test_every_error_field_is_msgpack_data() -> None:
    for exc in (E.InvalidArgument("x", object(), "r"), E.InvalidKind([1], None, "r")):
        msgpack.packb(W.error_to_wire(exc), use_bin_type=True)
