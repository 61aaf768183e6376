"""A full disk fails appends with a typed error and takes nothing down (issue 10, item 10).

On a real small tmpfs (mounted for the test; skipped where mounting is not permitted),
filled with a ballast file:

- appends that need space (the next segment, room for their index records) fail with
  ``bp.DiskFull`` (a ``StorageError``, an ``OSError`` with errno ENOSPC), nothing of them
  written; the engine is not poisoned and reads go on;
- the served writer survives it: its once-a-second checkpoint fails and is retried, the
  writer pid stays the same, reads work, and appends succeed again once the ballast is
  removed, with every acknowledged event kept;
- index files written through a mapping are allocated first: growing ``records.idx`` on
  a full disk is ``DiskFull``, not SIGBUS (checked in a child process, which SIGBUS
  would kill).
Every test ends with ``bp.verify``.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest
from _tmpfs import fill, free_bytes, small_tmpfs
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import INDEX_DIR, SEGMENT_DIR
from batpak_mp._format.record import RECORD_SIZE, record_offset
from batpak_mp._storage.indexfiles import RECORDS_GROWTH, IndexFiles
from batpak_mp._storage.osio import Disk

K = bp.Kind(1, 7)
COORD = bp.Coordinate("disk", "room:1")
PAD = "x" * 10_000  # an event of ~10 KB: a 1 MiB segment fills in ~100
SMALL_SEGMENTS = bp.EngineConfig(segment_max_bytes=1 << 20)
PAGE = 4096
APPENDS_MAX = 400  # more than fit in the rest of one segment: the next rotation must be met


def assert_disk_full(exc: BaseException) -> None:
    assert isinstance(exc, bp.DiskFull) and isinstance(exc, bp.StorageError) and isinstance(exc, OSError), exc
    assert exc.errno == errno.ENOSPC and not isinstance(exc, bp.StorePoisoned), exc


def append_until_full(store: bp.Engine | bp.Store, acked: list[bp.Receipt]) -> BaseException:
    for i in range(APPENDS_MAX):
        try:
            acked.append(store.append(COORD, K, {"i": len(acked), "pad": PAD}, idempotency_key=f"k{len(acked)}"))
        except bp.StorageError as exc:
            assert i > 0 or acked, "not one append went in"
            return exc
    raise AssertionError(f"{APPENDS_MAX} appends on a full disk all succeeded")


def assert_reads(store: bp.Engine | bp.Store, acked: list[bp.Receipt]) -> None:
    assert store.get(acked[-1].event_id).payload["i"] == len(acked) - 1
    events, after = [], 0
    while True:
        page = store.query_after(after, limit=500, entity=COORD.entity)
        if not page.events:
            break
        events += page.events
        after = page.next_after
    assert [e.event_id for e in events] == [r.event_id for r in acked]


def test_an_engine_on_a_full_disk_refuses_appends_typed_and_goes_on(tmp_path: str) -> None:
    with small_tmpfs(os.fspath(tmp_path)) as mnt:
        data_dir = os.path.join(mnt, "data")
        acked: list[bp.Receipt] = []
        with bp.Engine.open(data_dir, SMALL_SEGMENTS) as e:
            acked.append(e.append(COORD, K, {"i": 0, "pad": PAD}, idempotency_key="k0"))
            ballast = fill(mnt)
            assert free_bytes(mnt) < 4096 * 4
            err = append_until_full(e, acked)
            assert_disk_full(err)
            assert e.poisoned is None
            for _ in range(3):  # still full: still refused, still typed, nothing half kept
                with pytest.raises(bp.DiskFull):
                    e.append(COORD, K, {"i": -1, "pad": PAD})
            assert e.visible == len(acked)
            assert_reads(e, acked)
            with pytest.raises(bp.DiskFull):
                e.checkpoint()
            os.unlink(ballast)
            acked.append(e.append(COORD, K, {"i": len(acked), "pad": PAD}, idempotency_key=f"k{len(acked)}"))
            with pytest.raises(bp.IdempotencyConflict) as dup:  # the keys survived (another request: refused)
                e.append(COORD, K, {"i": 0}, idempotency_key="k0")
            assert dup.value.sequence == acked[0].global_sequence
            assert_reads(e, acked)
            e.checkpoint()
        assert len(os.listdir(os.path.join(data_dir, SEGMENT_DIR))) >= 2
        with bp.Engine.open(data_dir, SMALL_SEGMENTS) as e:
            assert_reads(e, acked)
        assert_verified(data_dir)


def test_a_served_store_survives_a_full_disk(tmp_path: str) -> None:
    with small_tmpfs(os.fspath(tmp_path)) as mnt:
        data_dir = os.path.join(mnt, "data")
        acked: list[bp.Receipt] = []
        with bp.serve(data_dir, segment_max_bytes=1 << 20) as svc, bp.connect(data_dir) as store:
            pid = svc.writer_pid
            acked.append(store.append(COORD, K, {"i": 0, "pad": PAD}, idempotency_key="k0"))
            ballast = fill(mnt)
            err = append_until_full(store, acked)
            assert_disk_full(err)  # the same typed error as in-process, through the wire
            time.sleep(1.5)  # the writer's checkpoint (once a second) meets the full disk
            with pytest.raises(bp.DiskFull):
                store.append(COORD, K, {"i": -1, "pad": PAD})
            assert_reads(store, acked)
            assert svc.writer_pid == pid and svc.status()["state"] == "ready"
            os.kill(pid, 0)
            os.unlink(ballast)
            acked.append(store.append(COORD, K, {"i": len(acked), "pad": PAD}, idempotency_key=f"k{len(acked)}"))
            with pytest.raises(bp.IdempotencyConflict) as dup:  # the key survived (another request: refused)
                store.append(COORD, K, {"i": 0}, idempotency_key="k0")
            assert dup.value.sequence == acked[0].global_sequence
            assert_reads(store, acked)
            assert svc.writer_pid == pid
            code = svc.stop()
        assert code == 0
        with bp.Engine.open(data_dir, SMALL_SEGMENTS) as e:
            assert_reads(e, acked)
        assert_verified(data_dir)


def test_growing_records_idx_on_a_full_disk_is_typed_not_sigbus(tmp_path: str) -> None:
    """records.idx is written through a mapping: grown sparse, the first record written
    past its old end on a full tmpfs kills the process with SIGBUS."""
    with small_tmpfs(os.fspath(tmp_path)) as mnt:
        idx_dir = os.path.join(mnt, INDEX_DIR)
        os.makedirs(idx_dir)
        index = IndexFiles(Disk(), idx_dir, os.path.join(mnt, SEGMENT_DIR), store_key=1)
        index.open_records()
        fill(mnt)
        first = RECORDS_GROWTH + 1  # the first record past the initial size
        last = 2 * RECORDS_GROWTH  # records.idx grows by RECORDS_GROWTH records at a time
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                index.ensure_records(last)
                for seq in range(first, last + 1, PAGE // RECORD_SIZE):  # a record in every page of the growth
                    index.records_map[record_offset(seq):record_offset(seq) + RECORD_SIZE] = b"\x01" * RECORD_SIZE
            except bp.DiskFull:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert not os.WIFSIGNALED(status), f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
        assert os.WEXITSTATUS(status) == 0, "growing records.idx on a full disk did not raise DiskFull"
        index.close()
