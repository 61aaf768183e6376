"""The hostile-client suite (issue 10 #6): thousands of generated hostile actions against
one served store while honest clients append.

A few hostile processes (same user as the service: the most a local client can be) each
run a seeded stream of actions through the raw protocol (tests/_raw_client.py): random
and malformed queue messages, requests that are garbage, oversized, nested or sized to
blow up a decoder, areas truncated mid-request, areas that are links, FIFOs, sparse
giants or open to others, floods of the queue, fence abuse (more fences than allowed,
tokens not theirs, forged pids), garbage written over the replies' areas, and real
clients SIGKILLed mid-request. Meanwhile honest clients append and keep every receipt.
At the end: the writer is the one that started, every acknowledged event is there with
its receipt verified, and ``bp.verify`` is clean (docs/OPERATIONS.md "Trust model").
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import random
import secrets
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import posix_ipc
import pytest
from _raw_client import RawArea, item, message, open_queue, request, shm_path
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp._ipc import wire as W
from batpak_mp._ipc.names import control_name, ipc_prefix, request_queue_name

K = bp.Kind(1, 1)
SEED = 20_241_201
HOSTILE_PROCS = 3
ACTIONS_PER_PROC = 700  # 2,100 in all
HONEST_PROCS = 2
CTX = mp.get_context("fork")

pytestmark = pytest.mark.slow


# -- honest clients -------------------------------------------------------------------------------
def _honest(data_dir: str, who: int, stop: Any, out: Any) -> None:
    receipts: list[tuple[bp.Receipt, int]] = []
    errors: list[str] = []
    with bp.connect(data_dir, timeout=30) as s:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 10 == 0:
                    rs = s.append_batch([bp.BatchItem(bp.Coordinate(f"honest-{who}", "batch"), K, {"n": n, "i": i})
                                         for i in range(5)])
                    receipts += [(r, n) for r in rs]
                else:
                    receipts.append((s.append(bp.Coordinate(f"honest-{who}", "single"), K, {"n": n}), n))
            except bp.BatpakError as exc:
                errors.append(repr(exc)[:300])
            time.sleep(0.002)
    out.put((who, receipts, errors))


# -- hostile actions ------------------------------------------------------------------------------
class Hostile:
    """One hostile process: its own areas, a queue handle, a seeded generator."""

    def __init__(self, data_dir: str, seed: int) -> None:
        self.data_dir = data_dir
        self.prefix = ipc_prefix(data_dir)
        self.rng = random.Random(seed)
        self.queue = open_queue(request_queue_name(data_dir))
        self.areas: list[RawArea] = []
        self.tokens: list[bytes] = []
        self.rid = 1
        self.links: list[str] = []

    def next_id(self) -> int:
        self.rid += 1
        return self.rid

    def send(self, raw: bytes) -> None:
        try:
            self.queue.send(raw, 0)
        except (posix_ipc.BusyError, ValueError):
            pass  # full (flooded): a hostile client does not wait

    def area(self) -> RawArea:
        if len(self.areas) < 6 or self.rng.random() < 0.05:
            self.areas.append(RawArea(self.prefix, self.rng.choice([4096, 1 << 16])))
        if len(self.areas) > 12:
            self.areas.pop(0).close()
        return self.rng.choice(self.areas)

    # each action: one hostile thing; returns its name
    def junk_message(self) -> str:
        self.send(secrets.token_bytes(self.rng.choice([0, 1, 4, 45, 200, 256])))
        return "junk message"

    def malformed_message(self) -> str:
        a = self.area()
        rid = self.next_id()
        bad = self.rng.choice([
            [W.WIRE_VERSION + 1, os.getpid(), a.name, rid], [W.WIRE_VERSION, -1, a.name, rid],
            [W.WIRE_VERSION, os.getpid(), a.name + "\x00x", rid], [W.WIRE_VERSION, os.getpid(), "/etc/passwd", rid],
            [W.WIRE_VERSION, os.getpid(), a.name, -5], [W.WIRE_VERSION, os.getpid(), a.name, 1 << 64 - 1],
            [W.WIRE_VERSION, os.getpid() + 1, a.name, rid], [W.WIRE_VERSION, 1, a.name, rid],
            [W.WIRE_VERSION, os.getpid(), self.prefix + "-ctl", rid], {"area": a.name},
            [W.WIRE_VERSION, os.getpid(), self.prefix + "-c1-" + "f" * 40, rid], [W.WIRE_VERSION] * 5,
        ])
        self.send(msgpack.packb(bad))
        return "malformed message"

    def garbage_request(self) -> str:
        a = self.area()
        rid = self.next_id()
        body = self.rng.choice([
            secrets.token_bytes(self.rng.randint(0, 3000)),
            request(W.OP_APPEND, rid, [["not", "an", "item"]]),
            request(W.OP_APPEND, rid, [item("hostile", 1)[:8]]),
            request(99, rid, None), request(W.OP_APPEND, rid, []), request(W.OP_APPEND, rid, {"a": 1}),
            request(W.OP_APPEND, rid, [[b"h", b"s", 1 << 40, b"\xc0", 0, b"x" * 16, None, None, None]]),
            request(W.OP_APPEND, rid, [[b"\xff\xfe", b"s", 4097, b"\xc0", 0, b"x" * 16, None, None, None]]),
            request(W.OP_APPEND, rid, [[b"h", b"s", 4097, b"\xc1", 0, b"x" * 16, None, None, None]]),
            request(W.OP_APPEND, rid, [[b"h", b"s", 0x0001, b"\xc0", 0, b"x" * 16, None, None, None]]),  # reserved
            request(W.OP_FENCE_COMMIT, rid, b"short"),
        ])
        length = None if self.rng.random() < 0.8 else self.rng.choice([0, 1 << 31, len(body) + 1000])
        a.put(body, length=length)
        a.send(self.queue, rid)
        return "garbage request"

    def explosive_request(self) -> str:
        a = RawArea(self.prefix, 1 << 22)
        rid = self.next_id()
        head = request(W.OP_APPEND, rid, [])[:-1]
        body = self.rng.choice([
            head + b"\xdd" + struct.pack(">I", 2000) + (b"\x99" + b"\x99\x90\x90\x90\x90\x90\x90\x90\x90\x90" * 9) * 2000,
            head + b"\xdd" + struct.pack(">I", 3000) + (b"\x91" * 900 + b"\xc0") * 3000,
            head + b"\xdd" + struct.pack(">I", 1_000_000) + b"\xc0" * 1_000_000,
            head + b"\x91\x99" + b"\xdd" + struct.pack(">I", 1_000_000) + b"\x80" * 1_000_000,
            head + b"\xdd" + struct.pack(">I", 10_001) + bytes(W.HEADER) * 10_001,
        ])
        a.put(body)
        a.send(self.queue, rid)
        a.reply(rid, 2.0)
        a.close()
        return "explosive request"

    def sparse_giant(self) -> str:
        a = RawArea(self.prefix, 1 << 30, sparse=True)
        rid = self.next_id()
        claim = self.rng.choice([(1 << 30) - 64, 1 << 28, 1 << 24])
        head = request(W.OP_APPEND, rid, [])[:-1] + b"\x91\x99\xc4\x01e\xc4\x01s\x01\xc6" + struct.pack(">I", claim)
        a.put(head, length=claim + len(head))
        a.send(self.queue, rid)
        a.reply(rid, 2.0)
        a.close()
        return "sparse 1 GiB area"

    def truncate_mid_request(self) -> str:
        a = RawArea(self.prefix)
        rid = self.next_id()
        a.put(request(W.OP_APPEND, rid, [item("hostile-trunc", rid)]))
        a.send(self.queue, rid)
        if self.rng.random() < 0.5:
            time.sleep(self.rng.random() * 0.002)
        os.ftruncate(a.fd, self.rng.choice([0, 5, 11, 12, 100, 4095]))
        for _ in range(self.rng.randint(0, 3)):
            a.send(self.queue, self.next_id())
        a.close()
        return "truncate mid-request"

    def linked_area(self) -> str:
        decoy = RawArea(self.prefix)
        name, path = decoy.name, decoy.path
        decoy.close()
        target = self.rng.choice([shm_path(control_name(self.data_dir)), "/etc/passwd",
                                  self.areas[0].path if self.areas else "/etc/hostname"])
        try:
            (os.link if self.rng.random() < 0.5 and target.startswith("/dev/shm") else os.symlink)(target, path)
        except OSError:
            return "linked area (refused by the kernel)"
        self.links.append(path)
        self.send(message(name, self.next_id()))
        return "linked area"

    def odd_file_area(self) -> str:
        decoy = RawArea(self.prefix)
        name, path = decoy.name, decoy.path
        kind = self.rng.choice(["fifo", "open", "empty", "nobody"])
        if kind == "fifo":
            decoy.close()
            os.mkfifo(path, 0o600)
        elif kind == "open":
            os.fchmod(decoy.fd, 0o666)
            decoy.close(unlink=False)
        elif kind == "empty":
            os.ftruncate(decoy.fd, 0)
            decoy.close(unlink=False)
        else:
            os.fchown(decoy.fd, 65534, 65534)
            decoy.close(unlink=False)
        self.links.append(path)
        self.send(message(name, self.next_id()))
        return f"odd area ({kind})"

    def flood(self) -> str:
        raw = message(self.area().name, 0)
        for _ in range(self.rng.randint(20, 60)):
            self.send(raw)
        return "flood"

    def fence_abuse(self) -> str:
        a = self.area()
        rid = self.next_id()
        what = self.rng.choice(["begin", "commit-foreign", "append-foreign", "cancel-random", "forged-pid"])
        if what == "begin" or not self.tokens:
            r = a.call(self.queue, W.OP_FENCE_BEGIN, None, rid, timeout=2.0)
            if r is not None and r.status == W.STATUS_OK:
                self.tokens.append(r.data[0])
            return "fence: begin"
        token = self.rng.choice(self.tokens) if self.rng.random() < 0.5 else secrets.token_bytes(16)
        if what == "commit-foreign":
            a.call(self.queue, self.rng.choice([W.OP_FENCE_COMMIT, W.OP_FENCE_CANCEL]), token, rid, timeout=2.0)
        elif what == "append-foreign":
            a.call(self.queue, W.OP_APPEND_FENCED, [token, [item("hostile-fenced", rid)]], rid, timeout=2.0)
        elif what == "cancel-random":
            a.call(self.queue, W.OP_FENCE_CANCEL, secrets.token_bytes(16), rid, timeout=2.0)
        else:  # an area named with another live process's pid (our parent's)
            forged = RawArea(self.prefix, pid=os.getppid())
            forged.put(request(W.OP_FENCE_COMMIT, rid, token))
            forged.send(self.queue, rid, pid=os.getppid())
            forged.reply(rid, 0.2)
            forged.close()
        return f"fence: {what}"

    def garbage_over_reply(self) -> str:
        a = self.area()
        rid = self.next_id()
        a.put(request(W.OP_PING, rid, None))
        a.send(self.queue, rid)
        a.write(secrets.token_bytes(self.rng.randint(1, 200)), self.rng.choice([0, 8, 12]))
        return "garbage over its own reply"

    def oversized(self) -> str:
        a = RawArea(self.prefix, 1 << 20)
        rid = self.next_id()
        body = self.rng.choice([
            request(W.OP_APPEND, rid, [item("hostile-big", i) for i in range(10_001)]),
            request(W.OP_APPEND, rid, [[b"h", b"s", 4097, msgpack.packb(b"x" * 700_000), 0, b"y" * 16, None, None,
                                        None]]),
        ])
        if len(body) + W.HEADER <= a.size:
            a.put(body)
            a.send(self.queue, rid)
            a.reply(rid, 2.0)
        a.close()
        return "oversized request"

    def kill_client(self) -> str:
        pid = os.fork()
        if pid == 0:
            try:
                with bp.connect(self.data_dir, timeout=5) as s:
                    while True:
                        s.append(bp.Coordinate("killed", "mid"), K, b"k" * self.rng.randint(1, 5000))
            finally:
                os._exit(0)
        time.sleep(self.rng.random() * 0.03)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "client killed mid-request"

    def close(self) -> None:
        for a in self.areas:
            a.close()
        for path in self.links:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.queue.close()


ACTIONS: list[tuple[Callable[[Hostile], str], int]] = [
    (Hostile.junk_message, 12), (Hostile.malformed_message, 12), (Hostile.garbage_request, 16),
    (Hostile.explosive_request, 2), (Hostile.sparse_giant, 1), (Hostile.truncate_mid_request, 10),
    (Hostile.linked_area, 5), (Hostile.odd_file_area, 5), (Hostile.flood, 4), (Hostile.fence_abuse, 12),
    (Hostile.garbage_over_reply, 8), (Hostile.oversized, 1), (Hostile.kill_client, 2),
]


def _hostile(data_dir: str, seed: int, n: int, out: Any) -> None:
    h = Hostile(data_dir, seed)
    done: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    actions, weights = zip(*ACTIONS, strict=True)
    try:
        for _ in range(n):
            act = h.rng.choices(actions, weights)[0]
            try:
                done[act(h)] += 1
            except Exception as exc:  # the action itself failed (not the writer): note it
                failures.append(f"{act.__name__}: {exc!r}"[:200])
    finally:
        h.close()
        out.put((seed, dict(done), failures))


def test_thousands_of_hostile_actions_leave_the_service_whole(data_dir: str) -> None:
    svc = bp.serve(data_dir, restart=bp.RestartPolicy.bounded(5, 60_000), segment_max_bytes=4 << 20)
    try:
        writer_pid = svc.writer_pid
        stop = CTX.Event()
        out = CTX.Queue()
        honest = [CTX.Process(target=_honest, args=(data_dir, i, stop, out)) for i in range(HONEST_PROCS)]
        hostile = [CTX.Process(target=_hostile, args=(data_dir, SEED + i, ACTIONS_PER_PROC, out))
                   for i in range(HOSTILE_PROCS)]
        started = time.monotonic()
        for p in honest + hostile:
            p.start()
        results = [out.get(timeout=120) for _ in hostile]
        stop.set()
        honest_results = [out.get(timeout=60) for _ in honest]
        for p in honest + hostile:
            p.join(30)
        elapsed = time.monotonic() - started

        actions = collections.Counter[str]()
        for _, done, _failures in results:
            actions.update(done)
        assert sum(actions.values()) >= 2000, actions
        status = svc.status()
        assert svc.writer_pid == writer_pid and status["restarts"] == 0, status
        assert status["supervisor_alive"], status

        receipts = [r for _, rs, _ in honest_results for r in rs]
        errors = [e for _, _, es in honest_results for e in es]
        assert not errors, errors[:5]
        assert len(receipts) > 100
        with bp.connect(data_dir) as s:
            for receipt, n in receipts:
                assert s.verify_receipt(receipt), receipt
                assert s.get(receipt.event_id).payload["n"] == n
        print(f"\n{sum(actions.values())} hostile actions in {elapsed:.1f} s, {len(receipts)} honest events acknowledged; "
              f"{dict(sorted(actions.items()))}; dropped messages {status['dropped_messages']}")
    finally:
        code = svc.stop()
    assert code == 0
    assert_verified(data_dir)
