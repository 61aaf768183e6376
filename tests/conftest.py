"""Shared fixtures: a fresh data directory per test, and a finisher that proves the
directory is intact at the end (every integration test ends with ``bp.verify``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import batpak_mp as bp


@pytest.fixture
def data_dir(tmp_path: os.PathLike[str]) -> Iterator[str]:
    path = os.path.join(os.fspath(tmp_path), "data")
    yield path


def assert_verified(path: str) -> bp.VerifyReport:
    report = bp.verify(path)
    assert report.ok, report.problems
    return report


SMALL = bp.EngineConfig(segment_max_bytes=1 << 20)
