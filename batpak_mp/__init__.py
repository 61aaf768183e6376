"""batpak-mp: a durable, tamper-evident, hash-chained event store for Python
applications that run as many processes on one machine.

The public face: everything a caller needs is importable from here (see ``__all__``).
"""

from __future__ import annotations

from ._client import Store, connect
from ._engine import Engine, EngineConfig
from ._errors import (
    BatpakError,
    ConcurrencyConflict,
    CorruptSegment,
    FutureFormat,
    InvalidArgument,
    InvalidCoordinate,
    InvalidKind,
    InvalidPayload,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    ReservedKind,
    StorageError,
    StoreClosed,
    StoreLocked,
    StorePoisoned,
    WriterTimeout,
    WriterUnavailable,
)
from ._service import Service, serve
from ._signing import verify_receipt_signature
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
)
from ._verify import verify

__version__ = "0.1.0"

__all__ = [
    "BatchItem",
    "BatpakError",
    "ConcurrencyConflict",
    "Coordinate",
    "CorruptSegment",
    "Engine",
    "EngineConfig",
    "Event",
    "Frontier",
    "FutureFormat",
    "InvalidArgument",
    "InvalidCoordinate",
    "InvalidKind",
    "InvalidPayload",
    "Kind",
    "NotFound",
    "Page",
    "PayloadTooLarge",
    "Problem",
    "ProtocolError",
    "Receipt",
    "ReservedKind",
    "RestartPolicy",
    "Service",
    "StorageError",
    "Store",
    "StoreClosed",
    "StoreLocked",
    "StorePoisoned",
    "SyncMode",
    "VerifyReport",
    "WriterState",
    "WriterTimeout",
    "WriterUnavailable",
    "__version__",
    "connect",
    "serve",
    "verify",
    "verify_receipt_signature",
]
