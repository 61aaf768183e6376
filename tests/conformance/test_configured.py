"""Conformance under a non-default configuration given alike to ``bp.serve`` and
``bp.EngineConfig``: receipts signed with an Ed25519 key, and a payload limit above
the 16 MiB default. Both implementations must honour what they were configured with."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import batpak_mp as bp

from ._contract import DEFAULT_CONFIG, KIND, Impl, check_error, receipt_at

SIGNING_KEY = bytes(range(32))  # a fixed test key: raw Ed25519 private key bytes
PUBLIC_KEY = Ed25519PrivateKey.from_private_bytes(SIGNING_KEY).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
MiB = 1 << 20
LARGE_LIMIT = 20 * MiB  # above the 16 MiB default (DESIGN §3: payloads up to 16 MiB is the floor, not a cap)
SIGNED = "64 bytes"  # an Ed25519 signature, as Shapes shows it


@pytest.fixture(scope="module")
def store_config() -> dict[str, Any]:
    return {**DEFAULT_CONFIG, "signing_key": SIGNING_KEY, "max_payload_bytes": LARGE_LIMIT}


def test_receipts_are_signed_and_verify(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    single = api.append(c, KIND, 1, idempotency_key=f"k-{c.entity}")
    batch = api.append_batch([bp.BatchItem(c, KIND, 2)])
    resent = api.append(c, KIND, 1, idempotency_key=f"k-{c.entity}")
    assert resent.deduplicated and resent._replace(deduplicated=False) == single
    assert shapes.receipts([single, *batch]) == [receipt_at(1, c, 1, signature=SIGNED),
                                                 receipt_at(2, c, 2, prev="h#1", signature=SIGNED)]
    for r in (single, *batch, resent):
        assert api.verify_receipt(r) is True
        assert bp.verify_receipt_signature(r, PUBLIC_KEY) is True


def test_gate_records_are_signed(impl: Impl) -> None:
    api, shapes = impl.api, impl.shapes()
    c = impl.coord()
    denial = api.append_denial(c, bp.Denial("g", "c"))
    event, audit = api.append_bypass(bp.BatchItem(c, KIND, 1), "why")
    assert shapes.receipts([denial, event, audit]) == [
        receipt_at(1, c, 1, signature=SIGNED), receipt_at(2, c, 2, prev="h#1", signature=SIGNED),
        receipt_at(3, c, 3, prev="h#2", signature=SIGNED)]
    assert all(api.verify_receipt(r) and bp.verify_receipt_signature(r, PUBLIC_KEY) for r in (denial, event, audit))


def test_a_forged_signature_fails(impl: Impl) -> None:
    r = impl.api.append(impl.coord(), KIND, 1)
    assert r.signature is not None
    forged = r._replace(signature=bytes([r.signature[0] ^ 1]) + r.signature[1:])
    assert impl.api.verify_receipt(forged) is False
    assert bp.verify_receipt_signature(forged, PUBLIC_KEY) is False


def test_a_stripped_signature_fails(impl: Impl) -> None:
    r = impl.api.append(impl.coord(), KIND, 1)
    assert impl.api.verify_receipt(r._replace(signature=None)) is False


def test_payload_up_to_the_configured_limit(impl: Impl) -> None:
    shapes = impl.shapes()
    c = impl.coord()
    payload = b"x" * (16 * MiB + 1)
    r = impl.api.append(c, KIND, payload)
    assert shapes.receipt(r) == receipt_at(1, c, 1, signature=SIGNED)
    assert impl.api.get(r.event_id).payload == payload


def test_payload_over_the_configured_limit(impl: Impl) -> None:
    start = impl.visible()
    payload = b"x" * LARGE_LIMIT
    check_error(lambda: impl.api.append(impl.coord(), KIND, payload), bp.PayloadTooLarge,
                size=LARGE_LIMIT + 5, limit=LARGE_LIMIT, what="payload")
    assert impl.visible() == start
