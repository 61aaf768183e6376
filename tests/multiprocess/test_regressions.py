"""Regression tests for defects found in review: each names what used to go wrong."""

from __future__ import annotations

import os
import shutil
import threading
import time

import msgpack
import posix_ipc
import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import CHECKPOINT_FILE, SEGMENT_DIR, segment_name
from batpak_mp._format.segment import SEG_HEADER_SIZE
from batpak_mp._ipc import wire as W
from batpak_mp._ipc.names import ipc_prefix, request_queue_name

K = bp.Kind(1, 1)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_nul_in_area_name_does_not_kill_the_writer(service: tuple[bp.Service, str]) -> None:
    """posix_ipc crashed (SIGSEGV) on a shared-memory name with a NUL byte."""
    svc, data_dir = service
    pid_before = svc.writer_pid
    q = posix_ipc.MessageQueue(request_queue_name(data_dir))
    prefix = ipc_prefix(data_dir)
    for name in (prefix + "-c1-ab\x00cd", prefix + "-c1-../../x", prefix + "-c1-" + "a" * 220):
        q.send(msgpack.packb([W.WIRE_VERSION, os.getpid(), name, 1]), 2)
    with pytest.raises(ValueError):  # a name past NAME_MAX does not fit a message (MAX_MESSAGE): the kernel refuses
        q.send(msgpack.packb([W.WIRE_VERSION, os.getpid(), prefix + "-c1-" + "a" * 300, 1]), 2)
    q.close()
    with bp.connect(data_dir) as s:
        assert s.append(bp.Coordinate("after", "nul"), K, 1).global_sequence > 0
    assert svc.writer_pid == pid_before


def test_tiny_client_area_does_not_crash_the_writer(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    pid_before = svc.writer_pid
    name = f"{ipc_prefix(data_dir)}-c{os.getpid()}-deadbeef"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=16)
    try:
        os.pwrite(shm.fd, W.REPLY_TO.pack(0) + W.LEN.pack(4) + b"\x94\x02\x01\x00", 0)
        q = posix_ipc.MessageQueue(request_queue_name(data_dir))
        q.send(W.encode_message(W.Message(W.WIRE_VERSION, os.getpid(), name, 1)), 2)
        q.close()
        with bp.connect(data_dir) as s:
            assert s.append(bp.Coordinate("after", "tiny"), K, 1).global_sequence > 0
        assert svc.writer_pid == pid_before
    finally:
        shm.close_fd()
        shm.unlink()


def test_fork_while_another_thread_holds_the_store_lock(service: tuple[bp.Service, str]) -> None:
    """The child inherited a held lock and hung on its first call."""
    _, data_dir = service
    store = bp.connect(data_dir)
    r = store.append(bp.Coordinate("forklock", "s"), K, 1)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:
        try:
            ok = store.get(r.event_id).payload == 1 and store.append(bp.Coordinate("forklock", "s"), K, 2)
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    release.set()
    t.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the forked child hung on the inherited lock")
    store.close()


def test_duplicate_key_inside_one_batch_is_refused(data_dir: str) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        items = [bp.BatchItem(bp.Coordinate("a", "s"), K, i, idempotency_key="same") for i in range(2)]
        with pytest.raises(bp.InvalidArgument):
            e.append_batch(items)
        assert e.visible == 0
    assert_verified(data_dir)


def test_damage_below_the_floor_is_reported_before_anything_is_zeroed(data_dir: str, tmp_path: os.PathLike[str]) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        for i in range(20):
            e.append(bp.Coordinate("a", "s"), K, {"i": i})
    seg = os.path.join(data_dir, SEGMENT_DIR, segment_name(1))
    with open(seg, "r+b") as f:
        f.seek(SEG_HEADER_SIZE + 200 * 5)  # somewhere inside the first few frames
        f.write(b"\xff" * 64)
    before = _read(seg)
    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(data_dir, SMALL)
    assert _read(seg) == before  # the evidence is intact
    assert not bp.verify(data_dir).ok


def test_damaged_checkpoint_refuses_to_open(data_dir: str, tmp_path: os.PathLike[str]) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        e.append(bp.Coordinate("a", "s"), K, 1)
    copy = os.path.join(os.fspath(tmp_path), "copy")
    shutil.copytree(data_dir, copy)
    path = os.path.join(copy, CHECKPOINT_FILE)
    raw = bytearray(_read(path))
    raw[12] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(copy, SMALL)
    assert_verified(data_dir)


def test_second_serve_leaves_the_running_service_alone(service: tuple[bp.Service, str]) -> None:
    """A second `batpak-mp serve` of a served directory exits 4 and used to unlink the
    live service's control block and queue on its way out."""
    import subprocess
    import sys

    svc, data_dir = service
    exe = os.path.join(os.path.dirname(sys.executable), "batpak-mp")
    r = subprocess.run([exe, "serve", data_dir], capture_output=True, text=True, timeout=60)
    assert r.returncode == 4, r.stderr
    with bp.connect(data_dir) as s:
        assert s.append(bp.Coordinate("still", "served"), K, 1).global_sequence > 0
    assert svc.status()["state"] == "ready"


def test_engine_stamps_the_registered_payload_version(data_dir: str) -> None:
    kind = bp.Kind(3, 33)
    bp.register_payload(kind, 2, upcasters={1: lambda p: {**p, "v2": True}})
    try:
        with bp.Engine.open(data_dir, SMALL) as e:
            r = e.append(bp.Coordinate("pv", "s"), kind, {"a": 1})
            [b] = e.append_batch([bp.BatchItem(bp.Coordinate("pv", "s"), kind, {"a": 2})])
            old = e.append(bp.Coordinate("pv", "s"), kind, {"a": 0}, payload_version=1)
            assert e.get(r.event_id).payload_version == 2 and e.get(b.event_id).payload_version == 2
            assert e.get(old.event_id).payload == {"a": 0, "v2": True}  # upcast on read, stored as is
    finally:
        bp.unregister_payload(kind)
    assert_verified(data_dir)


def test_client_area_is_given_back_after_a_large_payload(service: tuple[bp.Service, str]) -> None:
    _, data_dir = service
    with bp.connect(data_dir) as s:
        s.append(bp.Coordinate("big", "s"), K, 1)
        small = s._channel.idle_areas()
        s.append(bp.Coordinate("big", "s"), K, b"x" * (4 << 20))  # needs an area of 8 MiB for one request
        assert [a.name for a in s._channel.idle_areas()] == [a.name for a in small]  # the big one is not kept
        mine = [n for n in os.listdir("/dev/shm") if f"-c{os.getpid()}-" in n]
        assert sorted(mine) == sorted(a.name.lstrip("/") for a in small)  # ...and is unlinked
        assert all(a.size == 64 * 1024 for a in small)
        s.append(bp.Coordinate("big", "s"), K, 1)
        assert s._channel.idle_areas()[-1].size == 64 * 1024
