"""Consumer groups: several processes sharing the work of one durable cursor
(``store.cursor(name, group=True)``; KurrentDB's persistent subscriptions are the model).

Owns: ``GroupCursor`` and the group's state, kept in the journal itself as the newest
cursor-position event (kind 0x0:0x010) of the entity ``group:<name>`` in scope
``system``: ``{"cursor", "through", "filter", "next", "claims"}``. The stream (positions
as ``_read/queries.stream_page`` gives them: a fenced event at its FENCE_COMMIT) is cut
into *claims*, ranges ``(lo, hi]`` of at most ``chunk`` positions, each owned by one live
member (its pid and process start time) with its progress ``done``; ``next`` is the end
of the newest claim; ``through`` (every position up to it handled) is the least
``done`` of the open claims, or ``next`` when none is open.

Invariants:
- Every change is a compare-and-set: the new state is appended with ``expected_clock``
  set to the clock of the state it was computed from, so two members never both take a
  range (the loser reads again and retries).
- A matching event goes to the member owning the claim its position falls in, and to no
  other while that member lives: claims never overlap.
- A member found dead (its pid gone, or reused by another process) loses its claims to
  the next member that asks for work, from the claim's ``done``: its unacknowledged events
  are handed to another member (at least once; what it acknowledged stays done).
- ``close()`` persists progress and gives the member's claims up at once.

Must not import the client, the writer, the engine, the reader or the supervisor (the
store is reached through ``_api.ReplayHost``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from ._api import ReplayHost
from ._errors import ConcurrencyConflict, CursorFilterChanged, InvalidArgument, ProtocolError
from ._iterate import Feed, idle_wait
from ._replay import CURSOR_ACK, CURSOR_SCOPE, EventFilter, derived_key
from ._values import BatchItem, Coordinate, Event

__all__ = ["GroupCursor"]

DEFAULT_CHUNK = 100  # stream positions one claim covers: the unit of work handed to a member
DEFAULT_ACK_EVERY = 10  # events acknowledged locally before the progress is written (and at a claim's end)
CAS_TRIES = 1000  # compare-and-set attempts against other members before giving up
IDLE_SLEEP_S = (0.002, 0.05)  # first and longest pause while no work is to be had
# claim fields, in the list each claim is stored as
C_PID, C_START, C_LO, C_HI, C_DONE = range(5)


def _start_ticks(pid: int) -> int | None:
    """The start time of live process ``pid`` (clock ticks since boot, /proc/<pid>/stat
    field 22): with the pid, an identity no later process can take; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        fields = raw[raw.rindex(b")") + 2:].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


class GroupCursor(Feed):
    """One member of a consumer group. Iterate it (or call ``next``) and ``ack`` each
    event once handled; every matching event goes to exactly one live member, and the
    unacknowledged events of a member that dies go to another. Positions are stream
    positions, as a ``Cursor``'s."""

    def __init__(self, store: ReplayHost, name: str, flt: EventFilter, *, start_after: int = 0,
                 chunk: int = DEFAULT_CHUNK, ack_every: int = DEFAULT_ACK_EVERY, timeout: float | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgument("name", name, "must be a non-empty str")
        if type(chunk) is not int or not 1 <= chunk <= 1_000_000:
            raise InvalidArgument("chunk", chunk, "must be an int in 1..1000000")
        if type(ack_every) is not int or ack_every < 1:
            raise InvalidArgument("ack_every", ack_every, "must be an int >= 1")
        if type(start_after) is not int or start_after < 0:
            raise InvalidArgument("start_after", start_after, "must be an int >= 0")
        self.name = name
        self.filter = flt
        self.identity = flt.identity()
        self.chunk = chunk
        self.ack_every = ack_every
        self._timeout = timeout
        self._store = store
        self._coord = Coordinate(f"group:{name}", CURSOR_SCOPE)
        self._region = flt.as_region()
        self.pid = os.getpid()
        start = _start_ticks(self.pid)
        self._start = start if start is not None else 0
        self._start_after = start_after
        self._claim: list[int] | None = None  # [pid, start, lo, hi, done] as last written
        self._last_at = 0  # the ack position of the last event handed out of the claim
        self._scanned = 0  # stream position looked at so far in the claim
        self._buffer: deque[tuple[Event, int, bool]] = deque()
        self._acked = 0  # acknowledged locally (may be ahead of the claim's written done)
        self._unwritten = 0
        self._ack_at: dict[int, int] = {}
        self.handled = 0
        self._closed = False
        state, _ = self._load()
        stored = state.get("filter")
        if isinstance(stored, str) and stored != self.identity:
            raise CursorFilterChanged(name, stored, self.identity)

    # -- the group's state in the journal ---------------------------------------------------
    def _load(self) -> tuple[dict[str, Any], int]:
        head = self._store.entity_head(self._coord.entity)
        if head is None:
            return {"through": self._start_after, "next": self._start_after, "claims": []}, 0
        doc = head.payload
        if head.kind != CURSOR_ACK or not isinstance(doc, dict) or doc.get("cursor") != self.name:
            raise ProtocolError(f"consumer group {self.name!r}: malformed state at sequence {head.global_sequence}")
        claims = doc.get("claims")
        nxt = doc.get("next")
        if type(nxt) is not int or not isinstance(claims, list) or not all(
                isinstance(c, list) and len(c) == 5 and all(type(v) is int for v in c) for c in claims):
            raise ProtocolError(f"consumer group {self.name!r}: malformed state at sequence {head.global_sequence}")
        return {"through": doc.get("through"), "next": nxt, "claims": [list(c) for c in claims],
                "filter": doc.get("filter")}, head.entity_clock

    def _cas(self, change: Any) -> dict[str, Any] | None:
        """Apply ``change(state) -> new state or None`` (None: nothing to write) as a
        compare-and-set on the group's entity; returns the state written (or None)."""
        conflict: ConcurrencyConflict | None = None
        for _ in range(CAS_TRIES):
            state, clock = self._load()
            new: dict[str, Any] | None = change(state)
            if new is None:
                return None
            claims = new["claims"]
            new["through"] = min([c[C_DONE] for c in claims], default=new["next"])
            doc = {"cursor": self.name, "through": new["through"], "filter": self.identity, "next": new["next"],
                   "claims": claims}
            key = derived_key("group", self.name, clock, self.pid, self._start)
            try:
                self._store.append_store_kinds([BatchItem(self._coord, CURSOR_ACK, doc, idempotency_key=key,
                                                          expected_clock=clock)])
            except ConcurrencyConflict as exc:
                conflict = exc
                continue
            return new
        assert conflict is not None
        raise conflict

    def _mine(self, c: list[int]) -> bool:
        return c[C_PID] == self.pid and c[C_START] == self._start

    @staticmethod
    def _alive(c: list[int]) -> bool:
        start = _start_ticks(c[C_PID])
        return start is not None and start == c[C_START]

    def _acquire(self) -> bool:
        """Take a claim: one of ours left open, a dead member's, or the next range."""
        visible = self._store.frontier().visible
        taken: list[list[int]] = []

        def change(state: dict[str, Any]) -> dict[str, Any] | None:
            taken.clear()
            claims = state["claims"]
            for c in claims:
                if self._mine(c):
                    taken.append(c)
                    return None
            for c in claims:
                if not self._alive(c):
                    c[C_PID], c[C_START] = self.pid, self._start
                    taken.append(c)
                    return state
            lo = state["next"]
            first = self._first_match(lo, visible)
            if first is None:
                return None  # nothing for the group (not even its own state events make work)
            hi = min(first - 1 + self.chunk, visible)
            c = [self.pid, self._start, lo, hi, lo]
            claims.append(c)
            state["next"] = hi
            taken.append(c)
            return state

        self._cas(change)
        if not taken:
            return False
        self._claim = taken[0]
        self._scanned = self._acked = self._last_at = self._claim[C_DONE]
        self._unwritten = 0
        self._buffer.clear()
        return True

    def _first_match(self, after: int, visible: int) -> int | None:
        """The stream position of the first event after ``after`` (up to ``visible``) that
        this group's filter admits; None when there is none."""
        region = self._region.with_upto(visible)
        while after < visible:
            entries, end = self._store.stream_entries(after, 1000, region)
            for ev, pos, _ in entries:
                if self.filter.admits(ev):
                    return pos
            if end <= after:
                break
            after = end
        return None

    def _write_progress(self, *, release: bool = False) -> None:
        """Write the claim's progress; at its end (or with ``release``) give it up."""
        claim = self._claim
        if claim is None:
            return
        done = self._acked
        finished = done >= claim[C_HI]

        def change(state: dict[str, Any]) -> dict[str, Any] | None:
            for c in state["claims"]:
                if c[C_LO] == claim[C_LO] and c[C_HI] == claim[C_HI]:
                    if not self._mine(c):
                        return None  # taken over (we were thought dead): its new owner goes on
                    if finished:
                        state["claims"].remove(c)
                    elif release:
                        c[C_DONE] = max(c[C_DONE], done)
                        c[C_PID] = c[C_START] = 0  # nobody's: the next member to ask takes it
                    else:
                        if done <= c[C_DONE]:
                            return None
                        c[C_DONE] = done
                    return state
            return None

        self._cas(change)
        self._unwritten = 0
        if finished or release:
            self._claim = None

    # -- delivery ---------------------------------------------------------------------------
    def next(self, timeout: float | None = None) -> Event | None:
        """The next event of this member's claims; None after ``timeout`` idle seconds.
        A member gets no new claim until it has acknowledged the events of its current
        one (``for ev in member: handle(ev); member.ack(ev)``); until then this returns
        None at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = IDLE_SLEEP_S[0]
        while not self._closed:
            if self._buffer:
                ev, pos, last = self._buffer.popleft()
                if not self.filter.admits(ev):
                    continue
                at = pos if last else pos - 1
                if at != ev.global_sequence:
                    self._ack_at[ev.global_sequence] = at
                self._last_at = max(self._last_at, at)
                return ev
            claim = self._claim
            if claim is not None and self._scanned < claim[C_HI]:
                entries, scanned = self._store.stream_entries(self._scanned, 1000,
                                                              self._region.with_upto(claim[C_HI]))
                self._buffer = deque(entries)
                self._scanned = max(scanned, self._scanned) if entries else claim[C_HI]
                continue
            if claim is not None:  # every event of the claim handed out
                if self._acked < self._last_at:
                    return None  # the caller has events of this claim to acknowledge first
                self._acked = claim[C_HI]
                self._write_progress()
                continue
            if self._acquire():
                pause = IDLE_SLEEP_S[0]
                continue
            wait = idle_wait(pause, deadline, time.monotonic)
            if wait is None:
                return None
            time.sleep(wait)
            pause = min(pause * 2, IDLE_SLEEP_S[1])
        return None

    def ack(self, event: Event) -> None:
        """Acknowledge ``event`` and the events handed out before it. Written to the
        journal every ``ack_every`` events and when the claim is done."""
        if not isinstance(event, Event):
            raise InvalidArgument("event", event, "must be a bp.Event")
        at = self._ack_at.pop(event.global_sequence, event.global_sequence)
        claim = self._claim
        if claim is None or at <= self._acked:
            return
        self._acked = at
        self.handled += 1
        self._unwritten += 1
        if self._scanned >= claim[C_HI] and not self._buffer and self._acked >= self._last_at:
            self._acked = claim[C_HI]  # nothing else of the claim matches: it is done
        if self._acked >= claim[C_HI] or self._unwritten >= self.ack_every:
            self._write_progress()

    @property
    def position(self) -> int:
        """Every position up to this is handled by some member (the group's ``through``)."""
        state, _ = self._load()
        through = state.get("through")
        return through if type(through) is int else 0

    def close(self) -> None:
        """Write this member's progress and give its claim up (another member takes the rest)."""
        if self._closed:
            return
        self._closed = True
        if self._claim is not None:
            self._write_progress(release=True)

    def __repr__(self) -> str:
        return f"GroupCursor({self.name!r}, pid={self.pid}, claim={self._claim})"
