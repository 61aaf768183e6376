"""The two recovery paths agree: same-boot restart (trusts the index through the
checkpoint, scans the tail) and cold recovery (rebuilds from the segments)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._storage.osio import Disk, FaultPlan

K = bp.Kind(1, 1)
OTHER_BOOT = Disk(FaultPlan(boot_id=b"\x01" * 16))

CRASHER = textwrap.dedent("""
    import os, sys
    import batpak_mp as bp
    e = bp.Engine.open(sys.argv[1], bp.EngineConfig(segment_max_bytes=1 << 20))
    e.checkpoint()
    for i in range(int(sys.argv[2])):
        items = [bp.BatchItem(bp.Coordinate(f"e{(i * 7 + j) % 13}", "s"), bp.Kind(1, 1), {"i": i, "j": j, "p": "x" * 90},
                              idempotency_key=f"k{i}-{j}") for j in range(20)]
        e.append_batch(items)
        if i == int(sys.argv[3]):
            e.checkpoint()
    os._exit(0)  # no close: like a SIGKILL after the last acknowledgement
""")


def _snapshot(path: str, disk: Disk | None = None) -> list[tuple[int, bytes, str, int]]:
    with bp.Engine.open(path, SMALL, disk=disk) as e:
        out = [(ev.global_sequence, ev.event_hash, ev.coordinate.entity, ev.entity_clock)
               for ev in e.reader.scan(0)]
        for ent in ("e0", "e5", "e12"):
            hist = e.history(ent)
            assert [h.entity_clock for h in hist] == list(range(1, len(hist) + 1))
        return out


def test_same_boot_and_cold_recovery_agree(data_dir: str, tmp_path: os.PathLike[str]) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        e.append(bp.Coordinate("e0", "s"), K, 0)
    subprocess.run([sys.executable, "-c", CRASHER, data_dir, "300", "120"], check=True, timeout=120)
    cold_copy = os.path.join(os.fspath(tmp_path), "cold")
    shutil.copytree(data_dir, cold_copy)
    with bp.Engine.open(data_dir, SMALL) as e:
        report = e.recovery_report
        assert report.get("same_boot") is True, report
        assert report["active_frames_scanned"] > 0  # the tail after the last checkpoint
        last = e.visible
        # a re-sent key after the crash returns its original receipt
        with pytest.raises(bp.IdempotencyConflict) as dup:  # the key is known: another request is refused
            e.append(bp.Coordinate("e0", "s"), K, {"again": 1}, idempotency_key="k299-0")
        assert dup.value.sequence < last
    with bp.Engine.open(cold_copy, SMALL, disk=OTHER_BOOT) as e:
        assert "same_boot" not in e.recovery_report
        assert e.visible == last
    assert _snapshot(data_dir) == _snapshot(cold_copy, OTHER_BOOT)
    assert_verified(data_dir)
    assert_verified(cold_copy)


def test_same_boot_restart_cuts_a_torn_tail(data_dir: str) -> None:
    subprocess.run([sys.executable, "-c", CRASHER, data_dir, "40", "10"], check=True, timeout=120)
    with bp.Engine.open(data_dir, SMALL) as e:
        seg = e._seg
        assert seg is not None
        end, path, last = seg.end, seg.path, e.visible
    # a torn write after the last commit: half a frame of garbage
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(b"\x99\x01\x00\x00" + os.urandom(150))
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e.visible == last
        assert e.recovery_report.get("same_boot") is True
        with open(path, "rb") as f:
            f.seek(end)
            assert f.read(154) == bytes(154)  # zeroed, never truncated
        assert e.append(bp.Coordinate("e1", "s"), K, 1).global_sequence == last + 1
    assert_verified(data_dir)


COLD_THEN_CRASH = textwrap.dedent("""
    import os, sys
    import batpak_mp as bp
    from batpak_mp._storage.osio import Disk, FaultPlan
    disk = Disk(FaultPlan(boot_id=bytes.fromhex(sys.argv[2])))
    e = bp.Engine.open(sys.argv[1], bp.EngineConfig(segment_max_bytes=1 << 20), disk=disk)
    assert "same_boot" not in e.recovery_report  # another boot: the full recovery ran
    for i in range(50):
        e.append(bp.Coordinate("after-cold", "s"), bp.Kind(1, 1), {"i": i})
    e.checkpoint()  # as the writer does every second
    os._exit(0)
""")


def test_restart_after_a_cold_recovery_takes_the_fast_path(data_dir: str) -> None:
    """The full recovery used to leave the running frames checksum at zero, so the
    checkpoints after it never matched and every later restart fell back to the slow
    path."""
    subprocess.run([sys.executable, "-c", CRASHER, data_dir, "30", "10"], check=True, timeout=120)
    boot = "ab" * 16
    subprocess.run([sys.executable, "-c", COLD_THEN_CRASH, data_dir, boot], check=True, timeout=120)
    with bp.Engine.open(data_dir, SMALL, disk=Disk(FaultPlan(boot_id=bytes.fromhex(boot)))) as e:
        assert e.recovery_report.get("same_boot") is True, e.recovery_report
        assert [ev.payload["i"] for ev in e.history("after-cold")] == list(range(50))
    assert_verified(data_dir)


def test_same_boot_restart_rechecks_a_sealed_segment_written_since(data_dir: str) -> None:
    """Sealed segments checked in this boot are not re-read at a restart, unless the file
    changed since (any write moves its mtime): a flipped bit is still found at open."""
    from batpak_mp._format.directory import INDEX_DIR, SEGMENT_DIR, VERIFIED_FILE

    subprocess.run([sys.executable, "-c", CRASHER, data_dir, "200", "150"], check=True, timeout=120)
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e.recovery_report.get("same_boot") is True
        sealed = [n for n in sorted(os.listdir(os.path.join(data_dir, SEGMENT_DIR)))][:-1]
        assert sealed
    assert os.path.exists(os.path.join(data_dir, INDEX_DIR, VERIFIED_FILE))
    path = os.path.join(data_dir, SEGMENT_DIR, sealed[0])
    with open(path, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0x10]))
    import pytest

    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(data_dir, SMALL)
