"""A tiny bank on batpak-mp, served by several WSGI worker processes (e.g. gunicorn).

Every worker process appends deposits to one journal and answers reads from projections
that it folds itself, in its own memory, from the events it reads through the mapped
files (``store.project_if_changed``: a read that finds nothing new since the last one
costs one frontier check). No framework: plain WSGI.

Routes (JSON in and out; every response carries ``X-Worker-Pid``):

- ``POST /accounts/<id>/deposit`` with ``{"amount": n}`` (a positive int) appends one
  ``deposited`` event; with an ``Idempotency-Key`` header, a repeated request returns the
  original receipt and counts once (the same key with another account or amount: 422).
- ``GET /accounts/<id>`` the balance of one account (a projection of that entity).
- ``GET /accounts`` every balance and the total (a projection of the ``bank`` scope).
- ``GET /stats`` this worker's pid, the store's frontier and its projection counters.

The data directory comes from ``BATPAK_DIR``; the service must be running
(``batpak-mp serve $BATPAK_DIR``). Each worker connects on its first request
(``app``); ``create_app(connect=True)`` connects at once instead, which with gunicorn's
``--preload`` means in the master, before the fork: a ``Store`` is fork-safe, so each
worker re-attaches on its own at its first call. See README.md beside this file.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import batpak_mp as bp

SCOPE = "bank"
DEPOSITED = bp.Kind(1, 1)
ACCOUNT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_AMOUNT = 10**12
MAX_BODY = 4096
MAX_KEY = 200
KEY_PREFIX = "webapp.deposit:"  # keeps this app's idempotency keys apart from other writers'

StartResponse = Callable[..., Any]
Response = tuple[HTTPStatus, dict[str, Any]]

_folding = threading.local()  # events folded by this thread: tells a cache hit from a fold


def _count_fold() -> None:
    _folding.events = getattr(_folding, "events", 0) + 1


class Account:
    """Projection of one account (used with ``entity="account:<id>"``)."""

    name = "webapp.account"
    version = 1
    @staticmethod
    def initial() -> dict[str, int]:
        return {"balance": 0, "deposits": 0}

    def apply(self, state: dict[str, int], event: bp.Event) -> dict[str, int]:
        _count_fold()
        return {"balance": state["balance"] + event.payload["amount"], "deposits": state["deposits"] + 1}


class Board:
    """Projection of the whole bank (used with ``scope="bank"``). ``apply`` updates the
    state in place: the state returned by ``project_if_changed`` is the cached object,
    so a handler reads it and never changes it."""

    name = "webapp.board"
    version = 1

    @staticmethod
    def initial() -> dict[str, Any]:
        return {"balances": {}, "total": 0, "deposits": 0}

    def apply(self, state: dict[str, Any], event: bp.Event) -> dict[str, Any]:
        _count_fold()
        account = event.coordinate.entity.removeprefix("account:")
        amount = event.payload["amount"]
        state["balances"][account] = state["balances"].get(account, 0) + amount
        state["total"] += amount
        state["deposits"] += 1
        return state


ACCOUNT = Account()
BOARD = Board()


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BankApp:
    """The WSGI application. One ``Store`` per process, connected on first use (or at once
    with ``connect=True``); safe to share across a fork."""

    def __init__(self, data_dir: str | None = None, *, connect: bool = False) -> None:
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._store: bp.Store | None = None
        self.connected_in: int | None = None  # the pid that called bp.connect
        self._counters = {"calls": 0, "hits": 0, "events_folded": 0}
        self._seen: set[tuple[str, str | None]] = set()  # projections this process has folded
        if connect:
            self.store()

    # -- the store ---------------------------------------------------------------------------
    def store(self) -> bp.Store:
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    data_dir = self._data_dir or os.environ.get("BATPAK_DIR")
                    if not data_dir:
                        raise RuntimeError("set BATPAK_DIR to the data directory of a running batpak-mp service")
                    self._store = bp.connect(data_dir)
                    self.connected_in = os.getpid()
                store = self._store
        return store

    def close(self) -> None:
        """Detach this process's ``Store`` (gunicorn's ``worker_exit`` calls it)."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- projections -------------------------------------------------------------------------
    def _project(self, projection: Account | Board, *, entity: str | None = None) -> Any:
        """``project_if_changed``, counting calls answered from the cache (no event folded)."""
        before = getattr(_folding, "events", 0)
        if entity is None:
            state = self.store().project_if_changed(projection, scope=SCOPE, kind=DEPOSITED)
        else:
            state = self.store().project_if_changed(projection, entity=entity, kind=DEPOSITED)
        folded = getattr(_folding, "events", 0) - before
        key = (projection.name, entity)
        with self._lock:
            c = self._counters
            c["calls"] += 1
            c["events_folded"] += folded
            if folded == 0 and key in self._seen:
                c["hits"] += 1
            self._seen.add(key)
        return state

    # -- WSGI --------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            status, body = self._route(environ)
        except HttpError as e:
            status, body = e.status, {"error": e.message}
        except (bp.WriterUnavailable, bp.WriterTimeout) as e:
            status, body = HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)}
        data = json.dumps(body, sort_keys=True).encode() + b"\n"
        start_response(f"{status.value} {status.phrase}", [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("X-Worker-Pid", str(os.getpid())),
        ])
        return [data]

    def _route(self, environ: dict[str, Any]) -> Response:
        method = environ["REQUEST_METHOD"]
        parts = [p for p in environ.get("PATH_INFO", "").split("/") if p]
        if parts == ["stats"]:
            _only(method, "GET")
            return self.stats()
        if parts == ["accounts"]:
            _only(method, "GET")
            return self.board()
        if len(parts) in (2, 3) and parts[0] == "accounts":
            account = parts[1]
            if not ACCOUNT_ID.fullmatch(account):
                raise HttpError(HTTPStatus.BAD_REQUEST, f"an account id matches {ACCOUNT_ID.pattern}")
            if len(parts) == 2:
                _only(method, "GET")
                return self.balance(account)
            if parts[2] == "deposit":
                _only(method, "POST")
                return self.deposit(account, _json_body(environ), environ.get("HTTP_IDEMPOTENCY_KEY"))
        raise HttpError(HTTPStatus.NOT_FOUND, "no such route")

    # -- handlers ----------------------------------------------------------------------------
    def deposit(self, account: str, body: Any, key: str | None) -> Response:
        amount = body.get("amount") if isinstance(body, dict) else None
        if type(amount) is not int or not 0 < amount <= MAX_AMOUNT:
            raise HttpError(HTTPStatus.BAD_REQUEST, f'the body is {{"amount": n}} with 0 < n <= {MAX_AMOUNT}')
        if key is not None and not 0 < len(key) <= MAX_KEY:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"an Idempotency-Key has 1 to {MAX_KEY} characters")
        store = self.store()
        entity = f"account:{account}"
        payload = {"amount": amount}
        try:  # a repeated key returns the original receipt (deduplicated); for another request it is refused
            receipt = store.append(bp.Coordinate(entity, SCOPE), DEPOSITED, payload,
                                   idempotency_key=None if key is None else KEY_PREFIX + key)
        except bp.IdempotencyConflict:
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, "this Idempotency-Key was used for another deposit") from None
        return HTTPStatus.CREATED, {
            "account": account,
            "amount": amount,
            "sequence": receipt.global_sequence,
            "event_id": receipt.event_id.hex(),
            "entity_clock": receipt.entity_clock,
        }

    def balance(self, account: str) -> Response:
        state = self._project(ACCOUNT, entity=f"account:{account}")
        return HTTPStatus.OK, {"account": account, "balance": state["balance"], "deposits": state["deposits"]}

    def board(self) -> Response:
        state = self._project(BOARD)
        return HTTPStatus.OK, {"balances": dict(state["balances"]), "total": state["total"],
                               "deposits": state["deposits"]}

    def stats(self) -> Response:
        f = self.store().frontier()
        with self._lock:
            counters = dict(self._counters)
        return HTTPStatus.OK, {
            "pid": os.getpid(),
            "connected_in": self.connected_in,
            "frontier": {"visible": f.visible, "durable": f.durable, "writer_epoch": f.writer_epoch,
                         "writer_state": f.writer_state.name},
            "projection": counters,
        }


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {allowed}")


def _json_body(environ: dict[str, Any]) -> Any:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
    if not 0 < length <= MAX_BODY:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"a JSON body of 1 to {MAX_BODY} bytes is required")
    try:
        return json.loads(environ["wsgi.input"].read(length))
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None


def create_app(data_dir: str | None = None, *, connect: bool = False) -> BankApp:
    """A new application; ``connect=True`` connects now (in gunicorn's master with
    ``--preload``) rather than at the first request."""
    return BankApp(data_dir, connect=connect)


app = create_app()  # connects in each worker at its first request
