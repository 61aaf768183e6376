"""A compaction SIGKILLed at 20+ points (issue 13 #3): a child process compacts a copy
of one prepared store and kills itself (a real SIGKILL) at its Nth disk call, N spread
over every call a whole compaction makes: the copy being written, its fsync, the marker,
the rename, the fsync of the directory, the records, the marker's removal. Each time the
store then opens (recovery cleans up), verifies clean, and every event is whole or, if
an erasure request named it, redacted; a compaction after the restart finishes the job."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import SEGMENT_DIR

CHILD = r"""
import os, signal, sys
import batpak_mp as bp
from batpak_mp._storage.osio import Disk

class KillingDisk(Disk):
    armed = False
    calls = 0
    kill_at = int(sys.argv[2])
    def _do(self, op, path, fn, *, inject=True):
        if self.armed:
            KillingDisk.calls += 1
            if KillingDisk.calls == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return super()._do(op, path, fn, inject=inject)

disk = KillingDisk()
eng = bp.Engine.open(sys.argv[1], bp.EngineConfig(segment_max_bytes=1 << 20), disk=disk)
disk.armed = True
eng.compact()
disk.armed = False
print(KillingDisk.calls)
eng.close()
"""
MIN_POINTS = 20


def prepare(d: str) -> tuple[list[bp.Receipt], set[int]]:
    with bp.Engine.open(d, SMALL) as eng:
        items = [bp.BatchItem(bp.Coordinate(f"p-{i % 3}", "people"), bp.Kind(1, 1), {"i": i, "blob": "q" * 5000})
                 for i in range(560)]
        rs = [r for at in range(0, len(items), 20) for r in eng.append_batch(items[at:at + 20])]
        victims = {3, 50, 190, 260, 400}  # three sealed segments hold them
        for i in victims:
            eng.redact(rs[i].event_id, reason="erase")
        assert len(eng.compaction_plan()) == 3
    return rs, victims


def run_child(d: str, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, d, str(kill_at)], capture_output=True, text=True, timeout=120)


def check(d: str, rs: list[bp.Receipt], victims: set[int]) -> None:
    with bp.Engine.open(d, SMALL) as eng:
        for i, r in enumerate(rs):
            ev = eng.get(r.event_id)
            assert ev.event_hash == r.event_hash
            if ev.redacted:
                assert i in victims, f"event {i} was redacted but never asked for"
            else:
                assert ev.payload["i"] == i
        assert all(p.name.endswith(".seg") for p in Path(d, SEGMENT_DIR).iterdir())  # a half copy is gone
        eng.compact()  # after the restart the job finishes
        assert all(eng.get(rs[i].event_id).redacted for i in victims)
    assert_verified(d)


@pytest.mark.slow
def test_compaction_killed_at_twenty_points_leaves_each_event_whole_or_redacted(tmp_path: Path) -> None:
    base = str(tmp_path / "base")
    rs, victims = prepare(base)
    whole = str(tmp_path / "whole")
    shutil.copytree(base, whole)
    done = run_child(whole, 0)  # no kill: how many disk calls a whole compaction makes
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.strip())
    check(whole, rs, victims)
    points = sorted({max(1, round(k * total / MIN_POINTS)) for k in range(1, MIN_POINTS + 1)} | {1, 2, 3, total})
    assert len(points) >= MIN_POINTS, (total, points)
    for n in points:
        d = str(tmp_path / f"kill-{n}")
        shutil.copytree(base, d)
        res = run_child(d, n)
        assert res.returncode == -9, (n, res.returncode, res.stderr)
        check(d, rs, victims)
