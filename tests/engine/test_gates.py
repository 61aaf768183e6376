"""Caller-defined gates: pure tests of gates, gate sets and the pipeline (with a fake
appender), then the audit records (denials, bypasses) against a real engine."""

from __future__ import annotations

import copy
import pickle
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._gates import (
    DENIED,
    GATE_DEFECT,
    bypass_audit_item,
    check_effect,
    denial_payload,
)
from batpak_mp._values import CATEGORY_EFFECT, EFFECT_BYPASS, EFFECT_DENIAL

C = bp.Coordinate("account:alice", "bank")
K = bp.Kind(1, 3)
DENIAL_KIND = bp.Kind(CATEGORY_EFFECT, EFFECT_DENIAL)
BYPASS_KIND = bp.Kind(CATEGORY_EFFECT, EFFECT_BYPASS)


@dataclass
class Account:
    balance: int
    frozen: bool = False


def not_frozen(ctx: Account, p: bp.Proposal) -> bp.Denial | None:
    return bp.Denial("", "FROZEN", "the account is frozen") if ctx.frozen else None


def covered(ctx: Account, p: bp.Proposal) -> bool:
    return bool(ctx.balance >= p.payload["amount"])


class Limit(bp.Gate[Account]):
    name = "limit"

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def check(self, context: Account, proposal: bp.Proposal) -> bp.Denial | None:
        if proposal.payload["amount"] > self.limit:
            return self.deny("OVER_LIMIT", f"{proposal.payload['amount']} > {self.limit}")
        return None


def withdraw(amount: int, **kw: Any) -> bp.Proposal:
    return bp.Proposal(C, K, {"amount": amount}, **kw)


class FakeStore:
    """Records appends (pure tests only; engine tests below use a real Engine)."""

    def __init__(self) -> None:
        self.appended: list[tuple[Any, ...]] = []

    def append(self, coord: bp.Coordinate, kind: bp.Kind, payload: Any, **kw: Any) -> Any:
        self.appended.append((coord, kind, payload, kw))
        return len(self.appended)


# ------------------------------------------------------------------ gates and gate sets
def test_fail_fast_stops_at_first_denial_in_order() -> None:
    calls: list[str] = []

    def tracked(name: str, deny: bool) -> bp.Gate[Account]:
        def fn(ctx: Account, p: bp.Proposal) -> bp.Denial | None:
            calls.append(name)
            return bp.Denial(name, "NO", f"{name} says no") if deny else None
        return bp.Gate(fn, name=name)

    gs = bp.GateSet([tracked("a", False), tracked("b", True), tracked("c", True)])
    ev = gs.evaluate(Account(10), withdraw(1))
    assert not ev.passed and not ev
    assert [d.gate for d in ev.denials] == ["b"]
    assert ev.gates_run == ("a", "b") and calls == ["a", "b"]

    calls.clear()
    ev = gs.evaluate_all(Account(10), withdraw(1))
    assert [d.gate for d in ev.denials] == ["b", "c"]
    assert ev.gates_run == ("a", "b", "c") and calls == ["a", "b", "c"]

    ok = bp.GateSet([tracked("a", False)]).evaluate(Account(10), withdraw(1))
    assert ok.passed and ok and ok.denials == () and ok.gates_run == ("a",)
    assert bp.GateSet[Account]().evaluate(Account(0), withdraw(1)).passed


def test_gate_forms_and_names() -> None:
    class Callable_:
        name = "callable_object"

        def __call__(self, ctx: Account, p: bp.Proposal) -> bool:
            return True

    gs = bp.GateSet[Account]([not_frozen, covered, Limit(100), Callable_(), bp.Gate(covered, name="covered_again")])
    assert gs.names == ("not_frozen", "covered", "limit", "callable_object", "covered_again")
    assert len(gs) == 5 and [g.name for g in gs] == list(gs.names)
    assert gs.evaluate(Account(1000), withdraw(50)).passed

    ev = gs.evaluate_all(Account(10, frozen=True), withdraw(500))
    assert [(d.gate, d.code) for d in ev.denials] == [
        ("not_frozen", "FROZEN"), ("covered", DENIED), ("limit", "OVER_LIMIT"), ("covered_again", DENIED)]
    assert ev.denials[2].message == "500 > 100"

    with pytest.raises(bp.InvalidArgument, match="share this name"):
        bp.GateSet([covered, covered])
    with pytest.raises(bp.InvalidArgument):
        bp.Gate()  # neither a function nor an overridden check
    with pytest.raises(bp.InvalidArgument):
        bp.GateSet(["not a gate"])  # type: ignore[arg-type]
    bigger = gs.with_gate(lambda ctx, p: None)
    assert len(bigger) == 6 and len(gs) == 5 and bigger.names[-1] == "<lambda>"


def test_denial_always_names_the_gate_that_made_it() -> None:
    def impostor(ctx: Account, p: bp.Proposal) -> bp.Denial:
        return bp.Denial("someone_else", "NO", "")

    (d,) = bp.GateSet([impostor]).evaluate(Account(0), withdraw(1)).denials
    assert d.gate == "impostor"


def test_raising_or_misbehaving_gate_is_a_gate_defect_not_a_crash() -> None:
    def boom(ctx: Account, p: bp.Proposal) -> None:
        raise ZeroDivisionError("division by zero in the risk model")

    def garbage(ctx: Account, p: bp.Proposal) -> Any:
        return "yes"

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    def worse(ctx: Account, p: bp.Proposal) -> None:
        raise Unprintable()

    def bad_denial(ctx: Account, p: bp.Proposal) -> bp.Denial:
        return bp.Denial("x", "", "an empty code is not a code")

    gs = bp.GateSet([boom, garbage, worse, bad_denial, covered])
    ev = gs.evaluate(Account(0), withdraw(1))
    assert [(d.gate, d.code) for d in ev.denials] == [("boom", GATE_DEFECT)]
    assert "ZeroDivisionError" in ev.denials[0].message and "risk model" in ev.denials[0].message

    ev = gs.evaluate_all(Account(0), withdraw(1))
    assert [(d.gate, d.code) for d in ev.denials] == [
        ("boom", GATE_DEFECT), ("garbage", GATE_DEFECT), ("worse", GATE_DEFECT), ("bad_denial", GATE_DEFECT),
        ("covered", DENIED)]
    assert "str" in ev.denials[1].message and "Unprintable" in ev.denials[2].message
    assert "InvalidArgument" in ev.denials[3].message

    def interrupted(ctx: Account, p: bp.Proposal) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # only Exception is a defect; ^C still stops the program
        bp.GateSet([interrupted]).evaluate(Account(0), withdraw(1))


def test_proposal_validation_and_conversions() -> None:
    with pytest.raises(bp.ReservedKind):
        bp.Proposal(C, bp.Kind(0xD, 1), {})
    with pytest.raises(bp.InvalidPayload):
        bp.Proposal(C, K, {"x": object()})
    with pytest.raises(bp.InvalidArgument):
        bp.Proposal("account:alice", K, {})  # type: ignore[arg-type]
    with pytest.raises(bp.InvalidArgument):
        bp.Proposal(C, K, {}, expected_clock=-1)
    p = bp.Proposal(C, (1, 3), {"amount": 5}, idempotency_key="w-1", expected_clock=2)  # type: ignore[arg-type]
    assert type(p.kind) is bp.Kind
    item = p.to_batch_item()
    assert item == bp.BatchItem(C, K, {"amount": 5}, "w-1", 2)
    assert bp.Proposal.from_batch_item(item) == p
    args, kwargs = p.append_arguments()
    assert args == (C, K, {"amount": 5}) and kwargs["idempotency_key"] == "w-1" and kwargs["expected_clock"] == 2
    assert p.digest() == bp.Proposal(C, K, {"amount": 5}, idempotency_key="w-1", expected_clock=2).digest()
    assert p.digest() != bp.Proposal(C, K, {"amount": 6}, idempotency_key="w-1", expected_clock=2).digest()
    assert p.digest() != bp.Proposal(C, K, {"amount": 5}, idempotency_key=b"w-1", expected_clock=2).digest()


# ------------------------------------------------------------------ pipeline (pure)
def test_approval_is_single_use() -> None:
    pipe = bp.Pipeline([not_frozen, covered])
    store = FakeStore()
    outcome = pipe.evaluate(Account(100), withdraw(30, idempotency_key="w-1"))
    assert isinstance(outcome, bp.Approval) and outcome.approved and outcome.evaluation.passed
    assert pipe.outstanding == 1
    receipt: Any = pipe.commit(store, outcome)
    assert receipt == 1
    assert store.appended == [(C, K, {"amount": 30}, {"idempotency_key": "w-1", "expected_clock": None,
                                                      "causation_id": None, "correlation_id": None})]
    with pytest.raises(bp.ApprovalError) as ei:
        pipe.commit(store, outcome)
    assert ei.value.reason == "used" and isinstance(ei.value, ValueError)
    assert len(store.appended) == 1 and pipe.outstanding == 0


def test_approval_cannot_be_forged_copied_or_pickled() -> None:
    pipe = bp.Pipeline([covered])
    approval = pipe.evaluate(Account(100), withdraw(1))
    assert isinstance(approval, bp.Approval)
    with pytest.raises(TypeError):
        bp.Approval()
    with pytest.raises(TypeError):
        copy.copy(approval)
    with pytest.raises(TypeError):
        copy.deepcopy(approval)
    with pytest.raises(TypeError):
        pickle.dumps(approval)
    assert pipe.revoke(approval) and not pipe.revoke(approval)
    with pytest.raises(bp.ApprovalError, match="used"):
        pipe.commit(FakeStore(), approval)


def test_denied_outcome_cannot_be_committed() -> None:
    pipe = bp.Pipeline([not_frozen, covered])
    outcome = pipe.evaluate(Account(100, frozen=True), withdraw(1))
    assert isinstance(outcome, bp.Denied) and not outcome.approved
    assert outcome.denial == bp.Denial("not_frozen", "FROZEN", "the account is frozen")
    assert outcome.denials == (outcome.denial,) and pipe.outstanding == 0
    with pytest.raises(bp.InvalidArgument):
        pipe.commit(FakeStore(), outcome)  # type: ignore[arg-type]


def test_proposal_changed_after_approval_is_refused() -> None:
    pipe = bp.Pipeline([covered])
    store = FakeStore()
    p = withdraw(10)
    approval = pipe.evaluate(Account(10), p)
    assert isinstance(approval, bp.Approval)
    p.payload["amount"] = 1_000_000  # the dict is still the caller's: change it after approval
    with pytest.raises(bp.ApprovalError) as ei:
        pipe.commit(store, approval)
    assert ei.value.reason == "changed" and store.appended == []
    p.payload["amount"] = 10  # changing it back does not revive a burned approval
    with pytest.raises(bp.ApprovalError, match="used"):
        pipe.commit(store, approval)
    assert store.appended == []


def test_commit_appends_the_bytes_that_were_checked() -> None:
    pipe = bp.Pipeline([covered])
    p = withdraw(10)
    approval = pipe.evaluate(Account(10), p)
    assert isinstance(approval, bp.Approval)

    class Sneaky(FakeStore):
        def append(self, coord: bp.Coordinate, kind: bp.Kind, payload: Any, **kw: Any) -> Any:
            p.payload["amount"] = 999  # a change after the check reaches the caller's dict only
            return super().append(coord, kind, payload, **kw)

    store = Sneaky()
    pipe.commit(store, approval)
    assert store.appended[0][2] == {"amount": 10}


def test_gate_that_changes_the_proposal_is_a_defect() -> None:
    def meddler(ctx: Account, p: bp.Proposal) -> None:
        p.payload["amount"] = 0

    outcome = bp.Pipeline([meddler]).evaluate(Account(0), withdraw(5))
    assert isinstance(outcome, bp.Denied)
    assert outcome.denial.code == GATE_DEFECT and outcome.denial.gate == "<pipeline>"


def test_other_pipelines_approval_is_refused() -> None:
    first, second = bp.Pipeline([covered]), bp.Pipeline([covered])
    store = FakeStore()
    approval = first.evaluate(Account(10), withdraw(1))
    assert isinstance(approval, bp.Approval)
    other = second.evaluate(Account(10), withdraw(1))  # same token number in the other ledger
    assert isinstance(other, bp.Approval)
    with pytest.raises(bp.ApprovalError) as ei:
        second.commit(store, approval)
    assert ei.value.reason == "foreign" and store.appended == []
    assert not second.revoke(approval)
    first.commit(store, approval)  # still good where it was minted
    second.commit(store, other)
    assert len(store.appended) == 2


def test_concurrent_commits_of_one_approval_append_once() -> None:
    pipe = bp.Pipeline([covered])
    store = FakeStore()
    approval = pipe.evaluate(Account(10), withdraw(1))
    assert isinstance(approval, bp.Approval)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def go() -> None:
        barrier.wait()
        try:
            pipe.commit(store, approval)
        except bp.ApprovalError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.appended) == 1 and len(errors) == 7


def test_max_age_and_max_outstanding() -> None:
    pipe = bp.Pipeline([covered], max_age_ms=1000)
    with pytest.raises(bp.InvalidArgument, match="now_ms"):
        pipe.evaluate(Account(10), withdraw(1))
    a = pipe.evaluate(Account(10), withdraw(1), now_ms=5000)
    b = pipe.evaluate(Account(10), withdraw(1), now_ms=5000)
    assert isinstance(a, bp.Approval) and isinstance(b, bp.Approval) and a.evaluated_ms == 5000
    with pytest.raises(bp.InvalidArgument, match="now_ms"):
        pipe.commit(FakeStore(), a)  # a usage error does not burn the approval
    pipe.commit(FakeStore(), a, now_ms=6000)
    with pytest.raises(bp.ApprovalError) as ei:
        pipe.commit(FakeStore(), b, now_ms=6001)
    assert ei.value.reason == "expired"

    small = bp.Pipeline([covered], max_outstanding=2)
    first, *rest = [small.evaluate(Account(10), withdraw(1)) for _ in range(3)]
    assert small.outstanding == 2
    with pytest.raises(bp.ApprovalError, match="evicted"):
        small.commit(FakeStore(), first)  # type: ignore[arg-type]
    for r in rest:
        small.commit(FakeStore(), r)  # type: ignore[arg-type]


def test_bypass_needs_a_reason_and_a_recording_store() -> None:
    class Recorder(FakeStore):
        def append_bypass(self, item: bp.BatchItem, reason: str, *, gates: Any = ()) -> Any:
            self.appended.append((item, reason, tuple(gates)))
            return ("event", "audit")

    ran: list[str] = []

    def watched(ctx: Any, p: bp.Proposal) -> bool:
        ran.append("yes")
        return False

    pipe = bp.Pipeline([watched, covered])
    store = Recorder()
    for bad in ("", "   ", None, 42, "x" * 5000):
        with pytest.raises(bp.InvalidArgument):
            pipe.bypass(store, withdraw(1), reason=bad)  # type: ignore[arg-type]
    assert store.appended == []
    with pytest.raises(bp.InvalidArgument, match="unrecorded bypass"):
        pipe.bypass(FakeStore(), withdraw(1), reason="incident 42")  # type: ignore[arg-type]
    result: Any = pipe.bypass(store, withdraw(1), reason="incident 42")
    assert result == ("event", "audit")
    assert store.appended == [(withdraw(1).to_batch_item(), "incident 42", ("watched", "covered"))]
    assert ran == []  # a bypass runs no gate


def test_effect_records_are_checked() -> None:
    good = denial_payload(bp.Denial("g", "CODE", "msg"), K)
    assert good == {"gate": "g", "code": "CODE", "message": "msg", "proposed_kind": [1, 3]}
    check_effect(EFFECT_DENIAL, good)
    for type_id in (0, 3, 0xFFF, -1, 4096):
        with pytest.raises(bp.ReservedKind):
            check_effect(type_id, good)
    bad_payloads: list[Any] = [
        [1, 2], {"gate": "g", "code": "C"}, {**good, "extra": 1}, {**good, "gate": ""}, {**good, "code": 7},
        {**good, "proposed_kind": [0xD, 1]}, {**good, "proposed_kind": "1:3"}, {**good, "message": "m" * 5000},
    ]
    for bad in bad_payloads:
        with pytest.raises(bp.InvalidArgument):
            check_effect(EFFECT_DENIAL, bad)
    with pytest.raises(bp.InvalidArgument):
        denial_payload(bp.Denial("", "CODE"))  # a stored denial names its gate
    audit = bypass_audit_item(bp.BatchItem(C, K, {"amount": 1}, idempotency_key="k"), "why", ["g"])
    assert audit.kind == BYPASS_KIND and audit.coord == C and audit.idempotency_key not in (None, "k")
    assert audit.payload["proposal_digest"] == withdraw(1, idempotency_key="k").digest()
    with pytest.raises(bp.InvalidArgument):
        check_effect(EFFECT_BYPASS, {**audit.payload, "proposal_digest": b"short"})
    with pytest.raises(bp.InvalidArgument):
        check_effect(EFFECT_BYPASS, {**audit.payload, "reason": ""})


# ------------------------------------------------------------------ against a real engine
def test_commit_appends_through_the_engine(data_dir: str) -> None:
    pipe = bp.Pipeline[Account]([not_frozen, covered, Limit(100)])
    with bp.Engine.open(data_dir, SMALL) as e:
        approval = pipe.evaluate(Account(50), withdraw(40, expected_clock=0))
        assert isinstance(approval, bp.Approval)
        r = pipe.commit(e, approval)
        ev = e.get(r.event_id)
        assert ev.payload == {"amount": 40} and ev.kind == K and ev.coordinate == C and r.entity_clock == 1
        assert e.verify_receipt(r)
        with pytest.raises(bp.ApprovalError):
            pipe.commit(e, approval)
        stale = pipe.evaluate(Account(50), withdraw(5, expected_clock=0))
        assert isinstance(stale, bp.Approval)
        with pytest.raises(bp.ConcurrencyConflict):  # gates are not atomic with the append: the clock is
            pipe.commit(e, stale)
        assert [x.global_sequence for x in e.history("account:alice")] == [r.global_sequence]
    assert_verified(data_dir)


def test_denial_is_recorded_in_the_entity_chain(data_dir: str) -> None:
    pipe = bp.Pipeline([not_frozen, covered])
    with bp.Engine.open(data_dir, SMALL) as e:
        first = pipe.evaluate(Account(100), withdraw(10))
        assert isinstance(first, bp.Approval)
        r1 = pipe.commit(e, first)
        denied = pipe.evaluate(Account(0), withdraw(10))
        assert isinstance(denied, bp.Denied)
        rd = pipe.record_denial(e, denied, causation_id=r1.event_id)
        assert rd.entity == "account:alice" and rd.entity_clock == 2 and rd.prev_hash == r1.event_hash
        ev = e.get(rd.event_id)
        assert ev.kind == DENIAL_KIND and ev.causation_id == r1.event_id
        assert ev.payload == {"gate": "covered", "code": DENIED, "message": "refused by gate 'covered'",
                              "proposed_kind": [1, 3]}
        hist = e.history("account:alice")
        assert [(x.kind, x.global_sequence) for x in hist] == [(K, r1.global_sequence), (DENIAL_KIND, rd.global_sequence)]
        assert [x.event_id for x in e.walk_ancestors(rd.event_id)] == [rd.event_id, r1.event_id]
        assert e.verify_receipt(rd)
        # a gate defect is just as recordable
        boom = bp.Pipeline([lambda ctx, p: bool(1 // 0)]).evaluate(None, withdraw(1))
        assert isinstance(boom, bp.Denied)
        rb = e.append_denial(C, boom.denial)
        assert e.get(rb.event_id).payload["code"] == GATE_DEFECT
        # the reserved category stays closed to callers
        with pytest.raises(bp.ReservedKind):
            e.append(C, DENIAL_KIND, {"gate": "g", "code": "C", "message": "", "proposed_kind": None})
        with pytest.raises(bp.ReservedKind):
            e.append_batch([bp.BatchItem(C, DENIAL_KIND, {})])
        with pytest.raises(bp.ReservedKind):
            e.append_effect(C, 0x7, {"anything": 1})
        with pytest.raises(bp.InvalidArgument):
            e.append_effect(C, EFFECT_DENIAL, {"free": "form"})
        assert e.visible == rb.global_sequence
    with bp.Engine.open(data_dir, SMALL) as e:
        kinds = [x.kind for x in e.history("account:alice")]
        assert kinds == [K, DENIAL_KIND, DENIAL_KIND]
    assert_verified(data_dir)


def test_bypass_records_its_audit_in_the_same_atomic_append(data_dir: str) -> None:
    ran: list[int] = []

    def never(ctx: Any, p: bp.Proposal) -> bool:
        ran.append(1)
        return False

    pipe = bp.Pipeline([never])
    p = withdraw(7, idempotency_key="manual-7")
    with bp.Engine.open(data_dir, SMALL) as e:
        event, audit = pipe.bypass(e, p, reason="incident 42: refund approved by ops")
        assert ran == []
        assert audit.global_sequence == event.global_sequence + 1
        assert audit.prev_hash == event.event_hash and audit.entity == event.entity
        assert e.get(event.event_id).payload == {"amount": 7}
        rec = e.get(audit.event_id)
        assert rec.kind == BYPASS_KIND
        assert rec.payload == {"reason": "incident 42: refund approved by ops", "gates": ["never"],
                               "proposed_kind": [1, 3], "proposal_digest": p.digest()}
        assert [x.event_id for x in e.walk_ancestors(audit.event_id)] == [audit.event_id, event.event_id]
        # a re-sent bypass (same key) writes nothing and returns the same receipts
        again = pipe.bypass(e, p, reason="incident 42: refund approved by ops")
        assert again == (event._replace(deduplicated=True), audit._replace(deduplicated=True))
        assert e.visible == audit.global_sequence
        # all or nothing: a failed guard on the event writes no audit record either
        with pytest.raises(bp.ConcurrencyConflict):
            pipe.bypass(e, withdraw(1, expected_clock=0), reason="late")
        with pytest.raises(bp.InvalidArgument):
            e.append_bypass(withdraw(1).to_batch_item(), "")
        assert e.visible == audit.global_sequence
        assert [x.kind for x in e.history("account:alice")] == [K, BYPASS_KIND]
    assert_verified(data_dir)
