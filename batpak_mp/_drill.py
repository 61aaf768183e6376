"""The crash-restart drill: proof that nothing acknowledged is lost or duplicated.

Owns: running N client processes that append (singles, batches, some guarded by
``expected_clock``) while the writer is SIGKILLed K times at random moments, then
checking the journal offline: every acknowledged receipt present exactly once with the
same hash, no event that no client sent, every chain intact (``bp.verify``), and the
restarts as the log itself recorded them. Time and randomness come from the seed.
Used by ``batpak-mp drill`` and by the test suite (small); must not import the
supervisor package (it runs the service through ``bp.serve``).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import multiprocess as mp

from ._client import connect
from ._errors import BatpakError, ConcurrencyConflict, WriterTimeout, WriterUnavailable
from ._ipc.control import ControlBlock
from ._read.verify import verify
from ._service import serve
from ._storage.engine import Engine
from ._values import BatchItem, Coordinate, Kind, RestartPolicy, WriterState

DRILL_KIND = Kind(1, 0x7D)
ENTITIES_PER_CLIENT = 6
READY_WAIT_S = 30.0


@dataclass
class DrillReport:
    clients: int
    kills_planned: int
    kills_done: int = 0
    seconds: float = 0.0
    seed: int = 0
    acknowledged: int = 0
    found: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    unexpected: int = 0
    committed_unacknowledged: int = 0
    client_errors: list[str] = field(default_factory=list)
    restart_ms: list[float] = field(default_factory=list)
    writer_starts_in_log: int = 0
    verify_ok: bool = False
    verify_problems: list[str] = field(default_factory=list)
    events_in_log: int = 0

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.duplicated == 0 and self.mismatched == 0 and self.unexpected == 0
                and self.verify_ok and not self.client_errors)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        ms = self.restart_ms
        d["restart_ms"] = {"count": len(ms), "p50": statistics.median(ms) if ms else None,
                           "max": max(ms) if ms else None}
        return d

    def text(self) -> str:
        ms = self.restart_ms
        lines = [
            f"drill: {self.clients} clients, {self.kills_done}/{self.kills_planned} writer kills, "
            f"{self.seconds:.0f} s, seed {self.seed}",
            f"  acknowledged {self.acknowledged}, found {self.found}, lost {self.lost}, "
            f"duplicated {self.duplicated}, hash mismatches {self.mismatched}, unexpected {self.unexpected}",
            f"  committed but never acknowledged (in flight at a kill, then re-sent): {self.committed_unacknowledged}",
            f"  restarts: p50 {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms" if ms else "  restarts: none",
            f"  writer starts recorded in the log: {self.writer_starts_in_log}; events in log: {self.events_in_log}",
            f"  verify: {'clean' if self.verify_ok else 'PROBLEMS'}",
        ]
        lines += [f"    {p}" for p in self.verify_problems[:20]]
        lines += [f"  client error: {e}" for e in self.client_errors[:20]]
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _retrying(fn: Callable[[], Any], deadline: float) -> Any:
    """Call until it succeeds: a lost answer is re-sent with the same keys."""
    while True:
        try:
            return fn()
        except (WriterTimeout, WriterUnavailable):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def drill_client(data_dir: str, cid: int, stop_at: float, seed: int, out_path: str) -> None:
    """One client process: append until ``stop_at``; write its acknowledgements."""
    rng = random.Random(seed * 1000 + cid)
    acks: list[list[Any]] = []
    errors: list[str] = []
    clocks: dict[str, int] = {}
    op = 0
    try:
        with connect(data_dir, timeout=10) as store:
            while time.time() < stop_at:
                op += 1
                deadline = time.monotonic() + 120
                ents = [f"drill-c{cid}-e{rng.randrange(ENTITIES_PER_CLIENT)}"]
                if rng.random() < 0.6:
                    ent = ents[0]
                    guard = clocks.get(ent, 0) if rng.random() < 0.4 else None
                    payload = {"c": cid, "op": op, "i": 0}
                    key = f"c{cid}-op{op}"
                    receipts = [_retrying(functools.partial(
                        store.append, Coordinate(ent, "drill"), DRILL_KIND, payload, idempotency_key=key,
                        expected_clock=guard), deadline)]
                    keys = [key]
                else:
                    n = rng.randint(2, 40)
                    items = []
                    keys = []
                    for i in range(n):
                        ent = f"drill-c{cid}-e{rng.randrange(ENTITIES_PER_CLIENT)}"
                        keys.append(f"c{cid}-op{op}-{i}")
                        items.append(BatchItem(Coordinate(ent, "drill"), DRILL_KIND, {"c": cid, "op": op, "i": i},
                                               idempotency_key=keys[-1]))
                    receipts = _retrying(functools.partial(store.append_batch, items), deadline)
                for key, r in zip(keys, receipts, strict=True):
                    clocks[r.entity] = r.entity_clock
                    acks.append([key, r.event_id, r.global_sequence, r.event_hash, r.entity, r.entity_clock])
    except ConcurrencyConflict as exc:
        errors.append(f"client {cid}: unexpected conflict (only this client writes its entities): {exc}")
    except BatpakError as exc:
        errors.append(f"client {cid}: {type(exc).__name__}: {exc}")
    with open(out_path, "wb") as f:
        f.write(msgpack.packb({"acks": acks, "errors": errors}))


def _wait_ready(control: ControlBlock, after_epoch: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = control.read()
        if s.state == WriterState.READY and s.writer_epoch > after_epoch and s.writer_pid:
            return True
        if s.state == WriterState.FAILED:
            return False
        time.sleep(0.002)
    return False


def run_drill(data_dir: str | None, *, clients: int = 8, kills: int = 10, seconds: float = 30.0,
              seed: int | None = None, segment_max_bytes: int = 1 << 20,
              progress: Callable[[str], None] | None = None) -> DrillReport:
    """Run the drill on ``data_dir`` (a fresh temporary directory when None)."""
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    say = progress or (lambda _msg: None)
    path = os.path.abspath(data_dir) if data_dir else tempfile.mkdtemp(prefix="batpak-drill-")
    report = DrillReport(clients=clients, kills_planned=kills, seconds=seconds, seed=seed)
    work = tempfile.mkdtemp(prefix="batpak-drill-acks-")
    policy = RestartPolicy.bounded(kills + 10, int(seconds * 1000) + 600_000)
    svc = serve(path, restart=policy, segment_max_bytes=segment_max_bytes)
    control = ControlBlock.attach(path)
    try:
        start = time.time()
        stop_at = start + seconds
        ctx = mp.get_context("fork")
        procs = []
        for cid in range(clients):
            p = ctx.Process(target=drill_client, args=(path, cid, stop_at, seed, os.path.join(work, f"{cid}.ack")))
            p.start()
            procs.append(p)
        kill_at = sorted(rng.uniform(0.3, max(seconds - 0.5, 0.4)) for _ in range(kills))
        for t in kill_at:
            while time.time() < start + t:
                time.sleep(0.005)
            snap = control.read()
            if snap.state != WriterState.READY or not snap.writer_pid:
                if not _wait_ready(control, snap.writer_epoch - 1, READY_WAIT_S):
                    break
                snap = control.read()
            try:
                os.kill(snap.writer_pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            t0 = time.monotonic()
            report.kills_done += 1
            if _wait_ready(control, snap.writer_epoch, READY_WAIT_S):
                report.restart_ms.append((time.monotonic() - t0) * 1000)
                say(f"kill {report.kills_done}/{kills}: writer {snap.writer_pid} SIGKILLed, "
                    f"back in {report.restart_ms[-1]:.0f} ms")
            else:
                say(f"kill {report.kills_done}: the writer did not come back ({control.read().reason})")
                break
        for p in procs:
            p.join(seconds + 180)
            if p.is_alive():
                p.kill()
                report.client_errors.append(f"client pid {p.pid} did not finish")
    finally:
        control.close()
        svc.stop()
    acks: dict[bytes, list[Any]] = {}
    for cid in range(clients):
        try:
            with open(os.path.join(work, f"{cid}.ack"), "rb") as f:
                doc = msgpack.unpackb(f.read())
        except FileNotFoundError:
            report.client_errors.append(f"client {cid} wrote no acknowledgements")
            continue
        report.client_errors += doc["errors"]
        for key, event_id, seq, ehash, entity, clock in doc["acks"]:
            acks[event_id] = [key, seq, ehash, entity, clock]
    report.acknowledged = len(acks)
    say("checking the journal offline")
    _check_journal(path, acks, report)
    vr = verify(path)
    report.verify_ok = vr.ok
    report.verify_problems = [f"{p.segment} @ {p.offset}: {p.what}" for p in vr.problems]
    shutil.rmtree(work, ignore_errors=True)
    if data_dir is None and report.ok:
        shutil.rmtree(path, ignore_errors=True)  # a failed drill keeps its store for inspection
    elif data_dir is None:
        say(f"the drill's store is kept for inspection in {path}")
    return report


def _check_journal(path: str, acks: dict[bytes, list[Any]], report: DrillReport) -> None:
    seen_markers: dict[tuple[int, int, int], int] = {}
    with Engine.open(path) as engine:
        found = 0
        for event_id, (_key, seq, ehash, _entity, _clock) in acks.items():
            try:
                ev = engine.get(event_id)
            except BatpakError:
                report.lost += 1
                continue
            if ev.global_sequence != seq or ev.event_hash != ehash:
                report.mismatched += 1
            else:
                found += 1
        report.found = found
        for ev in engine.reader.scan(0):
            report.events_in_log += 1
            if ev.kind.category == 0:
                if ev.coordinate.entity == "writer" and ev.kind.type_id == 1:
                    report.writer_starts_in_log += 1
                continue
            p = ev.payload
            if ev.kind != DRILL_KIND or not isinstance(p, dict) or set(p) != {"c", "op", "i"}:
                report.unexpected += 1
                continue
            marker = (p["c"], p["op"], p["i"])
            if marker in seen_markers:
                report.duplicated += 1
            seen_markers[marker] = ev.global_sequence
            if ev.event_id not in acks:
                report.committed_unacknowledged += 1
