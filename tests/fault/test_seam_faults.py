"""Faults injected into the OS calls that used to go around the Disk seam.

The engine's fstat, close, pread, open, listdir and mmap calls now pass through
``osio.Disk``, so a ``FaultPlan`` reaches them. On real files, for every such call an
open or a rotation makes (the n-th call of an op, for every n until the op is no longer
reached):
- the failure is a typed ``StorageError`` naming the op (never a raw ``OSError``), or
  nothing at all where a failure has nothing to report (a close: the descriptor is
  released either way, and the data was fsynced before);
- nothing is left open (the lock included) after a failed open;
- no acknowledged event is lost and no refused one appears, the store goes on, and the
  directory verifies.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from _engine_helpers import assert_holds_exactly, copy_store, segment_ids
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._storage.osio import Disk, FaultPlan

K = bp.Kind(1, 7)
OTHER_BOOT = bytes.fromhex("cd" * 16)
OPEN_OPS = ["fstat", "pread", "listdir", "open", "close", "mmap"]
ROTATION_OPS = ["fstat", "listdir", "open", "close", "mmap", "pwrite", "fallocate", "write", "unlink"]
# calls of a rotation made after the switch to the next segment, whose failure refuses
# nothing: verified.tbl and the checkpoint (best effort: the writer retries the checkpoint)
AFTER_SWITCH = {"write": 2}
MAX_CALLS = 400  # a loop guard: no open or rotation makes this many calls of one op


def coord(entity: str) -> bp.Coordinate:
    return bp.Coordinate(entity, "room:1")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class FailAlways(FaultPlan):
    """A plan that also fails every call of the ops in ``always``."""

    always: set[str] = field(default_factory=set)

    def check(self, op: str) -> None:
        super().check(op)
        if op in self.always:
            raise OSError(errno.EIO, os.strerror(errno.EIO))


@dataclass
class Store:
    path: str
    receipts: list[bp.Receipt]


def _fill(e: bp.Engine, receipts: list[bp.Receipt], room: int) -> None:
    """Append until the active segment has at most ``room`` bytes left."""
    seg = e._seg
    assert seg is not None
    i = len(receipts)
    while seg.size - seg.end > room:
        receipts.append(e.append(coord(f"e{i % 3}"), K, {"i": i, "pad": "x" * 20_000}, idempotency_key=f"k{i}"))
        i += 1


@pytest.fixture(scope="module")
def sealed_and_active(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A closed store with a sealed segment and an active one holding a batch."""
    path = os.path.join(tmp_path_factory.mktemp("seam"), "data")
    receipts: list[bp.Receipt] = []
    with bp.Engine.open(path, SMALL) as e:
        while len(segment_ids(path)) < 2:
            receipts.append(e.append(coord(f"e{len(receipts) % 3}"), K, {"pad": "x" * 30_000}))
        receipts += e.append_batch([bp.BatchItem(coord("e1"), K, 1, idempotency_key="b1"),
                                    bp.BatchItem(coord("new"), K, 2, idempotency_key="b2")])
    assert_verified(path)
    return Store(path, receipts)


@pytest.fixture(scope="module")
def near_rotation(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A closed store whose only segment has about 60 KB left: the next 100 KB event rotates."""
    path = os.path.join(tmp_path_factory.mktemp("near"), "data")
    receipts: list[bp.Receipt] = []
    with bp.Engine.open(path, SMALL) as e:
        _fill(e, receipts, 60_000)
    assert segment_ids(path) == [1]
    assert_verified(path)
    return Store(path, receipts)


@pytest.fixture
def scratch(tmp_path: os.PathLike[str]) -> Iterator[str]:
    yield os.fspath(tmp_path)


def reopen_and_check(path: str, acked: list[bp.Receipt]) -> None:
    """Exactly the acknowledged events, the store goes on, and the directory verifies."""
    with bp.Engine.open(path, SMALL) as e:
        assert_holds_exactly(e, acked)
        r = e.append(coord("e0"), K, "after")
        assert r.global_sequence == len(acked) + 1
        assert [h.event_id for h in e.history("e0")][-1] == r.event_id
    assert_verified(path)


# ---- open -------------------------------------------------------------------------------
@pytest.mark.parametrize("boot", ["same", "other"])
@pytest.mark.parametrize("op", OPEN_OPS)
def test_every_call_of_an_open_can_fail(sealed_and_active: Store, scratch: str, op: str, boot: str) -> None:
    """Fail the n-th ``op`` of an open, for each n, on the same-boot and the full path."""
    path = copy_store(sealed_and_active.path, os.path.join(scratch, "c"))
    failed = opened = 0
    for n in range(MAX_CALLS):
        plan = FaultPlan(fail={op: (n, errno.EIO)}, boot_id=OTHER_BOOT if boot == "other" else None)
        fds = open_fds()
        try:
            e = bp.Engine.open(path, SMALL, disk=Disk(plan))
        except bp.StorageError as exc:  # anything else (a raw OSError, StoreLocked) fails the test
            assert exc.op == op and exc.errno == errno.EIO and path in exc.path, exc
            failed += 1
        else:
            opened += 1
            e.close()
        assert open_fds() == fds, f"call {n} of {op}: a descriptor was left open"
        if op in plan.fail:  # the open made fewer than n + 1 calls of op: all were tried
            break
    else:
        pytest.fail(f"more than {MAX_CALLS} calls of {op}")
    assert n >= 1, f"the open never calls {op}"
    if op == "close":
        assert failed == 0  # nothing to report: the descriptor is gone either way
    else:
        assert failed >= 1
    reopen_and_check(path, sealed_and_active.receipts)


def test_a_failed_open_after_recovery_releases_the_lock(sealed_and_active: Store, scratch: str) -> None:
    """The last write of an open is fences.tbl, after the reader is made: failing it used
    to keep the lock (a second open in this process then said StoreLocked)."""
    path = copy_store(sealed_and_active.path, os.path.join(scratch, "c"))
    bp.Engine.open(path, SMALL).close()  # the copy's new inodes: the checksum stamps are written once
    count = FaultPlan()
    e = bp.Engine.open(path, SMALL, disk=Disk(count))
    writes_at_open = count.calls["write"]
    e.close()
    plan = FaultPlan(fail={"write": (writes_at_open - 1, errno.ENOSPC)})  # the last write of the open
    fds = open_fds()
    with pytest.raises(bp.StorageError) as ei:
        bp.Engine.open(path, SMALL, disk=Disk(plan))
    assert ei.value.path.endswith("fences.tbl") and ei.value.errno == errno.ENOSPC
    assert open_fds() == fds
    reopen_and_check(path, sealed_and_active.receipts)


# ---- rotation ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", ROTATION_OPS)
def test_every_call_of_a_rotation_can_fail(near_rotation: Store, scratch: str, op: str) -> None:
    """Fail the n-th ``op`` of the append that rotates: it is refused with a typed error
    (or, for a close, not at all), and the next append rotates and goes on."""
    failed = 0
    for n in range(MAX_CALLS):
        path = copy_store(near_rotation.path, os.path.join(scratch, f"r{n}"))
        acked = list(near_rotation.receipts)
        plan = FaultPlan()
        fds = open_fds()
        e = bp.Engine.open(path, SMALL, disk=Disk(plan))
        try:
            plan.fail[op] = (n, errno.EIO)
            try:
                acked.append(e.append(coord("e1"), K, "y" * 100_000, idempotency_key="big"))
            except bp.StorageError as exc:
                assert exc.op == op and exc.errno == errno.EIO, exc
                assert not isinstance(exc, bp.StorePoisoned)
                failed += 1
            reached = op not in plan.fail
            plan.fail.pop(op, None)
            # the store goes on: the refused event (or a new one) lands in the next segment
            acked.append(e.append(coord("e1"), K, "y" * 100_000, idempotency_key="big")._replace(deduplicated=False))
            acked = list(dict.fromkeys(acked))  # the key made it land once
            acked.append(e.append(coord("e2"), K, "after", expected_clock=_clock_of(acked, "e2")))
            assert e._seg is not None and e._seg.segment_id == 2
            # this engine's own reads see the events of the new segment (its reader moved on)
            for entity in ("e1", "e2"):
                newest = [r for r in acked if r.entity == entity][-1]
                assert e.history(entity)[-1].event_id == newest.event_id, (op, n, entity)
            again = e.append(coord("e1"), K, "y" * 100_000, idempotency_key="big")
            assert again.deduplicated and again._replace(deduplicated=False) == acked[-2]
        finally:
            e.close()
        assert open_fds() == fds, f"call {n} of {op}: a descriptor was left open"  # mappings hold one too
        reopen_and_check(path, acked)
        if not reached:
            break
    else:
        pytest.fail(f"more than {MAX_CALLS} calls of {op}")
    assert n >= 1, f"a rotation never calls {op}"
    assert failed == (0 if op == "close" else n - AFTER_SWITCH.get(op, 0))


def _clock_of(receipts: list[bp.Receipt], entity: str) -> int:
    return max((r.entity_clock for r in receipts if r.entity == entity), default=0)


def test_close_failing_throughout_a_rotation(near_rotation: Store, scratch: str) -> None:
    """Every close of the rotation fails: nothing is reported, every descriptor is still
    released, and nothing is closed twice."""
    path = copy_store(near_rotation.path, os.path.join(scratch, "c"))
    acked = list(near_rotation.receipts)
    plan = FailAlways()
    fds = open_fds()
    with bp.Engine.open(path, SMALL, disk=Disk(plan)) as e:
        plan.always.add("close")
        closes = plan.calls.get("close", 0)
        acked.append(e.append(coord("e1"), K, "y" * 100_000))
        assert plan.calls["close"] - closes >= 2 and e._seg is not None and e._seg.segment_id == 2
        acked += e.append_batch([bp.BatchItem(coord("e1"), K, 1), bp.BatchItem(coord("e9"), K, 2)])
    assert open_fds() == fds  # every close failed, every descriptor is gone all the same
    reopen_and_check(path, acked)


def test_listdir_failing_keeps_refusing_until_it_works(near_rotation: Store, scratch: str) -> None:
    path = copy_store(near_rotation.path, os.path.join(scratch, "c"))
    acked = list(near_rotation.receipts)
    plan = FailAlways()
    with bp.Engine.open(path, SMALL, disk=Disk(plan)) as e:
        plan.always.add("listdir")
        for _ in range(3):
            with pytest.raises(bp.StorageError) as ei:
                e.append(coord("e1"), K, "y" * 100_000)
            assert ei.value.op == "listdir"
        assert e.visible == len(acked)
        # events of the sealed segment are still found, by key and by entity
        dup = e.append(coord("e0"), K, {"i": 0, "pad": "x" * 20_000}, idempotency_key="k0")
        assert dup._replace(deduplicated=False) == acked[0]
        assert e.history("e1")[-1].event_id == [r for r in acked if r.entity == "e1"][-1].event_id
        plan.always.clear()
        acked.append(e.append(coord("e1"), K, "y" * 100_000, expected_clock=_clock_of(acked, "e1")))
    assert segment_ids(path) == [1, 2]
    reopen_and_check(path, acked)
