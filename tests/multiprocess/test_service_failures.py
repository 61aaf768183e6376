"""The service's failure paths, with real processes (issue 10, items 7, 11, 12, 13).

Owns: a second ``serve`` of a served directory leaves the running service untouched and
names its supervisor (``bp.serve`` and ``batpak-mp serve``); a SIGKILLed ``batpak-mp
serve`` (or ``bp.serve`` caller) takes its supervisor and writer with it, gracefully, so
the next ``serve`` works; a service whose supervisor and writer are both dead is noticed
by ``connect`` and by an append in flight within a second, while a writer restart under a
live supervisor is still ridden through; ``Store.close`` racing subscriptions gives
``StoreClosed`` only; signals and another user's IPC objects never let a ``posix_ipc``
error out; ``serve`` refuses (never chmods) a directory open to others; a writer that
answers garbage gives the client ``ProtocolError``. Each test ends with ``bp.verify``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import assert_verified

import batpak_mp as bp
from batpak_mp._errors import AlreadyServed, UnsafeDirectory
from batpak_mp._ipc.control import ControlBlock, ControlSnapshot
from batpak_mp._ipc.names import SHM_DIR, ipc_prefix
from batpak_mp._service import cleanup_ipc

EXE = str(Path(sys.executable).parent / "batpak-mp")
K = bp.Kind(1, 1)
SMALL = 1 << 20  # segment size of every service here


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_until(what: str, cond: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _snapshot(data_dir: str) -> ControlSnapshot:
    block = ControlBlock.attach(data_dir)
    try:
        return block.read()
    finally:
        block.close()


def _shm_files(data_dir: str) -> list[str]:
    prefix = ipc_prefix(data_dir)[1:]
    return sorted(e for e in os.listdir(SHM_DIR) if prefix in e)


@pytest.fixture
def leftovers(data_dir: str) -> Iterator[list[int]]:
    """Pids a test saw serve ``data_dir``: whatever of them still runs at the end is
    killed (a failing test must not leave orphans behind), then the IPC objects go."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    cleanup_ipc(data_dir)


def _append_all(store: bp.Store, entity: str, n: int) -> list[bp.Receipt]:
    return [store.append(bp.Coordinate(entity, "s"), K, {"i": i}) for i in range(n)]


def _all_there(data_dir: str, receipts: list[bp.Receipt]) -> None:
    with bp.serve(data_dir, segment_max_bytes=SMALL) as svc, bp.connect(data_dir) as s:
        for r in receipts:
            assert s.get(r.event_id).global_sequence == r.global_sequence
        assert s.append(bp.Coordinate("after", "s"), K, 1).global_sequence > receipts[-1].global_sequence
    assert svc.exit_code == 0


# -- 7. a second serve --------------------------------------------------------------------------
def test_a_second_serve_leaves_the_running_service_untouched(data_dir: str) -> None:
    svc = bp.serve(data_dir, segment_max_bytes=SMALL)
    try:
        client = bp.connect(data_dir)
        receipts = _append_all(client, "first", 3)
        objects = _shm_files(data_dir)
        with pytest.raises(bp.StoreLocked) as caught:
            bp.serve(data_dir, segment_max_bytes=SMALL)
        assert isinstance(caught.value, AlreadyServed)
        assert caught.value.supervisor_pid == svc.supervisor_pid and str(svc.supervisor_pid) in str(caught.value)
        cli = subprocess.run([EXE, "serve", data_dir], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 4, cli.stderr
        assert f"supervisor pid {svc.supervisor_pid}" in cli.stderr
        assert _shm_files(data_dir) == objects  # nothing of the live service was unlinked
        receipts += _append_all(client, "first", 3)  # the connected client carries on
        with bp.connect(data_dir) as late:  # and new clients still connect
            receipts += _append_all(late, "late", 3)
            assert [e.event_id for e in late.history("first")] == [r.event_id for r in receipts[:6]]
        client.close()
        assert svc.status()["state"] == "ready" and svc.status()["restarts"] == 0
    finally:
        assert svc.stop() == 0
    assert_verified(data_dir)
    _all_there(data_dir, receipts)
    assert_verified(data_dir)


# -- 11. the serve process killed ---------------------------------------------------------------
def _serving_pids(data_dir: str) -> tuple[int, int]:
    def ready() -> tuple[int, int] | None:
        try:
            snap = _snapshot(data_dir)
        except bp.BatpakError:
            return None
        return (snap.supervisor_pid, snap.writer_pid) if snap.state == bp.WriterState.READY else None
    pids: tuple[int, int] = _wait_until("the service to be ready", ready, 60)
    return pids


def test_sigkilled_cli_serve_takes_supervisor_and_writer_with_it(data_dir: str, leftovers: list[int]) -> None:
    proc = subprocess.Popen([EXE, "serve", data_dir, "--segment-max-bytes", str(SMALL)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftovers.append(proc.pid)
    try:
        leftovers += _serving_pids(data_dir)
        with bp.connect(data_dir) as s:
            receipts = _append_all(s, "k", 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _wait_until("the supervisor and the writer to end", lambda: not any(_alive(p) for p in leftovers[1:]), 10)
        assert _snapshot(data_dir).state == bp.WriterState.STOPPED  # a graceful drain, not a kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _all_there(data_dir, receipts)
    assert_verified(data_dir)


def test_a_serve_started_right_after_a_kill_takes_over(data_dir: str, leftovers: list[int]) -> None:
    """What systemd or supervisord do after a SIGKILLed serve: start it again at once. The
    old supervisor says it is stopping; the new one waits for it instead of exiting 4."""
    cmd = [EXE, "serve", data_dir, "--segment-max-bytes", str(SMALL)]
    first = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftovers.append(first.pid)
    second: subprocess.Popen[bytes] | None = None
    try:
        leftovers += _serving_pids(data_dir)
        with bp.connect(data_dir) as s:
            receipts = _append_all(s, "k", 5)
        first.send_signal(signal.SIGKILL)
        second = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        leftovers.append(second.pid)
        first.wait(10)
        _wait_until("the old supervisor and writer to end", lambda: not any(_alive(p) for p in leftovers[1:3]), 15)
        old_writer = leftovers[2]

        def new_writer_or_exit() -> bool:
            snap = _snapshot(data_dir)
            ready = snap.state == bp.WriterState.READY and snap.writer_pid not in (0, old_writer)
            return ready or second.poll() is not None

        _wait_until("the new service", new_writer_or_exit, 30)
        assert second.poll() is None, second.stderr.read() if second.stderr else ""  # not exit 4
        leftovers += _serving_pids(data_dir)
        with bp.connect(data_dir) as s:
            assert [e.event_id for e in s.history("k")] == [r.event_id for r in receipts]
            s.append(bp.Coordinate("k", "s"), K, "after")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_verified(data_dir)


def test_a_sigkilled_serve_caller_takes_its_service_with_it(data_dir: str, leftovers: list[int]) -> None:
    """The decision for ``bp.serve``: the service lives as long as the process that
    started it (the one that can ``stop`` it), like ``batpak-mp serve``."""
    code = f"import batpak_mp as bp, time; bp.serve({data_dir!r}, segment_max_bytes={SMALL}); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftovers.append(proc.pid)
    try:
        leftovers += _serving_pids(data_dir)
        with bp.connect(data_dir) as s:
            receipts = _append_all(s, "k", 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _wait_until("the supervisor and the writer to end", lambda: not any(_alive(p) for p in leftovers[1:]), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _all_there(data_dir, receipts)
    assert_verified(data_dir)


# -- 12. a dead service -------------------------------------------------------------------------
def _append_in_thread(store: bp.Store, entity: str) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(store.append(bp.Coordinate(entity, "s"), K, "in flight"))
        except BaseException as exc:
            outcome.append(exc)
        outcome.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_dead_service_is_noticed_within_a_second(data_dir: str, leftovers: list[int]) -> None:
    svc = bp.serve(data_dir, restart=bp.RestartPolicy.bounded(5, 60_000), segment_max_bytes=SMALL)
    leftovers += [svc.supervisor_pid, svc.writer_pid]
    store = bp.connect(data_dir, timeout=20)
    try:
        receipts = _append_all(store, "d", 5)
        for pid in leftovers:  # hold both so the append below stays in flight
            os.kill(pid, signal.SIGSTOP)
        thread, outcome = _append_in_thread(store, "d")
        time.sleep(0.5)
        assert not outcome, outcome
        killed = time.monotonic()
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        thread.join(20)
        assert isinstance(outcome[0], bp.WriterUnavailable), outcome
        assert outcome[1] - killed < 1.0, f"noticed after {outcome[1] - killed:.2f} s"
        assert "gone" in str(outcome[0]) and str(leftovers[1]) in str(outcome[0])
        assert _snapshot(data_dir).state == bp.WriterState.READY  # what the block still says
        started = time.monotonic()
        with pytest.raises(bp.WriterUnavailable, match="gone"):
            bp.connect(data_dir)
        with pytest.raises(bp.WriterUnavailable, match="gone"):
            store.append(bp.Coordinate("d", "s"), K, "after")
        assert time.monotonic() - started < 1.0
    finally:
        store.close()
        svc.stop()
    _all_there(data_dir, receipts)
    assert_verified(data_dir)


def test_a_writer_restart_under_a_live_supervisor_is_ridden_through(data_dir: str, leftovers: list[int]) -> None:
    svc = bp.serve(data_dir, restart=bp.RestartPolicy.bounded(5, 60_000), segment_max_bytes=SMALL)
    first = svc.writer_pid
    leftovers += [svc.supervisor_pid, first]
    try:
        with bp.connect(data_dir, timeout=30) as store:
            receipts = _append_all(store, "r", 5)
            os.kill(first, signal.SIGSTOP)  # the heartbeat goes stale while the supervisor lives
            thread, outcome = _append_in_thread(store, "r")
            time.sleep(1.0)  # well past the client's staleness threshold
            assert not outcome, outcome
            os.kill(first, signal.SIGKILL)
            thread.join(30)
            assert isinstance(outcome[0], bp.Receipt), outcome  # re-sent to the next writer, no error
            assert svc.writer_pid not in (0, first)
            receipts += [outcome[0], *_append_all(store, "r", 3)]
            assert [e.event_id for e in store.history("r")] == [r.event_id for r in receipts]
    finally:
        assert svc.stop() == 0
    assert_verified(data_dir)


# -- 13. close vs subscriptions, posix_ipc errors, the directory, garbage replies -----------------
_CLOSE_RACE = textwrap.dedent("""
    import json, random, sys, threading, time
    import batpak_mp as bp

    data_dir, rounds = sys.argv[1], int(sys.argv[2])
    seen = {}

    def note(what):
        seen[what] = seen.get(what, 0) + 1

    def subscriber(sub):
        try:
            for _ in sub:
                pass
            note("ended")
        except bp.StoreClosed:
            note("StoreClosed")
        except BaseException as exc:
            note(repr(exc)[:200])

    def poller(store):
        try:
            while True:
                store.frontier()
                store.query_after(0, limit=1)
                store.wait_for_durable(0, 1.0)
        except bp.StoreClosed:
            note("StoreClosed")
        except BaseException as exc:
            note(repr(exc)[:200])

    for i in range(rounds):
        store = bp.connect(data_dir)
        threads = [threading.Thread(target=subscriber, args=(store.subscribe(after=0),)),
                   threading.Thread(target=subscriber, args=(store.subscribe(),)),
                   threading.Thread(target=poller, args=(store,))]
        for t in threads:
            t.start()
        time.sleep(random.random() * 0.05)
        store.close()
        for t in threads:
            t.join(10)
            if t.is_alive():
                note("still running 10 s after close")
    print(json.dumps(seen))
""")


def test_close_racing_subscriptions_gives_store_closed(data_dir: str) -> None:
    with bp.serve(data_dir, segment_max_bytes=SMALL) as svc, bp.connect(data_dir) as writer_side:
        stop = threading.Event()

        def append() -> None:  # publishes keep waking the subscribers
            while not stop.is_set():
                writer_side.append(bp.Coordinate("race", "s"), K, 1)
                time.sleep(0.002)

        appender = threading.Thread(target=append)
        appender.start()
        try:
            child = subprocess.run([sys.executable, "-c", _CLOSE_RACE, data_dir, "40"], capture_output=True,
                                   text=True, timeout=300)
        finally:
            stop.set()
            appender.join()
    assert svc.exit_code == 0
    assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
    seen = json.loads(child.stdout)
    assert set(seen) == {"StoreClosed"}, seen
    assert seen["StoreClosed"] == 40 * 3
    assert_verified(data_dir)


def test_signals_while_waiting_for_the_writer_do_not_escape(data_dir: str) -> None:
    """posix_ipc raises its own SignalError (not an OSError) when a signal handler runs
    during a wait: the client waits on instead."""
    svc = bp.serve(data_dir, segment_max_bytes=SMALL)
    interrupts = 0

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with bp.connect(data_dir) as store:
            receipts = _append_all(store, "sig", 2)
            os.kill(svc.writer_pid, signal.SIGSTOP)
            threading.Timer(0.5, os.kill, (svc.writer_pid, signal.SIGCONT)).start()
            signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)  # the main thread waits on the doorbell
            try:
                receipts.append(store.append(bp.Coordinate("sig", "s"), K, "through the signals"))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
            assert interrupts > 5
            assert [e.event_id for e in store.history("sig")] == [r.event_id for r in receipts]
    finally:
        signal.signal(signal.SIGALRM, old)
        assert svc.stop() == 0
    assert_verified(data_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_another_users_client_gets_a_typed_error(data_dir: str) -> None:
    """The service's IPC objects are 0600: a client of another uid is refused by the
    kernel, and gets a BatpakError for it, not a posix_ipc error."""
    code = textwrap.dedent(f"""
        import batpak_mp as bp
        try:
            bp.connect({data_dir!r})
        except bp.BatpakError as exc:
            print("typed", type(exc).__name__)
        except BaseException as exc:
            print("raw", type(exc).__module__, type(exc).__name__, exc)
    """)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with bp.serve(data_dir, segment_max_bytes=SMALL) as svc:
        out = subprocess.run([*nobody, sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
        cli = subprocess.run([*nobody, EXE, "status", data_dir], capture_output=True, text=True, timeout=60, cwd="/")
    assert svc.exit_code == 0
    assert out.stdout.startswith("typed "), out.stdout + out.stderr
    assert cli.returncode == 3 and cli.stderr.startswith("error: ") and "internal error" not in cli.stderr, cli.stderr
    assert_verified(data_dir)


def test_serve_refuses_a_directory_open_to_others_and_never_chmods(tmp_path: Path) -> None:
    missing = tmp_path / "new" / "data"
    with bp.serve(missing, segment_max_bytes=SMALL) as svc:
        assert (missing.stat().st_mode & 0o777) == 0o700  # created 0700
    assert svc.exit_code == 0
    assert_verified(str(missing))

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o750)
    with pytest.raises(UnsafeDirectory) as caught:
        bp.serve(shared)
    assert caught.value.mode == 0o750 and "0750" in str(caught.value) and isinstance(caught.value, PermissionError)
    cli = subprocess.run([EXE, "serve", str(shared)], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 3 and "0750" in cli.stderr and cli.stderr.startswith("error: "), cli.stderr
    assert (shared.stat().st_mode & 0o777) == 0o750 and not list(shared.iterdir())  # untouched

    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(UnsafeDirectory, match="another user") as caught:
            bp.serve(foreign)
        assert caught.value.owner_uid == 65534 and not list(foreign.iterdir())


_GARBAGE_WRITER = textwrap.dedent("""
    import sys
    import msgpack
    from batpak_mp import writer
    from batpak_mp._ipc import wire as W

    real = W.encode_reply
    answers = iter([
        lambda r: real(r._replace(data="not a list of receipts")),                 # wrong shape
        lambda r: real(r._replace(data=[[b"x", "1", 1, b"h", b"p", 0, "yes", None]])),  # wrong types
        lambda r: real(r._replace(status="ok")),                                   # status of the wrong type
        lambda r: real(r)[:4 + (len(real(r)) - 4) // 2],                           # truncated
        lambda r: (lambda b: W.LEN.pack(len(b)) + b)(msgpack.packb([r.request_id, r.writer_epoch])),  # 2 of 4
        lambda r: real(r._replace(status=W.STATUS_ERROR, data=["FenceLost", [5, None]])),  # an error of bad fields
        lambda r: real(r._replace(status=W.STATUS_ERROR, data=["ReplyTooLarge", "big"])),
        lambda r: real(r._replace(request_id="one")),
        lambda r: real(r._replace(data=[])),                                      # no receipt
    ])

    def encode_reply(reply):
        answer = next(answers, real)
        body = answer(reply)
        if answer is not real:  # a truncated body says its own length: what a torn write would leave
            body = W.LEN.pack(len(body) - 4) + body[4:]
        return body

    W.encode_reply = encode_reply
    sys.exit(writer.main(sys.argv[1:]))
""")
_GARBAGE_ANSWERS = 9


def test_a_writer_answering_garbage_gives_protocol_errors(data_dir: str) -> None:
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", _GARBAGE_WRITER, data_dir, "--segment-max-bytes", str(SMALL),
                             "--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            assert ready.readline() == b"ready\n"
        with bp.connect(data_dir, timeout=10) as store:
            for i in range(_GARBAGE_ANSWERS):
                with pytest.raises(bp.ProtocolError):
                    store.append(bp.Coordinate("g", "s"), K, i)
            good = store.append(bp.Coordinate("g", "s"), K, "good")  # the client recovers
            assert store.get(good.event_id).payload == "good"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        cleanup_ipc(data_dir)
    assert_verified(data_dir)
