"""Payload encryption and crypto-shredding (issue 13 #4): payloads of the entities a
store encrypts are stored under a data key per entity, wrapped by a master key the
operator keeps outside the data directory; ``shred`` destroys an entity's key, and its
events then read as shredded (flag, payload None) in this process, after a reopen, in
another process and in a copy taken afterwards, while the chain, receipts and
``bp.verify`` still pass over the ciphertext. A wrong, missing, malformed or misplaced
master key is ``MasterKeyError`` at open, with nothing written. Every test ends with
``bp.verify`` clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp import _values

READER = r"""
import sys, batpak_mp as bp
s = bp.connect(sys.argv[1])
ev = s.get(bytes.fromhex(sys.argv[2]))
print(ev.encrypted, ev.shredded, ev.payload)
s.close()
"""


@pytest.fixture
def master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = tmp_path / "secrets" / "master.key"
    path.parent.mkdir()
    path.write_bytes(os.urandom(32))
    monkeypatch.setenv("BATPAK_MP_MASTER_KEY_FILE", str(path))
    monkeypatch.delenv("BATPAK_MP_MASTER_KEY", raising=False)
    yield str(path)


def encrypted_store(d: str) -> tuple[bp.Receipt, bp.Receipt, bp.Receipt]:
    with bp.Engine.open(d, SMALL) as eng:
        eng.enable_encryption(["user-"])
        a = eng.append(bp.Coordinate("user-1", "app"), bp.Kind(1, 1), {"email": "ann@example.org"})
        b = eng.append(bp.Coordinate("user-2", "app"), bp.Kind(1, 1), {"email": "bob@example.org"})
        c = eng.append(bp.Coordinate("orders", "app"), bp.Kind(1, 2), {"total": 5})
    return a, b, c


def test_payloads_are_encrypted_and_a_shred_makes_them_unreadable_everywhere(master: str, tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    a, b, c = encrypted_store(d)
    raw = b"".join(p.read_bytes() for p in Path(d, "segments").iterdir())
    assert b"ann@example.org" not in raw and b"bob@example.org" not in raw  # ciphertext on disk
    with bp.Engine.open(d, SMALL) as eng:
        ev = eng.get(a.event_id)
        assert ev.encrypted and not ev.shredded and ev.payload == {"email": "ann@example.org"}
        assert not eng.get(c.event_id).encrypted and eng.get(c.event_id).payload == {"total": 5}
        again = eng.append(bp.Coordinate("user-1", "app"), bp.Kind(1, 1), {"email": "ann@new.org"})
        eng.shred("user-1")
        for r in (a, again):
            ev = eng.get(r.event_id)
            assert ev.shredded and ev.payload is None and ev.event_hash == r.event_hash
            assert eng.verify_receipt(r)
        assert eng.get(b.event_id).payload == {"email": "bob@example.org"}
        assert [e.shredded for e in eng.history("user-1")] == [True, True]
        assert len(list(eng.walk_ancestors(again.event_id))) == 2
        with pytest.raises(bp.InvalidCoordinate):
            eng.shred("")
    copy = str(tmp_path / "copy")
    shutil.copytree(d, copy)  # a copy taken after the shred holds no key for user-1
    bp.backup(d, str(tmp_path / "backup"))
    bp.fork(d, str(tmp_path / "fork"))  # a new store id: its inherited events keep the parent's tag
    for other in ("backup", "fork"):
        assert_verified(str(tmp_path / other))
        with bp.Engine.open(str(tmp_path / other), SMALL) as eng:
            assert eng.get(a.event_id).shredded and eng.get(b.event_id).payload == {"email": "bob@example.org"}
    assert_verified(d)
    assert_verified(copy)
    with bp.Engine.open(copy, SMALL) as eng:
        assert eng.get(a.event_id).shredded and eng.get(b.event_id).payload == {"email": "bob@example.org"}
    svc = bp.serve(d, segment_max_bytes=1 << 20)  # the served writer and another process read it the same
    try:
        for r, want in ((a, "True True None"), (b, "True False {'email': 'bob@example.org'}")):
            out = subprocess.run([sys.executable, "-c", READER, d, r.event_id.hex()], capture_output=True, text=True,
                                 timeout=60)
            assert out.stdout.strip() == want, out.stderr
        store = bp.connect(d)
        try:
            store.shred("user-2")
            assert store.get(b.event_id).shredded
        finally:
            store.close()
    finally:
        svc.stop()
    assert_verified(d)


def test_a_shred_on_a_store_without_encryption_is_refused(master: str, tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    with bp.Engine.open(d, SMALL) as eng:
        eng.append(bp.Coordinate("user-1", "app"), bp.Kind(1, 1), {"x": 1})
        with pytest.raises(bp.InvalidArgument, match="encrypts no payloads"):
            eng.shred("user-1")
        with pytest.raises(bp.InvalidArgument):
            eng.enable_encryption([])
    assert_verified(d)


def snapshot(d: str) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(d).rglob("*") if p.is_file()
            and p.name != "writer.lock"}


@pytest.mark.parametrize("how", ["wrong", "missing", "malformed", "inside"])
def test_a_bad_master_key_is_refused_at_open_and_nothing_is_written(master: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    d = str(tmp_path / "s")
    encrypted_store(d)
    before = snapshot(d)
    if how == "wrong":
        monkeypatch.setenv("BATPAK_MP_MASTER_KEY", "11" * 32)
        monkeypatch.delenv("BATPAK_MP_MASTER_KEY_FILE")
    elif how == "missing":
        monkeypatch.delenv("BATPAK_MP_MASTER_KEY_FILE")
    elif how == "malformed":
        Path(master).write_bytes(b"not a key")
    else:
        inside = Path(d, "master.key")
        inside.write_bytes(Path(master).read_bytes())
        monkeypatch.setenv("BATPAK_MP_MASTER_KEY_FILE", str(inside))
        before = snapshot(d)
    with pytest.raises(bp.MasterKeyError):
        bp.Engine.open(d, SMALL)
    assert snapshot(d) == before
    if how == "inside":
        Path(d, "master.key").unlink()
    assert_verified(d)  # verify needs no key: the chain covers the ciphertext


def test_a_process_without_the_master_key_gets_a_typed_error_not_garbage(master: str, tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    a, _, _ = encrypted_store(d)
    with bp.Engine.open(d, SMALL) as eng:
        ev = eng.get(a.event_id)
        saved = dict(_values._CIPHERS)
        _values._CIPHERS.clear()  # as in a process that opened no master key for this store
        try:
            with pytest.raises(bp.MasterKeyError):
                _ = ev.payload
        finally:
            _values._CIPHERS.update(saved)
        assert eng.get(a.event_id).payload == {"email": "ann@example.org"}
    assert_verified(d)


def test_a_service_with_a_wrong_master_key_fails_at_once_naming_it(master: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path / "s")
    encrypted_store(d)
    before = snapshot(d)
    monkeypatch.setenv("BATPAK_MP_MASTER_KEY", "22" * 32)  # not the key the data keys were wrapped with
    monkeypatch.delenv("BATPAK_MP_MASTER_KEY_FILE")
    t0 = time.monotonic()
    with pytest.raises(bp.WriterUnavailable, match="master key"):
        bp.serve(d, restart=bp.RestartPolicy.bounded(5, 60_000))
    assert time.monotonic() - t0 < 20  # refused at once (exit 2: restarting cannot help), not after 5 restarts
    after = snapshot(d)
    after.pop("supervisor.lock", None)  # the service's own lock file, not the store's
    assert after == before  # nothing written
    assert_verified(d)
