"""The pure message mapping of batpak_mp.jetstream with plain bytes: subject tokens for
any entity, headers from a frame, and ChainCheck's verdicts on good and bad messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import batpak_mp as bp
from batpak_mp._format.frame import FLAG_COMMIT_END, ZERO_HASH, ZERO_ID, Frame, decode_frame, encode_frame
from batpak_mp._format.ids import make_event_id
from batpak_mp.jetstream._mapping import (
    ChainCheck,
    entity_token,
    frame_version,
    headers_of,
    subject_of,
    token_entity,
)

STORE = bytes(range(16))
STORE_HEX = STORE.hex()


@given(st.text(min_size=1, max_size=50))
def test_entity_tokens_round_trip_and_are_one_subject_token(entity: str) -> None:
    raw = entity.encode()
    token = entity_token(raw)
    assert token_entity(token) == raw
    assert not any(c in token for c in ". *>\t\r\n")


def test_bad_tokens_are_refused() -> None:
    for bad in ("a.b", "~zz", "~1", "a*"):
        with pytest.raises(ValueError):
            token_entity(bad)


def _message(seq: int, entity: bytes, clock: int, prev: bytes) -> tuple[str, dict[str, str], bytes, bytes]:
    data, h = encode_frame(flags=FLAG_COMMIT_END, kind=bp.Kind(1, 2).packed(), payload_version=0, global_sequence=seq,
                           entity_clock=clock, wall_ms=1000, event_id=make_event_id(1000, int.from_bytes(STORE[:2], "big"), seq),
                           causation_id=ZERO_ID, correlation_id=ZERO_ID, idem_hash=bytes(16), prev_hash=prev,
                           entity=entity, scope=b"s", payload=b"\x81\xa1x\x01")
    frame = decode_frame(data)
    assert isinstance(frame, Frame)
    headers = headers_of(frame, STORE_HEX, frame_version(data))
    return subject_of("batpak.T", entity), headers, data, h


def _stream() -> list[tuple[str, dict[str, str], bytes, bytes]]:
    out = []
    heads: dict[bytes, tuple[int, bytes]] = {}
    for seq in range(1, 7):
        entity = b"e.%d" % (seq % 2)
        clock, prev = heads.get(entity, (0, ZERO_HASH))
        msg = _message(seq, entity, clock + 1, prev)
        heads[entity] = (clock + 1, msg[3])
        out.append(msg)
    return out


def test_a_good_stream_checks_clean() -> None:
    check = ChainCheck("T", STORE_HEX)
    for seq, (subject, headers, body, h) in enumerate(_stream(), 1):
        assert check.check(seq, subject, headers, body).event_hash == h


@pytest.mark.parametrize("fault", ["flip", "gap", "header", "store", "chain", "subject", "truncated"])
def test_each_fault_is_named(fault: str) -> None:
    msgs = _stream()
    check = ChainCheck("T", STORE_HEX)
    for seq in (1, 2, 3):
        subject, headers, body, _ = msgs[seq - 1]
        check.check(seq, subject, headers, body)
    seq = 4
    subject, headers, body, _ = msgs[3]
    headers = dict(headers)
    if fault == "flip":
        body = body[:-1] + bytes([body[-1] ^ 1])
    elif fault == "gap":
        seq = 5
        subject, headers, body, _ = msgs[4]
    elif fault == "header":
        headers["Bp-Clock"] = "99"
    elif fault == "store":
        headers["Bp-Store"] = "ff" * 16
    elif fault == "chain":  # a valid frame of the right sequence that does not extend its entity's chain
        subject, headers, body, _ = _message(4, b"e.0", 2, b"\x01" * 32)
    elif fault == "subject":
        subject = "batpak.T.other"
    elif fault == "truncated":
        body = body[:-3]
    with pytest.raises(bp.StreamTampered) as caught:
        check.check(seq, subject, headers, body)
    assert caught.value.stream_seq == seq and caught.value.subject == subject
    with pytest.raises(bp.StreamTampered):  # sticky
        check.check(4, *msgs[3][:3])
