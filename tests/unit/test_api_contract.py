"""The store contract (``batpak_mp._api``): the in-process ``Engine`` and the served
``Store`` offer every call of ``EventStore`` with the same argument names, kinds and
defaults; ``Store`` is the ``ReplayHost`` the replay layer uses and its subscriptions are
``EventFeed``s. mypy checks the same statically (``_client.py`` assigns ``Store`` to both
Protocols; the functions below do it for ``Engine``); this test also catches a renamed
argument or a changed default, which structural typing lets through."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import batpak_mp as bp
from batpak_mp import _api
from batpak_mp._client import Subscription


def _members(protocol: type) -> list[str]:
    names = [n for n, v in vars(protocol).items() if callable(v) and (not n.startswith("_") or n in
                                                                      ("__enter__", "__exit__"))]
    return sorted(names)


def _shape(fn: Any) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults of the parameters after ``self`` (annotations aside:
    they are strings under ``from __future__ import annotations``)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [(p.name, p.kind, p.default) for p in params]


CASES = [(_api.EventStore, bp.Engine), (_api.EventStore, bp.Store), (_api.ReplayHost, bp.Store),
         (_api.EventFeed, Subscription)]


@pytest.mark.parametrize(("protocol", "impl"), CASES, ids=lambda x: x.__name__)
def test_the_implementation_offers_every_call_of_the_contract(protocol: type, impl: type) -> None:
    for name in _members(protocol):
        assert hasattr(impl, name), f"{impl.__name__} lacks {name}"
        assert _shape(getattr(impl, name)) == _shape(getattr(protocol, name)), f"{impl.__name__}.{name}"


def test_the_contract_covers_the_public_calls_of_the_design() -> None:
    design = {"append", "append_batch", "get", "history", "query_after", "walk_ancestors", "verify_receipt", "close",
              "__enter__", "__exit__", "append_effect", "append_denial", "append_bypass",
              "latest", "latest_in_scope", "query_scope"}  # issue 14/15: the query calls both implementations answer from the index
    assert set(_members(_api.EventStore)) == design
    assert set(_members(_api.ReplayHost)) >= {"entity_head", "append_store_kinds", "stream_page", "subscribe"}


def _engine_is_an_event_store(engine: bp.Engine) -> _api.EventStore:
    return engine  # mypy: Engine offers the whole contract


def _store_is_an_event_store_and_a_replay_host(store: bp.Store) -> tuple[_api.EventStore, _api.ReplayHost]:
    return store, store  # mypy: so does the client's Store, and what _replay needs
