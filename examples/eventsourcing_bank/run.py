"""Run the example bank (bank.py beside this file) in several processes at once.

Commands (``python examples/eventsourcing_bank/run.py COMMAND --help``):

- ``demo``: serve a store in a temporary directory, start 4 worker processes and a
  follower, and print what they did (the quick look);
- ``worker DATA_DIR --accounts N --deposits M --out FILE``: open N accounts, deposit M
  times into each and M times into the shared ``house`` account (optimistic concurrency:
  a save that lost a race is retried on the fresh aggregate), and write every
  notification id this process got back to FILE (JSON);
- ``follow DATA_DIR --until N``: run the ``Ledger`` follower (an eventsourcing
  ``EventSourcedProjectionRunner``) until it has processed the bank's notification N,
  then print how many entries it holds.

Every process gets ``PERSISTENCE_MODULE=batpak_mp.eventsourcing`` and
``BATPAK_MP_DATA_DIR`` in its environment; nothing else tells it about batpak-mp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run as a script: the example is imported by its package name (see bank.py)
    sys.path.insert(0, ROOT)

from eventsourcing.projection import EventSourcedProjectionRunner  # noqa: E402

from examples.eventsourcing_bank.bank import HOUSE, Bank, Ledger  # noqa: E402


def _env(data_dir: str) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "batpak_mp.eventsourcing", "BATPAK_MP_DATA_DIR": data_dir}


def worker(data_dir: str, accounts: int, deposits: int, out: str) -> None:
    os.environ.update(_env(data_dir))
    pid = os.getpid()
    got: list[dict[str, Any]] = []
    with Bank() as bank:
        got += [{"id": n, "originator": str(HOUSE), "version": 1} for n in bank.open_house()]
        mine = []
        for i in range(accounts):
            account_id, ids = bank.open(f"{pid}-{i}")
            mine.append(account_id)
            got += [{"id": n, "originator": str(account_id), "version": 1} for n in ids]
        for _ in range(deposits):
            for account_id in [*mine, HOUSE]:
                ids = bank.deposit(account_id, 1)
                got += [{"id": n, "originator": str(account_id)} for n in ids]
    with open(out, "w") as f:
        json.dump({"pid": pid, "saved": got}, f)


def follow(data_dir: str, until: int, timeout: float) -> int:
    os.environ.update(_env(data_dir))
    with EventSourcedProjectionRunner(application_class=Bank, projection_class=Ledger) as runner:
        runner.wait(until, timeout=timeout)
        return int(runner.projection.entries())


def demo(workers: int) -> None:
    import batpak_mp as bp

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        accounts, deposits = 5, 10
        total = workers * (accounts + deposits * (accounts + 1)) + 1  # + the house's opening
        with bp.serve(data):
            me = os.path.abspath(__file__)
            started = time.monotonic()
            follower = subprocess.Popen([sys.executable, me, "follow", data, "--until", str(total)],
                                        stdout=subprocess.PIPE, text=True)
            procs = [subprocess.Popen([sys.executable, me, "worker", data, "--accounts", str(accounts),
                                       "--deposits", str(deposits), "--out", os.path.join(tmp, f"w{i}.json")])
                     for i in range(workers)]
            for p in procs:
                p.wait()
            out, _ = follower.communicate(timeout=120)
            took = time.monotonic() - started
            ids = []
            for i in range(workers):
                with open(os.path.join(tmp, f"w{i}.json")) as f:
                    ids += [n["id"] for n in json.load(f)["saved"]]
            ids.sort()
            os.environ.update(_env(data))
            with Bank() as bank:
                house = bank.balance(HOUSE)
            print(f"{workers} workers saved {len(ids)} events in {took:.1f} s; notification ids "
                  f"{'1..' + str(ids[-1]) + ' without a gap or a repeat' if ids == list(range(1, total + 1)) else ids}")
            print(f"house balance {house} (expected {workers * deposits}); the ledger follower recorded {out.strip()} entries")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--workers", type=int, default=4)
    w = sub.add_parser("worker")
    w.add_argument("data_dir")
    w.add_argument("--accounts", type=int, default=5)
    w.add_argument("--deposits", type=int, default=10)
    w.add_argument("--out", required=True)
    f = sub.add_parser("follow")
    f.add_argument("data_dir")
    f.add_argument("--until", type=int, required=True)
    f.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.workers)
    elif args.command == "worker":
        worker(args.data_dir, args.accounts, args.deposits, args.out)
    else:
        print(follow(args.data_dir, args.until, args.timeout))


if __name__ == "__main__":
    main()
