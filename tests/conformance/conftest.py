"""Fixtures of the conformance suite: ``impl`` is, in turn, the in-process ``bp.Engine``
and a served ``bp.Store``, each living for a whole test module (a service costs a
supervisor and a writer process; tests use coordinates of their own, see
``Impl.coord``). At module teardown the service is stopped, the engine closed, and both
data directories must pass ``bp.verify``.

A module changes what both are configured with by overriding ``store_config``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_verified  # the root tests/conftest.py (see this package's __init__)

import batpak_mp as bp

from ._contract import DEFAULT_CONFIG, IMPLS, EventStore, Impl


@pytest.fixture(scope="module")
def store_config() -> dict[str, Any]:
    """Options for both ``bp.serve(dir, **options)`` and ``bp.EngineConfig(**options)``."""
    return dict(DEFAULT_CONFIG)


def _engine(path: str, config: dict[str, Any]) -> Impl:
    engine = bp.Engine.open(path, bp.EngineConfig(**config))
    api: EventStore = engine  # mypy: the engine offers the whole contract
    return Impl("engine", api, path, lambda: engine.visible, lambda: bp.Engine.open(path, bp.EngineConfig(**config)))


def _store(path: str) -> Impl:
    store = bp.connect(path)
    api: EventStore = store  # mypy: the client offers the whole contract
    return Impl("store", api, path, lambda: store.frontier().visible, lambda: bp.connect(path))


@pytest.fixture(scope="module")
def engine_impl(tmp_path_factory: pytest.TempPathFactory, store_config: dict[str, Any]) -> Iterator[Impl]:
    path = os.fspath(tmp_path_factory.mktemp("engine") / "data")
    impl = _engine(path, store_config)
    try:
        yield impl
    finally:
        impl.api.close()
    assert_verified(path)


@pytest.fixture(scope="module")
def store_impl(tmp_path_factory: pytest.TempPathFactory, store_config: dict[str, Any]) -> Iterator[Impl]:
    path = os.fspath(tmp_path_factory.mktemp("served") / "data")
    service = bp.serve(path, restart=bp.RestartPolicy.once(), **store_config)
    try:
        impl = _store(path)
        try:
            yield impl
        finally:
            impl.api.close()
    finally:
        code = service.stop()
    assert code == 0
    assert_verified(path)


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> Impl:
    """The implementation under test (its module-wide instance, started on first use)."""
    value: Impl = request.getfixturevalue(f"{request.param}_impl")
    return value


@pytest.fixture
def another(impl: Impl, tmp_path: Path, store_config: dict[str, Any]) -> Iterator[Impl]:
    """A private instance of ``impl``'s kind that the test may close: a second connection
    to the module's service, or an engine over a data directory of its own (which must
    verify at the end)."""
    if impl.name == "store":
        private = _store(impl.data_dir)
        yield private
        private.api.close()
        return
    path = os.fspath(tmp_path / "another")
    private = _engine(path, store_config)
    yield private
    private.api.close()
    assert_verified(path)
