"""The writer's entity hash -> prefix tags table (``_storage/tagindex._PrefixRows``): a
chunk's rows are each event's prefix tags, padded with 0, whether the entity is in the
sorted table, met in an earlier chunk, new, or deeper than any before (the row widens)."""

from __future__ import annotations

import random

import numpy as np

from batpak_mp._format.directory import name_hash
from batpak_mp._format.tags import prefix_tags
from batpak_mp._storage.tagindex import _PrefixRows


def test_rows_are_each_events_prefix_tags_through_merges_and_widening() -> None:
    rng = random.Random(7)
    names = [f"acct:{i}".encode() for i in range(3000)] + [b"a:b:c:d:e", b"x", b"x:y:z"]
    by_hash = {name_hash(n): n for n in names}
    asked: list[int] = []

    def name_of(h: int, seq: int) -> bytes:
        asked.append(h)
        return by_hash[h]

    rows = _PrefixRows()
    first = 1
    for chunk in range(40):
        pool = names[:3000] if chunk < 20 else names  # deeper entities arrive late: the rows widen
        picked = [rng.choice(pool) for _ in range(rng.choice([1, 50, 1024]))]
        got = rows.rows(np.array([name_hash(n) for n in picked], dtype=np.uint64), first, name_of)
        for row, name in zip(got.tolist(), picked, strict=True):
            want = list(prefix_tags(name))
            assert row[:len(want)] == want and not any(row[len(want):])
        first += len(picked)
    assert len(asked) == len(set(asked))  # each entity's name was read once
    assert len(rows.hashes) > 0  # recurring entities were merged into the sorted table
