"""The NATS side of the jetstream adapter: connections, the stream, reading it in order.

Owns: ``LoopThread`` (an asyncio event loop in a thread of its own, so the remote reader
and restore keep the sync API of the rest of the package), connecting to NATS
(``nats-py``; URLs may list several servers, comma-separated), creating or checking the
stream of a store (subjects ``<prefix>.>``, file storage, no limits, the store id in its
metadata), its last message, and ``follow``: every message from a stream sequence on, in
stream order, through an ordered push consumer (the server's flow control; it resets
itself after a reconnect or a lost message), each handed to a callback.
Invariants: a stream holding another store's id in its metadata, or one this adapter did
not make, is never written to (``StreamMismatch``); nothing here keeps state that the
stream does not.
Must not import the write side's roles (writer, client, service) or the supervisor.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from .._errors import StreamMismatch, StreamUnavailable
from ._mapping import META_FORMAT, META_STORE, STREAM_FORMAT

T = TypeVar("T")

CONNECT_TIMEOUT_S = 2.0  # one attempt to reach a server; reconnects go on in the background
RECONNECT_WAIT_S = 0.25  # between reconnect attempts (a restarted server is back within ~1 s)
DUPLICATE_WINDOW_S = 120.0  # Nats-Msg-Id de-duplication window of a stream the bridge creates
API_TIMEOUT_S = 5.0  # a JetStream API call (stream info, get message) answered within this
NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, asyncio.TimeoutError, TimeoutError, OSError)


class LoopThread:
    """An asyncio loop running in a daemon thread; ``run`` a coroutine on it, blocking."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout} s") from None

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback: a server going away is expected and retried (the
    bridge counts its errors where they surface), not a traceback on stderr."""


async def open_nats(url: str, *, reconnect: bool = True, name: str = "batpak-mp") -> Client:
    """A connection to ``url`` (comma-separated servers allowed) that reconnects forever."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    try:
        return await nats.connect(servers=servers, name=name, connect_timeout=CONNECT_TIMEOUT_S, error_cb=_quiet,
                                  allow_reconnect=reconnect, max_reconnect_attempts=-1 if reconnect else 0,
                                  reconnect_time_wait=RECONNECT_WAIT_S, ping_interval=5, max_outstanding_pings=2)
    except NATS_ERRORS as exc:
        raise StreamUnavailable(url, "-", f"cannot connect: {type(exc).__name__}: {exc}") from None


async def stream_info(js: JetStreamContext, stream: str) -> api.StreamInfo | None:
    """The stream's info, None when it does not exist."""
    try:
        return await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return None


def check_store(stream: str, info: api.StreamInfo, store_hex: str | None) -> str:
    """The store id the stream's metadata names; ``StreamMismatch`` when it names none
    (a stream this adapter did not make) or another store than ``store_hex``."""
    meta = info.config.metadata or {}
    found = meta.get(META_STORE)
    if found is None or meta.get(META_FORMAT) != STREAM_FORMAT:
        raise StreamMismatch(stream, "the stream was not made by batpak-mp's bridge (no store id in its metadata)",
                             store_hex, None)
    if store_hex is not None and found != store_hex:
        raise StreamMismatch(stream, f"the stream holds the journal of store {found}, not of store {store_hex}",
                             store_hex, found)
    return found


async def ensure_stream(js: JetStreamContext, stream: str, prefix: str, store_hex: str, replicas: int) -> api.StreamInfo:
    """The stream of this store: created when missing, else checked (``check_store``)."""
    info = await stream_info(js, stream)
    if info is None:
        config = api.StreamConfig(
            name=stream, subjects=[f"{prefix}.>"], storage=api.StorageType.FILE, retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.NEW, num_replicas=replicas, duplicate_window=DUPLICATE_WINDOW_S,
            allow_direct=True, metadata={META_STORE: store_hex, META_FORMAT: STREAM_FORMAT},
            description=f"batpak-mp journal of store {store_hex}")
        try:
            info = await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            info = await stream_info(js, stream)  # made by another bridge meanwhile
            if info is None:
                raise
    check_store(stream, info, store_hex)
    return info


async def get_message(js: JetStreamContext, stream: str, seq: int) -> api.RawStreamMsg:
    return await js.get_msg(stream, seq)


async def follow(js: JetStreamContext, stream: str, start_seq: int, on_msg: Callable[[Msg], Awaitable[None] | None],
                 *, subject: str) -> Any:
    """Deliver every message of ``stream`` from ``start_seq`` on, in order, to ``on_msg``
    (an ordered push consumer: flow control and idle heartbeats, reset by the client
    after a reconnect). Returns the subscription (unsubscribe it to stop)."""
    async def cb(msg: Msg) -> None:
        r = on_msg(msg)
        if r is not None:
            await r

    return await js.subscribe(
        subject, stream=stream, cb=cb, ordered_consumer=True, idle_heartbeat=2.0, flow_control=True,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        config=api.ConsumerConfig(opt_start_seq=max(1, start_seq), deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE))
