"""bp.backup, bp.restore and bp.fork on real files, with no service: a backup is a store
that verifies and holds every event; a second backup copies only new segments; bad
destinations and a damaged source get typed errors and change nothing; a fork has its
own id and lineage, shares sealed segments and never shares a segment it writes into."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest
from _backup_helpers import grow as fill
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import SEGMENT_DIR
from batpak_mp._format.manifest import MANIFEST_FILE
from batpak_mp._format.segment import SEG_HEADER_SIZE


def fingerprint(root: str) -> dict[str, str]:
    """Every file under ``root`` and a digest of its bytes and mtime (what "untouched" means)."""
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f"{hashlib.blake2b(f.read()).hexdigest()}:{os.stat(path).st_mtime_ns}"
    return out


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def segments(path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(path, SEGMENT_DIR)))


def receipts_verify(path: str, receipts: list[bp.Receipt]) -> bool:
    with bp.Engine.open(path, SMALL) as e:
        return all(e.verify_receipt(r) for r in receipts)


def test_backup_is_a_store_and_the_next_one_copies_only_new_segments(tmp_path: os.PathLike[str]) -> None:
    src, dest = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "backup")
    receipts = fill(src, 6000)
    before = fingerprint(src)
    first = bp.backup(src, dest)
    assert (first.last_sequence, first.incremental, first.files_reused) == (6000, False, 0)
    assert first.files_copied == len(segments(src)) and first.bytes_copied > 0
    assert fingerprint(src) == before  # the source is only read
    manifest = read_json(os.path.join(dest, MANIFEST_FILE))
    assert manifest["last_seq"] == 6000 and manifest["store_id"] == first.store_id
    assert not os.path.exists(os.path.join(dest, "index"))  # derived files are rebuilt by the writer, not copied
    assert_verified(dest)

    receipts += fill(src, 4000, start=6000)
    sealed_before = [n for n in segments(dest)][:-1]  # the last one was the active prefix
    second = bp.backup(src, dest)
    assert second.incremental and second.last_sequence == 10000
    assert second.files_reused == len(sealed_before) >= 1
    assert second.files_copied == len(segments(src)) - second.files_reused
    assert second.bytes_copied < sum(os.path.getsize(os.path.join(src, SEGMENT_DIR, n)) for n in segments(src))
    assert not [n for n in os.listdir(tmp_path) if "staging" in n or "bpmp-old" in n]
    assert_verified(dest)
    assert receipts_verify(dest, receipts)  # the copy serves as it is; every receipt still matches
    assert_verified(src)


def test_refused_destinations_change_nothing(tmp_path: os.PathLike[str]) -> None:
    src = os.path.join(tmp_path, "data")
    other = os.path.join(tmp_path, "other")
    fill(src, 300)
    fill(other, 100)
    before = fingerprint(src)
    with pytest.raises(bp.BackupRefused, match="inside the data directory"):
        bp.backup(src, os.path.join(src, "segments", "b"))
    with pytest.raises(bp.BackupRefused, match="inside it"):
        bp.backup(src, str(tmp_path))  # the data directory lies inside DEST
    junk = os.path.join(tmp_path, "junk")
    os.makedirs(junk)
    with open(os.path.join(junk, "notes.txt"), "w") as f:
        f.write("mine\n")
    with pytest.raises(bp.BackupRefused, match="not a backup"):
        bp.backup(src, junk)
    assert os.listdir(junk) == ["notes.txt"]
    theirs = os.path.join(tmp_path, "theirs")
    bp.backup(other, theirs)
    their_files = fingerprint(theirs)
    with pytest.raises(bp.BackupRefused, match="another store") as info:
        bp.backup(src, theirs)
    assert info.value.found_store_id is not None and info.value.found_store_id == read_json(
        os.path.join(other, "store.meta"))["store_id"]
    assert fingerprint(theirs) == their_files
    with pytest.raises(bp.InvalidArgument, match="not a batpak-mp data directory"):
        bp.backup(junk, os.path.join(tmp_path, "b2"))
    with pytest.raises(bp.BackupRefused, match="needs a missing or empty"):
        bp.fork(src, junk)
    assert fingerprint(src) == before
    assert_verified(src)
    assert_verified(theirs)


def test_a_source_that_fails_verification_is_not_published(tmp_path: os.PathLike[str]) -> None:
    src, dest = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "backup")
    fill(src, 3000)
    bp.backup(src, dest)
    good = fingerprint(dest)
    fill(src, 6000, start=3000)
    victim = os.path.join(src, SEGMENT_DIR, segments(src)[1])  # sealed after the first backup: it will be copied
    offset = SEG_HEADER_SIZE + 5000
    with open(victim, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(bp.CorruptSegment, match="checksum mismatch") as info:
        bp.backup(src, dest)
    assert info.value.segment == victim
    assert fingerprint(dest) == good  # still the previous good backup
    assert not [n for n in os.listdir(tmp_path) if "staging" in n]
    with pytest.raises(bp.CorruptSegment):
        bp.fork(src, os.path.join(tmp_path, "fork"))
    assert not os.path.exists(os.path.join(tmp_path, "fork"))
    with open(victim, "r+b") as f:  # undo the damage: the source verifies again
        f.seek(offset)
        f.write(byte)
    assert_verified(src)
    assert_verified(dest)


def test_fork_has_its_own_id_and_lineage_and_shares_only_sealed_segments(tmp_path: os.PathLike[str]) -> None:
    src, dest = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "fork")
    receipts = fill(src, 7000)
    at = 6000
    report = bp.fork(src, dest, at=at)
    assert report.fork_sequence == at and report.store_id != report.parent_store_id
    meta = read_json(os.path.join(dest, "store.meta"))
    assert meta["store_id"] == report.store_id
    assert meta["lineage"] == {"parent_store_id": report.parent_store_id, "fork_seq": at,
                               "inherited": [[report.parent_store_id, at]]}
    names = segments(dest)
    assert report.files_linked == len(names) - 1 >= 1 and report.files_copied == 1
    for n in names[:-1]:  # shared: the same inode
        assert os.stat(os.path.join(dest, SEGMENT_DIR, n)).st_ino == os.stat(os.path.join(src, SEGMENT_DIR, n)).st_ino
    private = names[-1]  # holds the fork point: a private copy, sealed
    assert os.stat(os.path.join(dest, SEGMENT_DIR, private)).st_ino != os.stat(
        os.path.join(src, SEGMENT_DIR, private)).st_ino
    assert_verified(dest)
    assert receipts_verify(dest, receipts[:at])  # the parent's receipts of included events match in the fork
    parent_before = fingerprint(src)
    with bp.Engine.open(dest, SMALL) as e:
        assert e.visible == at
        assert not e.verify_receipt(receipts[at])  # not in the fork
        mine = [e.append(bp.Coordinate(f"fork:{i}", "s"), bp.Kind(1, 2), {"i": i, "pad": "y" * 300}) for i in range(3000)]
    assert mine[0].global_sequence == at + 1
    assert {k: v for k, v in fingerprint(src).items()} == parent_before  # the fork's writes never reach the parent
    fork_files = fingerprint(dest)
    more = fill(src, 3000, start=7000)  # nor the parent's the fork
    assert fingerprint(dest) == fork_files
    assert receipts_verify(src, receipts + more)
    assert_verified(dest)
    assert_verified(src)

    grand = os.path.join(tmp_path, "grandchild")  # a fork of a fork inherits from both
    g = bp.fork(dest, grand, at=at + 10)
    lineage = read_json(os.path.join(grand, "store.meta"))["lineage"]
    assert lineage["inherited"] == [[report.parent_store_id, at], [report.store_id, at + 10]]
    assert g.fork_sequence == at + 10
    assert_verified(grand)
    with bp.Engine.open(grand, SMALL) as e:
        assert e.get(mine[9].event_id).payload["i"] == 9
        e.append(bp.Coordinate("grand", "s"), bp.Kind(1, 3), {})
    assert_verified(grand)


def test_fork_point_must_be_a_whole_commit_within_the_log(tmp_path: os.PathLike[str]) -> None:
    src = os.path.join(tmp_path, "data")
    fill(src, 250)  # batches of 100: commits end at 100, 200, 250
    with pytest.raises(bp.InvalidArgument, match="inside a batch") as info:
        bp.fork(src, os.path.join(tmp_path, "f1"), at=150)
    assert info.value.name == "at" and info.value.value == 150
    with pytest.raises(bp.InvalidArgument, match="past the store's durable frontier"):
        bp.fork(src, os.path.join(tmp_path, "f2"), at=251)
    with pytest.raises(bp.InvalidArgument, match=">= 0"):
        bp.fork(src, os.path.join(tmp_path, "f3"), at=-1)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(("f1", "f2", "f3", ".f"))
                and not n.endswith("-lock")]
    empty = bp.fork(src, os.path.join(tmp_path, "f0"), at=0)  # no history at all: still a fork
    assert empty.fork_sequence == 0 and empty.files_copied == empty.files_linked == 0
    with bp.Engine.open(os.path.join(tmp_path, "f0"), SMALL) as e:
        assert e.append(bp.Coordinate("a", "s"), bp.Kind(1, 1), {}).global_sequence == 1
    assert_verified(os.path.join(tmp_path, "f0"))
    assert_verified(src)


def test_restore_puts_a_backup_in_place_and_keeps_what_was_there(tmp_path: os.PathLike[str]) -> None:
    src, dest = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "backup")
    receipts = fill(src, 3000)
    bp.backup(src, dest)
    fill(src, 500, start=3000)  # the live store moves on, then is lost
    report = bp.restore(dest, src)
    assert report.last_sequence == 3000 and report.previous is not None
    assert os.path.isdir(report.previous) and os.path.exists(os.path.join(report.previous, "store.meta"))
    assert not os.path.exists(os.path.join(src, MANIFEST_FILE))
    assert receipts_verify(src, receipts)
    other = os.path.join(tmp_path, "other")
    fill(other, 10)
    with pytest.raises(bp.BackupRefused, match="another store"):
        bp.restore(dest, other)
    forced = bp.restore(dest, other, force=True)
    assert forced.last_sequence == 3000
    assert_verified(other)
    assert_verified(src)
    assert_verified(dest)


def test_a_crash_between_the_two_renames_is_undone_by_the_next_run(tmp_path: os.PathLike[str]) -> None:
    """Where RENAME_EXCHANGE is missing the previous backup is moved aside, then the new
    one moved in: a crash in between leaves no DEST but ``.DEST.bpmp-old``, and a crash
    while staging leaves ``.DEST.bpmp-staging``. The next run puts the previous backup
    back, drops the staging and goes on."""
    src, dest = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "backup")
    fill(src, 3000)
    first = bp.backup(src, dest)
    os.rename(dest, os.path.join(tmp_path, ".backup.bpmp-old"))  # the state after the first rename
    os.makedirs(os.path.join(tmp_path, ".backup.bpmp-staging", "segments"))
    with open(os.path.join(tmp_path, ".backup.bpmp-staging", "segments", "000000000001.seg"), "wb") as f:
        f.write(b"half a copy")
    fill(src, 500, start=3000)
    second = bp.backup(src, dest)
    assert second.incremental and second.files_reused >= 1  # the previous backup was found again
    assert second.last_sequence == first.last_sequence + 500
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".backup")) == [".backup.bpmp-lock"]
    assert_verified(dest)
    assert_verified(src)


def test_compaction_in_the_source_reaches_the_next_backup_and_never_a_fork(tmp_path: os.PathLike[str]) -> None:
    """Compaction swaps a sealed segment for a rewritten copy (a new file, by rename): the
    next backup sees another seal and copies it again; a fork made before keeps its hard
    link to the old file, with the payload, untouched."""
    src, dest, fork_dir = (os.path.join(tmp_path, n) for n in ("data", "backup", "fork"))
    receipts = fill(src, 6000)
    bp.backup(src, dest)
    bp.fork(src, fork_dir)
    fork_files = fingerprint(fork_dir)
    with bp.Engine.open(src, SMALL) as e:
        e.redact(receipts[10].event_id, reason="test")
        assert e.compact().segments_rewritten == 1
    again = bp.backup(src, dest)
    assert again.files_copied >= 2 and again.files_reused >= 1  # the rewritten segment, the active one
    assert fingerprint(fork_dir) == fork_files
    with bp.Engine.open(dest, SMALL) as e:
        assert e.get(receipts[10].event_id).payload is None and e.verify_receipt(receipts[10])
    with bp.Engine.open(fork_dir, SMALL) as e:
        assert e.get(receipts[10].event_id).payload["i"] == 10
    assert_verified(dest)
    assert_verified(fork_dir)
    assert_verified(src)


def test_max_rate_paces_the_copy(tmp_path: os.PathLike[str]) -> None:
    src, dest = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "backup")
    fill(src, 3000)  # two segments, ~2 MiB to copy
    for bad in (0, -1.0, "fast", True):
        with pytest.raises(bp.InvalidArgument, match="max_rate"):
            bp.backup(src, dest, max_rate=bad)  # type: ignore[arg-type]
    assert not os.path.exists(dest)
    report = bp.backup(src, dest, max_rate=4 * 2**20)
    assert report.seconds >= report.bytes_copied / (4 * 2**20) * 0.9  # no faster than asked
    assert_verified(dest)
