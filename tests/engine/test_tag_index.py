"""The tag index at engine level (docs/FORMAT.md §6.4): every indexed answer is the answer
of a full scan; runs are kept by a same-boot open and rebuilt after another boot, damage,
a foreign manifest or a log cut below them; a failed build never refuses a commit."""

from __future__ import annotations

import errno
import os
import random
import time

import pytest
from conftest import SMALL, assert_verified, expected_page

import batpak_mp as bp
from batpak_mp._format.tags import TAGS_MANIFEST, run_name
from batpak_mp._read.offline import OfflineStore
from batpak_mp._storage.osio import Disk, FaultPlan
from batpak_mp._storage.tagindex import TAG_CHUNK

KINDS = [bp.Kind(1, 1), bp.Kind(1, 2), bp.Kind(2, 5), bp.Kind(3, 7)]
OTHER_BOOT = bytes.fromhex("cd" * 16)


def _entity(rng: random.Random) -> str:
    return rng.choice(["acct", "acct:hot", "order", "orderx", "a:b", "a:b:c", "a:bc"]) + (
        f":{rng.randrange(40)}" if rng.random() < 0.7 else "")


def _fill(e: bp.Engine, n: int, seed: int) -> None:
    rng = random.Random(seed)
    done = 0
    while done < n:
        size = rng.choice([1, 3, 50, 700])
        e.append_batch([bp.BatchItem(bp.Coordinate(_entity(rng), f"t:{rng.randrange(5)}"), rng.choice(KINDS), done + i)
                        for i in range(min(size, n - done))])
        done += size


REGIONS = [
    bp.Region(entity_prefix="acct"), bp.Region(entity_prefix="acct:hot"), bp.Region(entity_prefix="a:b"),
    bp.Region(entity_prefix="order"), bp.Region(entity_prefix="nothing"), bp.Region(scope="t:3"),
    bp.Region(kind=bp.Kind(2, 5)), bp.Region(kinds=frozenset({bp.Kind(1, 2), bp.Kind(3, 7)})), bp.Region(category=1),
    bp.Region(entity_prefix="a", kind=bp.Kind(1, 1), scope="t:1"), bp.Region(kind=bp.Kind(1, 1), kinds=frozenset({bp.Kind(2, 5)})),
    bp.Region(entity_prefix="acct", upto=2500), bp.Region(category=3, clock=(2, 5)),
]


def _answers(e: bp.Engine, regions: list[bp.Region], afters: list[int]) -> list[tuple[list[int], int]]:
    out = []
    for reg in regions:
        for after in afters:
            for limit in (1, 7, 100_000):
                page = e.query_after(after, limit=limit, region=reg)
                out.append(([ev.global_sequence for ev in page.events], page.next_after))
    return out


def _scanned(e: bp.Engine, regions: list[bp.Region], afters: list[int]) -> list[tuple[list[int], int]]:
    """The answers of ``_answers`` worked out from every event (a plain query, no index)."""
    events = e.query_after(0, limit=1 << 30).events
    return [expected_page(events, reg, after, limit, e.visible)
            for reg in regions for after in afters for limit in (1, 7, 100_000)]


def test_indexed_answers_are_the_answers_of_a_scan(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 6000, seed=1)
        tags = e._index.tags
        assert tags.failed is None and tags.runs and e.visible - tags.through < TAG_CHUNK
        assert e.visible > tags.through  # a tail above the runs: scanned, and part of every answer
        afters = [0, 1, 777, tags.runs[0][1], tags.through - 1, tags.through, e.visible - 3, e.visible]
        assert _answers(e, REGIONS, afters) == _scanned(e, REGIONS, afters)
        # and the index is what answered: a rare prefix looks at its postings, not the log
        assert e.reader.tags is not None
        rare = e.reader.tags.candidates(bp.Region(entity_prefix="a:b:c"), 0, e.visible)
        assert rare is not None and len(list(rare)) < e.visible // 5
    assert_verified(data_dir)


def test_runs_kept_by_a_same_boot_open_rebuilt_otherwise(data_dir: str) -> None:
    afters = [0, 1000, 4000]
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 5000, seed=2)
        want = _answers(e, REGIONS, afters)
    idx = os.path.join(data_dir, "index")
    with bp.Engine.open(data_dir, SMALL) as e:  # closed cleanly: every event filed, nothing to build
        tags = e._index.tags
        assert tags.rebuilt == 0 and tags.through == e.visible and _answers(e, REGIONS, afters) == want
        runs = list(tags.runs)
    with bp.Engine.open(data_dir, SMALL, disk=Disk(FaultPlan(boot_id=OTHER_BOOT))) as e:  # another boot
        assert e._index.tags.rebuilt == e.visible and _answers(e, REGIONS, afters) == want
        runs = list(e._index.tags.runs)
    # a damaged run: it and every later one are rebuilt; a stray run file goes
    lo, hi, _ = runs[-2] if len(runs) > 1 else runs[0]
    with open(os.path.join(idx, run_name(lo, hi)), "r+b") as f:
        f.truncate(100)
    stray = os.path.join(idx, run_name(90_000, 90_001))
    open(stray, "wb").close()
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e._index.tags.rebuilt == e.visible - lo + 1 and _answers(e, REGIONS, afters) == want
    assert not os.path.exists(stray)
    # another store's manifest: everything rebuilt
    other = data_dir + "-other"
    with bp.Engine.open(other, SMALL) as o:
        o.append(bp.Coordinate("x", "y"), KINDS[0], 1)
    os.replace(os.path.join(other, "index", TAGS_MANIFEST), os.path.join(idx, TAGS_MANIFEST))
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e._index.tags.rebuilt == e.visible and _answers(e, REGIONS, afters) == want
    assert_verified(data_dir)


def test_runs_past_the_recovered_log_are_dropped(data_dir: str) -> None:
    """A run may file events a crash took back (built before their fsync): an open that
    recovers fewer events drops it and every later run (the sequences will be reused)."""
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 4000, seed=3)
        tags = e._index.tags
        assert len(tags.runs) >= 2
        cut = tags.runs[-1][0] + 5  # inside the last run
        kept_through = tags.runs[-2][1]
        gone = run_name(*tags.runs[-1][:2])
        tags.open(e._index.records_map, cut, trusted=True, entity_of=e._entity_of)  # as a recovery to ``cut`` would
        assert tags.through == cut and tags.rebuilt == cut - kept_through
        assert not os.path.exists(os.path.join(data_dir, "index", gone))
        assert all(hi <= cut for _, hi, _ in tags.runs)
        # the events above the cut are filed again by the next chunk, and answers match a scan
        e.append_batch([bp.BatchItem(bp.Coordinate("late:1", "t:0"), KINDS[2], i) for i in range(TAG_CHUNK)])
        assert tags.through == e.visible
        assert _answers(e, REGIONS, [0, cut - 1]) == _scanned(e, REGIONS, [0, cut - 1])
    assert_verified(data_dir)


def test_a_failed_build_never_refuses_a_commit(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 300, seed=4)
    plan = FaultPlan()
    with bp.Engine.open(data_dir, SMALL, disk=Disk(plan)) as e:
        plan.fail["write"] = (0, errno.ENOSPC)  # the next whole-file write: the next run
        tags = e._index.tags
        before = tags.through
        receipts = e.append_batch([bp.BatchItem(bp.Coordinate(f"acct:{i % 9}", "t:1"), KINDS[i % 4], i)
                                   for i in range(TAG_CHUNK + 10)])
        assert len(receipts) == TAG_CHUNK + 10 and receipts[-1].global_sequence == e.visible
        assert tags.through == before and tags.failed is not None and "DiskFull" in tags.failed
        assert not [n for n in os.listdir(os.path.join(data_dir, "index")) if n.endswith(".run") and "000000000301" in n]
        assert _answers(e, REGIONS, [0, 250]) == _scanned(e, REGIONS, [0, 250])  # the tail is scanned
        # tried again a chunk later, and then every event is filed
        e.append_batch([bp.BatchItem(bp.Coordinate("order:1", "t:2"), KINDS[1], i) for i in range(TAG_CHUNK)])
        assert tags.failed is None and tags.through == e.visible
        assert _answers(e, REGIONS, [0, 250]) == _scanned(e, REGIONS, [0, 250])
    assert_verified(data_dir)


def test_the_merger_keeps_few_runs_off_the_commit_path(data_dir: str) -> None:
    """Level-0 runs are built in the commit path; merging them (8 of a tier into one) is
    the merger thread's: it keeps O(log n) runs, and answers stay a scan's meanwhile."""
    from batpak_mp._storage.tagindex import MERGE_FANOUT, _merge_due

    with bp.Engine.open(data_dir, SMALL) as e:
        for _ in range(24):
            e.append_batch([bp.BatchItem(bp.Coordinate(f"acct:{j % 50}", f"t:{j % 3}"), KINDS[j % 4], j)
                            for j in range(TAG_CHUNK)])
            assert _answers(e, REGIONS[:3], [0]) == _scanned(e, REGIONS[:3], [0])
        tags = e._index.tags
        deadline = time.monotonic() + 20
        while _merge_due(tags.runs) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tags.merge_failed is None and _merge_due(tags.runs) is None
        assert tags.through == e.visible and len(tags.runs) < 2 * MERGE_FANOUT  # 24 chunks, merged in tiers
        assert tags._merger is not None and tags._merger.is_alive()
        assert _answers(e, REGIONS, [0, 5000]) == _scanned(e, REGIONS, [0, 5000])
    assert tags._merger is None  # joined at close
    assert_verified(data_dir)


def test_without_the_index_the_records_are_filtered_in_chunks(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no run reaches (no manifest, the offline reader, the tail), the records are
    filtered column-wise a chunk at a time: the same answers."""
    from batpak_mp._read import queries

    monkeypatch.setattr(queries, "TAIL_CHUNK", 700)  # several chunks, and chunk edges inside pages
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 5000, seed=5)
        afters = [0, 699, 700, 2345, e.visible - 300]
        want = _scanned(e, REGIONS, afters)
        e.reader.tags = None  # as with no manifest
        assert _answers(e, REGIONS, afters) == want
    with OfflineStore.open(data_dir) as off:  # the offline reader never uses the tag index
        events = off.query_after(0, limit=1 << 30).events
        visible = events[-1].global_sequence
        for reg in REGIONS:
            for after in afters:
                page = off.query_after(after, limit=7, region=reg)
                assert ([ev.global_sequence for ev in page.events], page.next_after) == \
                    expected_page(events, reg, after, 7, visible)
    assert_verified(data_dir)


def test_a_reader_keeps_working_runs_when_the_manifest_names_what_it_cannot_map(data_dir: str) -> None:
    """A reader trusts nothing it cannot map whole: a manifest naming a missing run, one
    torn by a writer in the middle of an update, or no manifest at all leave it with the
    runs it had (immutable, still mapped) or none — answers stay the oracle's."""
    from batpak_mp._format.tags import MANIFEST_GENERATION_AT

    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 4000, seed=6)
        afters = [0, 1500]
        want = _scanned(e, REGIONS, afters)
        reader, tags = e.reader, e._index.tags
        assert reader.tags is not None
        assert _answers(e, REGIONS, afters) == want and reader.tags.runs  # mapped
        had = [(r.lo, r.hi) for r in reader.tags.runs]
        with tags._lock:  # a generation naming a run whose file is not there
            tags._publish([*tags.runs, (tags.through + 1, tags.through + 10, 5)])
        assert _answers(e, REGIONS, afters) == want
        assert [(r.lo, r.hi) for r in reader.tags.runs] == had  # kept what it had
        with tags._lock:
            tags._publish(tags.runs[:-1])
        manifest = os.path.join(data_dir, "index", TAGS_MANIFEST)
        with open(manifest, "r+b") as f:  # a writer stopped between its odd and even store
            f.seek(MANIFEST_GENERATION_AT)
            f.write((tags.generation + 1).to_bytes(8, "little"))
        assert _answers(e, REGIONS, afters) == want
        os.unlink(manifest)  # no manifest: the records are filtered instead
        reader.tags.close()
        assert _answers(e, REGIONS, afters) == want and reader.tags.runs == []
        tags.close()  # the writer's side let go of a manifest it no longer has
    assert_verified(data_dir)


def test_a_store_can_keep_no_tag_index(data_dir: str) -> None:
    """``EngineConfig(tag_index=False)`` (``serve --no-tag-index``): no manifest, no run;
    prefix, scope and kind queries filter the records and answer the same. Switched back
    on, the next open files the whole log."""
    import dataclasses

    off = dataclasses.replace(SMALL, tag_index=False)
    idx = os.path.join(data_dir, "index")
    with bp.Engine.open(data_dir, SMALL) as e:
        _fill(e, 3000, seed=8)
        want = _scanned(e, REGIONS, [0, 1200])
    assert os.path.exists(os.path.join(idx, TAGS_MANIFEST))
    with bp.Engine.open(data_dir, off) as e:
        assert not [n for n in os.listdir(idx) if n.startswith("tags")]  # removed
        assert _answers(e, REGIONS, [0, 1200]) == want
        _fill(e, 2000, seed=9)
        assert not [n for n in os.listdir(idx) if n.startswith("tags")]  # and none made
        assert _answers(e, REGIONS, [0, 4000]) == _scanned(e, REGIONS, [0, 4000])
    with bp.Engine.open(data_dir, SMALL) as e:
        assert e._index.tags.through == e.visible and e._index.tags.rebuilt == e.visible
        assert _answers(e, REGIONS, [0, 4000]) == _scanned(e, REGIONS, [0, 4000])
    with pytest.raises(bp.InvalidArgument, match="tag_index"):
        bp.EngineConfig(tag_index=1)  # type: ignore[arg-type]
    assert_verified(data_dir)
