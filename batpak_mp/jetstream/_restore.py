"""Restore from a stream: a journal rebuilt from the JetStream stream a bridge filled.

Owns: ``restore_from_stream`` (and its ``StreamRestoreReport``): read the stream from sequence 1
through its last sequence at the start, check every message as the remote reader does
(``_mapping.ChainCheck``), write the frames byte for byte into new segment files of a
new data directory whose ``store.meta`` carries the original store id (requests kept
whole: a segment is cut only after a ``COMMIT_END`` frame, and sized like the engine's
own, ``_storage.planning.segment_bytes_for``), fsync them, then open the directory once
with the ``Engine`` so the full recovery builds every index file, seals every segment
but the newest and writes the checkpoint (FORMAT.md §11.2).
Invariants: the journal gets the same event ids, sequences, hashes and frames as the
original; nothing is written into a directory that holds anything; frames of a request
the stream holds only in part (a bridge stopped mid-group) are left out and counted; a
message that fails its check stops the restore with ``StreamTampered`` (the partial
directory is left for inspection, never served by mistake: it has no checkpoint).
Must not import the writer, the client, the service or the supervisor.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from nats.aio.msg import Msg

from .._errors import InvalidArgument, StreamMismatch, StreamUnavailable
from .._format.directory import META_FILE, SEGMENT_DIR
from .._format.frame import FLAG_COMMIT_END
from .._format.meta import encode_meta
from .._format.segment import SEG_HEADER_SIZE
from .._storage.config import EngineConfig
from .._storage.engine import Engine
from .._storage.osio import Disk
from .._storage.planning import segment_bytes_for
from .._storage.segments import ActiveSegment, SegmentFiles
from ._mapping import ChainCheck
from ._nats import NATS_ERRORS, LoopThread, check_store, follow, open_nats, stream_info

STALL_TIMEOUT_S = 30.0  # a restore that receives nothing for this long gives up (StreamUnavailable)


@dataclass(frozen=True)
class StreamRestoreReport:
    store_id: str  # hex
    events: int  # events written (= the restored journal's last sequence)
    stream_last: int  # the stream's last sequence when the restore started
    dropped_tail: int  # frames of a request the stream held only in part
    segments: int
    seconds: float


class _SegmentWriter:
    """Frames into segment files, a request at a time (never split across segments)."""

    def __init__(self, disk: Disk, data_dir: str, store_id: bytes, segment_max_bytes: int) -> None:
        self.disk = disk
        self.files = SegmentFiles(disk, os.path.join(data_dir, SEGMENT_DIR), store_id)
        self.size = segment_max_bytes
        self.seg: ActiveSegment | None = None
        self.count = 0
        self.written = 0

    def add(self, frames: list[bytes], first_seq: int) -> None:
        data = b"".join(frames)
        seg = self.seg
        if seg is None or segment_bytes_for(seg.end - SEG_HEADER_SIZE + len(data), seg.count + len(frames)) > seg.size:
            self.finish()
            self.count += 1
            seg = self.seg = self.files.create(self.count, first_seq,
                                               max(self.size, segment_bytes_for(len(data), len(frames))))
        self.disk.pwrite(seg.fd, data, seg.end, seg.path)
        seg.end += len(data)
        seg.count += len(frames)
        self.written += len(frames)

    def finish(self) -> None:
        seg, self.seg = self.seg, None
        if seg is not None:
            try:
                self.disk.fdatasync(seg.fd, seg.path)
            finally:
                self.disk.close_quietly(seg.fd, seg.path)


def _empty_target(disk: Disk, data_dir: str) -> None:
    if os.path.lexists(data_dir):
        if not os.path.isdir(data_dir):
            raise InvalidArgument("data_dir", data_dir, "exists and is not a directory")
        if disk.listdir(data_dir):
            raise InvalidArgument("data_dir", data_dir, "is not empty: restore writes a new journal only")
    disk.makedirs(data_dir)
    disk.makedirs(os.path.join(data_dir, SEGMENT_DIR))


def restore_from_stream(url: str, stream: str, data_dir: str | os.PathLike[str], *,
                        segment_max_bytes: int | None = None, disk: Disk | None = None) -> StreamRestoreReport:
    """Rebuild ``data_dir`` (missing or empty) from ``stream`` (see the module docstring)."""
    started = time.monotonic()
    disk = disk or Disk()
    path = os.path.abspath(os.fspath(data_dir))
    config = EngineConfig() if segment_max_bytes is None else EngineConfig(segment_max_bytes=segment_max_bytes)
    loop = LoopThread(f"batpak-restore-{stream}")
    try:
        try:
            store_hex, last, check = loop.run(_open(url, stream), STALL_TIMEOUT_S)
        except NATS_ERRORS as exc:  # TimeoutError included
            raise StreamUnavailable(url, stream, f"stream info: {type(exc).__name__}: {exc}") from None
        _empty_target(disk, path)
        store_id = bytes.fromhex(store_hex)
        disk.write_file_atomic(os.path.join(path, META_FILE), encode_meta(store_id, time.time_ns() // 1_000_000))
        writer = _SegmentWriter(disk, path, store_id, config.segment_max_bytes)
        pending: list[bytes] = []
        pending_first = 1
        received = [0]
        done = asyncio.Event()
        failure: list[BaseException] = []

        def on_msg(msg: Msg) -> None:
            nonlocal pending_first
            if done.is_set() or failure:
                return
            seq = msg.metadata.sequence.stream
            if seq < check.next_seq:  # a redelivery after the consumer reset: written already
                return
            if seq > last:
                done.set()
                return
            try:
                frame = check.check(seq, msg.subject, msg.headers, msg.data)
                if not pending:
                    pending_first = seq
                pending.append(bytes(msg.data))
                if frame.flags & FLAG_COMMIT_END:
                    writer.add(pending, pending_first)
                    pending.clear()
            except BaseException as exc:  # StreamTampered, StorageError: reported by the caller
                failure.append(exc)
                done.set()
                return
            received[0] = seq
            if seq == last:
                done.set()

        async def run() -> None:
            nc = await open_nats(url)
            try:
                subjects = (await stream_info(nc.jetstream(), stream))
                sub = await follow(nc.jetstream(), stream, 1, on_msg,
                                   subject=(subjects.config.subjects or [">"])[0] if subjects else ">")
                seen = -1
                while not done.is_set():
                    if received[0] == seen:
                        raise StreamUnavailable(url, stream, f"no message for {STALL_TIMEOUT_S} s "
                                                f"(at {received[0]} of {last})")
                    seen = received[0]
                    try:
                        await asyncio.wait_for(done.wait(), STALL_TIMEOUT_S)
                    except TimeoutError:
                        continue
                await sub.unsubscribe()
            finally:
                await nc.close()

        if last:
            try:
                loop.run(run())
            except NATS_ERRORS as exc:
                raise StreamUnavailable(url, stream, f"{type(exc).__name__}: {exc}") from None
        writer.finish()
        if failure:
            raise failure[0]
        Engine.open(path, config).close()  # the full recovery: index files, seals, checkpoint
        return StreamRestoreReport(store_hex, writer.written, last, len(pending), writer.count, time.monotonic() - started)
    finally:
        loop.close()


async def _open(url: str, stream: str) -> tuple[str, int, ChainCheck]:
    nc = await open_nats(url, reconnect=False)
    try:
        info = await stream_info(nc.jetstream(), stream)
    finally:
        await nc.close()
    if info is None:
        raise StreamMismatch(stream, "no such stream")
    store = check_store(stream, info, None)
    last = int(info.state.last_seq)
    if last and int(info.state.first_seq) != 1:
        raise StreamMismatch(stream, f"the stream starts at sequence {info.state.first_seq}: not a whole journal")
    return store, last, ChainCheck(stream, store)

