"""A format-version-1 store (tests/data/v1_store.tar.gz, made by the code before the
version-2 bump) keeps opening, reading and verifying: every id, hash and payload as it
was; a writer upgrades store.meta to version 2 and appends version-2 frames after the
version-1 ones, in the same entity chains; a version-1 frame cannot become a stub."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import FORMAT_VERSION, META_FILE
from batpak_mp._read.offline import OfflineStore

DATA = Path(__file__).resolve().parent.parent / "data"


def unpack_v1(dest: str) -> dict[str, object]:
    os.makedirs(dest, mode=0o700, exist_ok=True)
    with tarfile.open(DATA / "v1_store.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    expected: dict[str, object] = json.loads((DATA / "v1_store.json").read_text())
    return expected


def meta_version(d: str) -> int:
    return int(json.loads(Path(d, META_FILE).read_text())["format_version"])


def check_events(read: bp.Engine | OfflineStore, expected: dict[str, object]) -> None:
    events = expected["events"]
    assert isinstance(events, list)
    for want in events:
        ev = read.get(bytes.fromhex(want["id"]))
        assert (ev.global_sequence, ev.event_hash.hex(), ev.prev_hash.hex(), ev.entity_clock) == (
            want["seq"], want["hash"], want["prev"], want["clock"])
        assert ev.coordinate.entity == want["entity"] and ev.payload["i"] == want["payload_i"]
        assert not ev.redacted


def test_a_version_1_store_reads_and_verifies_offline_unchanged(tmp_path: Path) -> None:
    d = str(tmp_path / "v1")
    expected = unpack_v1(d)
    report = assert_verified(d)
    assert report.events_checked == expected["count"]
    store = OfflineStore.open(d)
    try:
        check_events(store, expected)
    finally:
        store.close()
    assert meta_version(d) == 1  # reading never writes


def test_a_writer_upgrades_a_version_1_store_and_chains_on(tmp_path: Path) -> None:
    d = str(tmp_path / "v1")
    expected = unpack_v1(d)
    with bp.Engine.open(d, SMALL) as eng:
        assert meta_version(d) == FORMAT_VERSION == 2
        check_events(eng, expected)
        old_head = eng.history("order-1")[-1]
        r = eng.append(bp.Coordinate("order-1", "shop"), bp.Kind(1, 7), {"i": 999})
        assert r.prev_hash == old_head.event_hash and r.entity_clock == old_head.entity_clock + 1
        walked = list(eng.walk_ancestors(r.event_id))
        assert [e.entity_clock for e in walked] == list(range(r.entity_clock, 0, -1))
        v1_event = bytes.fromhex(expected["events"][0]["id"])  # type: ignore[index]
        with pytest.raises(bp.RedactionRefused, match="version-1 frame"):
            eng.redact(v1_event, reason="a version-1 frame's hash covers its payload bytes")
    with bp.Engine.open(d, SMALL) as eng:  # reopened: version 1 and 2 frames side by side
        check_events(eng, expected)
        assert eng.get(r.event_id).payload == {"i": 999}
    assert assert_verified(d).events_checked == expected["count"] + 1  # type: ignore[operator]
