"""Compaction figures (issue 13): how fast compaction rewrites sealed segments, and what
it costs the appends of 8 client processes running meanwhile.

Owns:
  throughput  Engine.compact() on a store of S sealed segments of SEG MiB with a tenth of
              its events asked to go, spread over every segment: MB/s of segment files
              read and rewritten (old sizes summed over the compaction's wall time),
              CPU µs per event rewritten; median of R fresh copies.
  appends     a served store of the same shape; 8 client processes append small events
              (one at a time, sync mode group) for the whole run; appends/s in a window
              before compaction (the baseline, measured in the same run) and while
              Store.compact() runs; the ratio during/baseline (1.0: no cost).
Run: python tools/bench_compact.py [--segments S] [--segment-mib SEG] [--runs R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import batpak_mp as bp

CLIENTS = 8
CLIENT = r"""
import sys, time, batpak_mp as bp
s = bp.connect(sys.argv[1])
stop = sys.argv[2]
i = 0
last = time.monotonic()
out = sys.stdout
import os
while not os.path.exists(stop):
    s.append(bp.Coordinate(f"c{sys.argv[3]}-{i % 16}", "load"), bp.Kind(1, 9), {"i": i})
    i += 1
    now = time.monotonic()
    if now - last >= 0.05:
        out.write(f"{time.time():.4f} {i}\n"); out.flush()
        last = now
out.write(f"{time.time():.4f} {i}\n")
s.close()
"""


def build(path: str, segments: int, seg_mib: int) -> tuple[int, list[bp.Receipt]]:
    """A store with ``segments`` sealed segments; a tenth of its events asked to go."""
    cfg = bp.EngineConfig(segment_max_bytes=seg_mib << 20, sync=bp.SyncMode.NONE)
    per = (seg_mib << 20) // 1300
    total = per * segments + per // 2
    with bp.Engine.open(path, cfg) as eng:
        rs: list[bp.Receipt] = []
        for at in range(0, total, 500):
            rs += eng.append_batch([bp.BatchItem(bp.Coordinate(f"u{j % 1000}", "bench"), bp.Kind(1, 1),
                                                 {"j": j, "pad": "p" * 1000}) for j in range(at, min(at + 500, total))])
        for r in rs[::10]:
            eng.redact(r.event_id, reason="bench")
    return total, rs


def sealed_bytes(path: str) -> int:
    seg_dir = os.path.join(path, "segments")
    names = sorted(os.listdir(seg_dir))
    return sum(os.path.getsize(os.path.join(seg_dir, n)) for n in names[:-1])


def throughput(base: str, runs: int, seg_mib: int) -> dict[str, float]:
    rates, cpu = [], []
    removed = 0
    for _ in range(runs):
        d = base + "-copy"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d)
        size = sealed_bytes(d)
        with bp.Engine.open(d, bp.EngineConfig(segment_max_bytes=seg_mib << 20)) as eng:
            c0, t0 = time.process_time(), time.perf_counter()
            report = eng.compact()
            wall, used = time.perf_counter() - t0, time.process_time() - c0
        removed = report.events_removed
        rates.append(size / wall / 1e6)
        cpu.append(used * 1e6 / max(report.events_removed, 1))
        assert bp.verify(d).ok
        shutil.rmtree(d)
    return {"compact_mb_per_s": round(statistics.median(rates), 1),
            "cpu_us_per_event_removed": round(statistics.median(cpu), 1), "events_removed": removed}


def rate(samples: list[list[tuple[float, int]]], t0: float, t1: float) -> float:
    """Appends per second of all clients in [t0, t1] (from each client's running counts)."""
    total = 0
    for series in samples:
        inside = [(t, n) for t, n in series if t0 <= t <= t1]
        if len(inside) >= 2:
            total += inside[-1][1] - inside[0][1]
    return total / (t1 - t0)


def appends_during(base: str, seg_mib: int) -> dict[str, float]:
    d = base + "-served"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    stop = os.path.join(tempfile.mkdtemp(), "stop")
    svc = bp.serve(d, segment_max_bytes=seg_mib << 20)
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, d, stop, str(k)], stdout=subprocess.PIPE, text=True)
                 for k in range(CLIENTS)]
        time.sleep(1.0)  # clients connected and warm
        b0 = time.time()
        time.sleep(3.0)
        b1 = time.time()
        store = bp.connect(d)
        c0 = time.time()
        report = store.compact()
        c1 = time.time()
        store.close()
        time.sleep(0.2)
        open(stop, "w").close()
        samples = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            samples.append([(float(t), int(n)) for t, n in (line.split() for line in out.splitlines())])
    finally:
        open(stop, "a").close()
        for p in procs:
            if p.poll() is None:
                p.kill()
        svc.stop()
    base_rate, during = rate(samples, b0, b1), rate(samples, c0, c1)
    ok = bp.verify(d).ok
    shutil.rmtree(d)
    return {"baseline_appends_per_s": round(base_rate), "during_compaction_appends_per_s": round(during),
            "ratio_during_to_baseline": round(during / base_rate, 3), "compaction_s_served": round(c1 - c0, 3),
            "segments_rewritten": report.segments_rewritten, "verify_ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--segment-mib", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = os.path.join(tempfile.mkdtemp(prefix="bench-compact-"), "store")
    t = time.perf_counter()
    total, _ = build(base, args.segments, args.segment_mib)
    print(f"built {total} events in {args.segments}+ segments of {args.segment_mib} MiB "
          f"in {time.perf_counter() - t:.1f} s (codec: {bp.codec_backend()})")
    doc = {"events": total, "segments": args.segments, "segment_mib": args.segment_mib,
           "codec": bp.codec_backend(), **throughput(base, args.runs, args.segment_mib),
           **appends_during(base, args.segment_mib)}
    for k, v in doc.items():
        print(f"  {k:34} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    shutil.rmtree(os.path.dirname(base), ignore_errors=True)


if __name__ == "__main__":
    main()
