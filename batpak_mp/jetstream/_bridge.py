"""The bridge: every committed event of a served journal, published to a JetStream stream.

Owns: the bridge process's loop (``run_bridge``): learn from the stream where it stopped
(its last message, checked against the journal's frame at that sequence), read the
frames after it straight from the mapped files up to the control block's visible
frontier (each found through its index record, ``_read.reader.Reader``, the read path of
``Store``, and published as the bytes stored, checked whole by ``decode_frame``), publish each in commit
order on its entity's subject with the headers of ``_mapping`` and the server-side
expectation ``Nats-Expected-Last-Sequence`` = sequence - 1 (so stream sequence N is
global sequence N, and a second bridge, or anyone else, cannot interleave: its publish
is refused and it re-reads the stream), a sliding window of publishes in flight, acknowledgements
taken in order; and its status file ``bridge.status`` in the data directory (state,
published through, lag, events/s, errors; ``batpak-mp status`` shows it).
Invariants: the bridge keeps no state that can disagree with the stream (after any crash
it starts from the stream's last message); only visible (committed) frames are published;
a stream that names another store, or whose last message is not the journal's event at
that sequence, is refused with ``StreamMismatch`` before anything is published; a frame
that fails its hash is ``CorruptSegment`` (fail closed); NATS being away is retried
forever, counted and shown, never fatal.
Must not import the writer, the client (``Store``), the service or the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from .._errors import BatpakError, CorruptSegment, StreamMismatch, StreamUnavailable, WriterUnavailable
from .._format.directory import META_FILE, SEGMENT_DIR, segment_name
from .._format.frame import Frame, decode_frame
from .._format.meta import decode_meta
from .._format.record import R_FRAME_LEN, R_OFFSET, R_SEGMENT_ID
from .._ipc.control import ControlBlock
from .._read.reader import Reader, View, map_readonly
from .._storage.osio import Disk
from .._values import WriterState
from ._mapping import H_HASH, H_STORE, default_prefix, frame_version, publish_headers, subject_of
from ._nats import NATS_ERRORS, ensure_stream, get_message, open_nats

STATUS_FILE = "bridge.status"  # JSON in the data directory, rewritten (atomically) about once a second
STATUS_EVERY_S = 1.0  # how often the status file is rewritten while the bridge runs
WINDOW = 1024  # publishes in flight at most; each acknowledgement lets the next frame go (a sliding window)
ACK_TIMEOUT_S = 5.0  # a window not acknowledged within this is retried from the stream's last message
RETRY_S = 0.5  # pause after an error (NATS away, a refused publish) before looking at the stream again
IDLE_WAIT_S = 0.5  # longest wait on the control block's bell before looking again (the writer rings it)
ATTACH_WAIT_S = 0.5  # between attempts to find the service's control block
DRAIN_S = 5.0  # on SIGTERM: publish what is visible for at most this long, then exit
RATE_WINDOW_S = 5.0  # events/s in the status file is over roughly this long

EXIT_OK = 0
EXIT_REFUSED = 2  # the stream is another store's or diverged (WriterExit.USAGE: a restart cannot help)
EXIT_CORRUPT = 71  # a journal frame failed its check (WriterExit.CORRUPT)


@dataclass(frozen=True)
class BridgeConfig:
    data_dir: str
    url: str
    stream: str
    prefix: str | None = None  # subjects <prefix>.<entity token>; default batpak.<stream>
    replicas: int = 1  # of a stream the bridge creates (3 for an R3 stream on a cluster)
    supervisor_pid: int | None = None  # stop when the parent is no longer this process


@dataclass
class BridgeStatus:
    """What the status file says (docs/OPERATIONS.md "The bridge")."""

    pid: int
    url: str
    stream: str
    subject_prefix: str
    started_ms: int
    state: str = "starting"  # starting | connecting | publishing | idle | waiting | retrying | stopped | failed
    published_through: int = 0  # the stream's last sequence as the bridge knows it (= global sequence)
    visible: int = 0  # the journal's visible frontier at the last look
    lag_events: int = 0
    events_per_s: float = 0.0
    published_total: int = 0  # events this process published (acknowledged)
    errors: int = 0
    last_error: str | None = None
    last_error_ms: int | None = None
    updated_ms: int = 0
    _marks: list[tuple[float, int]] = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def read_status(data_dir: str) -> dict[str, Any] | None:
    """The bridge's status file of ``data_dir`` (None when there is none or it is unreadable)."""
    data = Disk().read_file(os.path.join(data_dir, STATUS_FILE))
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class _Journal:
    """The committed frames of a served directory: its control block and a reader."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.control = ControlBlock.attach(data_dir)
        self.reader = Reader(data_dir, self._view)
        self._segments: dict[int, mmap.mmap] = {}  # read-only maps of segment files, by id

    def _view(self) -> View:
        vis, base, delta, _state, revealed = self.control.frontier()
        return View(vis, base, delta, revealed)

    def visible(self) -> int:
        return int(self.control.frontier()[0])

    def gone(self) -> bool:
        """The service behind this control block stopped or failed (a new one may come,
        with a new block: attach again)."""
        return int(self.control.frontier()[3]) in (WriterState.STOPPED, WriterState.FAILED)

    def bell_value(self) -> int:
        bell = self.control.bell
        return int(bell.value) if bell is not None else 0

    def wait(self, seen: int, timeout: float) -> None:
        bell = self.control.bell
        if bell is None:
            time.sleep(timeout)
        else:
            bell.wait(seen, timeout)

    def frame(self, seq: int) -> tuple[Frame, bytes]:
        """The frame of a visible sequence and its bytes exactly as stored, found through
        its index record and checked whole (``decode_frame``: length, CRC, version, names,
        event hash) and against the sequence; a record that disagrees twice (after a
        refresh) is ``CorruptSegment``."""
        for attempt in range(2):
            rec = self.reader.record(seq)
            raw = self._bytes(rec[R_SEGMENT_ID], rec[R_OFFSET], rec[R_FRAME_LEN])
            try:
                frame = decode_frame(raw, segment=segment_name(rec[R_SEGMENT_ID]), offset=rec[R_OFFSET])
            except CorruptSegment:
                frame = None
            if isinstance(frame, Frame) and frame.global_sequence == seq and frame.frame_len == len(raw):
                return frame, raw
            if attempt:
                raise CorruptSegment(segment_name(rec[R_SEGMENT_ID]), rec[R_OFFSET],
                                     f"the frame of sequence {seq} fails its check")
            self.reader.refresh()
            self._segments.pop(rec[R_SEGMENT_ID], None)
        raise AssertionError("unreachable")

    def _bytes(self, segment_id: int, offset: int, length: int) -> bytes:
        m = self._segments.get(segment_id)
        if m is None or len(m) < offset + length:
            m = map_readonly(os.path.join(self.data_dir, SEGMENT_DIR, segment_name(segment_id)))
            if m is None:
                raise CorruptSegment(segment_name(segment_id), offset, "segment file is missing")
            old = self._segments.pop(segment_id, None)
            if old is not None:
                old.close()
            self._segments[segment_id] = m
        return bytes(m[offset:offset + length])

    def close(self) -> None:
        for m in self._segments.values():
            m.close()
        self._segments.clear()
        self.reader.close()
        self.control.close()


class _Reattach(Exception):
    """The service stopped: find its control block again (a new service makes a new one)."""


class _Rejected(Exception):
    """A publish of the window was refused or not acknowledged: look at the stream again."""


_RETRYABLE: tuple[type[BaseException], ...] = (_Rejected, *NATS_ERRORS)


class _Publisher:
    """Publishes with reply subjects of one inbox, so a window of publishes is in flight
    at once, in order on one connection; each acknowledgement (or refusal) resolves its
    sequence's future. (nats-py's own ``publish_async`` loses refusals.)"""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.sub: Any = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(self.inbox + ".*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        fut = self.waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if fut is None or fut.done():
            return
        try:
            doc = json.loads(msg.data)
        except ValueError:
            doc = {"error": {"description": f"unreadable acknowledgement {msg.data[:80]!r}"}}
        if not isinstance(doc, dict):
            doc = {"error": {"description": "acknowledgement is not an object"}}
        fut.set_result(doc)

    async def send(self, subject: str, body: bytes, headers: dict[str, str], seq: int) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[str(seq)] = fut
        await self.nc.publish(subject, body, reply=f"{self.inbox}.{seq}", headers=headers)
        return fut

    def forget(self) -> None:
        for fut in self.waiting.values():
            fut.cancel()
        self.waiting.clear()

    async def close(self) -> None:
        self.forget()
        if self.sub is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self.sub.unsubscribe()


class Bridge:
    """One bridge process's work (see the module docstring). ``run`` until ``stop``."""

    def __init__(self, config: BridgeConfig, *, disk: Disk | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg = config
        self.data_dir = os.path.abspath(config.data_dir)
        self.prefix = config.prefix or default_prefix(config.stream)
        self.disk = disk or Disk()
        self.log = log or (lambda msg: None)
        meta = self.disk.read_file(os.path.join(self.data_dir, META_FILE))
        if meta is None:
            raise WriterUnavailable(f"{self.data_dir!r} is not a batpak-mp data directory (no {META_FILE})")
        self.store_hex = decode_meta(meta, os.path.join(self.data_dir, META_FILE)).hex()
        self.status = BridgeStatus(os.getpid(), config.url, config.stream, self.prefix, _now_ms())
        self.stop = asyncio.Event()
        self._last_status = 0.0

    # -- status ---------------------------------------------------------------------------
    def _set(self, state: str, *, force: bool = False) -> None:
        changed = state != self.status.state
        self.status.state = state
        now = time.monotonic()
        if changed or force or now - self._last_status >= STATUS_EVERY_S:
            self._write_status(now)

    def _write_status(self, now: float) -> None:
        st = self.status
        marks = st._marks
        marks.append((now, st.published_total))
        while len(marks) > 2 and now - marks[1][0] >= RATE_WINDOW_S:
            marks.pop(0)
        t0, n0 = marks[0]
        st.events_per_s = round((st.published_total - n0) / (now - t0), 1) if now > t0 else 0.0
        st.lag_events = max(0, st.visible - st.published_through)
        st.updated_ms = _now_ms()
        self._last_status = now
        try:
            self.disk.write_file_atomic(os.path.join(self.data_dir, STATUS_FILE),
                                        (json.dumps(st.doc(), indent=1) + "\n").encode())
        except BatpakError:
            pass  # the status file is a courtesy: a full disk must not stop the bridge

    def _error(self, exc: BaseException) -> None:
        self.status.errors += 1
        self.status.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.status.last_error_ms = _now_ms()
        self.log(f"bridge: {self.status.last_error}")

    # -- the loop ---------------------------------------------------------------------------
    def _parent_gone(self) -> bool:
        return self.cfg.supervisor_pid is not None and os.getppid() != self.cfg.supervisor_pid

    async def _attach(self) -> _Journal:
        while True:
            try:
                return _Journal(self.data_dir)
            except WriterUnavailable as exc:
                self._set("waiting")
                if self.status.last_error != f"{type(exc).__name__}: {exc}"[:500]:
                    self._error(exc)
                if self.stop.is_set():
                    raise
                await asyncio.sleep(ATTACH_WAIT_S)

    async def run(self) -> int:
        """Publish until ``stop`` is set (then drain what is visible, up to ``DRAIN_S``)."""
        self._set("starting", force=True)
        try:
            journal: _Journal | None = await self._attach()
        except WriterUnavailable:
            self._set("stopped", force=True)
            return EXIT_OK
        nc: Client | None = None
        try:
            while journal is not None:
                if nc is None:
                    self._set("connecting")
                    try:
                        nc = await open_nats(self.cfg.url)
                    except StreamUnavailable as exc:
                        self._error(exc)
                        if self.stop.is_set():
                            break
                        await self._pause(RETRY_S)
                        continue
                try:
                    if await self._session(nc, journal):
                        break
                except _Reattach:  # the service stopped; a new one (new control block) may come
                    self._set("waiting")
                    journal.close()
                    journal = None
                    await self._pause(ATTACH_WAIT_S)
                    with contextlib.suppress(WriterUnavailable):  # raised only once asked to stop
                        journal = await self._attach()
                except StreamMismatch as exc:
                    self._error(exc)
                    self._set("failed", force=True)
                    return EXIT_REFUSED
                except CorruptSegment as exc:
                    self._error(exc)
                    self._set("failed", force=True)
                    return EXIT_CORRUPT
                except _RETRYABLE as exc:
                    self._error(exc)
                    self._set("retrying", force=True)
                    if self.stop.is_set() and self._drain_over():
                        break
                    await self._pause(RETRY_S)
            self._set("stopped", force=True)
            return EXIT_OK
        finally:
            if nc is not None:
                with contextlib.suppress(*NATS_ERRORS):
                    await asyncio.wait_for(nc.close(), 2.0)
            if journal is not None:
                journal.close()

    _stop_at: float | None = None

    def _drain_over(self) -> bool:
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        return time.monotonic() - self._stop_at > DRAIN_S

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _resume_point(self, js: Any, journal: _Journal) -> int:
        """The stream's last sequence, after checking its last message is this journal's."""
        info = await ensure_stream(js, self.cfg.stream, self.prefix, self.store_hex, self.cfg.replicas)
        last = int(info.state.last_seq)
        if last:
            msg = await get_message(js, self.cfg.stream, last)
            headers = msg.headers or {}
            if headers.get(H_STORE) != self.store_hex:
                raise StreamMismatch(self.cfg.stream, f"its last message ({last}) is not an event of store {self.store_hex}",
                                     self.store_hex, headers.get(H_STORE))
            while journal.visible() < last:  # the journal is behind the stream: a writer still recovering
                self._set("waiting")
                if self.stop.is_set() or self._parent_gone():
                    return -1
                await asyncio.to_thread(journal.wait, journal.bell_value(), IDLE_WAIT_S)
            mine = journal.frame(last)[0].event_hash.hex()
            if headers.get(H_HASH) != mine:
                raise StreamMismatch(self.cfg.stream, f"its message {last} is not the journal's event {last} "
                                     "(the stream and the journal diverged)", mine, headers.get(H_HASH))
        return last

    def _acknowledged(self, seq: int, ack: dict[str, Any]) -> None:
        """One acknowledgement, in order; a refusal or a misplaced message is ``_Rejected``
        (the session ends and the next one starts from the stream's last message)."""
        err = ack.get("error")
        if err is not None:
            raise _Rejected(f"publish of sequence {seq} refused: {err.get('description', err)}")
        if ack.get("seq") != seq:
            raise _Rejected(f"sequence {seq} stored at stream sequence {ack.get('seq')}")
        st = self.status
        st.published_through = seq
        if not ack.get("duplicate"):
            st.published_total += 1

    async def _session(self, nc: Client, journal: _Journal) -> bool:
        """Publish from where the stream ends; True when asked to stop and drained."""
        js = nc.jetstream()
        last = await self._resume_point(js, journal)
        if last < 0:
            return True
        st = self.status
        st.published_through = last
        pub = _Publisher(nc)
        await pub.start()
        inflight: deque[tuple[int, asyncio.Future[dict[str, Any]]]] = deque()  # sent, not yet acknowledged
        try:
            nxt = last + 1
            while True:
                if self._parent_gone():
                    self.stop.set()
                seen = journal.bell_value()
                visible = st.visible = journal.visible()
                if self.stop.is_set() and self._drain_over():
                    return True
                while len(inflight) < WINDOW and nxt <= visible:  # keep the window full
                    frame, raw = journal.frame(nxt)
                    inflight.append((nxt, await pub.send(subject_of(self.prefix, frame.entity), raw,
                                                         publish_headers(frame, self.store_hex, frame_version(raw)), nxt)))
                    nxt += 1
                if inflight:
                    self._set("publishing")
                    try:
                        await asyncio.wait_for(asyncio.shield(inflight[0][1]), ACK_TIMEOUT_S)
                    except TimeoutError:
                        pub.forget()
                        raise _Rejected(f"sequence {inflight[0][0]} not acknowledged within {ACK_TIMEOUT_S} s") from None
                    while inflight and inflight[0][1].done():
                        seq, fut = inflight.popleft()
                        self._acknowledged(seq, fut.result())
                    continue
                if self.stop.is_set():
                    return True
                if journal.gone():
                    raise _Reattach()
                self._set("idle")
                await asyncio.to_thread(journal.wait, seen, IDLE_WAIT_S)
        finally:
            await pub.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def run_bridge(config: BridgeConfig, *, log: Callable[[str], None] | None = None) -> int:
    """Run a bridge in this process until SIGTERM/SIGINT (or its supervisor is gone);
    returns its exit code (``EXIT_OK``, ``EXIT_REFUSED``, ``EXIT_CORRUPT``)."""
    bridge = Bridge(config, log=log)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop.set)
        return await bridge.run()

    return asyncio.run(main())
