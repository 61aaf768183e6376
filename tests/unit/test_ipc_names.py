"""The cross-process names (``batpak_mp._ipc.names``): each built once, parsed back by its
inverse, and the only spelling used by the writer, the client, the service, the CLI and
the supervisor."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batpak_mp._errors import ProtocolError
from batpak_mp._format.directory import LOCK_FILE
from batpak_mp._ipc import names as N
from batpak_mp._ipc import wire as W

ROOT = Path(__file__).resolve().parents[2]


def test_the_prefix_is_one_per_real_path(tmp_path: Path) -> None:
    real = tmp_path / "data"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    prefix = N.ipc_prefix(str(real))
    assert re.fullmatch(r"/bpmp-[0-9a-f]{12}", prefix)
    assert N.ipc_prefix(str(link)) == prefix == N.ipc_prefix(str(real) + "/")
    assert N.ipc_prefix(str(tmp_path / "other")) != prefix
    assert N.control_name(str(real)) == prefix + "-ctl"
    assert N.request_queue_name(str(real)) == prefix + "-req"


@given(pid=st.integers(1, N.PID_MAX), token=st.binary(min_size=1, max_size=16))
def test_an_area_name_parses_back(pid: int, token: bytes) -> None:
    prefix = "/bpmp-0123456789ab"
    name = N.area_name(prefix, pid, token.hex())
    assert N.parse_area_name(name) == N.AreaName(prefix, pid, token.hex())
    assert N.is_area_of(name, prefix) and not N.is_area_of(name, "/bpmp-ba9876543210")
    sem = N.semaphore_name(name)
    assert N.parse_area_name(sem) is None  # a doorbell is not an area
    # /dev/shm shows them as files; parsed back, both name the same area
    mem_obj = N.parse_shm_file(N.shm_file(name))
    sem_obj = N.parse_shm_file(N.shm_file(sem, semaphore=True))
    assert mem_obj == N.ShmObject(name, False, N.AreaName(prefix, pid, token.hex()))
    assert sem_obj == N.ShmObject(sem, True, N.AreaName(prefix, pid, token.hex()))


@pytest.mark.parametrize("name", [
    "/bpmp-0123456789ab-ctl", "/bpmp-0123456789ab-req", "/bpmp-0123456789ab-c-00", "/bpmp-0123456789ab-c12-",
    "/bpmp-0123456789ab-c12-XYZ", "/bpmp-0123456789ab-c12345678901-00", "/bpmp-0123456789ab-c1-00/../x",
    "/bpmp-0123456789a-c1-00", "bpmp-0123456789ab-c1-00", "/other-c1-00", "", "/bpmp-0123456789ab-c1-" + "0" * 33,
    # strict: ASCII digits only, no leading zero, a pid the kernel can give (files in /dev/shm are anyone's)
    "/bpmp-0123456789ab-c9999999999-ab", "/bpmp-0123456789ab-c4194305-ab", "/bpmp-0123456789ab-c0-ab",
    "/bpmp-0123456789ab-c012-ab", "/bpmp-0123456789ab-c\u0661\u0662\u0663-ab", "/bpmp-0123456789ab-c\uff11-ab",
    "/bpmp-0123456789ab-c1-\u0661", "/bpmp-\u0660123456789ab-c1-00",
])
def test_anything_else_is_not_an_area(name: str) -> None:
    assert N.parse_area_name(name) is None


def test_the_store_files_of_a_listing() -> None:
    prefix = "/bpmp-0123456789ab"
    area = N.area_name(prefix, 42, "deadbeef")
    other = N.area_name("/bpmp-ba9876543210", 42, "deadbeef")
    entries = [N.shm_file(area), N.shm_file(N.semaphore_name(area), semaphore=True), "bpmp-0123456789ab-ctl",
               N.shm_file(other), "sem.bpmp-0123456789ab-ctls", "unrelated", "sem.mp-1234"]
    objects = N.client_objects(entries, prefix)
    assert [(o.name, o.semaphore) for o in objects] == [(area, False), (N.semaphore_name(area), True)]
    assert N.store_files(entries, prefix) == sorted(entries[:3])


def test_the_lock_files() -> None:
    assert N.WRITER_LOCK_FILE == LOCK_FILE == "writer.lock"
    assert N.writer_lock_path("/d") == "/d/writer.lock"
    assert N.supervisor_lock_path("/d") == "/d/supervisor.lock"


def test_the_writer_accepts_messages_naming_only_its_own_areas() -> None:
    prefix = "/bpmp-0123456789ab"
    ours = N.area_name(prefix, os.getpid(), "00ff")

    def area_pid(name: str) -> int | None:
        parsed = N.parse_area_name(name)
        return parsed.pid if parsed is not None and parsed.prefix == prefix else None

    def decode(area: str, pid: int = os.getpid()) -> W.Message:
        return W.decode_message(W.encode_message(W.Message(W.WIRE_VERSION, pid, area, 1)), area_pid)

    assert decode(ours).area == ours
    for bad in (N.area_name("/bpmp-ba9876543210", 1, "00"), N.semaphore_name(ours), prefix + "-ctl"):
        with pytest.raises(ProtocolError):
            decode(bad)
    with pytest.raises(ProtocolError, match="not the pid of its area"):  # a message claims its area's pid
        decode(ours, os.getpid() + 1)


def test_an_area_rings_one_doorbell_of_many() -> None:
    rng = random.Random(7)
    tokens = [N.area_token(rng.randrange(4096), f"{rng.getrandbits(32):08x}") for _ in range(1000)]
    slots = {N.doorbell_slot(N.area_name("/bpmp-0123456789ab", 42, t), 4096) for t in tokens}
    assert all(0 <= s < 4096 for s in slots) and len(slots) > 800  # spread: collisions cost a spurious wake-up


def test_an_area_token_names_its_doorbell_word() -> None:
    for bell in (0, 1, 0xABC, 4095):
        name = N.area_name("/bpmp-0123456789ab", 42, N.area_token(bell, "deadbeef"))
        assert N.parse_area_name(name) is not None
        assert N.doorbell_slot(name, 4096) == bell
    # a name that is not an area's still gets a word (a hash), never an error
    assert 0 <= N.doorbell_slot("/bpmp-0123456789ab-ctl", 4096) < 4096


# Spellings that must appear only in batpak_mp/_ipc/names.py (and _format/directory.py for
# the writer's lock): a second copy anywhere in the code is a contract written twice.
ONE_HOME = {
    '"/dev/shm"': "batpak_mp/_ipc/names.py",
    '"supervisor.lock"': "batpak_mp/_ipc/names.py",
    '"writer.lock"': "batpak_mp/_format/directory.py",
    '"-req"': "batpak_mp/_ipc/names.py",
    '"-ctl"': "batpak_mp/_ipc/names.py",
    '"sem."': "batpak_mp/_ipc/names.py",
    '"/bpmp-"': "batpak_mp/_ipc/names.py",
}


@pytest.mark.parametrize("literal", sorted(ONE_HOME))
def test_each_name_is_written_once(literal: str) -> None:
    files = [*ROOT.glob("batpak_mp/**/*.py"), *ROOT.glob("supervisor/batpak_supervisor/*.py")]
    found = sorted(str(p.relative_to(ROOT)) for p in files if literal in p.read_text())
    assert found == [ONE_HOME[literal]]
