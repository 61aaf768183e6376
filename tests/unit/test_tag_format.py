"""The tag index's pure codec (docs/FORMAT.md §6.4): which tags an entity and a region
name, the run header, the manifest (seqlock generation, CRC, no gaps) and the searches."""

from __future__ import annotations

import array

import pytest

import batpak_mp as bp
from batpak_mp._format.directory import name_hash
from batpak_mp._format.tags import (
    MANIFEST_GENERATION_AT,
    MANIFEST_HEADER_SIZE,
    MAX_PREFIX_DEPTH,
    category_range,
    decode_manifest,
    decode_run_header,
    encode_run_header,
    entity_prefixes,
    kind_tag,
    manifest_body,
    manifest_header,
    prefix_tag,
    prefix_tags,
    region_tag_options,
    scope_tag,
    seq_span,
    tag_spans,
)


def test_an_entity_is_filed_under_each_prefix_at_a_colon_boundary() -> None:
    assert entity_prefixes(b"a:b:c") == [b"a", b"a:b", b"a:b:c"]
    assert entity_prefixes(b"plain") == [b"plain"]
    assert entity_prefixes(b"a::b") == [b"a", b"a:", b"a::b"]
    assert prefix_tags(b"acct:7")[-1] == name_hash(b"acct:7")  # the whole name's tag is its entity hash
    deep = ":".join(f"p{i}" for i in range(12)).encode()
    assert len(entity_prefixes(deep)) == MAX_PREFIX_DEPTH
    # a prefix deeper than the cap looks under its first MAX_PREFIX_DEPTH components (a superset)
    assert prefix_tag(deep.decode()) == prefix_tags(deep)[-1]
    assert prefix_tag("a:b") in prefix_tags(b"a:b:c") and prefix_tag("a:b") not in prefix_tags(b"a:bc")


def test_tags_of_different_keys_live_apart() -> None:
    h = name_hash(b"x")
    assert len({prefix_tag("x"), scope_tag(h), kind_tag(0x1001)}) == 3
    assert scope_tag(h) != 0 and kind_tag(0) != 0
    # a category is the range of its kinds' tags, and holds no other category's kind
    first, last = category_range(2)
    assert first <= kind_tag(bp.Kind(2, 0).packed()) <= kind_tag(bp.Kind(2, 4095).packed()) <= last
    assert not first <= kind_tag(bp.Kind(1, 4095).packed()) <= last
    assert not first <= kind_tag(bp.Kind(3, 0).packed()) <= last


def test_region_options() -> None:
    assert region_tag_options(bp.Region()) is None
    assert region_tag_options(bp.Region(entity="a")) is None  # an exact entity walks its chain
    k1, k2 = bp.Kind(1, 1), bp.Kind(2, 5)
    opts = region_tag_options(bp.Region(entity_prefix="acct", scope="t", kinds=frozenset({k1, k2}), category=2))
    # the kinds option already leaves out kinds of another category (and stands for the category)
    one = (prefix_tag("acct"), prefix_tag("acct"))
    scope = (scope_tag(name_hash(b"t")), scope_tag(name_hash(b"t")))
    k2t = kind_tag(k2.packed())
    assert opts == [(one,), (scope,), ((k2t, k2t),)]
    both = region_tag_options(bp.Region(kinds=frozenset({k1, k2})))
    k1t = kind_tag(k1.packed())
    assert both == [((k1t, k1t), (k2t, k2t))]
    assert region_tag_options(bp.Region(category=3)) == [(category_range(3),)]
    # kind and kinds that do not meet: an option with no range (nothing can match)
    assert region_tag_options(bp.Region(kind=k1, kinds=frozenset({k2}))) == [()]


def test_run_header_round_trip_and_refusals() -> None:
    head = encode_run_header(7, 1, 10, 3)
    assert decode_run_header(head, 64 + 48, "r") == (7, 1, 10, 3)
    with pytest.raises(bp.CorruptSegment, match="does not match its size"):
        decode_run_header(head, 64 + 47, "r")
    with pytest.raises(bp.CorruptSegment, match="bad magic"):
        decode_run_header(b"X" * 64, 64, "r")
    with pytest.raises(bp.CorruptSegment, match="shorter"):
        decode_run_header(head[:10], 10, "r")


def _manifest(key: int, gen: int, runs: list[tuple[int, int]]) -> bytearray:
    return bytearray(manifest_header(key, gen, runs) + manifest_body(runs))


def test_manifest_round_trip_and_what_a_reader_refuses() -> None:
    runs = [(1, 100), (101, 150), (151, 151)]
    buf = _manifest(9, 4, runs)
    assert decode_manifest(buf, "m") == (9, 4, runs)
    odd = bytearray(buf)
    odd[MANIFEST_GENERATION_AT] = 5  # an update under way
    with pytest.raises(bp.CorruptSegment, match="being written or torn"):
        decode_manifest(odd, "m")
    torn = bytearray(buf)
    torn[MANIFEST_HEADER_SIZE] ^= 1  # a run changed after the CRC: torn
    with pytest.raises(bp.CorruptSegment, match="being written or torn"):
        decode_manifest(torn, "m")
    with pytest.raises(bp.CorruptSegment, match="gap or overlap at sequence 101"):
        decode_manifest(_manifest(9, 2, [(1, 100), (102, 150)]), "m")
    with pytest.raises(bp.CorruptSegment, match="gap or overlap at sequence 1"):
        decode_manifest(_manifest(9, 2, [(2, 100)]), "m")
    with pytest.raises(bp.CorruptSegment, match="shorter"):
        decode_manifest(buf[:20], "m")


def test_spans() -> None:
    tags = array.array("Q", [1, 1, 1, 5, 5, 9])
    seqs = array.array("Q", [3, 8, 20, 4, 7, 1])
    assert tag_spans(tags, 1, 1) == [(0, 3)] and tag_spans(tags, 5, 5) == [(3, 5)] and tag_spans(tags, 6, 6) == []
    assert tag_spans(tags, 2, 9) == [(3, 5), (5, 6)] and tag_spans(tags, 0, 100) == [(0, 3), (3, 5), (5, 6)]
    assert seq_span(seqs, 0, 3, 3, 19) == (1, 2)  # 3 < seq <= 19: only 8
    assert seq_span(seqs, 0, 3, 0, 100) == (0, 3)
    assert seq_span(seqs, 3, 5, 7, 100) == (5, 5)


def test_the_column_form_of_scope_and_kind_tags_is_the_scalar_form() -> None:
    import numpy as np

    from batpak_mp._format.tags import scope_and_kind_tags

    hashes = [name_hash(f"t:{i}".encode()) for i in range(50)] + [0x9E3779B97F4A7C15]  # the last one XORs to 0
    kinds = [bp.Kind(c, t).packed() for c in (1, 2, 14) for t in (0, 7, 4095)]
    scopes, kind_tags = scope_and_kind_tags(np.array(hashes, dtype=np.uint64), np.array(kinds, dtype=np.uint16))
    assert scopes.tolist() == [scope_tag(h) for h in hashes]
    assert kind_tags.tolist() == [kind_tag(k) for k in kinds]
