"""Words the writer updates in place while clients read them — an entity's delta slot, a
scope's head, the positions watermark — never read as 0 in passing. (CPython's
``struct.pack_into`` clears its target before it writes: on a shared mapping, a reader
could see the head of an entity or scope as 0 and answer None for one that has events.)"""

from __future__ import annotations

import time

import multiprocess as mp

import batpak_mp as bp

K = bp.Kind(1, 1)
SECONDS = 2.0


def _appender(data_dir: str, seconds: float) -> None:
    with bp.connect(data_dir) as s:
        c = bp.Coordinate("e", "s")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.append_batch([bp.BatchItem(c, K, i) for i in range(20)])


def test_latest_never_misses_an_entity_or_scope_with_events(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        s.append(bp.Coordinate("e", "s"), K, -1)
        p = mp.get_context("fork").Process(target=_appender, args=(data_dir, SECONDS))
        p.start()
        calls = misses = 0
        try:
            while p.is_alive():
                for ev in (s.latest("e"), s.latest_in_scope("s")):
                    calls += 1
                    misses += ev is None
        finally:
            p.join()
        assert p.exitcode == 0
        assert calls > 1000  # the reads overlapped the appends: the test could have failed
        assert misses == 0, f"{misses} of {calls} reads answered None for an entity/scope with events"
