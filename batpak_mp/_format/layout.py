"""How a fixed binary layout of docs/FORMAT.md is declared: once, as a NamedTuple whose
field annotations carry their struct codes.

Owns: deriving everything else from that declaration: the field list, the ``struct``
of a run of fields, a field's position in the unpacked tuple and its byte offset in the
packed bytes. So a layout (the frame header, the index record) is written down in one
place, and its struct, its NamedTuple, its position constants and its numpy dtype cannot
disagree. Invariants: little-endian, no padding (``"<"``), so a field's offset is the sum
of the sizes before it. Pure: no I/O. Must not import os, mmap, posix_ipc or a clock.
"""

from __future__ import annotations

import struct
import typing
from typing import Any

Fields = tuple[tuple[str, str], ...]  # (name, struct code) in layout order


def fields_of(layout: type[Any]) -> Fields:
    """(name, struct code) of every field of ``layout``, a NamedTuple declared with
    ``name: Annotated[int, "Q"]`` style annotations, in order."""
    hints = typing.get_type_hints(layout, include_extras=True)
    out = []
    for name in layout._fields:
        meta: tuple[Any, ...] = getattr(hints[name], "__metadata__", ())
        if len(meta) != 1 or not isinstance(meta[0], str):
            raise TypeError(f"{layout.__name__}.{name} needs one struct code: Annotated[type, 'code']")
        struct.calcsize(meta[0])  # a bad code fails here, at import
        out.append((name, meta[0]))
    return tuple(out)


def struct_of(fields: Fields, first: str | None = None, last: str | None = None) -> struct.Struct:
    """The little-endian struct of fields ``first`` through ``last`` (inclusive; default
    all of them)."""
    names = [n for n, _ in fields]
    lo = names.index(first) if first is not None else 0
    hi = names.index(last) + 1 if last is not None else len(fields)
    return struct.Struct("<" + "".join(code for _, code in fields[lo:hi]))


def position_of(fields: Fields, name: str) -> int:
    """Index of field ``name`` in the tuple the layout's struct unpacks to."""
    return [n for n, _ in fields].index(name)


def offset_of(fields: Fields, name: str) -> int:
    """Byte offset of field ``name`` in the packed layout."""
    return struct.calcsize("<" + "".join(code for _, code in fields[:position_of(fields, name)]))


def field_struct(fields: Fields, name: str) -> struct.Struct:
    """A struct as long as the whole layout that reads field ``name`` alone (pad bytes
    around it), so ``iter_unpack`` over packed layouts yields that field of each."""
    whole = struct_of(fields).size
    start = offset_of(fields, name)
    code = fields[position_of(fields, name)][1]
    return struct.Struct(f"<{start}x{code}{whole - start - struct.calcsize('<' + code)}x")
