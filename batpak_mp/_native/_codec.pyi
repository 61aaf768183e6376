"""Typed signatures of the C extension batpak_mp._native._codec (source: _codec.c).

Each function mirrors the pure-Python reference named in its docstring, byte for byte
and verdict for verdict (tests/unit/test_native_agrees.py).
"""

from collections.abc import Callable, Sequence
from typing import Any

from batpak_mp._format.frame import Buffer, Frame
from batpak_mp._format.scan import SegmentScan
from batpak_mp._values import Coordinate, Event

# An encode_group item: the 14 fields of encode_parts; prev_hash (index 10) may be the
# int index of an earlier item of the same group, whose event hash is then used.
GroupItem = tuple[int, int, int, int, int, int, bytes, bytes, bytes, bytes, bytes | int, bytes, bytes, bytes]

FRAME_VERSION: int
HEADER_SIZE: int
MIN_FRAME: int
MAX_FRAME: int
KNOWN_FLAGS: int
RECORD_SIZE: int
RECORDS_HEADER_SIZE: int
SOURCE_SHA256: str  # of the _codec.c this was built from ("" when built without setup.py)
CRC32_SIMD: bool  # CRC-32 by PCLMULQDQ folding on this CPU (else slice-by-8 tables)

def crc32(data: Buffer, value: int = 0) -> int:
    """zlib.crc32(data, value)."""

def blake2b(data: Buffer, digest_size: int = 64, person: Buffer = b"") -> bytes:
    """hashlib.blake2b(data, digest_size=digest_size, person=person).digest()."""

def name_hash(raw: bytes) -> int:
    """_format.directory.name_hash."""

def idem_hash(key: str | bytes) -> bytes:
    """_format.directory.idem_hash."""

def encode_parts(
    flags: int, kind: int, payload_version: int, global_sequence: int, entity_clock: int, wall_ms: int,
    event_id: bytes, causation_id: bytes, correlation_id: bytes, idem_hash: bytes, prev_hash: bytes,
    entity: bytes, scope: bytes, payload: bytes,
) -> tuple[tuple[bytes, bytes, bytes, bytes], bytes, int]:
    """_format.frame.encode_parts."""

def encode_group(items: Sequence[GroupItem]) -> tuple[bytes, list[bytes], list[int]]:
    """A commit group in one call: (frames joined, event hashes, frame lengths)."""

def frame_header(buf: Buffer, off: int, limit: int, *, final: bool = False) -> tuple[Any, ...] | int | str:
    """_format.frame.frame_header (ValueError, not a read past the buffer, when off < 0 or limit > len(buf))."""

def scan_frame(buf: Buffer, off: int, limit: int, *, final: bool = False) -> tuple[int, Frame | int | str | None]:
    """_format.frame.scan_frame."""

def frame_hash(buf: Buffer, off: int, frame_len: int) -> bytes:
    """_format.frame.frame_hash."""

def hash_matches(buf: Buffer, off: int, frame: Frame) -> bool:
    """_format.frame.hash_matches."""

def scan_segment(buf: Buffer, start: int, limit: int, expect_seq: int, *, check_hash: bool = False) -> SegmentScan:
    """_format.scan.scan_segment."""

def unpack_record(buf: Buffer, seq: int) -> tuple[int, int, int, int, int, int, int, int, int, bytes]:
    """RECORD.unpack_from(buf, RECORDS_HEADER_SIZE + (seq - 1) * RECORD_SIZE)."""

def pack_records(buf: Any, metas: Sequence[tuple[int, int, int, int, int, int, int, int, bytes, bytes]],
                 segment_id: int, offset: int) -> int:
    """_native._pure.pack_records: a published group's records into records.idx."""

def event_at(buf: Buffer, off: int, limit: int, seq: int, coords: dict[bytes, tuple[int, Coordinate]]) -> Event | None:
    """_native._pure.event_at: the Event of the frame of seq filling buf[off:limit]."""

def scan_events(buf: Buffer, off: int, limit: int, seq: int, last: int, coords: dict[bytes, tuple[int, Coordinate]],
                max_events: int) -> tuple[list[Event], int, int]:
    """_native._pure.scan_events: a run of frames as Events."""

def encode_request(items: Sequence[Any], entities: dict[bytes, Any], known: dict[bytes, Any],
                   lookup: Callable[[bytes], Any], first_seq: int, wall_ms: int, id_prefix: bytes, fence_flag: int,
                   durable: bool, scope_hashes: dict[bytes, int], receipt_type: Any, state_type: Any,
                   ) -> tuple[bytes, list[tuple[int, int, int, int, int, int, int, int, bytes, bytes]], list[Any],
                              list[tuple[bytes, int]]]:
    """_native._pure.encode_request: one append request planned and encoded."""

def index_group(records: Any, metas: Sequence[tuple[int, int, int, int, int, int, int, int, bytes, bytes]],
                segment_id: int, offset: int, delta: Any, slots: dict[bytes, int],
                upsert: Callable[[int, int, int], int]) -> int:
    """_native._pure.index_group: a published group's records, then its delta slots."""
