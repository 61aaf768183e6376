"""The control block's seqlock between processes (docs/PROTOCOL.md §4.1).

A compiled benchmark run once failed with its only client judging a live service gone:
it had read the control block as ABSENT with heartbeat 0 and writer pid 0, yet with the
supervisor's pid, while writer and supervisor served on. The cause: every update stored
its fields with ``struct.pack_into``, which clears its target before it writes, so the
``seq`` word passed through 0 (even: "consistent") in the middle of each update, and a
reader that looked then accepted a half-cleared block. These tests run a real updater
process against a reader in this one, and count what the reader must never see.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from batpak_mp._ipc.control import _FIELDS_AT, _SEQ, ControlBlock, ControlSnapshot
from batpak_mp._values import WriterState

SUPERVISOR_PID = 363  # any constant: a torn read shows it beside cleared fields
MIN_UPDATES_SEEN = 2_000  # seq moves the reader must witness: proof the two really overlapped
LOOK_SECONDS = 1.5  # unfixed, an idle 2-core machine showed ~300 zero counters a second
ENOUGH_UPDATES = 20_000  # seen these (and LOOK_SECONDS passed): stop
MAX_SECONDS = 10.0  # a loaded machine: stop looking after this, whatever was seen

# The updater: consistent-by-construction fields (visible == durable == groups == n,
# requests == 2n, heartbeat == n + 1), updated in a tight loop until its stdin closes.
UPDATER = r"""
import os, select, sys
from batpak_mp._ipc.control import ControlBlock
from batpak_mp._values import WriterState
block = ControlBlock.create(sys.argv[1])
n = 1
block.update(state=int(WriterState.READY), supervisor_pid=int(sys.argv[2]), writer_pid=os.getpid(),
             visible=n, durable=n, groups=n, requests=2 * n, heartbeat_ns=n + 1)
print("ready", flush=True)
while True:
    for _ in range(256):
        n += 1
        block.update(visible=n, durable=n, groups=n, requests=2 * n, heartbeat_ns=n + 1)
    if select.select([sys.stdin], [], [], 0)[0]:
        break
block.close()
"""


def _torn(s: ControlSnapshot) -> bool:
    """Whether ``s`` is not one of the states the updater stores (a mix of two, or cleared)."""
    n = s.visible
    return not (s.state == WriterState.READY and s.supervisor_pid == SUPERVISOR_PID and s.writer_pid != 0
                and s.durable == n and s.groups == n and s.requests == 2 * n and s.heartbeat_ns == n + 1)


def test_readers_never_see_an_update_half_done(tmp_path: os.PathLike[str]) -> None:
    data_dir = os.path.join(os.fspath(tmp_path), "data")
    os.mkdir(data_dir, 0o700)
    updater = subprocess.Popen([sys.executable, "-c", UPDATER, data_dir, str(SUPERVISOR_PID)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    block: ControlBlock | None = None
    try:
        assert updater.stdout is not None and updater.stdin is not None
        assert select.select([updater.stdout], [], [], 30)[0], "the updater did not start"
        assert updater.stdout.readline().strip() == b"ready"
        block = ControlBlock.attach(data_dir)
        mm = block._mm
        raw_seq = _SEQ.unpack_from
        zero_seqs = torn = reads = moves = 0
        example: ControlSnapshot | None = None
        last = raw_seq(mm, _FIELDS_AT)[0]
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= MAX_SECONDS or (elapsed >= LOOK_SECONDS and moves >= ENOUGH_UPDATES):
                break
            for _ in range(500):  # the counter itself: a published block's is never 0 again
                seq = raw_seq(mm, _FIELDS_AT)[0]
                if seq == 0:
                    zero_seqs += 1
                elif seq != last:
                    moves += 1
                    last = seq
            for _ in range(20):  # whole reads through the seqlock: consistent or retried
                snap = block.read()
                reads += 1
                if _torn(snap):
                    torn += 1
                    example = example or snap
        updater.stdin.close()
        assert updater.wait(30) == 0
    finally:
        if updater.poll() is None:
            updater.kill()
            updater.wait()
        if block is not None:
            block.close()
        ControlBlock.unlink(data_dir)
    assert moves >= MIN_UPDATES_SEEN, f"the reader saw only {moves} updates: the test proved nothing"
    assert zero_seqs == 0, f"seq read as 0 (even: 'consistent') {zero_seqs} times in the middle of updates"
    assert torn == 0, f"{torn} of {reads} seqlock reads returned a half-written block, e.g. {example}"
