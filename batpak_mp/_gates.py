"""Caller-defined gates: named checks that run in the caller before an append, the
single-use approvals they mint, and the audit records (denials, bypasses) the store
keeps of them.

Owns: ``Denial``, ``Proposal`` (what is proposed to append, and its digest), ``Gate``
(a named predicate over (context, proposal)), ``GateSet`` (ordered, uniquely named
gates; fail-fast ``evaluate``, reporting ``evaluate_all``), ``Evaluation``,
``Pipeline`` (evaluate -> ``Approval`` or ``Denied``; ``commit``; ``bypass`` with a
reason; ``record_denial``), and the shape of the effect events (category 0xD) that
record denials and bypasses: ``check_effect`` and the builders ``denial_payload``,
``effect_item``, ``bypass_audit_item``. The engine, and the client and writer, use
these so that every path accepts exactly the same audit records.

Invariants:
- Evaluating never raises because of a gate. A gate that raises (``Exception``;
  ``KeyboardInterrupt`` and ``SystemExit`` still propagate) or returns anything but
  None, a bool or a ``Denial`` produces a ``GATE_DEFECT`` denial. A denial always
  names the gate that made it (the name it was registered under).
- An approval is committed at most once, only by the pipeline that minted it, only
  while its proposal still has the digest it was approved with, and the payload
  appended is decoded from the very bytes that were checked. The pipeline's ledger,
  not the approval object, is the authority: a copy of an approval grants nothing.
- There is no unrecorded bypass: it needs a non-empty reason and a store that appends
  the event and its audit record in one atomic batch (``append_bypass``).
- Gates run in the caller, not in the writer, so they are not atomic with the append:
  put ``expected_clock`` on the proposal for read-check-write.

Pure: no ``os``, no IPC, no clock, no randomness (time comes in as ``now_ms``). Must not
import the engine, the reader, the writer, the client or the supervisor; only
``_values`` and ``_errors`` of this package.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, NamedTuple, NoReturn, Protocol, TypeVar

import msgpack

from ._errors import ApprovalError, InvalidArgument, InvalidKind, InvalidPayload, ReservedKind
from ._values import (
    CATEGORY_EFFECT,
    EFFECT_BYPASS,
    EFFECT_DENIAL,
    STORE_KINDS,
    BatchItem,
    Coordinate,
    Kind,
    Receipt,
    check_kind,
)

GATE_DEFECT = "GATE_DEFECT"  # code of the denial made for a gate that raised or returned nonsense
DENIED = "DENIED"  # code of the denial made for a gate that returned False
PIPELINE = "<pipeline>"  # the gate name on denials the pipeline itself makes
MAX_GATE_NAME = 256  # chars: a name is in every denial and bypass record
MAX_CODE = 64  # chars: a code is a short machine-readable token, not prose
MAX_TEXT = 4096  # chars: a denial message or bypass reason; keeps audit records small
MAX_GATES = 1024  # gates in one set (so names in one bypass record)
MAX_OUTSTANDING = 1024  # approvals a pipeline remembers by default; the oldest are evicted beyond
_DIGEST_PERSON = b"batpak-mp/prop1"  # blake2b personalisation: proposal digests, version 1
_BYPASS_KEY_PERSON = b"batpak-mp/byp1"  # the audit record's idempotency key, derived from the event's

# The fields an effect record may carry (the required ones are in _values.STORE_KINDS).
_EFFECT_FIELDS: dict[int, frozenset[str]] = {
    EFFECT_DENIAL: frozenset({"gate", "code", "message", "proposed_kind"}),
    EFFECT_BYPASS: frozenset({"reason", "gates", "proposed_kind", "proposal_digest"}),
}

Ctx = TypeVar("Ctx")


def _check_text(what: str, value: object, limit: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(what, type(value).__name__, "must be a str")
    if not allow_empty and not value.strip():
        raise InvalidArgument(what, value, "must not be empty")
    if len(value) > limit:
        raise InvalidArgument(what, value[:40] + "...", f"is {len(value)} chars, the limit is {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(what, value[:40], "is not valid UTF-8 (lone surrogate)") from None
    return value


def _check_id(what: str, value: object) -> None:
    if value is not None and not (type(value) is bytes and len(value) == 16 and any(value)):
        raise InvalidArgument(what, type(value).__name__, "must be a 16-byte event id (bytes) or None")


# ---------------------------------------------------------------------------- values
@dataclass(frozen=True, slots=True)
class Denial:
    """A gate's refusal: which ``gate``, a short machine-readable ``code``, and a
    ``message`` for people. A gate may leave ``gate`` empty: the gate set fills in the
    name the gate was registered under."""

    gate: str
    code: str
    message: str = ""

    def __post_init__(self) -> None:
        _check_text("gate", self.gate, MAX_GATE_NAME, allow_empty=True)
        _check_text("code", self.code, MAX_CODE)
        _check_text("message", self.message, MAX_TEXT, allow_empty=True)


@dataclass(frozen=True, slots=True)
class Proposal:
    """What a caller proposes to append: the arguments of ``append`` (or a
    ``BatchItem``). The kind must be a caller kind (not reserved) and the payload must
    be msgpack-encodable; both are checked here. The store checks the rest again."""

    coord: Coordinate
    kind: Kind
    payload: Any
    idempotency_key: str | bytes | None = None
    expected_clock: int | None = None
    causation_id: bytes | None = None
    correlation_id: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.coord, Coordinate):
            raise InvalidArgument("coord", type(self.coord).__name__, "must be a bp.Coordinate")
        check_kind(self.kind)
        if type(self.kind) is not Kind:
            object.__setattr__(self, "kind", Kind(*self.kind))
        key = self.idempotency_key
        if key is not None and not (type(key) in (str, bytes) and 0 < len(key) <= 1024):
            raise InvalidArgument("idempotency_key", type(key).__name__, "must be a non-empty str or bytes of at most 1024")
        clock = self.expected_clock
        if clock is not None and (type(clock) is not int or clock < 0):
            raise InvalidArgument("expected_clock", clock, "must be an int >= 0")
        _check_id("causation_id", self.causation_id)
        _check_id("correlation_id", self.correlation_id)
        self.encode()  # an unencodable payload fails here, not at commit

    @classmethod
    def from_batch_item(cls, item: BatchItem) -> Proposal:
        if not isinstance(item, BatchItem):
            raise InvalidArgument("item", type(item).__name__, "must be a bp.BatchItem")
        return cls(item.coord, item.kind, item.payload, item.idempotency_key, item.expected_clock,
                   item.causation_id, item.correlation_id)

    def to_batch_item(self) -> BatchItem:
        return BatchItem(self.coord, self.kind, self.payload, self.idempotency_key, self.expected_clock,
                         self.causation_id, self.correlation_id)

    def append_arguments(self) -> tuple[tuple[Coordinate, Kind, Any], dict[str, Any]]:
        """``(args, kwargs)`` such that ``store.append(*args, **kwargs)`` appends this."""
        return (self.coord, self.kind, self.payload), {
            "idempotency_key": self.idempotency_key, "expected_clock": self.expected_clock,
            "causation_id": self.causation_id, "correlation_id": self.correlation_id,
        }

    def encode(self) -> tuple[bytes, bytes]:
        """``(digest, payload_bytes)``: a 32-byte digest of every field (the payload as
        msgpack), and the payload's msgpack bytes."""
        head = [self.coord.entity, self.coord.scope, self.kind[0], self.kind[1], self.idempotency_key,
                self.expected_clock, self.causation_id, self.correlation_id]
        try:
            raw_head: bytes = msgpack.packb(head, use_bin_type=True)
            raw: bytes = msgpack.packb(self.payload, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidPayload(str(exc)) from None
        h = hashlib.blake2b(len(raw_head).to_bytes(4, "little"), digest_size=32, person=_DIGEST_PERSON)
        h.update(raw_head)
        h.update(raw)
        return h.digest(), raw

    def digest(self) -> bytes:
        return self.encode()[0]


GateResult = Denial | bool | None
GateFunction = Callable[[Ctx, Proposal], GateResult]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The outcome of running a gate set: ``passed``, the ``denials`` (in gate order) and
    the names of the gates that ran, in order (fail-fast stops at the first denial)."""

    passed: bool
    denials: tuple[Denial, ...]
    gates_run: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.passed


# ---------------------------------------------------------------------------- gates
class Gate(Generic[Ctx]):
    """A named check over ``(context, proposal)``. It returns None or True to pass, and
    False or a ``Denial`` to refuse. Write one as a plain function (``Gate(fn)``, or
    just put the function in a ``GateSet``; its name is ``fn.__name__``), as a callable
    object with a ``name`` attribute, or as a subclass that sets ``name`` and overrides
    ``check``. Gates should be pure: no I/O, no appends, no changes to the proposal."""

    name: str = ""

    def __init__(self, check: GateFunction[Ctx] | None = None, *, name: str | None = None) -> None:
        if check is not None:
            if not callable(check):
                raise InvalidArgument("check", type(check).__name__, "must be callable as check(context, proposal)")
            self._fn: GateFunction[Ctx] = check
        elif type(self).check is Gate.check:
            raise InvalidArgument("check", None, "give a function, or subclass Gate and override check")
        chosen = name or getattr(check, "name", None) or self.name or getattr(check, "__name__", None) or type(self).__name__
        self.name = _check_text("gate name", chosen, MAX_GATE_NAME)

    def check(self, context: Ctx, proposal: Proposal) -> GateResult:
        return self._fn(context, proposal)

    def deny(self, code: str, message: str = "") -> Denial:
        """A denial from this gate."""
        return Denial(self.name, code, message)

    def __call__(self, context: Ctx, proposal: Proposal) -> GateResult:
        return self.check(context, proposal)

    def __repr__(self) -> str:
        return f"Gate({self.name!r})"


def as_gate(gate: GateFunction[Ctx]) -> Gate[Ctx]:
    """A ``Gate`` as is; any other callable wrapped in one."""
    if isinstance(gate, Gate):
        return gate
    if callable(gate):
        return Gate(gate)
    raise InvalidArgument("gate", type(gate).__name__, "must be a bp.Gate or a callable (context, proposal)")


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_TEXT]


def run_gate(gate: Gate[Ctx], context: Ctx, proposal: Proposal) -> Denial | None:
    """Run one gate; never raises an ``Exception`` (a defect becomes a denial)."""
    try:
        result = gate.check(context, proposal)
    except Exception as exc:
        return Denial(gate.name, GATE_DEFECT, f"gate raised {_describe(exc)}")
    if result is None or result is True:
        return None
    if result is False:
        return Denial(gate.name, DENIED, f"refused by gate {gate.name!r}")
    if isinstance(result, Denial):
        return result if result.gate == gate.name else replace(result, gate=gate.name)
    return Denial(gate.name, GATE_DEFECT, f"gate returned {type(result).__name__}; expected None, a bool or a Denial")


class GateSet(Generic[Ctx]):
    """An ordered, immutable set of uniquely named gates. (For mypy, a list mixing
    plain functions and ``Gate`` objects may need the context named:
    ``GateSet[Account]([...])``, ``Pipeline[Account]([...])``.)"""

    __slots__ = ("_gates",)

    def __init__(self, gates: Iterable[GateFunction[Ctx]] = ()) -> None:
        if isinstance(gates, (str, bytes)) or not isinstance(gates, Iterable):
            raise InvalidArgument("gates", type(gates).__name__, "must be an iterable of gates")
        built = tuple(as_gate(g) for g in gates)
        if len(built) > MAX_GATES:
            raise InvalidArgument("gates", len(built), f"a gate set holds at most {MAX_GATES} gates")
        seen: set[str] = set()
        for g in built:
            _check_text("gate name", g.name, MAX_GATE_NAME)
            if g.name in seen:
                raise InvalidArgument("gates", g.name, "two gates share this name (a denial must name one gate)")
            seen.add(g.name)
        self._gates: tuple[Gate[Ctx], ...] = built

    def with_gate(self, gate: GateFunction[Ctx]) -> GateSet[Ctx]:
        """A new set with ``gate`` appended (this one is unchanged)."""
        return GateSet((*self._gates, gate))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self._gates)

    def __len__(self) -> int:
        return len(self._gates)

    def __iter__(self) -> Iterator[Gate[Ctx]]:
        return iter(self._gates)

    def __repr__(self) -> str:
        return f"GateSet({list(self.names)!r})"

    def evaluate(self, context: Ctx, proposal: Proposal) -> Evaluation:
        """Run the gates in order; stop at the first denial."""
        return self._run(context, proposal, fail_fast=True)

    def evaluate_all(self, context: Ctx, proposal: Proposal) -> Evaluation:
        """Run every gate (for reporting); every denial, in gate order."""
        return self._run(context, proposal, fail_fast=False)

    def _run(self, context: Ctx, proposal: Proposal, *, fail_fast: bool) -> Evaluation:
        if not isinstance(proposal, Proposal):
            raise InvalidArgument("proposal", type(proposal).__name__, "must be a bp.Proposal")
        denials: list[Denial] = []
        ran: list[str] = []
        for g in self._gates:
            ran.append(g.name)
            d = run_gate(g, context, proposal)
            if d is not None:
                denials.append(d)
                if fail_fast:
                    break
        return Evaluation(not denials, tuple(denials), tuple(ran))


# ---------------------------------------------------------------------------- pipeline
class Appender(Protocol):
    """Anything with ``append`` (``Engine``, ``Store``)."""

    def append(self, coord: Coordinate, kind: Kind, payload: Any, *, idempotency_key: str | bytes | None = ...,
               expected_clock: int | None = ..., causation_id: bytes | None = ...,
               correlation_id: bytes | None = ...) -> Receipt: ...


class BypassRecorder(Protocol):
    """A store that appends an event together with its bypass audit record, atomically."""

    def append_bypass(self, item: BatchItem, reason: str, *, gates: Sequence[str] = ...) -> tuple[Receipt, Receipt]: ...


class DenialRecorder(Protocol):
    """A store that persists a denial as an effect event in the entity's chain."""

    def append_denial(self, coord: Coordinate, denial: Denial, *, proposal_kind: Kind | None = ...,
                      causation_id: bytes | None = ...) -> Receipt: ...


class _Entry(NamedTuple):
    proposal: Proposal
    digest: bytes
    evaluated_ms: int | None


class Approval:
    """A single-use right to append one exact proposal, minted by ``Pipeline.evaluate``
    when every gate passed. Consumed by ``Pipeline.commit``; cannot be built, copied or
    pickled (the pipeline's ledger decides, so a copy would grant nothing anyway)."""

    __slots__ = ("_pipeline", "_token", "digest", "evaluated_ms", "evaluation", "proposal")

    approved = True

    _pipeline: Pipeline[Any]
    _token: int
    digest: bytes
    evaluated_ms: int | None
    evaluation: Evaluation
    proposal: Proposal

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("approvals are minted by Pipeline.evaluate")

    @classmethod
    def _mint(cls, pipeline: Pipeline[Any], token: int, entry: _Entry, evaluation: Evaluation) -> Approval:
        self = object.__new__(cls)
        self._pipeline = pipeline
        self._token = token
        self.proposal = entry.proposal
        self.digest = entry.digest
        self.evaluated_ms = entry.evaluated_ms
        self.evaluation = evaluation
        return self

    def _no_copy(self, *args: object) -> NoReturn:
        raise TypeError("an approval is single-use: it cannot be copied or pickled")

    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = _no_copy

    def __repr__(self) -> str:
        return f"Approval(#{self._token}, {self.proposal.coord!r}, kind={tuple(self.proposal.kind)})"


@dataclass(frozen=True, slots=True)
class Denied:
    """``Pipeline.evaluate`` refused the proposal: see ``denials`` (fail-fast: one)."""

    proposal: Proposal
    evaluation: Evaluation

    approved = False

    @property
    def denials(self) -> tuple[Denial, ...]:
        return self.evaluation.denials

    @property
    def denial(self) -> Denial:
        """The (first) denial."""
        return self.evaluation.denials[0]


class Pipeline(Generic[Ctx]):
    """Gates, then commit: ``evaluate`` turns a passed evaluation into a single-use
    ``Approval`` bound to that exact proposal; ``commit`` consumes it to append.

    ``max_age_ms``: when set, ``evaluate`` and ``commit`` need ``now_ms`` (pass a
    monotonic clock in ms) and an approval older than that is refused as expired.
    ``max_outstanding``: approvals remembered at once; beyond it the oldest is evicted
    (and can no longer be committed), so an abandoned approval costs no memory for long.
    Thread-safe."""

    def __init__(self, gates: GateSet[Ctx] | Iterable[GateFunction[Ctx]], *,
                 max_age_ms: int | None = None, max_outstanding: int = MAX_OUTSTANDING) -> None:
        self._gates: GateSet[Ctx] = gates if isinstance(gates, GateSet) else GateSet(gates)
        if max_age_ms is not None and (type(max_age_ms) is not int or max_age_ms < 0):
            raise InvalidArgument("max_age_ms", max_age_ms, "must be an int >= 0 (milliseconds) or None")
        if type(max_outstanding) is not int or max_outstanding < 1:
            raise InvalidArgument("max_outstanding", max_outstanding, "must be an int >= 1")
        self._max_age_ms = max_age_ms
        self._max_outstanding = max_outstanding
        self._ledger: OrderedDict[int, _Entry] = OrderedDict()
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def gate_set(self) -> GateSet[Ctx]:
        return self._gates

    @property
    def outstanding(self) -> int:
        """Approvals minted and not yet committed, revoked or evicted."""
        return len(self._ledger)

    def _now(self, now_ms: int | None) -> int | None:
        if now_ms is not None and (type(now_ms) is not int or now_ms < 0):
            raise InvalidArgument("now_ms", now_ms, "must be an int >= 0 (milliseconds)")
        if self._max_age_ms is not None and now_ms is None:
            raise InvalidArgument("now_ms", None, "this pipeline has max_age_ms: pass now_ms")
        return now_ms

    def evaluate(self, context: Ctx, proposal: Proposal, *, now_ms: int | None = None) -> Approval | Denied:
        """Run the gates fail-fast: a ``Denied`` (with the denial) or an ``Approval``."""
        now = self._now(now_ms)
        if not isinstance(proposal, Proposal):
            raise InvalidArgument("proposal", type(proposal).__name__, "must be a bp.Proposal")
        before = proposal.digest()
        ev = self._gates.evaluate(context, proposal)
        if not ev.passed:
            return Denied(proposal, ev)
        try:
            after = proposal.digest()
        except InvalidPayload:
            after = b""
        if after != before:
            tampered = Denial(PIPELINE, GATE_DEFECT, "a gate changed the proposal while evaluating it")
            return Denied(proposal, Evaluation(False, (tampered,), ev.gates_run))
        entry = _Entry(proposal, before, now)
        with self._lock:
            token = next(self._tokens)
            self._ledger[token] = entry
            while len(self._ledger) > self._max_outstanding:
                self._ledger.popitem(last=False)
        return Approval._mint(self, token, entry, ev)

    def commit(self, store: Appender, approval: Approval, *, now_ms: int | None = None) -> Receipt:
        """Append the approved proposal through ``store.append`` (an ``Engine`` or a
        ``Store``) and consume the approval. The approval is consumed by the attempt, even
        when the append then fails: evaluate again (with the same idempotency key a retry
        cannot append twice). Raises ``ApprovalError`` (``used``, ``foreign``,
        ``changed``, ``expired``) before appending anything."""
        if not isinstance(approval, Approval):
            raise InvalidArgument("approval", type(approval).__name__,
                                  "must be an Approval from Pipeline.evaluate (a Denied cannot be committed)")
        if approval._pipeline is not self:
            raise ApprovalError("foreign", "this approval was minted by another pipeline")
        now = self._now(now_ms)
        with self._lock:
            entry = self._ledger.pop(approval._token, None)
        if entry is None:
            raise ApprovalError("used", "this approval was already committed, revoked or evicted")
        if self._max_age_ms is not None:
            assert now is not None and entry.evaluated_ms is not None
            age = now - entry.evaluated_ms
            if not 0 <= age <= self._max_age_ms:
                raise ApprovalError("expired", f"evaluated at {entry.evaluated_ms} ms, now is {now} ms, "
                                               f"the limit is {self._max_age_ms} ms")
        args, kwargs = entry.proposal.append_arguments()
        try:
            digest, raw = entry.proposal.encode()
        except InvalidPayload:
            digest, raw = b"", b""
        if digest != entry.digest:
            raise ApprovalError("changed", "the proposal changed after it was approved; evaluate it again")
        # append what was checked: decoded from the very bytes digested (a thread that
        # changes the payload from now on cannot change what is appended)
        payload = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        return store.append(args[0], args[1], payload, **kwargs)

    def revoke(self, approval: Approval) -> bool:
        """Withdraw an approval of this pipeline; True if it was still outstanding."""
        if not isinstance(approval, Approval) or approval._pipeline is not self:
            return False
        with self._lock:
            return self._ledger.pop(approval._token, None) is not None

    def bypass(self, store: BypassRecorder, proposal: Proposal, *, reason: str) -> tuple[Receipt, Receipt]:
        """Append ``proposal`` without running the gates. Needs a non-empty ``reason``
        and a store that records it: the event and a bypass audit record (reason, the
        gates skipped, the proposal's digest) are appended in one atomic batch, the
        record right after the event in the same entity chain. Returns both receipts."""
        if not isinstance(proposal, Proposal):
            raise InvalidArgument("proposal", type(proposal).__name__, "must be a bp.Proposal")
        _check_text("reason", reason, MAX_TEXT)
        recorder = getattr(store, "append_bypass", None)
        if not callable(recorder):
            raise InvalidArgument("store", type(store).__name__,
                                  "cannot record a bypass (it has no append_bypass); an unrecorded bypass is refused")
        result: tuple[Receipt, Receipt] = recorder(proposal.to_batch_item(), reason, gates=self._gates.names)
        return result

    def record_denial(self, store: DenialRecorder, denied: Denied, *, causation_id: bytes | None = None) -> Receipt:
        """Persist ``denied``'s (first) denial in the proposal's entity chain."""
        if not isinstance(denied, Denied):
            raise InvalidArgument("denied", type(denied).__name__, "must be a Denied from Pipeline.evaluate")
        p = denied.proposal
        return store.append_denial(p.coord, denied.denial, proposal_kind=p.kind, causation_id=causation_id)


# ---------------------------------------------------------------------------- effect records
def _bad_effect(type_id: int, reason: str) -> NoReturn:
    raise InvalidArgument("payload", f"effect {CATEGORY_EFFECT:#x}:{type_id:#x}", reason)


def check_effect(type_id: int, payload: object) -> None:
    """Check an effect record (category 0xD): an allowlisted ``type_id`` and a map with
    the required keys, no unknown keys and well-typed values. ``ReservedKind`` for any
    other type id; ``InvalidArgument`` for a bad payload."""
    packed = (CATEGORY_EFFECT << 12) | type_id if type(type_id) is int and 0 <= type_id <= 0xFFF else None
    if packed is None or packed not in STORE_KINDS or type_id not in _EFFECT_FIELDS:
        raise ReservedKind(CATEGORY_EFFECT, type_id)
    if not isinstance(payload, dict):
        _bad_effect(type_id, f"must be a map, not {type(payload).__name__}")
    keys = set(payload)
    missing = STORE_KINDS[packed] - keys
    extra = keys - _EFFECT_FIELDS[type_id]
    if missing or extra:
        _bad_effect(type_id, f"missing keys {sorted(missing)!r}, unknown keys {sorted(map(repr, extra))[:8]!r}")
    try:
        for k in ("gate", "code", "message", "reason"):
            if k in payload:
                limit = {"gate": MAX_GATE_NAME, "code": MAX_CODE}.get(k, MAX_TEXT)
                _check_text(k, payload[k], limit, allow_empty=k == "message")
        pk = payload.get("proposed_kind")
        if pk is not None:
            if not isinstance(pk, (list, tuple)) or len(pk) != 2:
                raise InvalidArgument("proposed_kind", type(pk).__name__, "must be [category, type_id] or None")
            try:
                check_kind(tuple(pk))
            except InvalidKind as exc:
                raise InvalidArgument("proposed_kind", list(pk), exc.reason) from None
        if "gates" in payload:
            gates = payload["gates"]
            if not isinstance(gates, (list, tuple)) or len(gates) > MAX_GATES:
                raise InvalidArgument("gates", type(gates).__name__, f"must be a list of at most {MAX_GATES} names")
            for name in gates:
                _check_text("gate name", name, MAX_GATE_NAME)
        if "proposal_digest" in payload:
            d = payload["proposal_digest"]
            if type(d) is not bytes or len(d) != 32:
                raise InvalidArgument("proposal_digest", type(d).__name__, "must be 32 bytes")
    except InvalidArgument as exc:  # one error type for every shape problem: the effect's payload
        _bad_effect(type_id, f"{exc.name}: {exc.reason}")


def denial_payload(denial: Denial, proposed_kind: Kind | None = None) -> dict[str, Any]:
    """The payload of a denial record."""
    if not isinstance(denial, Denial):
        raise InvalidArgument("denial", type(denial).__name__, "must be a bp.Denial")
    if proposed_kind is not None:
        check_kind(proposed_kind)
    payload = {"gate": denial.gate, "code": denial.code, "message": denial.message,
               "proposed_kind": None if proposed_kind is None else [proposed_kind[0], proposed_kind[1]]}
    check_effect(EFFECT_DENIAL, payload)
    return payload


def effect_item(coord: Coordinate, type_id: int, payload: Any, *, causation_id: bytes | None = None,
                idempotency_key: str | bytes | None = None) -> BatchItem:
    """A checked effect record as a ``BatchItem`` of kind (0xD, type_id). Only store-side
    paths append it (callers' ``append_batch`` refuses reserved kinds)."""
    check_effect(type_id, payload)
    return BatchItem(coord, Kind(CATEGORY_EFFECT, type_id), payload, idempotency_key=idempotency_key,
                     causation_id=causation_id)


def bypass_key(key: str | bytes) -> str:
    """The audit record's idempotency key, derived from the bypassed event's key (a
    re-sent bypass is then a no-op for both, never half of one)."""
    raw = b"s" + key.encode("utf-8", "surrogatepass") if isinstance(key, str) else b"b" + bytes(key)
    return "bypass:" + hashlib.blake2b(raw, digest_size=16, person=_BYPASS_KEY_PERSON).hexdigest()


def bypass_audit_item(item: BatchItem, reason: str, gates: Sequence[str] = ()) -> BatchItem:
    """The bypass audit record for ``item``: same coordinate (so it is chained right after
    the event when both go in one batch, event first), the reason, the gates skipped,
    the proposed kind and the proposal's digest."""
    proposal = Proposal.from_batch_item(item)
    payload = {"reason": reason, "gates": list(gates), "proposed_kind": [proposal.kind[0], proposal.kind[1]],
               "proposal_digest": proposal.digest()}
    check_effect(EFFECT_BYPASS, payload)
    key = None if item.idempotency_key is None else bypass_key(item.idempotency_key)
    return BatchItem(item.coord, Kind(CATEGORY_EFFECT, EFFECT_BYPASS), payload, idempotency_key=key,
                     correlation_id=item.correlation_id)
