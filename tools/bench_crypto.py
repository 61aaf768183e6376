"""The cost of payload encryption (issue 13): appends and reads of an encrypted entity
as ratios to the same work on a plain one, measured in the same run.

Owns: two in-process stores (sync mode none: the figure is the codec and the cipher, not
fsync), N events of a ~200-byte payload in batches of 100, one store with every entity
encrypted (AES-256-GCM under a per-entity key, ``BATPAK_MP_MASTER_KEY`` set here to a
throwaway key); appends/s and reads/s (``get`` then ``payload``: the decryption happens on
first use), median of R runs, and µs per event.
Run: python tools/bench_crypto.py [--events N] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import batpak_mp as bp

PAYLOAD = {"user": "alice", "email": "alice@example.org", "action": "move", "x": 10, "pad": "x" * 120}


def run(encrypted: bool, n: int) -> tuple[float, float]:
    d = tempfile.mkdtemp(prefix="bench-crypto-")
    try:
        with bp.Engine.open(d, bp.EngineConfig(sync=bp.SyncMode.NONE)) as eng:
            if encrypted:
                eng.enable_encryption(["u"])
            t = time.perf_counter()
            rs: list[bp.Receipt] = []
            for at in range(0, n, 100):
                rs += eng.append_batch([bp.BatchItem(bp.Coordinate(f"u{j % 100}", "bench"), bp.Kind(1, 1), PAYLOAD)
                                        for j in range(at, min(at + 100, n))])
            append_s = time.perf_counter() - t
            t = time.perf_counter()
            for r in rs:
                assert eng.get(r.event_id).payload["x"] == 10
            read_s = time.perf_counter() - t
        return n / append_s, n / read_s
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("BATPAK_MP_MASTER_KEY", os.urandom(32).hex())
    plain = [run(False, args.events) for _ in range(args.runs)]
    enc = [run(True, args.events) for _ in range(args.runs)]
    pa, pr = statistics.median(a for a, _ in plain), statistics.median(r for _, r in plain)
    ea, er = statistics.median(a for a, _ in enc), statistics.median(r for _, r in enc)
    print(f"codec {bp.codec_backend()}, {args.events} events, median of {args.runs}")
    print(f"  appends/s  plain {pa:10,.0f} ({1e6 / pa:6.1f} us/event)  encrypted {ea:10,.0f} ({1e6 / ea:6.1f} us/event)"
          f"  ratio {ea / pa:.3f}")
    print(f"  reads/s    plain {pr:10,.0f} ({1e6 / pr:6.1f} us/event)  encrypted {er:10,.0f} ({1e6 / er:6.1f} us/event)"
          f"  ratio {er / pr:.3f}")


if __name__ == "__main__":
    main()
