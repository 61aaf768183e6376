"""Backups and forks onto a real small file system (a tmpfs mounted for the test): a
full disk is ``DiskFull`` with the previous backup left as it was and nothing staged
left behind; a destination on another file system gets copies, never hard links."""

from __future__ import annotations

import os

import pytest
from _backup_helpers import grow
from _tmpfs import fill, free_bytes, small_tmpfs
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import SEGMENT_DIR
from batpak_mp._read.offline import OfflineStore


def listing(path: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(path, SEGMENT_DIR, n)) for n in os.listdir(os.path.join(path, SEGMENT_DIR))}


def test_backup_onto_a_full_disk_is_typed_and_keeps_the_previous_backup(tmp_path: str) -> None:
    src = os.path.join(tmp_path, "data")
    grow(src, 3000)  # two 1 MiB segments
    with small_tmpfs(os.fspath(tmp_path), "10m") as mnt:
        dest = os.path.join(mnt, "backup")
        first = bp.backup(src, dest)
        before = listing(dest)
        grow(src, 6000, start=3000)  # now about four segments: more than the space left
        ballast = fill(mnt)
        os.truncate(ballast, os.path.getsize(ballast) - (1 << 20))  # room for part of it only
        with pytest.raises(bp.DiskFull) as info:
            bp.backup(src, dest)
        assert info.value.path.startswith(mnt)
        assert listing(dest) == before  # the previous good backup, untouched
        assert not [n for n in os.listdir(mnt) if "staging" in n]  # nothing staged is left taking space
        assert_verified(dest)
        with OfflineStore.open(dest) as store:  # read-only: the full disk has no room for an index
            assert store.visible == first.last_sequence
        os.unlink(ballast)
        second = bp.backup(src, dest)  # with space again, the same call succeeds
        assert second.last_sequence == 9000 and second.files_reused >= 1
        assert_verified(dest)
        with pytest.raises(bp.DiskFull):  # a fork has nowhere to put its private copy either
            fill(mnt)
            bp.fork(src, os.path.join(mnt, "fork"), at=4000)
        assert not os.path.exists(os.path.join(mnt, "fork"))
        assert free_bytes(mnt) < 1 << 20
    assert_verified(src)


def test_fork_and_backup_onto_another_file_system_copy(tmp_path: str) -> None:
    src = os.path.join(tmp_path, "data")
    receipts = grow(src, 6000)
    with small_tmpfs(os.fspath(tmp_path), "16m") as mnt:
        fork_dir = os.path.join(mnt, "fork")
        report = bp.fork(src, fork_dir)
        assert report.files_linked == 0 and report.files_copied == len(listing(fork_dir)) >= 2
        assert report.fork_sequence == 6000
        for name in listing(fork_dir):
            assert os.stat(os.path.join(fork_dir, SEGMENT_DIR, name)).st_nlink == 1
        assert_verified(fork_dir)
        with bp.Engine.open(fork_dir, SMALL) as e:
            assert all(e.verify_receipt(r) for r in receipts[::97])
            e.append(bp.Coordinate("fork", "s"), bp.Kind(1, 1), {})
        backup_dir = os.path.join(mnt, "backup")
        assert bp.backup(src, backup_dir).last_sequence == 6000
        assert_verified(backup_dir)
        assert_verified(fork_dir)
    assert_verified(src)
