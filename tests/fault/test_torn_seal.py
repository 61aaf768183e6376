"""A seal torn by a power cut is finished at recovery, never reported as corruption
(issue 10, item 9).

Sealing writes the footer, fsyncs, then writes the trailer and fsyncs again (FORMAT.md
§3.6). Until the second fsync returns, a power cut can leave any of these on disk, and
each is simulated here by writing that file state with real files and opening:

- the trailer without its footer (what the old order, one fsync for both, could leave:
  the page of the trailer on disk, the footer's not);
- the trailer with half its footer;
- the footer with half its trailer, or with no trailer at all (the new order's states).

Every frame is intact in each, so the open must succeed with every event and the store
must go on: a segment with a trailer is sealed again, byte for byte as it was (whether
or not segments follow it); the newest segment without a valid trailer is active again,
its footer cut as a torn tail. What a power cut cannot leave stays corruption: a missing
or damaged trailer on a segment before the newest, a footer sector that is neither what
the seal wrote nor zeros, a damaged frame below the footer. A trailer whose footer
does not verify while a frame below it is damaged stays corruption. Both recovery paths
run (the same-boot fast path declines and hands over to the full recovery). Every test
ends with ``bp.verify``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable

import pytest
from _engine_helpers import all_events, flip_bit, read_layout, segment_ids, segment_path, zero_range
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.segment import FOOTER_HEAD, SEG_TRAILER_SIZE
from batpak_mp._storage.osio import Disk, FaultPlan
from batpak_mp._storage.segments import SECTOR

K = bp.Kind(1, 7)
Tear = Callable[[str], None]  # writes one torn state into a sealed segment file


def coord(entity: str) -> bp.Coordinate:
    return bp.Coordinate(entity, "room:1")


def digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).digest()


def _footer(path: str) -> tuple[int, int]:
    trailer = read_layout(path).trailer
    assert trailer is not None
    return trailer.footer_offset, trailer.footer_len


def trailer_without_footer(path: str) -> None:
    start, length = _footer(path)
    zero_range(path, start, start + length)


def _sector_after(offset: int) -> int:
    """A power cut tears writes at sector boundaries: the first one at or after ``offset``."""
    return -(-offset // SECTOR) * SECTOR


def footer_half_written(path: str) -> None:
    start, length = _footer(path)
    zero_range(path, _sector_after(start + length // 2), start + length)


def footer_head_only(path: str) -> None:
    """Only the footer's first sector landed: its head, not all of its records."""
    start, length = _footer(path)
    zero_range(path, _sector_after(start + FOOTER_HEAD.size), start + length)


def trailer_half_written(path: str) -> None:
    size = os.path.getsize(path)
    zero_range(path, size - SEG_TRAILER_SIZE // 2, size)


def footer_without_trailer(path: str) -> None:
    size = os.path.getsize(path)
    zero_range(path, size - SEG_TRAILER_SIZE, size)


TEARS: list[Tear] = [trailer_without_footer, footer_half_written, footer_head_only, trailer_half_written,
                     footer_without_trailer]
NOT_SEALED = (trailer_half_written, footer_without_trailer)  # no valid trailer: not sealed at all
OPENERS: dict[str, Callable[[], Disk]] = {"same-boot": Disk,
                                          "after-reboot": lambda: Disk(FaultPlan(boot_id=b"\x07" * 16))}


def _fill(e: bp.Engine, acked: list[bp.Receipt], room: int) -> None:
    """Append until fewer than ``room`` bytes are left in segment 1."""
    assert e._seg is not None
    i = 0
    while e._seg.size - e._seg.end > room:
        acked.append(e.append(coord(f"e{i % 3}"), K, {"i": i, "pad": "x" * 20_000},
                              idempotency_key=f"k{len(acked)}"))
        i += 1
    assert e._seg.segment_id == 1


def build_sealed_newest(path: str) -> list[bp.Receipt]:
    """Segment 1 sealed and the newest file: a rotation sealed it, then could not create
    segment 2 (as a power cut between the seal and the next segment leaves it)."""
    plan = FaultPlan()
    acked: list[bp.Receipt] = []
    e = bp.Engine.open(path, SMALL, disk=Disk(plan))
    try:
        _fill(e, acked, 60_000)
        plan.fail["fallocate"] = (0, errno.ENOSPC)
        with pytest.raises(bp.StorageError):
            e.append(coord("e1"), K, "y" * 100_000)  # needs the next segment
    finally:
        e.close()
    assert segment_ids(path) == [1] and read_layout(segment_path(path, 1)).trailer is not None
    return acked


def build_sealed_then_active(path: str) -> list[bp.Receipt]:
    """Segment 1 sealed, segment 2 active with events of its own."""
    acked: list[bp.Receipt] = []
    with bp.Engine.open(path, SMALL) as e:
        _fill(e, acked, 60_000)
        acked.append(e.append(coord("e1"), K, "y" * 100_000))  # rotates
        acked += e.append_batch([bp.BatchItem(coord("e0"), K, n) for n in range(3)])
    assert segment_ids(path) == [1, 2]
    return acked


def reopen_and_check(path: str, acked: list[bp.Receipt], disk: Disk) -> None:
    with bp.Engine.open(path, SMALL, disk=disk) as e:
        events = all_events(e)
        assert [ev.event_id for ev in events] == [r.event_id for r in acked]
        for r in acked:
            assert e.verify_receipt(r)
        assert e.append(coord("e0"), K, "after", idempotency_key=acked[0].event_id.hex()).global_sequence
        with pytest.raises(bp.IdempotencyConflict) as dup:  # keys of the resealed segment hold (another request)
            e.append(coord("e2"), K, "dup", idempotency_key="k0")
        assert dup.value.sequence == acked[0].global_sequence


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[bp.Receipt]]]:
    base = tmp_path_factory.mktemp("torn-seal")
    out = {}
    for name, build in (("newest", build_sealed_newest), ("followed", build_sealed_then_active)):
        path = os.path.join(base, name)
        out[name] = (path, build(path))
        assert_verified(path)
    return out


CASES = [(tear, shape) for tear in TEARS for shape in ("newest", "followed")
         if not (tear in NOT_SEALED and shape == "followed")]


@pytest.mark.parametrize("opener", sorted(OPENERS))
@pytest.mark.parametrize(("tear", "shape"), CASES, ids=[f"{t.__name__}-{s}" for t, s in CASES])
def test_a_torn_seal_is_finished_not_reported(originals: dict[str, tuple[str, list[bp.Receipt]]], tmp_path: str,
                                              tear: Tear, shape: str, opener: str) -> None:
    src, acked = originals[shape]
    path = os.path.join(tmp_path, "data")
    shutil.copytree(src, path)
    seg1 = segment_path(path, 1)
    sealed_digest = digest(seg1)
    tear(seg1)
    assert digest(seg1) != sealed_digest
    reopen_and_check(path, acked, OPENERS[opener]())
    if tear in NOT_SEALED:
        # the newest without a valid trailer: the footer was a torn tail of the active
        # segment, cut; the segment took the appends of reopen_and_check
        layout = read_layout(seg1)
        assert layout.trailer is None and segment_ids(path) == [1]
        assert len(layout.frames) == len(acked) + 1
    else:
        assert read_layout(seg1).trailer is not None
        assert digest(seg1) == sealed_digest  # sealed again exactly as the first seal left it
    assert_verified(path)


@pytest.mark.parametrize("tear", NOT_SEALED, ids=lambda t: t.__name__)
def test_a_lost_trailer_before_the_newest_segment_is_corruption(
        originals: dict[str, tuple[str, list[bp.Receipt]]], tmp_path: str, tear: Tear) -> None:
    """A power cut cannot leave a segment without its trailer when a later one exists
    (the next segment is created only after the trailer's fsync): that is damage to a
    sealed segment, reported, and the evidence is left as it is."""
    src, _ = originals["followed"]
    path = os.path.join(tmp_path, "data")
    shutil.copytree(src, path)
    seg1 = segment_path(path, 1)
    tear(seg1)
    before = digest(seg1)
    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(path, SMALL, disk=OPENERS["after-reboot"]())
    assert digest(seg1) == before
    assert not bp.verify(path).ok


@pytest.mark.parametrize("shape", ["newest", "followed"])
def test_a_torn_seal_with_a_flipped_bit_in_its_footer_is_corruption(
        originals: dict[str, tuple[str, list[bp.Receipt]]], tmp_path: str, shape: str) -> None:
    """Half the footer landed and a bit of that half flipped: a sector that is neither
    what the seal wrote nor zeros is damage, not a torn write."""
    src, _ = originals[shape]
    path = os.path.join(tmp_path, "data")
    shutil.copytree(src, path)
    seg1 = segment_path(path, 1)
    start, _ = _footer(seg1)
    footer_half_written(seg1)
    flip_bit(seg1, start + 70, 3)  # in the first record, in the half that landed
    before = digest(seg1)
    for opener in OPENERS.values():
        with pytest.raises(bp.CorruptSegment):
            bp.Engine.open(path, SMALL, disk=opener())
    assert digest(seg1) == before
    assert not bp.verify(path).ok


def test_a_torn_seal_over_a_damaged_frame_is_corruption(originals: dict[str, tuple[str, list[bp.Receipt]]],
                                                        tmp_path: str) -> None:
    """The footer is gone AND a frame below it is damaged: that is not a torn seal."""
    src, _ = originals["followed"]
    path = os.path.join(tmp_path, "data")
    shutil.copytree(src, path)
    seg1 = segment_path(path, 1)
    frames = read_layout(seg1).frames
    trailer_without_footer(seg1)
    flip_bit(seg1, frames[len(frames) // 2].offset + 60)
    before = digest(seg1)
    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(path, SMALL, disk=OPENERS["after-reboot"]())
    assert digest(seg1) == before  # the evidence is left as it was
    assert not bp.verify(path).ok


def test_seal_writes_the_footer_before_the_trailer(data_dir: str) -> None:
    """The order itself: the footer's bytes are fsynced before the trailer is written."""
    seen: list[str] = []

    class Recording(Disk):
        def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int, path: str) -> None:
            if path.endswith(".seg") and bytes(data[:8]) in (b"BPMPSIDX", b"BPMPSEAL"):
                seen.append(bytes(data[:8]).decode())
            super().pwrite(fd, data, offset, path)

        def fdatasync(self, fd: int, path: str) -> None:
            if path.endswith(".seg") and seen and seen[-1] != "sync":
                seen.append("sync")
            super().fdatasync(fd, path)

    acked: list[bp.Receipt] = []
    with bp.Engine.open(data_dir, SMALL, disk=Recording()) as e:
        _fill(e, acked, 60_000)
        acked.append(e.append(coord("e1"), K, "y" * 100_000))  # rotates
    assert seen[:4] == ["BPMPSIDX", "sync", "BPMPSEAL", "sync"], seen
    assert_verified(data_dir)
