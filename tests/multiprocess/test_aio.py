"""bp.aio: the asyncio face of the client, against a real service (issue 14, item 1)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp import aio

K = bp.Kind(1, 3)
T = TypeVar("T")


@pytest.fixture
def served(tmp_path: object) -> Iterator[str]:
    data_dir = os.path.join(str(tmp_path), "data")
    with bp.serve(data_dir, restart=bp.RestartPolicy.bounded(3, 60_000)):
        yield data_dir
    assert_verified(data_dir)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_many_appends_in_flight_share_group_commits(served: str) -> None:
    async def main() -> tuple[list[bp.Receipt], int, int]:
        async with await aio.connect(served) as store:
            before = store.store._control.read()
            receipts = await asyncio.gather(*(store.append(bp.Coordinate(f"e{i % 10}", "aio"), K, {"i": i})
                                              for i in range(300)))
            after = store.store._control.read()
            return list(receipts), after.requests - before.requests, after.groups - before.groups

    receipts, requests, groups = run(main())
    seqs = [r.global_sequence for r in receipts]
    assert len(set(seqs)) == 300 and all(r.durable for r in receipts)
    assert requests >= 300 and groups < requests / 2, (requests, groups)  # many requests per commit group
    with bp.connect(served) as s:
        for r in receipts[::37]:
            assert s.verify_receipt(r)
        assert sorted(e.payload["i"] for e in s.query_after(0, limit=1000, scope="aio").events) == list(range(300))


def test_batch_conflict_and_bad_input_are_typed_errors(served: str) -> None:
    async def main() -> None:
        async with await aio.connect(served) as store:
            c = bp.Coordinate("acct", "aio")
            await store.append(c, K, 1)
            with pytest.raises(bp.ConcurrencyConflict):
                await store.append(c, K, 2, expected_clock=0)
            with pytest.raises(bp.ReservedKind):
                await store.append(c, bp.Kind(0, 1), 3)
            with pytest.raises(bp.InvalidCoordinate):
                await store.append_batch([bp.BatchItem(bp.Coordinate("", "aio"), K, 1)])
            r = await store.append(c, K, 4, idempotency_key="k1")
            again = await store.append(c, K, 4, idempotency_key="k1")
            assert again.global_sequence == r.global_sequence
            assert [e.payload for e in store.history("acct")] == [1, 4]  # reads are direct calls

    run(main())


def test_subscription_and_cursor_are_async_iterators(served: str) -> None:
    async def main() -> None:
        async with await aio.connect(served) as store:
            sub = store.subscribe(0, scope="feed", timeout=5)
            got: list[int] = []

            async def consume() -> None:
                async for ev in sub:
                    got.append(ev.payload)
                    if len(got) == 20:
                        return

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)  # the consumer is asleep on the notify word
            for i in range(20):
                await store.append(bp.Coordinate("f", "feed"), K, i)
            await asyncio.wait_for(task, 10)
            assert got == list(range(20))

            cur = store.cursor("aio-cur", scope="feed", timeout=0.2)
            seen = [ev async for ev in cur]
            assert [e.payload for e in seen] == list(range(20))
            await cur.ack(seen[9])
            cur.close()
            again = store.cursor("aio-cur", scope="feed", timeout=0.2)
            assert [e.payload async for e in again][:1] == [10]  # resumes after the ack
            again.close()

    run(main())


def test_fence_reveals_on_exit(served: str) -> None:
    async def main() -> None:
        async with await aio.connect(served) as store:
            async with await store.fence() as f:
                r = await f.append(bp.Coordinate("fenced", "aio"), K, 1)
                with pytest.raises(bp.NotFound):
                    store.get(r.event_id)  # hidden until the commit
            assert store.get(r.event_id).payload == 1

    run(main())


def test_a_cancelled_call_leaves_the_store_usable(served: str) -> None:
    async def main() -> None:
        async with await aio.connect(served) as store:
            tasks = [asyncio.create_task(store.append(bp.Coordinate("c", "aio"), K, i, idempotency_key=f"c{i}"))
                     for i in range(50)]
            await asyncio.sleep(0)
            for t in tasks[::2]:
                t.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(d, (bp.Receipt, asyncio.CancelledError)) for d in done)
            # each cancelled append was either applied or not, never twice: re-sending its key settles it
            for i in range(50):
                await store.append(bp.Coordinate("c", "aio"), K, i, idempotency_key=f"c{i}")
            assert sorted(e.payload for e in store.history("c")) == list(range(50))

    run(main())


def test_appends_in_flight_ride_through_a_writer_restart(served: str) -> None:
    async def main() -> list[bp.Receipt]:
        async with await aio.connect(served, timeout=30) as store:
            first = store.frontier().writer_epoch

            async def killer() -> None:
                await asyncio.sleep(0.05)
                os.kill(store.frontier().writer_pid, signal.SIGKILL)

            k = asyncio.create_task(killer())
            receipts = await asyncio.gather(*(store.append(bp.Coordinate(f"r{i % 4}", "aio"), K, i)
                                              for i in range(400)))
            await k
            assert store.frontier().writer_epoch > first
            return list(receipts)

    receipts = run(main())
    with bp.connect(served) as s:
        events = s.query_after(0, limit=5000, scope="aio").events
        assert sorted(e.payload for e in events) == list(range(400))  # each exactly once
        assert {r.global_sequence for r in receipts} == {e.global_sequence for e in events}


def test_close_waits_for_calls_in_flight_and_then_refuses(served: str) -> None:
    async def main() -> None:
        store = await aio.connect(served)
        pending = [asyncio.create_task(store.append(bp.Coordinate("z", "aio"), K, i)) for i in range(30)]
        await asyncio.sleep(0)
        await store.close()
        assert all(t.done() and not t.cancelled() for t in pending)
        with pytest.raises(bp.StoreClosed):
            await store.append(bp.Coordinate("z", "aio"), K, 99)

    run(main())


def test_idle_waiting_does_not_poll(served: str) -> None:
    async def main() -> float:
        async with await aio.connect(served) as store:
            sub = store.subscribe(None, scope="never")
            t0 = time.process_time()
            assert await sub.next(timeout=1.5) is None
            return time.process_time() - t0

    cpu = run(main())
    assert cpu < 0.1, f"{cpu:.3f} s of CPU while idle for 1.5 s"


def _child_uses(store: aio.AsyncStore, out: mp.Queue[str]) -> None:
    async def use() -> None:
        await store.append(bp.Coordinate("x", "aio"), K, 1)

    try:
        asyncio.run(use())
        out.put("no error")
    except bp.InvalidArgument as exc:
        out.put(f"InvalidArgument: {exc}")


def test_an_async_store_refuses_use_after_fork(served: str) -> None:
    async def main() -> str:
        async with await aio.connect(served) as store:
            ctx = mp.get_context("fork")
            out: mp.Queue[str] = ctx.Queue()
            p = ctx.Process(target=_child_uses, args=(store, out))
            p.start()
            p.join(20)
            await store.append(bp.Coordinate("x", "aio"), K, 2)  # the parent's is unharmed
            return str(out.get(timeout=5))

    assert run(main()).startswith("InvalidArgument")
