"""The active segment stays preallocated across restarts (issue 10, item 8).

Segments are preallocated so that an append never allocates blocks, and so never meets
ENOSPC half way through a group. Recovery cuts the torn tail by zeroing everything after
the last commit; it must zero without giving the blocks back (hole punching alone did:
after one restart a 64 MiB segment had 8 KiB allocated). Checked with ``st_blocks`` on
the real file system after an in-process restart (both recovery paths), after a served
restart, and after a failed write was taken back.
Every test ends with ``bp.verify``.
"""

from __future__ import annotations

import errno
import os

from _engine_helpers import segment_ids, segment_path
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._storage.osio import Disk, FaultPlan

K = bp.Kind(1, 7)
COORD = bp.Coordinate("prealloc", "room:1")


def allocated(path: str) -> int:
    """Bytes the file system has allocated to ``path``."""
    return os.stat(path).st_blocks * 512


def active_path(data_dir: str) -> str:
    return segment_path(data_dir, segment_ids(data_dir)[-1])


def assert_fully_allocated(data_dir: str) -> None:
    path = active_path(data_dir)
    size = os.path.getsize(path)
    assert allocated(path) >= size, f"{path}: {allocated(path)} of {size} bytes allocated"


def test_a_new_segment_is_fully_allocated(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        e.append(COORD, K, {"i": 0})
        assert_fully_allocated(data_dir)
    assert_verified(data_dir)


def test_the_same_boot_restart_keeps_the_active_segment_allocated(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        for i in range(20):
            e.append(COORD, K, {"i": i})
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e.recovery_report.get("same_boot") is True
        assert_fully_allocated(data_dir)
        e.append(COORD, K, {"i": 20})
    assert_fully_allocated(data_dir)
    assert_verified(data_dir)


def test_the_full_recovery_keeps_the_active_segment_allocated(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        for i in range(20):
            e.append(COORD, K, {"i": i})
    other_boot = Disk(FaultPlan(boot_id=b"\x01" * 16))  # the cold path: as after a reboot
    with bp.Engine.open(data_dir, SMALL, disk=other_boot) as e:
        assert "same_boot" not in e.recovery_report
        assert_fully_allocated(data_dir)
        assert e.visible == 20
    assert_verified(data_dir)


def test_a_torn_tail_cut_keeps_the_segment_allocated(data_dir: str) -> None:
    """A tail past the last commit (a torn group) is zeroed at open, not deallocated."""
    with bp.Engine.open(data_dir, SMALL) as e:
        e.append(COORD, K, {"i": 0})
        seg = e._seg
        assert seg is not None
        end = seg.end
    with open(active_path(data_dir), "r+b") as f:  # half a frame after the last commit
        f.seek(end)
        f.write(b"\x99" * 300)
    with bp.Engine.open(data_dir, SMALL, disk=Disk(FaultPlan(boot_id=b"\x02" * 16))) as e:
        assert e.recovery_report["torn_bytes_cut"] > 0 or e.visible == 1
        assert_fully_allocated(data_dir)
        assert e.visible == 1
    assert_verified(data_dir)


def test_a_failed_write_taken_back_keeps_the_segment_allocated(data_dir: str) -> None:
    plan = FaultPlan()
    with bp.Engine.open(data_dir, SMALL, disk=Disk(plan)) as e:
        e.append(COORD, K, {"i": 0})
        plan.short_write_at = 100  # a bit of a group lands, then ENOSPC: it is zeroed again
        big = [bp.BatchItem(COORD, K, {"i": 1, "pad": "x" * 2000}) for _ in range(50)]  # spans whole blocks
        try:
            e.append_batch(big)
        except bp.StorageError as exc:
            assert exc.errno == errno.ENOSPC
        else:
            raise AssertionError("the short write was not reported")
        assert_fully_allocated(data_dir)
        e.append(COORD, K, {"i": 2})
        assert e.visible == 2
    assert_verified(data_dir)


def test_a_served_restart_keeps_the_active_segment_allocated(data_dir: str) -> None:
    for rnd in range(2):
        with bp.serve(data_dir, segment_max_bytes=1 << 20) as svc, bp.connect(data_dir) as store:
            store.append(COORD, K, {"round": rnd})
            assert_fully_allocated(data_dir)
            assert svc.writer_pid
    assert_fully_allocated(data_dir)
    assert_verified(data_dir)
