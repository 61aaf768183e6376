"""batpak-mp: a durable, tamper-evident, hash-chained event store for Python
applications that run as many processes on one machine.

The public face: everything a caller needs is importable from here (see ``__all__``).
"""

from __future__ import annotations

from ._client import Fence, Store, Subscription, connect
from ._errors import (
    AlreadyServed,
    ApprovalError,
    BatpakError,
    ConcurrencyConflict,
    CorruptSegment,
    DiskFull,
    FenceLost,
    FutureFormat,
    FutureVersion,
    InvalidArgument,
    InvalidCoordinate,
    InvalidKind,
    InvalidPayload,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    ReactorError,
    ReservedKind,
    StorageError,
    StoreClosed,
    StoreLocked,
    StorePoisoned,
    UnsafeDirectory,
    UnsafeIpcObject,
    WriterTimeout,
    WriterUnavailable,
)
from ._gates import Approval, Denial, Denied, Evaluation, Gate, GateSet, Pipeline, Proposal
from ._native import codec_backend
from ._read.verify import verify
from ._replay import Cursor, Projection, Reactor, ReactorFailure
from ._service import Service, serve
from ._signing import verify_receipt_signature
from ._storage.engine import Engine, EngineConfig
from ._values import (
    BatchItem,
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
    "BatchItem",
    "BatpakError",
    "ConcurrencyConflict",
    "Coordinate",
    "CorruptSegment",
    "Cursor",
    "Denial",
    "Denied",
    "DiskFull",
    "Engine",
    "EngineConfig",
    "Evaluation",
    "Event",
    "Fence",
    "FenceLost",
    "Frontier",
    "FutureFormat",
    "FutureVersion",
    "Gate",
    "GateSet",
    "InvalidArgument",
    "InvalidCoordinate",
    "InvalidKind",
    "InvalidPayload",
    "Kind",
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
    "ReservedKind",
    "RestartPolicy",
    "Service",
    "StorageError",
    "Store",
    "StoreClosed",
    "StoreLocked",
    "StorePoisoned",
    "Subscription",
    "SyncMode",
    "UnsafeDirectory",
    "UnsafeIpcObject",
    "VerifyReport",
    "WriterState",
    "WriterTimeout",
    "WriterUnavailable",
    "__version__",
    "codec_backend",
    "connect",
    "register_payload",
    "serve",
    "unregister_payload",
    "verify",
    "verify_receipt_signature",
]
