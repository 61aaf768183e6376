"""The error hierarchy of batpak-mp.

Owns: every exception the public API raises. Each is rooted at ``BatpakError``, named
by who is at fault, carries the data that explains it, and mixes in the built-in it
resembles so ``except ValueError`` / ``except KeyError`` style handlers keep working.
Invariant: an ``OSError`` never crosses the public API raw; I/O failures become
``StorageError`` (which *is* an ``OSError`` subclass, with the path and operation).
Must not import anything else from the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class BatpakError(Exception):
    """Root of every error raised by batpak-mp."""


class InvalidCoordinate(BatpakError, ValueError):
    """The caller gave an entity or scope that is empty, too long or has control chars."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field} {value!r}: {reason}")


class InvalidKind(BatpakError, ValueError):
    """The caller gave a kind whose category or type id is out of range."""

    def __init__(self, category: Any, type_id: Any, reason: str) -> None:
        self.category = category
        self.type_id = type_id
        self.reason = reason
        super().__init__(f"invalid kind ({category!r}, {type_id!r}): {reason}")


class ReservedKind(InvalidKind):
    """The caller used category 0x0 (system) or 0xD (effect), which the store reserves."""

    def __init__(self, category: int, type_id: int) -> None:
        super().__init__(category, type_id, f"category {category:#x} is reserved for the store")


class PayloadTooLarge(BatpakError, ValueError):
    """The encoded payload (or batch) is larger than the configured limit."""

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        self.size = size
        self.limit = limit
        self.what = what
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")


class InvalidPayload(BatpakError, ValueError):
    """The payload cannot be encoded as msgpack."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"payload is not msgpack-encodable: {reason}")


class InvalidArgument(BatpakError, ValueError):
    """Some other argument is out of range (limit, timeout, id length, ...)."""

    def __init__(self, name: str, value: Any, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name} {value!r}: {reason}")


class ConcurrencyConflict(BatpakError):
    """``expected_clock`` did not match the entity's clock (its number of events).
    ``entity``/``expected``/``actual`` name the first conflict of the request;
    ``conflicts`` names every one of a batch, as (entity, expected, actual) triples."""

    def __init__(self, entity: str, expected: int, actual: int,
                 conflicts: Sequence[Sequence[Any]] | None = None) -> None:
        self.entity = entity
        self.expected = expected
        self.actual = actual
        self.conflicts: tuple[tuple[str, int, int], ...] = (
            ((entity, expected, actual),) if conflicts is None
            else tuple((str(e), int(x), int(a)) for e, x, a in conflicts))
        more = f" (and {len(self.conflicts) - 1} more: {list(self.conflicts[1:5])})" if len(self.conflicts) > 1 else ""
        super().__init__(
            f"entity {entity!r}: expected clock {expected}, actual clock {actual}{more}"
        )


class CursorFilterChanged(BatpakError, ValueError):
    """A durable cursor (or reactor) was opened under another filter than the one its
    position was acknowledged under: the position would not mean the same events.
    ``stored`` and ``given`` are the two filters' identities. Open it with ``reset=True``
    to start it over under the new filter, or use another name."""

    def __init__(self, cursor: str, stored: str, given: str) -> None:
        self.cursor = cursor
        self.stored = stored
        self.given = given
        super().__init__(f"cursor {cursor!r} was acknowledged under filter {stored!r}, not {given!r}")


class IdempotencyConflict(BatpakError, ValueError):
    """An idempotency key was used again for another request: the event stored under it
    (at ``sequence``) differs in ``field`` (entity, scope, kind, payload, payload_version,
    causation_id or correlation_id). ``key`` is the key's 128-bit hash, in hex. Nothing
    was written."""

    def __init__(self, key: str, sequence: int, field: str) -> None:
        self.key = key
        self.sequence = sequence
        self.field = field
        super().__init__(f"idempotency key (hash {key}) was used for another request: the event at sequence "
                         f"{sequence} has another {field}")


class NotFound(BatpakError, KeyError):
    """No committed, visible event has that id (or sequence)."""

    def __init__(self, what: str, key: Any) -> None:
        self.what = what
        self.key = key
        super().__init__(f"{what} {key!r} not found")

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain sentence
        return str(self.args[0])


class StoreLocked(BatpakError):
    """Another live process owns (holds the lock of) the data directory."""

    def __init__(self, data_dir: str, holder_pid: int | None = None) -> None:
        self.data_dir = data_dir
        self.holder_pid = holder_pid
        who = f" (held by pid {holder_pid})" if holder_pid else ""
        super().__init__(f"data directory {data_dir!r} is locked by another writer{who}")


class AlreadyServed(StoreLocked):
    """``serve`` found the data directory served by another live supervisor (or a writer
    it did not start); the running service was left untouched."""

    def __init__(self, data_dir: str, supervisor_pid: int | None, detail: str = "") -> None:
        self.data_dir = data_dir
        self.holder_pid = self.supervisor_pid = supervisor_pid
        self.detail = detail
        who = f"supervisor pid {supervisor_pid}" if supervisor_pid else "another live process"
        BatpakError.__init__(self, f"data directory {data_dir!r} is already served by {who}; that service "
                                   f"was left untouched (stop it first){': ' + detail if detail else ''}")


class UnsafeDirectory(BatpakError, PermissionError):
    """A data directory other users could reach into: owned by another uid, or with
    group/other permission bits. ``serve`` refuses it rather than chmod it."""

    def __init__(self, path: str, mode: int, owner_uid: int, reason: str) -> None:
        self.path = path
        self.mode = mode
        self.owner_uid = owner_uid
        self.reason = reason
        super().__init__(f"data directory {path!r} (mode {mode:04o}, owner uid {owner_uid}) {reason}")


class WriterUnavailable(BatpakError, ConnectionError):
    """The writer is down, failed closed, or the supervisor gave up restarting it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"writer unavailable: {reason}")


class WriterTimeout(BatpakError, TimeoutError):
    """The writer did not answer (or the frontier did not advance) before the deadline."""

    def __init__(self, what: str, timeout_s: float) -> None:
        self.what = what
        self.timeout_s = timeout_s
        super().__init__(f"timed out after {timeout_s:g}s waiting for {what}")


class CorruptSegment(BatpakError):
    """Stored bytes fail their checksum or structure below the durable end."""

    def __init__(self, segment: str, offset: int, reason: str) -> None:
        self.segment = segment
        self.offset = offset
        self.reason = reason
        super().__init__(f"corrupt segment {segment} at offset {offset}: {reason}")


class FutureFormat(BatpakError):
    """A file was written by a newer format version than this code understands."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"{path}: format version {found} is newer than the supported version {supported}"
        )


class ProtocolError(BatpakError):
    """A message on the IPC path is malformed, of an unknown version, or unexpected."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"protocol error: {reason}")


class UnsafeIpcObject(BatpakError, PermissionError):
    """An IPC object of the store (control block, request queue, client area) is not one
    the service's own user made and alone can use: another owner, group/other permission
    bits, the wrong file type, extra hard links or a size out of range. The service never
    uses such an object; it replaces one it cannot trust (when it may remove it) or
    refuses to start, naming it (docs/OPERATIONS.md "Trust model")."""

    def __init__(self, name: str, owner_uid: int, mode: int, reason: str) -> None:
        self.name = name
        self.owner_uid = owner_uid
        self.mode = mode
        self.reason = reason
        super().__init__(f"IPC object {name} (owner uid {owner_uid}, mode {mode & 0o7777:04o}) {reason}")


class FenceLost(BatpakError):
    """The visibility fence is gone (cancelled, or the writer restarted): its events stay
    invisible for good. Open a new fence and write them again."""

    def __init__(self, token: bytes, reason: str) -> None:
        self.token = token
        self.reason = reason
        super().__init__(f"fence {token.hex()} is lost: {reason}")


class StoreClosed(BatpakError):
    """The store (or engine) was closed; open or connect again."""

    def __init__(self, what: str = "store") -> None:
        super().__init__(f"{what} is closed")


class StorageError(BatpakError, OSError):
    """An operating-system call on the data directory failed (ENOSPC, EIO, EACCES...)."""

    def __init__(self, op: str, path: str, cause: OSError) -> None:
        self.op = op
        self.path = path
        self.cause = cause
        OSError.__init__(self, cause.errno, f"{op} {path}: {cause.strerror or cause}")
        self.filename = path

    def __str__(self) -> str:
        return f"{self.op} {self.path} failed: [errno {self.errno}] {self.strerror}"


class StorePoisoned(StorageError):
    """A failed fsync (or an unrepairable write) stopped the engine for good.

    Nothing is retried over pages the kernel may have dropped; restart the writer so it
    recovers from what is really on disk."""

    def __str__(self) -> str:
        return f"store poisoned by failed {self.op} on {self.path}: [errno {self.errno}] {self.strerror}"


class DiskFull(StorageError):
    """The file system of the data directory is full (ENOSPC, or EDQUOT: the owner's
    quota). The request that met it was not written (nothing of it is kept); reads and
    the service stay up, and the same request succeeds once space is freed."""


class BackupRefused(BatpakError, ValueError):
    """``backup``, ``fork`` or ``restore`` will not write into ``path``: it lies inside the
    store being copied, holds something that is not a backup of the same store (or is not
    empty, for a fork), or is a store of another id (restore). Nothing was written there
    and the source is untouched."""

    def __init__(self, path: str, reason: str, found_store_id: str | None = None) -> None:
        self.path = path
        self.reason = reason
        self.found_store_id = found_store_id
        super().__init__(f"refusing {path!r}: {reason}")


class ApprovalError(BatpakError, ValueError):
    """An approval cannot be committed: it was already ``used``, was minted by another
    pipeline (``foreign``), its proposal ``changed`` after approval, or it ``expired``."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"approval refused ({reason}): {detail}")


class FutureVersion(BatpakError):
    """An event's payload was stored at a newer payload version than this process has
    registered for its kind (``bp.register_payload``): it is refused, never guessed at."""

    def __init__(self, kind: Any, stored: int, known: int) -> None:
        self.kind = kind
        self.stored = stored
        self.known = known
        super().__init__(
            f"payload of kind {tuple(kind)!r} is at version {stored}, newer than the registered version {known}"
        )


class ReactorError(BatpakError):
    """A reactor's handler failed on the same event ``failures`` times in a row; the
    event was not acknowledged (the reactor retries it when run again)."""

    def __init__(self, reactor: str, sequence: int, failures: int, cause: BaseException) -> None:
        self.reactor = reactor
        self.sequence = sequence
        self.failures = failures
        self.cause = cause
        super().__init__(
            f"reactor {reactor!r} failed {failures} times in a row on the event at sequence {sequence}: {cause!r}"
        )


# -- JetStream (batpak_mp.jetstream): the journal in a NATS stream --------------------------------
class StreamTampered(BatpakError):
    """A message of a NATS JetStream stream fails its check: the frame's checksum or
    hash, the hash chain of its entity, its headers against its frame, or its place in
    the stream. Raised by the remote reader and restore-from-stream, which never return
    such a message (nor anything after it)."""

    def __init__(self, stream: str, stream_seq: int, subject: str, reason: str) -> None:
        self.stream = stream
        self.stream_seq = stream_seq
        self.subject = subject
        self.reason = reason
        super().__init__(f"stream {stream!r} message {stream_seq} ({subject}): {reason}")


class StreamMismatch(BatpakError):
    """A stream cannot take (or give) this journal: it holds another store's events or
    foreign messages, or its history diverged from the journal's. Nothing is published."""

    def __init__(self, stream: str, reason: str, expected: str | None = None, found: str | None = None) -> None:
        self.stream = stream
        self.reason = reason
        self.expected = expected
        self.found = found
        super().__init__(f"stream {stream!r}: {reason}")


class StreamUnavailable(BatpakError, ConnectionError):
    """The NATS server (or its JetStream stream) could not be reached in time."""

    def __init__(self, url: str, stream: str, reason: str) -> None:
        self.url = url
        self.stream = stream
        self.reason = reason
        super().__init__(f"stream {stream!r} at {url}: {reason}")


class MetricsUnavailable(BatpakError, OSError):
    """The metrics endpoint cannot listen on ``address`` (``serve(metrics=...)``,
    ``batpak-mp serve --metrics``): the port is in use, the host is not this machine's,
    or the port needs privileges. Nothing was started."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot serve metrics on {address!r}: {reason}")


class RedactionRefused(BatpakError, ValueError):
    """An event's payload cannot be removed: a system event (the store's own record), or a
    frame of format version 1, whose hash covers its payload bytes (FORMAT.md §9.1)."""

    def __init__(self, event: str, reason: str) -> None:
        self.event = event
        self.reason = reason
        super().__init__(f"cannot redact event {event}: {reason}")


class RetentionRefused(BatpakError, ValueError):
    """A retention rule that would remove what must stay: system events (cursor
    positions, fences, erasure requests) or the latest event of an entity."""

    def __init__(self, rule: Any, reason: str) -> None:
        self.rule = rule
        self.reason = reason
        super().__init__(f"retention rule {rule!r} refused: {reason}")


class MasterKeyError(BatpakError, PermissionError):
    """The store encrypts payloads and the master key is missing, malformed, not the one
    its data keys were wrapped with, or kept inside the data directory. Raised at open,
    before anything is written."""

    def __init__(self, data_dir: str, reason: str) -> None:
        self.data_dir = data_dir
        self.reason = reason
        super().__init__(f"master key of {data_dir or 'the store'}: {reason}")
