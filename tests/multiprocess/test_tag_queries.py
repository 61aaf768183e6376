"""Prefix, scope, kind and category queries from client processes on a served store
(docs/FORMAT.md §6.4): the writer files events in tag runs while clients append (merges
included), a fence's events stay hidden until it commits, a SIGKILLed writer's successor
keeps the runs (same boot) — and at every step an indexed answer is a full scan's."""

from __future__ import annotations

import multiprocessing
import os
import time

from conftest import assert_verified, expected_page, kill_writer_and_wait

import batpak_mp as bp
from batpak_mp._service import writer_args

K1, K2 = bp.Kind(1, 1), bp.Kind(2, 5)
REGIONS = [bp.Region(entity_prefix="order"), bp.Region(entity_prefix="order:3"), bp.Region(scope="t:1"),
           bp.Region(kind=K2), bp.Region(category=1), bp.Region(kinds=frozenset({K1, K2}), entity_prefix="acct")]


def _writer(data_dir: str, worker: int, n: int) -> None:
    with bp.connect(data_dir) as s:
        for start in range(0, n, 100):
            s.append_batch([bp.BatchItem(bp.Coordinate(f"order:{i % 5}" if i % 4 == 0 else f"acct:{worker}:{i % 11}",
                                                       f"t:{i % 3}"), K2 if i % 4 == 0 else K1, i)
                            for i in range(start, start + 100)])


def _answers(store: bp.Store, afters: list[int], upto: int) -> list[tuple[list[int], int]]:
    out = []
    for reg in REGIONS:
        for after in afters:
            page = store.query_after(after, limit=25, region=reg.with_upto(upto))
            out.append(([e.global_sequence for e in page.events], page.next_after))
    return out


def _both(store: bp.Store, afters: list[int]) -> tuple[list[tuple[list[int], int]], list[tuple[list[int], int]]]:
    """(the answers, what they must be: worked out from every event by ``Region.matches``)."""
    upto = store.frontier().visible  # both at one frontier: writers may be appending
    got = _answers(store, afters, upto)
    events = store.query_after(0, limit=1 << 30, upto=upto).events
    return got, [expected_page(events, reg, after, 25, upto) for reg in REGIONS for after in afters]


def test_indexed_queries_from_clients(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(data_dir, w, 1500)) for w in range(3)]
    for p in procs:
        p.start()
    with bp.connect(data_dir) as s:
        while any(p.is_alive() for p in procs):  # answers while runs are built and merged
            got, want = _both(s, [0, max(s.frontier().visible - 700, 0)])
            assert got == want
            time.sleep(0.05)
        for p in procs:
            p.join()
            assert p.exitcode == 0
        f = s.fence()
        hidden = f.append(bp.Coordinate("order:9", "t:1"), K2, "fenced")
        s.append_batch([bp.BatchItem(bp.Coordinate("order:8", "t:1"), K2, i) for i in range(600)])
        page = s.query_after(0, limit=10_000, region=bp.Region(entity_prefix="order:9"))
        assert page.events == []  # filed, but not shown before its fence commits
        f.commit()
        page = s.query_after(0, limit=10_000, region=bp.Region(entity_prefix="order:9"))
        assert [e.global_sequence for e in page.events] == [hidden.global_sequence]
        visible = s.frontier().visible
        reader = s._reader
        assert reader.tags is not None and reader.tags.through >= visible - 1024 and reader.tags.through > 3000
        got, want = _both(s, [0, 1000, visible - 50])
        assert got == want
        # a new writer (same boot) keeps the runs; answers stay those of a scan
        kill_writer_and_wait(svc, s)
        s.append(bp.Coordinate("order:3", "t:1"), K2, "after restart")
        got, want = _both(s, [0, 1000, visible - 50])
        assert got == want and got[1][0]  # the order prefix still answers after sequence 1000
        assert reader.tags.through >= visible - 1024


def test_a_service_without_a_tag_index(data_dir: str) -> None:
    """``bp.serve(..., tag_index=False)`` (the CLI's ``--no-tag-index``): the writer keeps
    no manifest or run; clients' prefix, scope and kind queries answer the same."""
    with bp.serve(data_dir, segment_max_bytes=1 << 20, tag_index=False), bp.connect(data_dir) as s:
        _writer(data_dir, 0, 3000)
        got, want = _both(s, [0, 1000])
        assert got == want and any(seqs for seqs, _ in got)
        assert not [n for n in os.listdir(os.path.join(data_dir, "index")) if n.startswith("tags")]
    assert "--no-tag-index" in writer_args("group", {"tag_index": False}, data_dir)
    assert "--no-tag-index" not in writer_args("group", {"tag_index": True}, data_dir)
    assert_verified(data_dir)
