"""The tunables of an engine (the writer takes the same ones from its command line).

Owns: ``EngineConfig`` (segment size, sync mode, payload and batch limits, signing key,
whether the tag index is kept)
and ``parse_sync``. Invariants: a config that exists is valid (checked at construction,
each error naming the value at fault). Pure values: must not import os, the seam or any
other module of the write side.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import InvalidArgument
from .._values import SyncMode

MiB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    """Tunables of an engine (the writer takes the same ones from the command line)."""

    segment_max_bytes: int = 64 * MiB  # preallocated size of each segment file
    sync: SyncMode = SyncMode.GROUP
    sync_interval_ms: int = 100  # with SyncMode.INTERVAL: the longest a commit waits for fsync
    max_payload_bytes: int = 16 * MiB  # per event, encoded
    max_batch_events: int = 10_000
    max_batch_bytes: int = 256 * MiB  # encoded payloads of one batch
    signing_key: bytes | None = None  # raw 32-byte Ed25519 private key: receipts get signed
    tag_index: bool = True  # file events by entity prefix, scope and kind (False: those queries filter the records)

    def __post_init__(self) -> None:
        if not 1 * MiB <= self.segment_max_bytes <= 3 << 30:
            raise InvalidArgument("segment_max_bytes", self.segment_max_bytes, "must be 1 MiB .. 3 GiB")
        if not isinstance(self.sync, SyncMode):
            object.__setattr__(self, "sync", parse_sync(self.sync))
        if self.sync_interval_ms < 1:
            raise InvalidArgument("sync_interval_ms", self.sync_interval_ms, "must be >= 1")
        if type(self.tag_index) is not bool:
            raise InvalidArgument("tag_index", self.tag_index, "must be a bool")
        if not 1 <= self.max_payload_bytes <= 1 << 30:
            raise InvalidArgument("max_payload_bytes", self.max_payload_bytes, "must be 1 .. 1 GiB")


def parse_sync(value: object) -> SyncMode:
    try:
        return SyncMode(value)
    except ValueError:
        raise InvalidArgument("sync", value, "must be one of group, interval, none") from None
