"""Shared fixtures: a fresh data directory per test, and a finisher that proves the
directory is intact at the end (every integration test ends with ``bp.verify``)."""

from __future__ import annotations

import os
import signal
import time
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


@pytest.fixture
def service(data_dir: str) -> Iterator[tuple[bp.Service, str]]:
    """A served data directory (supervisor + writer, real processes and queues); at the
    end the service is stopped and the directory must verify."""
    svc = bp.serve(data_dir, restart=bp.RestartPolicy.bounded(10, 60_000), segment_max_bytes=1 << 20)
    try:
        yield svc, data_dir
    finally:
        code = svc.stop()
    assert code == 0
    assert_verified(data_dir)


def expected_page(events: list[bp.Event], region: bp.Region, after: int, limit: int,
                  visible: int) -> tuple[list[int], int]:
    """What ``query_after(after, limit=limit, region=region)`` must answer, as (sequences,
    next_after), worked out from ``events`` (every event a plain unfiltered query returns,
    through ``visible``) with ``Region.matches``: the oracle the index paths are held to."""
    upto = visible if region.upto is None else min(visible, region.upto)
    if upto <= after:
        return [], after
    seqs = [ev.global_sequence for ev in events if after < ev.global_sequence <= upto and region.matches(ev)]
    if len(seqs) >= limit:
        return seqs[:limit], seqs[limit - 1]
    return seqs, upto


def kill_writer_and_wait(svc: bp.Service, store: bp.Store, timeout_s: float = 30) -> int:
    """SIGKILL the service's writer and wait until its successor serves ``store``; the
    successor's pid."""
    old = svc.writer_pid
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while (svc.writer_pid in (0, old) or store.frontier().writer_state != bp.WriterState.READY) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc.writer_pid not in (0, old), "no new writer"
    return svc.writer_pid


KINDS = ("unit", "engine", "conformance", "multiprocess", "crash", "fault", "rules")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the kind its folder names (tests/<kind>/test_*.py)."""
    for item in items:
        kind = item.path.parent.name
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.path}: tests live in a folder named after their kind, one of {KINDS}")
        item.add_marker(getattr(pytest.mark, kind))
