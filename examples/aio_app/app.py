"""A multi-worker asyncio web app on batpak-mp: Starlette under ``uvicorn --workers 4``.

Every worker process holds one ``bp.aio.AsyncStore`` (connected at startup, closed at
shutdown) and serves many requests at once on its event loop: concurrent appends from
one worker are in flight together and share the writer's group commits; reads make no
round trip (the mapped files); a feed streams new events as they commit.

Routes (JSON; every response carries ``X-Worker-Pid``):

- ``POST /notes/<id>`` with ``{"text": "..."}`` appends one ``noted`` event to
  ``note:<id>`` (scope ``notes``); with an ``Idempotency-Key`` header a repeated request
  returns the original receipt (``"deduplicated": true``) and is stored once.
- ``GET /notes/<id>`` the note's events, oldest first (``?newest=N``: the newest N).
- ``GET /feed?after=S&limit=N&wait=SECONDS`` events of the ``notes`` scope after
  sequence ``S``, waiting up to ``wait`` seconds (at most 10) for the first one: a
  long poll that sleeps on the store's notify word, not in a loop.
- ``GET /stats`` this worker's pid and the store's frontier.

The data directory comes from ``BATPAK_DIR``; the service must be running
(``batpak-mp serve $BATPAK_DIR``). Run:
``uvicorn examples.aio_app.app:app --workers 4 --port 8000``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import batpak_mp as bp
from batpak_mp import aio

SCOPE = "notes"
NOTED = bp.Kind(1, 1)
NOTE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TEXT = 10_000
MAX_WAIT_S = 10.0
MAX_LIMIT = 1000


def _json(status: int, body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"X-Worker-Pid": str(os.getpid())})


def _event(ev: bp.Event) -> dict[str, Any]:
    return {"sequence": ev.global_sequence, "entity": ev.coordinate.entity, "clock": ev.entity_clock,
            "text": ev.payload.get("text") if isinstance(ev.payload, dict) else None}


def _store(request: Request) -> aio.AsyncStore:
    store: aio.AsyncStore = request.app.state.store
    return store


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be within {low}..{high}")
    return value


async def add_note(request: Request) -> JSONResponse:
    note = request.path_params["note"]
    if not NOTE_ID.fullmatch(note):
        return _json(400, {"error": "a note id is 1-64 of A-Z a-z 0-9 _ . -"})
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _json(400, {"error": "the body must be JSON"})
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        return _json(400, {"error": f"text must be a string of at most {MAX_TEXT} characters"})
    key = request.headers.get("Idempotency-Key")
    try:
        r = await _store(request).append(bp.Coordinate(f"note:{note}", SCOPE), NOTED, {"text": text},
                                         idempotency_key=None if key is None else f"aio_app:{key}")
    except bp.IdempotencyConflict as exc:
        return _json(422, {"error": str(exc)})
    except (bp.WriterUnavailable, bp.WriterTimeout) as exc:
        return _json(503, {"error": str(exc)})
    return _json(201, {"sequence": r.global_sequence, "event_id": r.event_id.hex(), "clock": r.entity_clock,
                       "deduplicated": r.deduplicated})


async def get_note(request: Request) -> JSONResponse:
    note = request.path_params["note"]
    if not NOTE_ID.fullmatch(note):
        return _json(400, {"error": "a note id is 1-64 of A-Z a-z 0-9 _ . -"})
    try:
        newest = _int_param(request, "newest", 0, 0, MAX_LIMIT)
    except ValueError as exc:
        return _json(400, {"error": str(exc)})
    store = _store(request)
    events = store.history(f"note:{note}", limit=newest, newest_first=True) if newest else store.history(f"note:{note}")
    return _json(200, {"note": note, "events": [_event(e) for e in events]})


async def feed(request: Request) -> JSONResponse:
    try:
        after = _int_param(request, "after", 0, 0, 1 << 62)
        limit = _int_param(request, "limit", 100, 1, MAX_LIMIT)
        wait = float(request.query_params.get("wait", "0"))
    except ValueError as exc:
        return _json(400, {"error": str(exc)})
    if not 0 <= wait <= MAX_WAIT_S:
        return _json(400, {"error": f"wait must be within 0..{MAX_WAIT_S} seconds"})
    sub = _store(request).subscribe(after, scope=SCOPE)
    try:
        events: list[bp.Event] = []
        first = await sub.next(timeout=wait)
        if first is not None:
            events.append(first)
            while len(events) < limit:
                ev = await sub.next(timeout=0)
                if ev is None:
                    break
                events.append(ev)
    finally:
        sub.close()
    nxt = events[-1].global_sequence if events else after
    return _json(200, {"events": [_event(e) for e in events], "next_after": nxt})


async def stats(request: Request) -> JSONResponse:
    f = _store(request).frontier()
    return _json(200, {"pid": os.getpid(), "visible": f.visible, "durable": f.durable, "epoch": f.writer_epoch})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    store = await aio.connect(os.environ["BATPAK_DIR"])
    app.state.store = store
    try:
        yield
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await store.close()


app = Starlette(routes=[
    Route("/notes/{note}", add_note, methods=["POST"]),
    Route("/notes/{note}", get_note, methods=["GET"]),
    Route("/feed", feed, methods=["GET"]),
    Route("/stats", stats, methods=["GET"]),
], lifespan=lifespan)
