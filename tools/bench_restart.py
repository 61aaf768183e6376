"""Writer restart time and engine reopen time on a large store (issue 4 / issue 2).

Owns: building an N-event store (default 1,000,000) once, then measuring
  reopen   Engine.open after a clean close (same boot), median of R;
  cold     Engine.open as if after a reboot (the full recovery), median of R;
  restart  SIGKILL of a served writer under client load -> ready again and serving
           (the supervisor restarts it), p50 and max over K kills.
Run: python tools/bench_restart.py [--events N] [--runs R] [--kills K] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import threading
import time

import batpak_mp as bp
from batpak_mp._ipc.control import ControlBlock
from batpak_mp._storage.osio import Disk, FaultPlan
from batpak_mp._values import WriterState

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-data", "restart")
PAYLOAD = {"user": "alice", "action": "move", "x": 10, "y": 20, "pad": "x" * 140}
RESTART_WAIT_S = 60.0  # a restart that takes longer than this fails the run


def build(path: str, events: int) -> float:
    t = time.perf_counter()
    with bp.Engine.open(path) as e:
        for i in range(0, events, 1000):
            e.append_batch([bp.BatchItem(bp.Coordinate(f"e{j % 10000}", "bench"), bp.Kind(1, 1), PAYLOAD)
                            for j in range(i, min(i + 1000, events))])
    return time.perf_counter() - t


def reopen(path: str, runs: int, cold: bool) -> tuple[float, dict[str, object]]:
    """Median open time; ``cold`` pretends each open follows a reboot (a new boot id), so
    the full recovery runs every time."""
    times = []
    report: dict[str, object] = {}
    for _ in range(runs):
        disk = Disk(FaultPlan(boot_id=os.urandom(16))) if cold else None
        t = time.perf_counter()
        e = bp.Engine.open(path, disk=disk)
        times.append(time.perf_counter() - t)
        report = e.recovery_report
        e.close()
    return statistics.median(times), report


def restarts(path: str, kills: int) -> list[float]:
    out = []
    with bp.serve(path, restart=bp.RestartPolicy.bounded(kills + 5, 3_600_000)):
        control = ControlBlock.attach(path)
        stop = threading.Event()

        def load() -> None:
            with bp.connect(path) as s:
                c = bp.Coordinate("load", "bench")
                while not stop.is_set():
                    try:
                        s.append(c, bp.Kind(1, 1), PAYLOAD)
                    except bp.BatpakError:
                        time.sleep(0.01)

        th = threading.Thread(target=load, daemon=True)
        th.start()
        for _ in range(kills):
            time.sleep(1.0)
            snap = control.read()
            os.kill(snap.writer_pid, signal.SIGKILL)
            t = time.monotonic()
            while True:
                try:
                    s2 = control.read()
                except bp.WriterUnavailable:  # the killed writer left the block mid-update: not ready yet
                    if time.monotonic() - t > RESTART_WAIT_S:
                        raise
                    time.sleep(0.001)
                    continue
                if s2.state == WriterState.READY and s2.writer_epoch > snap.writer_epoch:
                    break
                time.sleep(0.001)
            out.append((time.monotonic() - t) * 1000)
        stop.set()
        th.join(30)
        control.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="reuse a store built by a previous run")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    a = ap.parse_args()
    doc: dict[str, object] = {"events": a.events, "runs": a.runs, "kills": a.kills, "build_s": None}
    path = os.path.join(ROOT, f"store-{a.events}")
    if not (a.keep and os.path.exists(path)):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(ROOT, exist_ok=True)
        doc["build_s"] = build(path, a.events)
        print(f"building {a.events:,} events: {doc['build_s']:.1f} s", flush=True)
    warm, report = reopen(path, a.runs, False)
    doc.update(reopen_warm_s=warm, reopen_warm_report=report)
    print(f"reopen (same boot)  median {warm * 1000:.0f} ms   {report}", flush=True)
    cold, report = reopen(path, a.runs, True)
    doc.update(reopen_cold_s=cold, reopen_cold_report=report)
    print(f"reopen (cold path)  median {cold * 1000:.0f} ms   {report}", flush=True)
    ms = restarts(path, a.kills)
    doc.update(restart_ms=ms, restart_p50_ms=statistics.median(ms), restart_max_ms=max(ms))
    print(f"writer restart under load (SIGKILL -> ready): p50 {statistics.median(ms):.0f} ms, "
          f"max {max(ms):.0f} ms over {len(ms)} kills", flush=True)
    with bp.Engine.open(path) as e:
        doc["final_events"] = e.visible
        print(f"store now holds {e.visible:,} events; verify: ", end="", flush=True)
    doc["verify_ok"] = bp.verify(path).ok
    print("clean" if doc["verify_ok"] else "PROBLEMS")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
