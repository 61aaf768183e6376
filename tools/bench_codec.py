#!/usr/bin/env python3
"""Micro-benchmark of the codec: the C extension against the pure-Python reference, per call.

Owns: timing the per-event codec calls the engine and readers make (encode one event,
encode a commit group of 100, decode a frame, the header check, the recovery scan, a name
hash, an index record), each for both backends in the same run, and printing the
figures and the ratio python / native. Print only; not a test. Each figure is the best
of ``--repeat`` timeit runs (the least disturbed by the other work on the machine).

  python tools/bench_codec.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import timeit
from collections.abc import Callable
from typing import Any

from batpak_mp._format import directory, frame, scan
from batpak_mp._format.frame import FLAG_COMMIT_END
from batpak_mp._native import _pure

try:
    from batpak_mp._native import _codec as native
except ImportError as exc:  # pragma: no cover - a machine without the build
    raise SystemExit(f"the C extension is not built ({exc}): pip install -e . with gcc") from exc

PAYLOAD_BYTES = 200  # the engine benchmark's typical msgpack payload
GROUP = 100  # events per commit group (the batched-append workload)
SCAN_FRAMES = 1000  # frames in the recovery-scan buffer


def event(seq: int, prev: bytes | int) -> tuple[Any, ...]:
    """The 14 encode_parts fields of a typical event."""
    return (FLAG_COMMIT_END, 0x1001, 1, seq, seq, 1_700_000_000_000, os.urandom(16), bytes(16), bytes(16),
            bytes(16), prev, f"order-{seq % 1000}".encode(), b"orders", os.urandom(PAYLOAD_BYTES))


def best(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Microseconds per call: the best of ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="timeit runs per figure (the best is kept)")
    args = ap.parse_args()
    r = args.repeat

    one = event(1, bytes(32))
    group = [event(i + 1, i - 1 if i else bytes(32)) for i in range(GROUP)]
    data = b"".join(frame.encode_parts(*one)[0])
    log, _, _ = native.encode_group(group)
    big = native.encode_group([event(i + 1, i - 1 if i else bytes(32)) for i in range(SCAN_FRAMES)])[0]
    records = os.urandom(64 * 1001)
    name = b"order-123"

    # (what, per, python callable, native callable, calls per timing run)
    rows: list[tuple[str, int, Callable[[], Any], Callable[[], Any], int]] = [
        ("encode_parts, 1 event", 1, lambda: frame.encode_parts(*one), lambda: native.encode_parts(*one), 20000),
        (f"encode_group, {GROUP} events (per event)", GROUP, lambda: _pure.encode_group(group),
         lambda: native.encode_group(group), 200),
        ("scan_frame (decode to Frame)", 1, lambda: frame.scan_frame(data, 0, len(data)),
         lambda: native.scan_frame(data, 0, len(data)), 20000),
        ("frame_header (validity rule)", 1, lambda: frame.frame_header(data, 0, len(data)),
         lambda: native.frame_header(data, 0, len(data)), 20000),
        ("hash_matches", 1, lambda: frame.hash_matches(data, 0, frame.scan_frame(data, 0, len(data))[1]),
         lambda: native.hash_matches(data, 0, native.scan_frame(data, 0, len(data))[1]), 20000),
        (f"scan_segment, {SCAN_FRAMES} frames (per frame)", SCAN_FRAMES, lambda: scan.scan_segment(big, 0, len(big), 1),
         lambda: native.scan_segment(big, 0, len(big), 1), 20),
        (f"scan_segment check_hash, {SCAN_FRAMES} frames (per frame)", SCAN_FRAMES,
         lambda: scan.scan_segment(big, 0, len(big), 1, check_hash=True),
         lambda: native.scan_segment(big, 0, len(big), 1, check_hash=True), 10),
        ("name_hash", 1, lambda: directory.name_hash(name), lambda: native.name_hash(name), 50000),
        ("idem_hash", 1, lambda: directory.idem_hash("key-123"), lambda: native.idem_hash("key-123"), 50000),
        ("unpack_record", 1, lambda: _pure.unpack_record(records, 500), lambda: native.unpack_record(records, 500),
         50000),
    ]
    assert native.encode_group(group) == _pure.encode_group(group)  # the same bytes, or the figures mean nothing
    assert native.scan_segment(big, 0, len(big), 1) == scan.scan_segment(big, 0, len(big), 1)
    del log

    print(f"codec micro-benchmark: best of {r} runs, microseconds per event/call ({PAYLOAD_BYTES}-byte payloads)")
    print(f"{'operation':<52} {'python µs':>10} {'native µs':>10} {'ratio':>7}")
    for what, per, py, nat, number in rows:
        t_py = best(py, number, r) / per
        t_nat = best(nat, number, r) / per
        print(f"{what:<52} {t_py:>10.3f} {t_nat:>10.3f} {t_py / t_nat:>6.1f}x")


if __name__ == "__main__":
    main()
