"""The example bank (bank.py) as a WSGI app, for several gunicorn workers over one store.

    batpak-mp serve /tmp/es-bank &
    PERSISTENCE_MODULE=batpak_mp.eventsourcing BATPAK_MP_DATA_DIR=/tmp/es-bank \\
        gunicorn -w 4 -b 127.0.0.1:8001 examples.eventsourcing_bank.wsgi:app

Routes (JSON out; every response carries ``X-Worker-Pid``):

- ``POST /accounts/<owner>`` opens an account (409 if it exists): ``{"id", "notifications"}``;
- ``POST /accounts/<owner>/deposit?amount=N`` deposits (a save that lost a race to
  another worker is retried on the fresh aggregate): ``{"balance", "notifications"}``;
- ``GET /accounts/<owner>``: ``{"balance"}``;
- ``GET /notifications?after=N``: up to 100 notifications of the bank's log after N, the
  same in every worker.

Each worker constructs its ``Bank`` on its first request (the environment names the
store); eventsourcing's IntegrityError and batpak-mp's service errors map to 409 and 503.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError, OperationalError

from examples.eventsourcing_bank.bank import Account, Bank

ROUTE = re.compile(r"^/accounts/([A-Za-z0-9_.-]{1,64})(/deposit)?$")
_bank: Bank | None = None
_lock = threading.Lock()


def bank() -> Bank:
    global _bank
    with _lock:
        if _bank is None:
            _bank = Bank()
        return _bank


def _reply(start: Callable[..., Any], status: str, body: Any) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                   ("X-Worker-Pid", str(os.getpid()))])
    return [data]


def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        if path == "/notifications" and method == "GET":
            after = int(query.get("after", ["0"])[0])
            items = bank().recorder.select_notifications(start=after, limit=100, inclusive_of_start=False)
            return _reply(start, "200 OK", [{"id": n.id, "originator_id": str(n.originator_id),
                                             "version": n.originator_version, "topic": n.topic} for n in items])
        m = ROUTE.match(path)
        if m is None:
            return _reply(start, "404 Not Found", {"error": "no such route"})
        owner, deposit = m.group(1), m.group(2)
        account_id = Account.create_id(owner)
        if method == "POST" and not deposit:
            _, ids = bank().open(owner)
            return _reply(start, "201 Created", {"id": str(account_id), "notifications": ids})
        if method == "POST":
            amount = int(query.get("amount", ["0"])[0])
            if amount <= 0:
                return _reply(start, "400 Bad Request", {"error": "amount must be a positive int"})
            ids = bank().deposit(account_id, amount)
            return _reply(start, "200 OK", {"balance": bank().balance(account_id), "notifications": ids})
        if method == "GET" and not deposit:
            return _reply(start, "200 OK", {"balance": bank().balance(account_id)})
        return _reply(start, "405 Method Not Allowed", {"error": method})
    except ValueError:
        return _reply(start, "400 Bad Request", {"error": "not a number"})
    except (KeyError, AggregateNotFoundError):
        return _reply(start, "404 Not Found", {"error": "no such account"})
    except IntegrityError:
        return _reply(start, "409 Conflict", {"error": "already recorded"})
    except OperationalError as exc:
        return _reply(start, "503 Service Unavailable", {"error": str(exc)})
