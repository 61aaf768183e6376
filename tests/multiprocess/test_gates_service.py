"""Scratch: gates through the served store (after the proposed writer/client change)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

import batpak_mp as bp
from batpak_mp._gates import GATE_DEFECT
from batpak_mp._values import CATEGORY_EFFECT, EFFECT_BYPASS, EFFECT_DENIAL

C = bp.Coordinate("account:alice", "bank")
K = bp.Kind(1, 3)


def covered(ctx: int, p: bp.Proposal) -> bool:
    return bool(ctx >= p.payload["amount"])


def test_gates_through_the_service(service: Any) -> None:
    _, data_dir = service
    pipe = bp.Pipeline[int]([covered])
    with bp.connect(data_dir) as store:
        a = pipe.evaluate(100, bp.Proposal(C, K, {"amount": 10}))
        assert isinstance(a, bp.Approval)
        r1 = pipe.commit(store, a)
        d = pipe.evaluate(0, bp.Proposal(C, K, {"amount": 10}))
        assert isinstance(d, bp.Denied)
        rd = pipe.record_denial(store, d, causation_id=r1.event_id)
        assert rd.prev_hash == r1.event_hash
        ev, au = pipe.bypass(store, bp.Proposal(C, K, {"amount": 5}), reason="ops override")
        assert au.prev_hash == ev.event_hash and au.global_sequence == ev.global_sequence + 1
        boom = bp.Pipeline[int]([lambda c, p: bool(1 // 0)]).evaluate(0, bp.Proposal(C, K, {"amount": 1}))
        assert isinstance(boom, bp.Denied)
        store.append_denial(C, boom.denial)
        kinds = [x.kind for x in store.history("account:alice")]
        assert kinds == [K, bp.Kind(0xD, EFFECT_DENIAL), K, bp.Kind(0xD, EFFECT_BYPASS), bp.Kind(0xD, EFFECT_DENIAL)]
        assert store.history("account:alice")[-1].payload["code"] == GATE_DEFECT
        assert [x.event_id for x in store.walk_ancestors(rd.event_id)] == [rd.event_id, r1.event_id]
        # hostile items straight to the writer (past the client's checks)
        from batpak_mp._prepare import prepare

        def raw(type_id: int, payload: Any) -> Any:
            p = prepare(C, bp.Kind(CATEGORY_EFFECT, type_id), payload, idempotency_key="k" + str(type_id) + repr(payload)[:50],
                        expected_clock=None, causation_id=None, correlation_id=None, max_payload=1 << 20,
                        allow_reserved=True)
            return store._append([p])
        with pytest.raises(bp.ReservedKind):
            raw(7, {"gate": "g"})
        with pytest.raises(bp.InvalidArgument):
            raw(EFFECT_DENIAL, {"gate": "g", "code": "C", "message": "m", "evil": 1})
        with pytest.raises(bp.InvalidArgument):
            raw(EFFECT_DENIAL, {"gate": 5, "code": "C", "message": "m"})
        with pytest.raises(bp.InvalidArgument):
            raw(EFFECT_BYPASS, {"reason": ""})
        with pytest.raises(bp.InvalidArgument):
            raw(EFFECT_BYPASS, [1, 2])
        # the writer still serves
        assert store.append(C, K, {"amount": 1}).global_sequence > au.global_sequence
        assert msgpack is not None
