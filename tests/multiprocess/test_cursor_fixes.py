"""Cursor defects of issue 14 #4, on a served store: an event revealed by a visibility
fence is acknowledged where it was delivered (at its FENCE_COMMIT), so it is not
delivered again after the ack (reactors ride the same cursor); a changed filter on an
existing cursor name is a typed error, or a documented reset."""

from __future__ import annotations

import pytest

import batpak_mp as bp

K = bp.Kind(1, 1)
S = "orders"


def _drain(cur: bp.Cursor, timeout: float = 0.3) -> list[bp.Event]:
    out = []
    while (ev := cur.next(timeout)) is not None:
        out.append(ev)
    return out


def test_a_fenced_event_is_not_delivered_again_after_its_ack(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        s.append(bp.Coordinate("o-1", S), K, "before")
        f = s.fence()
        f.append(bp.Coordinate("o-2", S), K, "fenced-1")
        f.append(bp.Coordinate("o-3", S), K, "fenced-2")
        s.append(bp.Coordinate("o-4", S), K, "after")
        f.commit()
        with s.cursor("mailer", scope=S) as cur:
            got = _drain(cur)
            assert [e.payload for e in got] == ["before", "after", "fenced-1", "fenced-2"]
            cur.ack(got[-1])  # the newest delivered: acknowledges everything
        with s.cursor("mailer", scope=S) as again:
            assert _drain(again) == []  # was: fenced-1, fenced-2 (and "after") delivered again, forever
            s.append(bp.Coordinate("o-5", S), K, "new")
            assert [e.payload for e in _drain(again)] == ["new"]


def test_an_ack_inside_a_fence_commit_does_not_cover_the_rest_of_it(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        with s.fence() as f:
            f.append(bp.Coordinate("o-1", S), K, "fenced-1")
            f.append(bp.Coordinate("o-2", S), K, "fenced-2")
        with s.cursor("partial", scope=S) as cur:
            first = cur.next(1.0)
            assert first is not None and first.payload == "fenced-1"
            cur.ack(first)
        with s.cursor("partial", scope=S) as again:
            # at least once: the commit's events come again, none is lost
            assert [e.payload for e in _drain(again)] == ["fenced-1", "fenced-2"]


def test_a_reactor_does_not_handle_a_fenced_event_twice(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    seen: list[object] = []
    with bp.connect(data_dir) as s:
        with s.fence() as f:
            f.append(bp.Coordinate("o-1", S), K, "fenced")
        s.append(bp.Coordinate("o-2", S), K, "plain")
        s.react("r", lambda ev: seen.append(ev.payload), scope=S).run(timeout=0.3)
        s.react("r", lambda ev: seen.append(ev.payload), scope=S).run(timeout=0.3)
    assert seen == ["fenced", "plain"]  # the commit came before "plain": once each


def test_a_changed_filter_is_a_typed_error_or_a_reset(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        r = s.append(bp.Coordinate("o-1", S), K, 1)
        s.append(bp.Coordinate("o-1", "other"), K, 2)
        with s.cursor("c", scope=S) as cur:
            ev = cur.next(1.0)
            assert ev is not None
            cur.ack(ev)
        try:
            s.cursor("c", scope="other")
            raise AssertionError("a changed filter must not reuse the position")
        except bp.CursorFilterChanged as exc:
            assert (exc.cursor, exc.stored, exc.given) == ("c", "s='orders'", "s='other'")
            assert isinstance(exc, ValueError)
        with s.cursor("c", scope="other", reset=True) as cur:  # documented: starts over at start_after
            got = _drain(cur)
            assert [e.payload for e in got] == [2]
            cur.ack(got[-1])
        with s.cursor("c", scope="other") as cur:  # the new filter is the cursor's now, with its position
            assert cur.position == got[-1].global_sequence > r.global_sequence
            assert _drain(cur) == []


def test_subscribe_and_cursors_take_a_region(service: tuple[bp.Service, str]) -> None:
    """The one filter object of every read: an entity prefix and a set of kinds here."""
    _, data_dir = service
    other = bp.Kind(2, 2)
    region = bp.Region(entity_prefix="order:1", kinds=frozenset({K, other}))
    with bp.connect(data_dir) as s:
        sub = s.subscribe(0, region=region, timeout=0.3)
        for entity, kind, payload in (("order:1", K, "a"), ("order:12", K, "no: not under order:1"),
                                      ("order:1:line", other, "b"), ("order:1", bp.Kind(3, 3), "no: kind"),
                                      ("order:1:line:x", K, "c")):
            s.append(bp.Coordinate(entity, S), kind, payload)
        assert [e.payload for e in sub] == ["a", "b", "c"]
        with s.cursor("by-region", region=region) as cur:
            got = _drain(cur)
            assert [e.payload for e in got] == ["a", "b", "c"]
            cur.ack(got[-1])
        with pytest.raises(bp.CursorFilterChanged):
            s.cursor("by-region", region=bp.Region(entity_prefix="order:1"))
        with pytest.raises(bp.InvalidKind):
            s.subscribe(0, region=bp.Region(kinds=[(1, None)]))  # type: ignore[arg-type]
