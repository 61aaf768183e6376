"""Retention in a store (issue 13 #2, #3): rules set with ``set_retention`` are a system
event every process reads, compaction applies them to sealed segments (never system
events, never an entity's latest event), the idempotency window makes a retry after it a
new event, and ``batpak-mp status`` shows the rules. Every test ends with ``bp.verify``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._read.offline import OfflineStore
from batpak_mp._read.redaction import current_retention


def fill(eng: bp.Engine, n: int) -> list[bp.Receipt]:
    items = [bp.BatchItem(bp.Coordinate(f"user-{i % 2}" if i % 3 else "keep", "app"), bp.Kind(1, 1),
                          {"i": i, "blob": "r" * 4000}) for i in range(n)]
    return [r for at in range(0, n, 20) for r in eng.append_batch(items[at:at + 20])]


def test_compaction_applies_the_rules_in_force(tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    clock = [1_000_000]
    with bp.Engine.open(d, SMALL, clock_ms=lambda: clock[0]) as eng:
        eng.append_system("cursor:c", 0x010, {"cursor": "c", "through": 1})
        rs = fill(eng, 600)
        assert eng.retention().rules == ()
        eng.set_retention([bp.RetentionRule(entity_prefix="user-", keep_last=10)], idempotency_window_ms=60_000)
        assert eng.retention().rules == (bp.RetentionRule(entity_prefix="user-", keep_last=10),)
        assert eng.retention().idempotency_window_ms == 60_000
        sealed_end = eng.compaction_plan()  # only sealed segments are planned
        assert sealed_end and all(sid < 3 for sid in sealed_end)
        report = eng.compact()
        assert report.events_removed > 300 and report.bytes_reclaimed > 1_000_000
        users = [r for i, r in enumerate(rs) if i % 3]
        for r in users[-10:]:
            assert not eng.get(r.event_id).redacted
        assert all(not eng.get(r.event_id).redacted for i, r in enumerate(rs) if not i % 3)  # "keep" has no rule
        assert eng.get(users[0].event_id).redacted
        assert eng.history("cursor:c")[0].payload == {"cursor": "c", "through": 1}  # system events stay
        latest = {e: eng.history(e)[-1] for e in ("user-0", "user-1")}
        assert not any(ev.redacted for ev in latest.values())
    assert_verified(d)
    store = OfflineStore.open(d)  # every process reads the same rules from the log
    try:
        assert current_retention(store.reader, {}).rules == (bp.RetentionRule(entity_prefix="user-", keep_last=10),)
    finally:
        store.close()


def test_an_idempotency_key_deduplicates_within_its_window_only(tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    clock = [5_000_000]
    with bp.Engine.open(d, SMALL, clock_ms=lambda: clock[0]) as eng:
        coord, kind = bp.Coordinate("acct", "bank"), bp.Kind(1, 3)
        first = eng.append(coord, kind, {"amount": 5}, idempotency_key="pay-1")
        clock[0] += 1000
        assert eng.append(coord, kind, {"amount": 5}, idempotency_key="pay-1").global_sequence == first.global_sequence
        eng.set_retention([], idempotency_window_ms=2000)
        clock[0] += 500
        again = eng.append(coord, kind, {"amount": 5}, idempotency_key="pay-1")
        assert again.global_sequence == first.global_sequence  # 1.5 s old: inside the 2 s window
        clock[0] += 1000
        late = eng.append(coord, kind, {"amount": 5}, idempotency_key="pay-1")  # 2.5 s: a new event
        assert late.global_sequence != first.global_sequence and late.entity_clock == 2
        assert eng.append(coord, kind, {"amount": 5}, idempotency_key="pay-1").global_sequence == late.global_sequence
    assert_verified(d)


def test_status_shows_the_rules(service: tuple[bp.Service, str]) -> None:
    _, d = service
    store = bp.connect(d)
    try:
        store.set_retention([bp.RetentionRule(entity_prefix="tmp-", max_age_ms=86_400_000)], idempotency_window_ms=1000)
        assert store.retention().idempotency_window_ms == 1000
    finally:
        store.close()
    res = subprocess.run([sys.executable, "-m", "batpak_mp.cli", "status", d, "--json"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)["retention"]
    assert doc == {"rules": [["tmp-", None, None, None, 86_400_000]], "idempotency_window_ms": 1000}
    res = subprocess.run([sys.executable, "-m", "batpak_mp.cli", "status", d], capture_output=True, text=True,
                         timeout=60)
    assert "retention    1 rule(s): entity tmp- scope * kind * max age 86400000 ms; idempotency keys for 1000 ms" \
        in res.stdout
