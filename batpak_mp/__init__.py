"""batpak-mp: a durable, tamper-evident, hash-chained event store for Python
applications that run as many processes on one machine.

The public face: everything a caller needs is importable from here (see ``__all__``).
"""

from __future__ import annotations

import typing as _typing

from ._backup import BackupReport, ForkReport, RestoreReport, backup, fork, restore
from ._client import Fence, Store, Subscription, connect
from ._errors import (
    AlreadyServed,
    ApprovalError,
    BackupRefused,
    BatpakError,
    ConcurrencyConflict,
    CorruptSegment,
    CursorFilterChanged,
    DiskFull,
    FenceLost,
    FutureFormat,
    FutureVersion,
    IdempotencyConflict,
    InvalidArgument,
    InvalidCoordinate,
    InvalidKind,
    InvalidPayload,
    MasterKeyError,
    MetricsUnavailable,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    ReactorError,
    RedactionRefused,
    ReservedKind,
    RetentionRefused,
    StorageError,
    StoreClosed,
    StoreLocked,
    StorePoisoned,
    StreamMismatch,
    StreamTampered,
    StreamUnavailable,
    UnsafeDirectory,
    UnsafeIpcObject,
    WriterTimeout,
    WriterUnavailable,
)
from ._gates import Approval, Denial, Denied, Evaluation, Gate, GateSet, Pipeline, Proposal
from ._native import codec_backend
from ._query import Region
from ._read.verify import verify
from ._replay import Cursor, Projection, Reactor, ReactorFailure
from ._retention import RetentionRule
from ._service import Service, serve
from ._signing import verify_receipt_signature
from ._storage.engine import Engine, EngineConfig
from ._values import (
    BatchItem,
    CompactReport,
    Coordinate,
    Event,
    Frontier,
    Kind,
    Page,
    Problem,
    Receipt,
    RestartPolicy,
    SyncMode,
    VerifyReport,
    WriterState,
    register_payload,
    unregister_payload,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadyServed",
    "Approval",
    "ApprovalError",
    "BackupRefused",
    "BackupReport",
    "BatchItem",
    "BatpakError",
    "CompactReport",
    "ConcurrencyConflict",
    "Coordinate",
    "CorruptSegment",
    "Cursor",
    "CursorFilterChanged",
    "Denial",
    "Denied",
    "DiskFull",
    "Engine",
    "EngineConfig",
    "Evaluation",
    "Event",
    "Fence",
    "FenceLost",
    "ForkReport",
    "Frontier",
    "FutureFormat",
    "FutureVersion",
    "Gate",
    "GateSet",
    "IdempotencyConflict",
    "InvalidArgument",
    "InvalidCoordinate",
    "InvalidKind",
    "InvalidPayload",
    "Kind",
    "MasterKeyError",
    "MetricsUnavailable",
    "NotFound",
    "Page",
    "PayloadTooLarge",
    "Pipeline",
    "Problem",
    "Projection",
    "Proposal",
    "ProtocolError",
    "Reactor",
    "ReactorError",
    "ReactorFailure",
    "Receipt",
    "RedactionRefused",
    "Region",
    "ReservedKind",
    "RestartPolicy",
    "RestoreReport",
    "RetentionRefused",
    "RetentionRule",
    "Service",
    "StorageError",
    "Store",
    "StoreClosed",
    "StoreLocked",
    "StorePoisoned",
    "StreamMismatch",
    "StreamTampered",
    "StreamUnavailable",
    "Subscription",
    "SyncMode",
    "UnsafeDirectory",
    "UnsafeIpcObject",
    "VerifyReport",
    "WriterState",
    "WriterTimeout",
    "WriterUnavailable",
    "__version__",
    "aio",
    "backup",
    "codec_backend",
    "connect",
    "fork",
    "register_payload",
    "restore",
    "serve",
    "unregister_payload",
    "verify",
    "verify_receipt_signature",
]


if _typing.TYPE_CHECKING:  # type checkers see the module; at run time it is imported on first use
    from . import aio as aio


def __getattr__(name: str) -> object:
    """``bp.aio`` (the asyncio face) is imported on first use: a sync process never pays
    for asyncio."""
    if name == "aio":
        import importlib

        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
