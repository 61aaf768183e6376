"""The round trip (issue 11 #2, #3): a Store shared by threads keeps several requests in
flight and its reads never wait behind them; the writer's loop wakes when an fsync ends."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import assert_verified

import batpak_mp as bp

K = bp.Kind(1, 4)


@pytest.fixture
def served(tmp_path: object) -> Iterator[str]:
    data_dir = os.path.join(str(tmp_path), "data")
    with bp.serve(data_dir):
        yield data_dir
    assert_verified(data_dir)


def test_a_lone_append_is_answered_when_its_fsync_ends_not_at_the_loop_s_next_timeout(served: str) -> None:
    # the syncer wakes the loop (a message of its own on the request queue); without that,
    # each lone append would wait out the loop's 50 ms sleep in the kernel queue
    with bp.connect(served) as s:
        c = bp.Coordinate("lone", "rt")
        s.append(c, K, 0)
        took = []
        for i in range(30):
            t0 = time.perf_counter()
            s.append(c, K, i)
            took.append(time.perf_counter() - t0)
    assert statistics.median(took) < 0.035, f"median {statistics.median(took) * 1e3:.1f} ms per lone append"


def test_threads_sharing_one_store_have_requests_in_flight_together(served: str) -> None:
    with bp.connect(served) as s:
        before = s._control.read()
        errors: list[BaseException] = []
        receipts: list[bp.Receipt] = []

        def run(t: int) -> None:
            try:
                for i in range(40):
                    receipts.append(s.append(bp.Coordinate(f"t{t}", "rt"), K, i))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        after = s._control.read()
        assert not errors
        assert len({r.global_sequence for r in receipts}) == 320
        requests, groups = after.requests - before.requests, after.groups - before.groups
        assert groups < requests * 0.9, (requests, groups)  # several threads' requests shared commit groups
        for t in range(8):
            assert [e.payload for e in s.history(f"t{t}")] == list(range(40))
        assert len(s._channel.idle_areas()) >= 2  # one area per request in flight, kept for reuse


def test_reads_do_not_wait_behind_an_append_in_flight(served: str) -> None:
    with bp.connect(served) as s:
        r = s.append(bp.Coordinate("r", "rt"), K, "x")
        big = [bp.BatchItem(bp.Coordinate("big", "rt"), K, b"y" * 2000) for _ in range(8000)]
        done = threading.Event()
        reads_during: list[int] = []

        def writer() -> None:
            s.append_batch(big)  # ~16 MB: the writer takes a while over it
            done.set()

        th = threading.Thread(target=writer)
        th.start()
        n = 0
        while not done.is_set():
            assert s.get(r.event_id).payload == "x"
            n += 1
            if n == 200:
                reads_during.append(n)
                break
        th.join(60)
        assert reads_during == [200], "the reads waited for the append to finish"
        assert len(s.history("big")) == 8000


def test_close_lets_requests_in_flight_finish(served: str) -> None:
    s = bp.connect(served)
    results: list[object] = []

    def run() -> None:
        try:
            results.append(s.append_batch([bp.BatchItem(bp.Coordinate("c", "rt"), K, b"z" * 1000)] * 3000))
        except BaseException as exc:
            results.append(exc)

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.01)
    s.close()
    th.join(60)
    assert len(results) == 1
    assert isinstance(results[0], (list, bp.StoreClosed))
    with pytest.raises(bp.StoreClosed):
        s.append(bp.Coordinate("c", "rt"), K, 1)
