"""Integration test: ``batpak-mp serve`` under the real Supervisor (supervisord, from PyPI).

Owns: the two restart layers of a deployment. supervisord (outer) runs the program section
of ``docs/deploy/supervisord.conf`` with only its paths swapped for temporary ones; our
supervisor (inner, inside ``batpak-mp serve``) must restart a SIGKILLed writer by itself
(new pid, ``restarts == 1``, a higher epoch, the first event still there, appends still
answered) while supervisord sees nothing; ``supervisorctl stop`` must drain the service to
exit 0 (STOPPED, "exit status 0"); the directory must verify at the end. Also: supervisord's
package ``supervisor`` and ours, ``batpak_supervisor``, import side by side in one
interpreter without shadowing each other.

Real processes only: supervisord, supervisorctl and batpak-mp from this virtual
environment. A finalizer stops supervisord, kills whatever is left and unlinks the data
directory's IPC objects. Skipped only when supervisord's package cannot be imported
(``pip install -e '.[dev]'`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import batpak_mp as bp
from batpak_mp._ipc.control import ControlBlock, ControlSnapshot
from batpak_mp._service import cleanup_ipc
from batpak_mp._values import WriterState

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "deploy" / "supervisord.conf"
VENV_BIN = Path(sys.executable).parent
SUPERVISORD = VENV_BIN / "supervisord"
SUPERVISORCTL = VENV_BIN / "supervisorctl"
BATPAK_MP = VENV_BIN / "batpak-mp"
PROGRAM = "batpak-mp"
EXAMPLE_BIN = "/opt/batpak-mp/venv/bin/batpak-mp"
EXAMPLE_DATA = "/var/lib/batpak/data"
READY_S = 30.0  # supervisord start + Python start of serve, supervisor and writer + recovery

# What the brief and docs/OPERATIONS.md promise about the example; checked, then run as-is.
EXPECTED_SETTINGS = {
    "autorestart": "unexpected", "exitcodes": "0,2,3,4", "stopsignal": "TERM",
    "stopasgroup": "false", "killasgroup": "true",
}


def _python_here(code: str, cwd: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this venv, away from the repository root
    (``-P`` and a neutral ``cwd``), as a deployed program would run."""
    return subprocess.run([sys.executable, "-P", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def _why_no_supervisord() -> str | None:
    probe = _python_here("import supervisor.supervisord, supervisor.supervisorctl", tempfile.gettempdir())
    if probe.returncode != 0:
        return ("Supervisor (supervisord) is not importable in this venv; `pip install supervisor` "
                f"(it is in the dev extra): {probe.stderr.strip().splitlines()[-1:]}")
    for exe in (SUPERVISORD, SUPERVISORCTL, BATPAK_MP):
        if not exe.exists():
            return f"{exe} is missing: install supervisor and batpak-mp into this venv"
    return None


WHY_SKIP = _why_no_supervisord()
pytestmark = pytest.mark.skipif(WHY_SKIP is not None, reason=WHY_SKIP or "")


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_until(what: str, cond: Callable[[], Any], timeout: float, diag: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diag()}")
        time.sleep(0.05)


def program_section(data_dir: str, work: Path) -> tuple[str, dict[str, str]]:
    """The example's ``[program:batpak-mp]`` section with test paths, and its settings."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index(f"[program:{PROGRAM}]")
    body: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("["):
            break
        if line.strip() and not line.lstrip().startswith(";"):
            body.append(line)
    settings = dict(line.split("=", 1) for line in body)
    assert settings["command"].startswith(f"{EXAMPLE_BIN} serve {EXAMPLE_DATA} ")
    overrides = {
        "command": settings["command"].replace(EXAMPLE_BIN, str(BATPAK_MP)).replace(EXAMPLE_DATA, data_dir),
        "directory": str(work),
        "stdout_logfile": str(work / "batpak-mp.log"),
    }
    out = [f"[program:{PROGRAM}]"]
    for key, value in settings.items():
        if key == "user":  # needs a root supervisord and a real user; the test runs as whoever it is
            continue
        out.append(f"{key}={overrides.get(key, value)}")
    return "\n".join(out) + "\n", settings


class Supervisord:
    """One supervisord process under test, with its config, logs and the pids it was seen to run."""

    def __init__(self, work: Path, data_dir: str) -> None:
        self.work = work
        self.data_dir = data_dir
        self.sock_dir = tempfile.mkdtemp(prefix="bpsv-")  # a unix socket path must stay short (108 bytes)
        self.conf = work / "supervisord.conf"
        self.log_path = work / "supervisord.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()  # serve, our supervisor, writers: killed in cleanup if alive
        self._block: ControlBlock | None = None

    def write_conf(self) -> dict[str, str]:
        section, settings = program_section(self.data_dir, self.work)
        sock = os.path.join(self.sock_dir, "s.sock")
        self.conf.write_text(textwrap.dedent(f"""\
            [unix_http_server]
            file={sock}
            chmod=0700

            [supervisord]
            nodaemon=true
            logfile={self.log_path}
            pidfile={self.work / "supervisord.pid"}
            childlogdir={self.work}
            loglevel=info
            minfds=64
            minprocs=16

            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

            [supervisorctl]
            serverurl=unix://{sock}

            """) + section)
        return settings

    def start(self) -> None:
        with open(self.work / "supervisord.out", "ab") as out:
            self.proc = subprocess.Popen([str(SUPERVISORD), "-c", str(self.conf)], cwd=self.work,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SUPERVISORCTL), "-c", str(self.conf), *args], cwd=self.work,
                              capture_output=True, text=True, timeout=60)

    def program_pid(self) -> int:
        out = self.ctl("pid", PROGRAM).stdout.strip()
        return int(out) if out.isdigit() else 0

    def status(self) -> str:
        return self.ctl("status", PROGRAM).stdout.strip()

    def logs(self) -> str:
        parts = []
        for name in ("supervisord.log", "supervisord.out", "batpak-mp.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n" + (self.work / name).read_text(errors="replace")[-6000:])
        return "\n".join(parts)

    def control(self) -> ControlSnapshot | None:
        if self._block is None:
            try:
                self._block = ControlBlock.attach(self.data_dir)
            except bp.WriterUnavailable:
                return None
        return self._block.read()

    def ready_writer(self, not_pid: int = 0) -> ControlSnapshot:
        """Wait until a writer other than ``not_pid`` is READY (failing fast if supervisord died)."""
        def check() -> ControlSnapshot | None:
            assert self.proc is not None
            assert self.proc.poll() is None, f"supervisord exited with {self.proc.returncode}\n{self.logs()}"
            snap = self.control()
            if snap is None or snap.state != WriterState.READY or snap.writer_pid in (0, not_pid):
                return None
            self.pids.update({snap.writer_pid, snap.supervisor_pid})
            return snap
        snap: ControlSnapshot = _wait_until(f"a READY writer other than pid {not_pid}", check, READY_S, self.logs)
        return snap

    def close_block(self) -> None:
        if self._block is not None:
            self._block.close()
            self._block = None

    def shutdown(self, timeout: float = 30.0) -> int:
        """SIGTERM supervisord (it stops its programs first) and wait for it."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        self.close_block()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.shutdown(20.0)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids:  # only our own processes: their command line names the data directory
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if any(self.data_dir in part for part in p.cmdline()):
                    p.kill()
        cleanup_ipc(self.data_dir)  # also the client areas and doorbells a failed test left
        shutil.rmtree(self.sock_dir, ignore_errors=True)


@pytest.fixture
def supervisord(tmp_path: Path, data_dir: str) -> Iterator[Supervisord]:
    s = Supervisord(tmp_path, data_dir)
    try:
        yield s
    finally:
        s.cleanup()


def test_imports_side_by_side(tmp_path: Path) -> None:
    """supervisord's ``supervisor`` and our ``batpak_supervisor`` live in one interpreter."""
    code = textwrap.dedent("""\
        import json
        from importlib import metadata
        import supervisor, supervisor.options, supervisor.supervisord, supervisor.supervisorctl
        import batpak_supervisor, batpak_supervisor.policy, batpak_supervisor.process
        import batpak_mp
        print(json.dumps({
            "supervisor": supervisor.__file__, "batpak_supervisor": batpak_supervisor.__file__,
            "supervisord_main": callable(supervisor.supervisord.main),
            "our_supervisor": callable(batpak_supervisor.process.run),
            "supervisor_dist": metadata.version("supervisor"),
            "our_top_level": metadata.distribution("batpak-mp").read_text("top_level.txt"),
        }))
        """)
    result = _python_here(code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    theirs, ours = Path(found["supervisor"]).resolve(), Path(found["batpak_supervisor"]).resolve()
    assert ours == ROOT / "supervisor" / "batpak_supervisor" / "__init__.py", ours  # our folder, our name only
    assert theirs != ours and (ROOT / "supervisor") not in theirs.parents, theirs
    assert "site-packages" in theirs.parts, theirs
    assert found["supervisord_main"] and found["our_supervisor"]
    assert found["supervisor_dist"]
    assert "supervisor" not in (found["our_top_level"] or "").split(), found["our_top_level"]


def test_served_under_supervisord(supervisord: Supervisord, data_dir: str) -> None:
    settings = supervisord.write_conf()
    assert {k: settings[k] for k in EXPECTED_SETTINGS} == EXPECTED_SETTINGS
    assert int(settings["stopwaitsecs"]) > 10  # above the supervisor's own 10 s drain timeout
    supervisord.start()

    first = supervisord.ready_writer()
    serve_pid = _wait_until("supervisord to report the serve pid", supervisord.program_pid, 10.0, supervisord.logs)
    supervisord.pids.add(serve_pid)
    assert psutil.Process(first.supervisor_pid).ppid() == serve_pid  # serve -> our supervisor -> writer
    assert psutil.Process(first.writer_pid).ppid() == first.supervisor_pid
    assert first.restarts == 0

    coord, kind = bp.Coordinate("order:1", "shop"), bp.Kind(1, 1)
    with bp.connect(data_dir, timeout=30) as store:
        r1 = store.append(coord, kind, {"step": 1})

        os.kill(first.writer_pid, signal.SIGKILL)  # the inner layer must handle this
        second = supervisord.ready_writer(not_pid=first.writer_pid)
        assert second.writer_pid != first.writer_pid and not _alive(first.writer_pid)
        assert second.restarts == 1
        assert second.writer_epoch > first.writer_epoch
        assert second.supervisor_pid == first.supervisor_pid

        r2 = store.append(coord, kind, {"step": 2})  # the same client rides through the restart
        assert r2.global_sequence > r1.global_sequence and r2.entity_clock == r1.entity_clock + 1
        assert store.get(r1.event_id).payload == {"step": 1}
        assert [e.event_id for e in store.history("order:1")] == [r1.event_id, r2.event_id]
        assert store.verify_receipt(r1) and store.verify_receipt(r2)

    # supervisord saw nothing: the same serve process, started once, still running
    assert supervisord.program_pid() == serve_pid
    assert "RUNNING" in supervisord.status() or "STARTING" in supervisord.status()
    log = supervisord.logs()
    assert f"writer pid {first.writer_pid} killed by SIGKILL" in log and "restarting writer" in log, log
    assert len(re.findall(rf"spawned: '{PROGRAM}'", (supervisord.work / "supervisord.log").read_text())) == 1

    supervisord.close_block()
    stop = supervisord.ctl("stop", PROGRAM)
    assert f"{PROGRAM}: stopped" in stop.stdout, stop.stdout + stop.stderr + supervisord.logs()
    assert "STOPPED" in supervisord.status()
    sd_log = (supervisord.work / "supervisord.log").read_text()
    assert f"stopped: {PROGRAM} (exit status 0)" in sd_log, supervisord.logs()
    for pid in (serve_pid, second.supervisor_pid, second.writer_pid):
        assert not _alive(pid), f"pid {pid} outlived the stop"
    with pytest.raises(bp.WriterUnavailable):  # serve unlinked the control block on its way out
        ControlBlock.attach(data_dir)

    assert supervisord.shutdown() == 0
    report = bp.verify(data_dir)
    assert report.ok, report.problems
    assert report.events_checked >= 2


def test_import_supervisor_from_the_repository_root_finds_supervisord() -> None:
    """With the repository root first on ``sys.path`` (a script or ``python -c`` run from a
    checkout), ``import supervisor`` must still be supervisord's package: our folder
    ``supervisor/`` holds only ``batpak_supervisor/``, so it is at most a namespace portion,
    which a regular package later on the path wins over."""
    if WHY_SKIP:
        pytest.skip(WHY_SKIP)
    code = "import json, supervisor, supervisor.supervisord; print(json.dumps(supervisor.__file__))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = Path(json.loads(result.stdout)).resolve()
    assert "site-packages" in theirs.parts and (ROOT / "supervisor") not in theirs.parents, theirs
