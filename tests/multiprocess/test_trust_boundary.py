"""The trust boundary of a served store (issue 10 items 1-5; docs/OPERATIONS.md "Trust model").

Each test plays a hostile neighbour with real processes: another local user squatting the
store's IPC names, odd files in /dev/shm, a same-user client abusing its own area, hostile
requests sized to blow up a decoder, and fence abuse. The service must stay up with the
same writer, append nothing it did not get from its owner's clients, and verify clean.
The cross-user tests act as ``nobody`` through ``setpriv`` and need root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import msgpack
import psutil
import pytest
from _raw_client import NOBODY, RawArea, item, open_queue, request, run_as, shm_path
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp._ipc import control as C
from batpak_mp._ipc import wire as W
from batpak_mp._ipc.names import SHM_DIR, control_name, ipc_prefix, request_queue_name

K = bp.Kind(1, 1)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another local user (setpriv) needs root")
OTHER_UID = 12345  # a second unprivileged uid that owns a whole service in some tests


def _purge(prefix: str) -> None:
    """Remove whatever a test left in /dev/shm under the store's prefix (any owner, any type)."""
    tail = prefix.lstrip("/")
    for entry in os.listdir(SHM_DIR):
        if entry.startswith((tail, "sem." + tail)):
            path = os.path.join(SHM_DIR, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
    try:
        import posix_ipc

        posix_ipc.unlink_message_queue(prefix + "-req")
    except Exception:
        pass


@pytest.fixture
def purge(data_dir: str) -> Iterator[str]:
    prefix = ipc_prefix(data_dir)
    yield prefix
    _purge(prefix)


def _alive(svc: bp.Service, writer_pid: int) -> None:
    """The service is up with the same writer and supervisor, and takes an append."""
    st = svc.status()
    assert st["supervisor_alive"], st
    assert svc.writer_pid == writer_pid, st
    assert st["restarts"] == 0, st
    with bp.connect(svc.data_dir, timeout=10) as s:
        assert s.append(bp.Coordinate("honest", "after"), K, {"ok": True}).global_sequence > 0


def _history(data_dir: str, entity: str) -> list[bp.Event]:
    with bp.connect(data_dir, timeout=10) as s:
        return s.history(entity)


# -- 1. another local user squatting the IPC names ----------------------------------------------
SQUAT = r"""
import json, os, struct, sys, time
import posix_ipc
import _raw_client as R
from batpak_mp._ipc import wire as W

ctl_name, q_name, prefix, size, magic, version = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
os.umask(0)
shm = posix_ipc.SharedMemory(ctl_name, posix_ipc.O_CREX, mode=0o666, size=size)
os.pwrite(shm.fd, struct.pack("<QI", magic, version), 0)
os.pwrite(shm.fd, struct.pack("<Q", 2), 40)  # state READY: lure clients
q = posix_ipc.MessageQueue(q_name, posix_ipc.O_CREX, mode=0o666, max_messages=R.Q_DEPTH, max_message_size=R.Q_MSG)
print("squatted", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
out = {}
area = None
try:
    q2 = R.open_queue(q_name)
    area = R.RawArea(prefix, mode=0o666)
    area.put(R.request(W.OP_APPEND, 7, [R.item("acct:victim", {"forged_by_uid": os.getuid()})]))
    area.send(q2, 7)
    r = area.reply(7, 2.0)
    out["queue"] = "sent" if r is None else f"answered {r.status}"
except Exception as e:
    out["queue"] = f"denied: {type(e).__name__}"
try:
    fd = os.open("/dev/shm/" + ctl_name[1:], os.O_RDWR)
    os.ftruncate(fd, 0)
    out["ctl"] = "truncated the live control block"
except OSError as e:
    out["ctl"] = f"denied: errno {e.errno}"
os.ftruncate(shm.fd, 0)  # the object it created, named or not any more
time.sleep(0.5)
if area is not None:
    area.close()
print(json.dumps(out), flush=True)
"""


def _squat(data_dir: str) -> subprocess.Popen[str]:
    """``nobody`` creates the store's control block (0666, looking READY) and request queue
    (0666) before the service starts, and waits for "go"."""
    args = [control_name(data_dir), request_queue_name(data_dir), ipc_prefix(data_dir), str(C.CONTROL_SIZE),
            str(C.CONTROL_MAGIC), str(C.CONTROL_VERSION)]
    p = run_as(NOBODY, SQUAT + "\n", stdin=subprocess.PIPE, args=args)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "squatted"
    return p


@ROOT_ONLY
@pytest.mark.parametrize("moment", ["first_start", "after_stop", "after_reset_ipc"])
def test_another_user_cannot_squat_the_ipc_names(data_dir: str, purge: str, moment: str) -> None:
    """Issue 10 #1: names are predictable; an object another user made before the start
    is not adopted: the service makes its own, the squatter appends nothing and cannot
    SIGBUS anyone by truncating what it made."""
    os.makedirs(data_dir, mode=0o700)
    if moment != "first_start":
        with bp.serve(data_dir) as svc, bp.connect(data_dir) as s:
            s.append(bp.Coordinate("before", "stop"), K, 1)
        if moment == "after_reset_ipc":
            subprocess.run([sys.executable, "-m", "batpak_mp.cli", "reset-ipc", "--yes", data_dir], check=True,
                           capture_output=True)
    squatter = _squat(data_dir)
    assert squatter.stdin is not None and squatter.stdout is not None
    try:
        svc = bp.serve(data_dir, restart=bp.RestartPolicy.bounded(3, 60_000))
    except BaseException:
        squatter.kill()
        raise
    try:
        pid = svc.writer_pid
        squatter.stdin.write("go\n")
        squatter.stdin.flush()
        out = json.loads(squatter.stdout.readline())
        assert squatter.wait(10) == 0
        assert out["queue"].startswith("denied"), out
        assert out["ctl"].startswith("denied"), out
        time.sleep(0.3)  # a heartbeat or two: a truncated block would SIGBUS writer and supervisor now
        _alive(svc, pid)
        assert _history(data_dir, "acct:victim") == []
    finally:
        code = svc.stop()
    assert code == 0
    assert_verified(data_dir)


@ROOT_ONLY
def test_squatted_names_are_refused_with_their_owner_when_they_cannot_be_removed(data_dir: str) -> None:
    """A service of a non-root user cannot unlink another user's objects in /dev/shm
    (sticky): it refuses to start, naming the object and its owner, instead of using them."""
    base = tempfile.mkdtemp(prefix="bp-trust-", dir="/tmp")
    os.chown(base, OTHER_UID, OTHER_UID)
    path = os.path.join(base, "data")
    squatter = _squat(path)
    try:
        code = ("import sys, batpak_mp as bp\n"
                "try:\n    svc = bp.serve(sys.argv[1], ready_timeout=30)\n"
                "except Exception as e:\n    print('refused', type(e).__name__, e)\n"
                "else:\n    print('started', svc.writer_pid); svc.stop()\n")
        p = run_as(OTHER_UID, code, args=[path])
        out, _ = p.communicate(timeout=60)
        assert out.startswith("refused"), out
        assert control_name(path) in out and str(NOBODY) in out, out
    finally:
        squatter.kill()
        squatter.wait()
        _purge(ipc_prefix(path))
        shutil.rmtree(base, ignore_errors=True)


@ROOT_ONLY
def test_a_client_refuses_objects_another_user_made(data_dir: str, purge: str) -> None:
    """With no service up, ``connect`` finds a control block that looks READY and a queue,
    both made by another user: it refuses them (naming the owner) and sends nothing."""
    os.makedirs(data_dir, mode=0o700)
    squatter = _squat(data_dir)
    try:
        with pytest.raises(PermissionError, match=str(NOBODY)):
            bp.connect(data_dir, timeout=2).close()
    finally:
        squatter.kill()
        squatter.wait()


# -- 2. hostile files in /dev/shm under the store's prefix --------------------------------------
def _hostile_entries(prefix: str) -> list[str]:
    """Files a stray process (or another user) left under the prefix: each parses as a
    dead client's object, or almost does."""
    tail = prefix.lstrip("/")
    made = []
    for name in (f"{tail}-c9999999999-ab", f"{tail}-c\u0661\u0662\u0663-ab", f"{tail}-c4194305-ab",
                 f"sem.{tail}-c9999999999-abs", f"{tail}-c99999-cd"):
        path = os.path.join(SHM_DIR, name)
        with open(path, "wb"):
            pass
        made.append(path)
    os.chown(made[-1], NOBODY, NOBODY)  # another user's, pid 99999 > pid_max: "dead"
    d = os.path.join(SHM_DIR, f"{tail}-c99998-ef")
    os.mkdir(d)
    link = os.path.join(SHM_DIR, f"{tail}-c99997-aa")
    os.symlink("/etc/hostname", link)
    return [*made, d, link]


@ROOT_ONLY
def test_odd_files_under_the_prefix_do_not_stop_the_service(data_dir: str, purge: str) -> None:
    """Issue 10 #2: the dead-client sweep at start (and every 5 s) skips what is not a
    regular file of the service's own user or does not parse strictly."""
    entries = _hostile_entries(purge)
    svc = bp.serve(data_dir, restart=bp.RestartPolicy.once())
    try:
        pid = svc.writer_pid
        time.sleep(5.5)  # one periodic sweep too
        _alive(svc, pid)
        assert os.path.exists("/etc/hostname")
        for path in entries[-3:]:  # another user's file, the directory, the symlink: left alone
            assert os.path.lexists(path), path
    finally:
        for path in entries[-2:]:  # not the cleanup's business (tested below)
            (os.rmdir if not os.path.islink(path) else os.unlink)(path)
        code = svc.stop()
    assert code == 0
    assert_verified(data_dir)


@ROOT_ONLY
def test_cleanup_and_reset_ipc_survive_odd_files(data_dir: str, purge: str) -> None:
    """``cleanup_ipc`` (run by ``Service.stop``) and ``batpak-mp reset-ipc`` skip what they
    cannot or must not remove instead of crashing on it."""
    from batpak_mp._service import cleanup_ipc

    with bp.serve(data_dir) as svc, bp.connect(data_dir) as s:
        s.append(bp.Coordinate("a", "b"), K, 1)
        assert svc.writer_pid
    entries = _hostile_entries(purge)
    cleanup_ipc(data_dir)
    r = subprocess.run([sys.executable, "-m", "batpak_mp.cli", "reset-ipc", "--yes", data_dir], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.exists("/etc/hostname")
    assert os.path.isdir(entries[-2])


# -- 3. a same-user client abusing its own area ---------------------------------------------------
def _queue(data_dir: str) -> object:
    return open_queue(request_queue_name(data_dir))


def test_truncating_an_area_while_its_request_is_in_flight(service: tuple[bp.Service, str]) -> None:
    """Issue 10 #3: the writer never maps client memory: a truncated area is a short read."""
    svc, data_dir = service
    pid = svc.writer_pid
    q = open_queue(request_queue_name(data_dir))
    for size in (0, 5):
        area = RawArea(ipc_prefix(data_dir))
        try:
            assert area.call(q, W.OP_APPEND, [item("trunc", 1)], 1) is not None  # the writer knows the area now
            area.put(request(W.OP_APPEND, 2, [item("trunc", 2)]))
            area.send(q, 2)
            os.ftruncate(area.fd, size)
            for rid in range(3, 13):  # and a few more into the truncated area
                area.send(q, rid)
            time.sleep(0.3)
        finally:
            area.close()
        _alive(svc, pid)
    q.close()


def test_a_zero_length_doorbell_file(service: tuple[bp.Service, str]) -> None:
    """A client's own doorbell file truncated to nothing (the old semaphores) is nothing
    the writer opens: doorbells are words in the writer's own control block."""
    svc, data_dir = service
    pid = svc.writer_pid
    q = open_queue(request_queue_name(data_dir))
    area = RawArea(ipc_prefix(data_dir))
    sem = os.path.join(SHM_DIR, "sem." + area.name.lstrip("/") + "s")
    try:
        with open(sem, "wb"):
            pass
        area.put(request(W.OP_APPEND, 1, [item("doorbell", 1)]))
        area.send(q, 1)
        time.sleep(0.3)
        _alive(svc, pid)
    finally:
        area.close()
        if os.path.exists(sem):
            os.unlink(sem)
        q.close()


@pytest.mark.parametrize("how", ["hardlink", "symlink"])
def test_an_area_name_linked_to_the_control_block(service: tuple[bp.Service, str], how: str) -> None:
    """Issue 10 #3: a reply must never land in the control block (its magic once got
    overwritten and every later connect failed)."""
    svc, data_dir = service
    pid = svc.writer_pid
    prefix = ipc_prefix(data_dir)
    q = open_queue(request_queue_name(data_dir))
    decoy = RawArea(prefix)  # a real area: the name the link takes is one of this process
    name, path = decoy.name, decoy.path
    decoy.close()
    ctl = shm_path(control_name(data_dir))
    (os.link if how == "hardlink" else os.symlink)(ctl, path)
    sem = os.path.join(SHM_DIR, "sem." + name.lstrip("/") + "s")
    try:
        q.send(msgpack.packb([W.WIRE_VERSION, os.getpid(), name, 5]), 1.0)
        time.sleep(0.3)
        with open(ctl, "rb") as f:
            magic, version = struct.unpack("<QI", f.read(12))
        assert (magic, version) == (C.CONTROL_MAGIC, C.CONTROL_VERSION)
        _alive(svc, pid)
    finally:
        os.unlink(path)
        if os.path.exists(sem):
            os.unlink(sem)
        q.close()


@ROOT_ONLY
def test_an_area_of_another_owner_is_refused(service: tuple[bp.Service, str]) -> None:
    """A message naming an area another user made (and could rewrite at any time) is
    dropped: the writer reads requests only from areas of its own user."""
    svc, data_dir = service
    pid = svc.writer_pid
    area = RawArea(ipc_prefix(data_dir), mode=0o666)
    try:
        os.fchown(area.fd, NOBODY, NOBODY)
        area.put(request(W.OP_APPEND, 1, [item("acct:foreign", {"by": NOBODY})]))
        q = open_queue(request_queue_name(data_dir))
        area.send(q, 1)
        q.close()
        assert area.reply(1, 1.0) is None
        _alive(svc, pid)
        assert _history(data_dir, "acct:foreign") == []
    finally:
        area.close()


# -- 4. bounded decoding ------------------------------------------------------------------------
def _tree(depth: int) -> bytes:
    """A 9-ary tree of empty arrays: ``depth`` levels, one byte per array."""
    return b"\x90" if depth == 0 else b"\x99" + _tree(depth - 1) * 9


def _hostile_requests() -> list[tuple[str, bytes]]:
    """Requests of about 3.5 MB made of objects as small as msgpack allows."""
    rid = 1
    many = request(W.OP_APPEND, rid, [])[:-1] + b"\xdd" + struct.pack(">I", 4000) + _tree(3) * 4000
    nested = request(W.OP_APPEND, rid, [])[:-1] + b"\xdd" + struct.pack(">I", 3500) + (b"\x91" * 1000 + b"\xc0") * 3500
    flat = request(W.OP_APPEND, rid, [])[:-1] + b"\xdd" + struct.pack(">I", 3_500_000) + b"\xc0" * 3_500_000
    maps = request(W.OP_APPEND, rid, [])[:-1] + b"\x91\x99" + b"\xdd" + struct.pack(">I", 3_500_000) + b"\x80" * 3_500_000
    return [("many tiny arrays", many), ("deeply nested", nested), ("flat nils", flat), ("empty maps", maps)]


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.slow
def test_hostile_requests_keep_the_writer_small_and_responsive(service: tuple[bp.Service, str]) -> None:
    """Issue 10 #4: decoding is bounded by fixed limits, not by the area a client picked:
    ~3.5 MB requests of tiny or nested objects and a sparse 1 GiB area grow the writer by
    a bounded amount (measured as peak RSS, VmHWM) and never stall its loop."""
    svc, data_dir = service
    pid = svc.writer_pid
    prefix = ipc_prefix(data_dir)
    q = open_queue(request_queue_name(data_dir))
    with bp.connect(data_dir) as s:
        for i in range(50):
            s.append(bp.Coordinate("warm", "up"), K, {"i": i})
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    base = _vm(pid, "VmRSS")
    largest = 0
    stop = threading.Event()
    worst_latency = [0.0]

    def honest() -> None:
        with bp.connect(data_dir) as s:
            while not stop.is_set():
                t = time.monotonic()
                s.append(bp.Coordinate("honest", "during"), K, {"t": t})
                worst_latency[0] = max(worst_latency[0], time.monotonic() - t)
                time.sleep(0.01)

    t = threading.Thread(target=honest)
    t.start()
    try:
        for what, body in _hostile_requests():
            area = RawArea(prefix, size=1 << 22)
            try:
                largest = max(largest, len(body))
                area.put(body)
                area.send(q, 1)
                r = area.reply(1, 10.0)
                assert r is not None and r.status == W.STATUS_ERROR, (what, r)
            finally:
                area.close()
        # a sparse 1 GiB area (4 KiB of real memory): a bin claiming most of it, and a
        # length claiming all of it
        for claim in (1 << 29, (1 << 30) - 64):
            area = RawArea(prefix, size=1 << 30, sparse=True)
            try:
                head = request(W.OP_APPEND, 1, [])[:-1] + b"\x91\x99\xc4\x01e\xc4\x01s\x01\xc6" + struct.pack(">I", claim)
                area.put(head, length=claim + len(head))
                area.send(q, 1)
                r = area.reply(1, 10.0)
                assert r is not None and r.status == W.STATUS_ERROR, r
            finally:
                area.close()
    finally:
        stop.set()
        t.join()
        q.close()
    growth = _vm(pid, "VmHWM") - base
    sys.stderr.write(f"writer peak RSS growth {growth / 2**20:.1f} MiB for requests of {largest / 2**20:.1f} MiB; "
                     f"honest append worst latency {worst_latency[0] * 1000:.0f} ms\n")
    assert growth <= 2 * largest + 16 * 2**20, growth  # docs/OPERATIONS.md "Trust model": the memory bound
    assert worst_latency[0] < 1.0  # the hang timeout is 3 s: the loop never came near it
    _alive(svc, pid)


# -- 5. fences ------------------------------------------------------------------------------------
def test_one_client_cannot_take_every_fence(service: tuple[bp.Service, str]) -> None:
    """Issue 10 #5: a per-client cap; another client still gets a fence."""
    svc, data_dir = service
    pid = svc.writer_pid
    held = []
    with bp.connect(data_dir) as greedy:
        with pytest.raises(bp.InvalidArgument):
            for _ in range(5000):
                held.append(greedy.fence())
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # another client process
            ok = b"0"
            try:
                with bp.connect(data_dir) as other, other.fence() as f:
                    f.append(bp.Coordinate("fenced", "other"), K, 1)
                ok = b"1"
            finally:
                os.write(w, ok)
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(child, 0)
        for f in held:
            f.cancel()
    assert len(held) < 100
    _alive(svc, pid)


def _fence_hijack(data_dir: str, token: bytes, victim: int, forge_name: bool, out: int) -> None:
    """In a child: commit someone else's fence, claiming their pid (and naming the area
    with their pid too, when ``forge_name``)."""
    status = b"?"
    try:
        area = RawArea(ipc_prefix(data_dir), pid=victim if forge_name else None)
        q = open_queue(request_queue_name(data_dir))
        area.put(request(W.OP_FENCE_COMMIT, 3, token))
        area.send(q, 3, pid=victim)
        r = area.reply(3, 2.0)
        status = b"n" if r is None else (b"k" if r.status == W.STATUS_OK else b"e")
        area.close()
    finally:
        os.write(out, status)
        os._exit(0)


@pytest.mark.parametrize("forge_name", [False, True])
def test_a_fence_belongs_to_the_process_that_opened_it(service: tuple[bp.Service, str], forge_name: bool) -> None:
    """Issue 10 #5: the owner of a fence is the client area the writer checked (its pid
    verified by the kernel), not the pid a message claims."""
    svc, data_dir = service
    pid = svc.writer_pid
    with bp.connect(data_dir) as s:
        fence = s.fence()
        fence.append(bp.Coordinate("fenced", "mine"), K, 1)
        victim = os.getpid()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            _fence_hijack(data_dir, fence.token, victim, forge_name, w)
        os.close(w)
        got = os.read(r, 1)
        os.waitpid(child, 0)
        assert got in (b"n", b"e"), got  # refused (an error reply, or dropped)
        assert s.history("fenced") == []  # still hidden
        fence.append(bp.Coordinate("fenced", "mine"), K, 2)
        fence.commit()
        assert [e.payload for e in s.history("fenced")] == [1, 2]
    _alive(svc, pid)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_fenced_appends_racing_the_dead_owner_sweep(service: tuple[bp.Service, str]) -> None:
    """Issue 10 #5: fenced appends keep arriving for a fence whose claimed owner is dead
    while the dead-owner sweep (every 5 s) cancels it; the sweep used to meet an append
    waiting for its fsync and the writer died of a KeyError in ``Fences.written``."""
    svc, data_dir = service
    pid = svc.writer_pid
    prefix = ipc_prefix(data_dir)
    dead = _dead_pid()
    q = open_queue(request_queue_name(data_dir))
    areas = [RawArea(prefix, pid=dead) for _ in range(8)]
    try:
        areas[0].put(request(W.OP_FENCE_BEGIN, 1, None))
        areas[0].send(q, 1, pid=dead)
        r = areas[0].reply(1, 2.0)
        token = r.data[0] if r is not None and r.status == W.STATUS_OK else secrets.token_bytes(16)
        rid = 10
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            for a in areas:
                rid += 1
                a.put(request(W.OP_APPEND_FENCED, rid, [token, [item("race", rid)]]))
                try:
                    a.send(q, rid, pid=dead)
                except Exception:
                    pass
            time.sleep(0.002)
    finally:
        for a in areas:
            a.close()
        q.close()
    time.sleep(0.3)
    _alive(svc, pid)


def test_fence_lost_when_the_sweep_cancels_a_fence_whose_append_awaits_fsync(data_dir: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race made deterministic: a writer driven in-process writes a fenced append
    (pipelined: its fsync not yet done), the owner is found dead and the fence cancelled,
    then the fsync completes: the append is answered FenceLost and the writer goes on."""
    from batpak_mp import writer as Wr

    os.makedirs(data_dir, mode=0o700)
    w = Wr.Writer(data_dir, bp.EngineConfig(segment_max_bytes=1 << 20))
    area = RawArea(ipc_prefix(data_dir))
    try:
        area.put(request(W.OP_FENCE_BEGIN, 1, None))
        w.handle([msgpack.packb([W.WIRE_VERSION, os.getpid(), area.name, 1])])
        r = area.reply(1, 1.0)
        assert r is not None and r.status == W.STATUS_OK, r
        token = r.data[0]
        area.put(request(W.OP_APPEND_FENCED, 2, [token, [item("fenced", 1)]]))
        w.handle([msgpack.packb([W.WIRE_VERSION, os.getpid(), area.name, 2])], pipelined=True)
        assert w.engine.groups_written > w.engine.groups_published  # waiting for its fsync
        monkeypatch.setattr(Wr, "pid_alive", lambda p: p != os.getpid())
        w.fences.cancel_dead()
        fd, path, _ = w.engine.pending_sync_target()
        w.engine.disk.fdatasync(fd, path)
        w._sync_done(Wr._SyncDone(w.engine.groups_written, None, path))
        r = area.reply(2, 1.0)
        assert r is not None and r.status == W.STATUS_ERROR and r.data[0] == "FenceLost", r
    finally:
        area.close()
        w.close(clean=True)
        _purge(ipc_prefix(data_dir))
    assert_verified(data_dir)


def test_killing_a_client_mid_request_leaves_the_writer_alone(service: tuple[bp.Service, str]) -> None:
    """A client SIGKILLed while its append is in flight: the writer answers into an area
    nobody reads and sweeps it later; it does not notice otherwise."""
    svc, data_dir = service
    pid = svc.writer_pid
    for _ in range(5):
        child = os.fork()
        if child == 0:
            with bp.connect(data_dir) as s:
                while True:
                    s.append(bp.Coordinate("killed", "mid"), K, b"x" * 1000)
        time.sleep(0.1)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    _alive(svc, pid)
    assert psutil.pid_exists(pid)
