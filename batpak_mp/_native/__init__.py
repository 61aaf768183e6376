"""The loader of the compiled codec: which backend serves the per-event work.

Owns: the decision between the C extension ``batpak_mp._native._codec`` (a mirror of
``batpak_mp._format``'s frame, scan, name-hash and record codecs) and the pure-Python
reference. ``BACKEND`` is ``"native"`` when the extension imported, matches the layout
constants of ``_format`` and the source it sits next to (the SHA-256 of ``_codec.c`` is
compiled in: a failed optional rebuild leaves an old build in place, which must not
serve), and ``BATPAK_MP_PURE`` is unset, empty or ``"0"``; else
``"python"``, and ``codec`` is None so callers keep the ``_format`` functions.
``BATPAK_MP_REQUIRE_NATIVE=1`` turns "could not load" into ImportError (CI uses it so a
broken build cannot silently fall back). ``UNAVAILABLE`` says why the extension is not
in use ("" when it is).

The functions below are the active backend's: ``from batpak_mp._native import scan_frame``
gets the C one when it serves and the ``_format`` (or ``_pure``) one otherwise, with the
same signature either way. ``codec`` is the extension module itself (or None).

Invariants: decided once, at import; the two backends give the same bytes and verdicts
(tests/unit/test_native_agrees.py). Reads the environment and its own ``_codec.c``; no
clock.
Must not import _storage, _read, _ipc or any process role.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType

from .._format import frame as _frame
from .._format import record as _record

PURE_ENV = "BATPAK_MP_PURE"  # non-empty and not "0": use the pure-Python codec even when built
REQUIRE_ENV = "BATPAK_MP_REQUIRE_NATIVE"  # "1": fail the import when the extension cannot load


def _flag(name: str) -> bool:
    value = os.environ.get(name, "")
    return value not in ("", "0")


def _load() -> tuple[ModuleType | None, str]:
    """The extension module, or None and the reason it cannot be used."""
    try:
        from . import _codec
    except ImportError as exc:
        return None, f"batpak_mp._native._codec did not import: {exc}"
    expected = {
        "FRAME_VERSION": _frame.FRAME_VERSION, "HEADER_SIZE": _frame.HEADER_SIZE, "MIN_FRAME": _frame.MIN_FRAME,
        "MAX_FRAME": _frame.MAX_FRAME, "KNOWN_FLAGS": _frame.KNOWN_FLAGS, "RECORD_SIZE": _record.RECORD_SIZE,
        "RECORDS_HEADER_SIZE": _record.RECORDS_HEADER_SIZE,
    }
    stale = [f"{k}={getattr(_codec, k, None)} (expected {v})" for k, v in expected.items() if getattr(_codec, k, None) != v]
    source = Path(__file__).with_name("_codec.c")
    built_from = getattr(_codec, "SOURCE_SHA256", "")
    if built_from and source.exists() and hashlib.sha256(source.read_bytes()).hexdigest() != built_from:
        stale.append(f"built from another version of {source.name}")
    if stale:
        return None, "batpak_mp._native._codec is a stale build (rebuild: pip install -e .): " + ", ".join(stale)
    return _codec, ""


_module, _reason = _load()
if _module is None and os.environ.get(REQUIRE_ENV) == "1":
    raise ImportError(f"{REQUIRE_ENV}=1 but {_reason}")

if _module is not None and _flag(PURE_ENV):
    _reason = f"{PURE_ENV} is set"

codec: ModuleType | None = None if _reason else _module
"""The extension module when it serves, else None (use ``batpak_mp._format``)."""

BACKEND: str = "native" if codec is not None else "python"
UNAVAILABLE: str = _reason


if codec is not None:
    from ._codec import (
        encode_group,
        encode_parts,
        encode_request,
        event_at,
        frame_hash,
        frame_header,
        hash_matches,
        idem_hash,
        index_group,
        name_hash,
        pack_records,
        scan_events,
        scan_frame,
        scan_segment,
        unpack_record,
    )
else:
    from .._format.directory import idem_hash, name_hash
    from .._format.frame import encode_parts, frame_hash, frame_header, hash_matches, scan_frame
    from .._format.scan import scan_segment
    from ._pure import encode_group, encode_request, event_at, index_group, pack_records, scan_events, unpack_record

__all__ = [
    "BACKEND", "PURE_ENV", "REQUIRE_ENV", "UNAVAILABLE", "backend", "codec", "codec_backend", "encode_group",
    "encode_parts", "encode_request", "event_at", "frame_hash", "frame_header", "hash_matches", "idem_hash",
    "index_group", "name_hash", "pack_records", "scan_events", "scan_frame", "scan_segment", "unpack_record",
]


def codec_backend() -> str:
    """Which codec serves this process: ``"native"`` (the compiled C extension, built by
    ``pip install``) or ``"python"`` (the pure-Python reference: the extension is not
    built or is stale, or ``BATPAK_MP_PURE=1`` forces it). Public as ``bp.codec_backend``."""
    return BACKEND


backend = codec_backend  # the name the loader's own tests use
