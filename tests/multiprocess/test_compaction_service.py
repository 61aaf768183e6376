"""Redaction and compaction through a served store (issue 13 #1, #3 and the races of
"Bad input and faults"): ``Store.redact`` and ``Store.compact`` over the wire while
another process appends, a subscription and a durable cursor read, and a backup and a
fork copy the segments being swapped: the appends all land, the subscriber and the
cursor see every event once (the redacted ones flagged), the backup and the fork hold
each segment old or new, never a mix, and verify; the CLI's
``compact`` works with and without a service. Every test ends with ``bp.verify`` clean."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import assert_verified

import batpak_mp as bp

APPENDER = r"""
import sys, batpak_mp as bp
s = bp.connect(sys.argv[1])
n = int(sys.argv[2])
for i in range(n):
    s.append(bp.Coordinate(f"w-{i % 3}", "writes"), bp.Kind(1, 2), {"i": i})
print(n)
s.close()
"""


def fill(store: bp.Store, n: int) -> list[bp.Receipt]:
    items = [bp.BatchItem(bp.Coordinate(f"p-{i % 4}", "people"), bp.Kind(1, 1), {"i": i, "blob": "z" * 3000})
             for i in range(n)]
    return [r for at in range(0, n, 25) for r in store.append_batch(items[at:at + 25])]


@pytest.mark.slow
def test_compaction_while_a_process_appends_a_subscriber_reads_and_a_backup_copies(
        service: tuple[bp.Service, str], tmp_path: Path) -> None:
    _, d = service
    store = bp.connect(d)
    try:
        rs = fill(store, 700)
        victims = {3, 10, 200, 400}
        for i in victims:
            store.redact(rs[i].event_id, reason="erasure")
        with pytest.raises(bp.RedactionRefused):
            store.redact(store.history("redactions")[0].event_id, reason="requests stay")
        sub = store.subscribe(0, entity="p-2", timeout=5.0)
        cursor = store.cursor("reader", entity="p-0")  # a durable cursor reading across the swaps
        read: list[bp.Event] = []
        for _ in range(30):
            ev = cursor.next(timeout=5.0)
            assert ev is not None
            cursor.ack(ev)
            read.append(ev)
        appender = subprocess.Popen([sys.executable, "-c", APPENDER, d, "300"], stdout=subprocess.PIPE, text=True)
        backups: list[bp.BackupReport] = []
        failures: list[BaseException] = []

        def take_backup() -> None:
            try:
                backups.append(bp.backup(d, str(tmp_path / "backup")))
            except BaseException as exc:  # reported below
                failures.append(exc)

        def take_fork() -> None:
            try:
                bp.fork(d, str(tmp_path / "fork"))
            except BaseException as exc:  # reported below
                failures.append(exc)

        copiers = [threading.Thread(target=take_backup), threading.Thread(target=take_fork)]
        for t in copiers:
            t.start()
        report = store.compact()
        for t in copiers:
            t.join(60)
        out, _ = appender.communicate(timeout=60)
        assert appender.returncode == 0 and out.strip() == "300"
        assert not failures, failures
        assert (report.segments_rewritten, report.events_removed) == (2, 4) and report.bytes_reclaimed > 0
        for i, r in enumerate(rs):
            ev = store.get(r.event_id)
            assert ev.redacted == (i in victims) and ev.event_hash == r.event_hash
        assert len(store.history("w-0")) == 100
        seen = [ev for ev, _ in zip(sub, range(175), strict=False)]
        assert [e.global_sequence for e in seen] == [r.global_sequence for r in rs if r.entity == "p-2"]
        assert [e.redacted for e in seen].count(True) == 1  # sequence 11 (i=10) is p-2's
        sub.close()
        while (ev := cursor.next(timeout=0.5)) is not None:
            cursor.ack(ev)
            read.append(ev)
        cursor.close()
        assert [e.global_sequence for e in read] == [r.global_sequence for r in rs if r.entity == "p-0"]
        for i, e in zip(range(0, 700, 4), read, strict=True):  # it read a page ahead: each old or new, whole
            assert (e.redacted and i in (200, 400)) or e.payload["i"] == i
    finally:
        store.close()
    for copy in ("backup", "fork"):  # old or new segments, each whole: the copies verify
        copy_dir = str(tmp_path / copy)
        assert_verified(copy_dir)
        with bp.Engine.open(copy_dir) as eng:
            for i, r in enumerate(rs[:700]):
                ev = eng.get(r.event_id)
                assert ev.event_hash == r.event_hash and ((ev.redacted and i in victims) or ev.payload["i"] == i)


def test_the_cli_compacts_with_and_without_a_service(data_dir: str) -> None:
    with bp.Engine.open(data_dir, bp.EngineConfig(segment_max_bytes=1 << 20)) as eng:
        items = [bp.BatchItem(bp.Coordinate("a", "s"), bp.Kind(1, 1), {"blob": "y" * 4000}) for _ in range(300)]
        rs = [r for at in range(0, 300, 25) for r in eng.append_batch(items[at:at + 25])]
        eng.redact(rs[1].event_id, reason="erase")
    cli = [sys.executable, "-m", "batpak_mp.cli"]
    res = subprocess.run([*cli, "compact", data_dir, "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["events_removed"] == 1
    svc = bp.serve(data_dir, segment_max_bytes=1 << 20)
    try:
        s = bp.connect(data_dir)
        s.redact(rs[2].event_id, reason="erase too")
        s.close()
        res = subprocess.run([*cli, "compact", data_dir, "--json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["events_removed"] == 1
    finally:
        svc.stop()
    with bp.Engine.open(data_dir) as eng:
        assert eng.get(rs[1].event_id).redacted and eng.get(rs[2].event_id).redacted
        assert not eng.get(rs[3].event_id).redacted
    res = subprocess.run([*cli, "compact", str(Path(data_dir) / "nope")], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert_verified(data_dir)
