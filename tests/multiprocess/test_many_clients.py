"""200 client processes attached at once, each appending and reading, on the kernel's
default POSIX queue limits; and the clear error when /dev/shm has no room."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import multiprocess as mp
import pytest
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp._ipc.names import control_name, ipc_prefix

K = bp.Kind(1, 1)
CLIENTS = 200


def _client(data_dir: str, cid: int, barrier: object, out: object) -> None:
    try:
        with bp.connect(data_dir, timeout=120) as s:
            barrier.wait(120)  # type: ignore[attr-defined]  # every client attached at the same time
            receipts = [s.append(bp.Coordinate(f"client-{cid}", "many"), K, {"c": cid, "i": i}) for i in range(3)]
            ok = all(s.get(r.event_id).payload == {"c": cid, "i": i} for i, r in enumerate(receipts))
            ok = ok and [e.payload["i"] for e in s.history(f"client-{cid}")] == [0, 1, 2]
            barrier.wait(120)  # type: ignore[attr-defined]  # still attached while the others work
        out.put((cid, ok))  # type: ignore[attr-defined]
    except BaseException as exc:  # report, never hang the parent
        out.put((cid, repr(exc)))  # type: ignore[attr-defined]


def _limits() -> dict[str, int]:
    base = "/proc/sys/fs/mqueue/"
    return {name: int(open(base + name).read()) for name in ("msg_max", "msgsize_max", "queues_max")}


def test_two_hundred_clients_at_once(service: tuple[bp.Service, str]) -> None:
    svc, data_dir = service
    limits = _limits()
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(CLIENTS + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(data_dir, cid, barrier, out)) for cid in range(CLIENTS)]
    for p in procs:
        p.start()
    barrier.wait(180)  # all 200 attached
    attached = svc.status()
    prefix = ipc_prefix(data_dir)[1:]
    shm_bytes = sum(os.stat(os.path.join("/dev/shm", n)).st_blocks * 512 for n in os.listdir("/dev/shm")
                    if prefix in n)
    barrier.wait(180)  # all 200 done, still attached
    results = dict(out.get(timeout=120) for _ in range(CLIENTS))
    for p in procs:
        p.join(60)
    assert all(v is True for v in results.values()), [v for v in results.values() if v is not True][:5]
    assert len(results) == CLIENTS
    assert attached["state"] == "ready"
    assert shm_bytes < 64 * 2**20 / 2, f"{shm_bytes / 2**20:.1f} MiB of /dev/shm for {CLIENTS} clients"
    with bp.connect(data_dir) as s:
        assert sum(1 for e in s.query_after(0, limit=100_000).events if e.coordinate.scope == "many") == 3 * CLIENTS
    # nothing was raised above the kernel defaults this machine runs with
    assert limits["msg_max"] <= 10 or limits == _limits()


SMALL_SHM = textwrap.dedent("""
    import sys
    import batpak_mp as bp
    s = bp.connect(sys.argv[1])
    try:
        s.append(bp.Coordinate("a", "b"), bp.Kind(1, 1), b"x" * (4 << 20))
    except bp.WriterUnavailable as exc:
        print("ERR", exc)
        sys.exit(0)
    print("NO ERROR")
""")


def test_too_small_dev_shm_gives_a_clear_error(service: tuple[bp.Service, str], tmp_path: os.PathLike[str]) -> None:
    """In a private mount namespace, /dev/shm becomes a 1 MiB tmpfs (only the control
    block is bound in from the real one): a 4 MiB payload needs an 8 MiB area."""
    _, data_dir = service
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount namespaces to shrink /dev/shm")
    ctl = control_name(data_dir)[1:]
    orig = os.path.join(os.fspath(tmp_path), "orig")
    os.makedirs(orig)
    with open(os.path.join(os.fspath(tmp_path), "probe.py"), "w") as f:
        f.write(SMALL_SHM)
    script = (f"mount --make-rprivate / && mount --bind /dev/shm {orig} && "
              f"mount -t tmpfs -o size=1m tmpfs /dev/shm && touch /dev/shm/{ctl} && "
              f"mount --bind {orig}/{ctl} /dev/shm/{ctl} || exit 77; "
              f"exec {sys.executable} {tmp_path}/probe.py {data_dir}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    if r.returncode == 77:
        pytest.skip("cannot mount a tmpfs here: " + r.stderr[-200:])
    assert "ERR" in r.stdout, r.stdout + r.stderr
    assert "/dev/shm" in r.stdout and "shm-size" in r.stdout, r.stdout


def test_one_user_serves_more_stores_than_81_kib_queues_allowed(tmp_path: Any) -> None:
    # a request queue of 10 x 8192 bytes was charged ~81 KiB of the user's RLIMIT_MSGQUEUE
    # (819,200 bytes by default): a tenth store failed to start. 10 x 256 costs ~3.6 KiB.
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    stores = 14
    if soft != resource.RLIM_INFINITY:
        assert stores > soft // 81_920  # more than the old queues let one user serve
    dirs = [os.path.join(str(tmp_path), f"s{i}") for i in range(stores)]
    services: list[bp.Service] = []
    try:
        for d in dirs:
            services.append(bp.serve(d))
        for i, d in enumerate(dirs):
            with bp.connect(d) as s:
                assert s.append(bp.Coordinate("e", "many"), bp.Kind(1, 1), i).global_sequence >= 1
    finally:
        for svc in services:
            svc.stop()
    for d in dirs:
        assert_verified(d)
