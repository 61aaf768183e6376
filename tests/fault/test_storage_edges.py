"""Two edges of the storage seam (issue 10, item 13, its storage parts).

- ``Disk.write_file_atomic`` writes every byte or fails typed: a short ``write`` (a file
  system filling up, a file size limit) is continued, and the call after it says why it
  stopped; the temp file is removed and the old file is left as it was. Made real with
  ``RLIMIT_FSIZE`` (a short write at the limit, EFBIG after it) and with a nearly full
  tmpfs (a short write, then ENOSPC).
- The syncer thread's fsync runs on its own duplicate of the segment's descriptor
  (``pending_sync_target``): a rotation that closes the segment's descriptor meanwhile,
  and a file opened after it that takes the same number, cannot make that fsync fail
  (EBADF poisoned the store) or land on another file.
Every test that builds a store ends with ``bp.verify``.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
from collections.abc import Iterator

import pytest
from _tmpfs import fill, small_tmpfs
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._prepare import Prepared, prepare
from batpak_mp._storage.osio import Disk

K = bp.Kind(1, 7)
LIMIT = 10_000  # bytes: the file size limit of the RLIMIT_FSIZE test


@pytest.fixture
def file_size_limit() -> Iterator[int]:
    """RLIMIT_FSIZE at ``LIMIT`` for this process (SIGXFSZ ignored: a write past it is
    short, then EFBIG), restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        yield LIMIT
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_write_file_atomic_continues_a_short_write_and_fails_typed(tmp_path: str, file_size_limit: int) -> None:
    path = os.path.join(tmp_path, "table.tbl")
    with open(path, "wb") as f:
        f.write(b"old")
    with pytest.raises(bp.StorageError) as ei:
        Disk().write_file_atomic(path, b"n" * (2 * file_size_limit))
    assert ei.value.errno == errno.EFBIG
    with open(path, "rb") as f:
        assert f.read() == b"old"  # never a silently cut file in its place
    assert not os.path.exists(path + ".tmp")


def test_write_file_atomic_on_a_nearly_full_disk(tmp_path: str) -> None:
    with small_tmpfs(os.fspath(tmp_path), size="2m") as mnt:
        path = os.path.join(mnt, "table.tbl")
        with open(path, "wb") as f:
            f.write(b"old")
        ballast = fill(mnt)
        os.truncate(ballast, os.path.getsize(ballast) - 2 * 4096)  # two pages left
        with pytest.raises(bp.DiskFull) as ei:
            Disk().write_file_atomic(path, b"n" * (5 * 4096))
        assert ei.value.errno == errno.ENOSPC
        with open(path, "rb") as f:
            assert f.read() == b"old"
        assert not os.path.exists(path + ".tmp")  # its pages are free again
        Disk().write_file_atomic(path, b"n" * 4096)  # what fits, fits
        with open(path, "rb") as f:
            assert f.read() == b"n" * 4096


def _prepared(entity: str, payload: object) -> Prepared:
    return prepare(bp.Coordinate(entity, "room:1"), K, payload, idempotency_key=None, expected_clock=None,
                   causation_id=None, correlation_id=None, max_payload=SMALL.max_payload_bytes)


def test_a_sync_target_outlives_a_rotation(data_dir: str) -> None:
    """The writer's pipeline hands ``pending_sync_target`` to its syncer thread, which may
    run the fsync only after the loop rotated (sealed, closed the segment's descriptor)."""
    with bp.Engine.open(data_dir, SMALL) as e:
        seg = e._seg
        assert seg is not None
        while seg.size - seg.end > 60_000:
            e.append(bp.Coordinate("e", "room:1"), K, "x" * 20_000)
        e.commit([[_prepared("e", "pending")]], settle=False)  # written; its fsync is the syncer's
        fd, path, groups = e.pending_sync_target()
        assert groups == 1
        sealed_inode = os.stat(path).st_ino
        e.commit([[_prepared("e", "y" * 100_000)]])  # does not fit: rotation, in the loop
        new_seg = e._seg
        assert new_seg is not None and new_seg.segment_id == seg.segment_id + 1
        reuse = os.open(os.devnull, os.O_RDONLY)  # takes the lowest free number: the old segment's
        try:
            assert os.fstat(fd).st_ino == sealed_inode  # still the segment the job was made for
            e.disk.fdatasync(fd, path)
        finally:
            os.close(reuse)
            e.disk.close_quietly(fd, path)
        assert e.poisoned is None
        e.publish_through(0, True)  # the rotation settled it already: nothing left to publish
        assert e.visible == e.durable
    assert_verified(data_dir)
