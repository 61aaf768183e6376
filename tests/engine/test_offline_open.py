"""The read-only offline open (``_read/offline.py``) and the CLI reads that use it.

A read with no writer must not write: every test hashes the whole directory (bytes,
sizes, mtimes, the file list) before and after. It reads what recovery would keep
(whole commits, indexed), fails closed where recovery would, and works while another
process holds ``writer.lock`` or starts a writer beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from _engine_helpers import copy_store, flip_bit, read_layout, segment_ids, segment_path, set_frame_field
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.directory import INDEX_DIR, LOCK_FILE, META_FILE, RECORDS_FILE
from batpak_mp._format.frame import FLAG_COMMIT_END
from batpak_mp._prepare import prepare
from batpak_mp._read.offline import OfflineStore
from batpak_mp._values import FENCE_ENTITY, SYSTEM_FENCE_COMMIT
from batpak_mp.cli import main

K = bp.Kind(1, 2)
Snapshot = dict[str, tuple[str, int, int]]


def snapshot(root: str) -> Snapshot:
    """Every file under ``root``: (sha256, size, mtime_ns); directories by their listing."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        out[dirpath] = (hashlib.sha256("\0".join(sorted(dirnames + filenames)).encode()).hexdigest(), 0,
                        os.stat(dirpath).st_mtime_ns)
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[path] = (digest, st.st_size, st.st_mtime_ns)
    return out


def fill(e: bp.Engine, batches: int, per: int = 30) -> list[bp.Receipt]:
    receipts: list[bp.Receipt] = []
    for b in range(batches):
        receipts += e.append_batch([
            bp.BatchItem(bp.Coordinate(f"ent{(b * per + i) % 11}", f"sc{i % 3}"), K, {"b": b, "i": i, "pad": "x" * 300},
                         causation_id=b"\1" * 16 if i % 4 == 0 else None)
            for i in range(per)
        ])
    return receipts


def fields(ev: bp.Event) -> tuple[object, ...]:
    return (ev.event_id, ev.global_sequence, ev.coordinate, ev.kind, ev.entity_clock, ev.wall_ms, ev.payload_bytes,
            ev.payload_version, ev.event_hash, ev.prev_hash, ev.causation_id, ev.correlation_id)


def everything(source: bp.Engine | OfflineStore) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    after = 0
    while page := source.query_after(after, limit=250).events:
        out += [fields(ev) for ev in page]
        after = page[-1].global_sequence
    return out


def tear_tail(data_dir: str) -> int:
    """A crash in the middle of a write: the newest segment gets a whole frame of a request
    that never ended (no COMMIT_END) and the first half of another frame after it, past
    its last commit. Returns the sequence of the last whole commit."""
    sid = segment_ids(data_dir)[-1]
    layout = read_layout(segment_path(data_dir, sid))
    last = layout.frames[-1]
    with open(segment_path(data_dir, sid), "r+b") as f:
        f.seek(last.offset)
        frame = bytearray(f.read(last.frame_len))
    # the next sequence, no COMMIT_END: a whole frame of a request whose end never came
    unended = set_frame_field(set_frame_field(frame, "<Q", 24, last.seq + 1), "<H", 10, frame[10] & ~FLAG_COMMIT_END)
    with open(segment_path(data_dir, sid), "r+b") as f:
        f.seek(layout.end)
        f.write(unended + unended[: len(unended) // 2])
    return last.seq


@pytest.fixture
def written(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, list[bp.Receipt]]]:
    """A closed store over several segments (some sealed), and the receipts of its events."""
    data_dir = os.path.join(os.fspath(tmp_path), "data")
    with bp.Engine.open(data_dir, SMALL) as e:
        receipts = fill(e, 120)  # ~1.2 MB of frames: sealed segments and an active one
    assert len(segment_ids(data_dir)) >= 2
    yield data_dir, receipts


def test_offline_reads_match_the_engine_and_write_nothing(written: tuple[str, list[bp.Receipt]],
                                                          tmp_path: os.PathLike[str]) -> None:
    data_dir, receipts = written
    before = snapshot(data_dir)
    with OfflineStore.open(data_dir) as off:
        assert off.visible == len(receipts) and off.records_from_file
        offline = everything(off)
        hist = [fields(ev) for ev in off.history("ent3")]
        hist_tail = [fields(ev) for ev in off.history("ent3", after_clock=100, limit=5)]
        one = fields(off.get(receipts[1234].event_id))
        chain = [fields(ev) for ev in off.walk_ancestors(receipts[-1].event_id, limit=50)]
        scanned = [fields(ev) for ev in off.scan(3000)]
        with pytest.raises(bp.NotFound):
            off.get(receipts[0].event_id[:8] + (len(receipts) + 1).to_bytes(8, "big"))
        assert off.history("nobody") == []
    assert snapshot(data_dir) == before
    with bp.Engine.open(copy_store(data_dir, os.path.join(os.fspath(tmp_path), "copy"))) as e:
        assert offline == everything(e)
        assert hist == [fields(ev) for ev in e.history("ent3")]
        assert hist_tail == [fields(ev) for ev in e.history("ent3", after_clock=100, limit=5)]
        assert one == fields(e.get(receipts[1234].event_id))
        assert chain == [fields(ev) for ev in e.walk_ancestors(receipts[-1].event_id, limit=50)]
        assert scanned == everything(e)[3000:]


def test_offline_read_of_a_torn_tail(written: tuple[str, list[bp.Receipt]], tmp_path: os.PathLike[str]) -> None:
    data_dir, receipts = written
    last = tear_tail(data_dir)
    assert last == len(receipts)
    before = snapshot(data_dir)
    with OfflineStore.open(data_dir) as off:
        assert off.visible == len(receipts)
        offline = everything(off)
    assert snapshot(data_dir) == before  # nothing cut, nothing zeroed
    assert [e[0] for e in offline] == [r.event_id for r in receipts]
    with bp.Engine.open(data_dir) as e:  # recovery cuts the tail and agrees
        assert e.recovery_report["torn_bytes_cut"] > 0
        assert everything(e) == offline
    assert_verified(data_dir)


def test_offline_read_without_the_index(written: tuple[str, list[bp.Receipt]], tmp_path: os.PathLike[str]) -> None:
    """records.idx missing (derived data): the records are rebuilt in memory from the seal
    footers and a scan, and every read still answers."""
    data_dir, receipts = written
    tear_tail(data_dir)
    expected = copy_store(data_dir, os.path.join(os.fspath(tmp_path), "copy"))
    os.remove(os.path.join(data_dir, INDEX_DIR, RECORDS_FILE))
    before = snapshot(data_dir)
    with OfflineStore.open(data_dir) as off, bp.Engine.open(expected) as e:
        assert not off.records_from_file and off.visible == len(receipts)
        assert everything(off) == everything(e)
        for entity in ("ent0", "ent10"):
            assert [fields(ev) for ev in off.history(entity)] == [fields(ev) for ev in e.history(entity)]
    assert snapshot(data_dir) == before


def test_offline_fails_closed_where_recovery_would(written: tuple[str, list[bp.Receipt]]) -> None:
    data_dir, _ = written
    active = segment_path(data_dir, segment_ids(data_dir)[-1])
    layout = read_layout(active)
    flip_bit(active, layout.frames[len(layout.frames) // 2].offset + 100)  # below the durable floor
    before = snapshot(data_dir)
    with pytest.raises(bp.CorruptSegment):
        OfflineStore.open(data_dir)
    assert snapshot(data_dir) == before
    with pytest.raises(bp.CorruptSegment):
        bp.Engine.open(data_dir).close()


def test_not_a_store(tmp_path: os.PathLike[str]) -> None:
    root = os.fspath(tmp_path)
    with pytest.raises(bp.InvalidArgument, match="not a batpak-mp data directory"):
        OfflineStore.open(os.path.join(root, "missing"))
    os.makedirs(os.path.join(root, "empty"))
    with pytest.raises(bp.InvalidArgument, match=r"no store\.meta"):
        OfflineStore.open(os.path.join(root, "empty"))
    assert os.listdir(os.path.join(root, "empty")) == []
    os.makedirs(os.path.join(root, "junk"))
    with open(os.path.join(root, "junk", META_FILE), "w") as f:
        f.write("not json")
    with pytest.raises(bp.CorruptSegment):
        OfflineStore.open(os.path.join(root, "junk"))


def test_fenced_events_offline(data_dir: str) -> None:
    """Hidden events stay hidden, revealed ones show, from the fence chain up to the
    frontier (not from fences.tbl, which the writer may have written past it)."""
    with bp.Engine.open(data_dir, SMALL) as e:
        e.append(bp.Coordinate("a", "s"), K, 0)

        def fenced(n: int) -> list[bp.Receipt]:
            reqs = [[prepare(bp.Coordinate("a", "s"), K, i, idempotency_key=None, expected_clock=None,
                             causation_id=None, correlation_id=None, max_payload=1 << 20)] for i in range(n)]
            out = e.commit(reqs, [True] * n)
            return [r[0] for r in out if isinstance(r, list)]

        shown = fenced(2)
        hidden = fenced(1)
        e.append_system(FENCE_ENTITY, SYSTEM_FENCE_COMMIT, {"fence": b"t" * 16, "ranges": [
            [shown[0].global_sequence, shown[-1].global_sequence]]})
        e.reveal([(shown[0].global_sequence, shown[-1].global_sequence)])
        expected = everything(e)
        expected_history = [fields(ev) for ev in e.history("a")]
    before = snapshot(data_dir)
    with OfflineStore.open(data_dir) as off:
        assert everything(off) == expected
        assert [fields(ev) for ev in off.history("a")] == expected_history
        assert off.get(shown[0].event_id).global_sequence == shown[0].global_sequence
        with pytest.raises(bp.NotFound):
            off.get(hidden[0].event_id)
    assert snapshot(data_dir) == before


# ---- beside another process that holds the writer's lock ---------------------------------
WRITER = textwrap.dedent("""
    import sys
    import batpak_mp as bp
    e = bp.Engine.open(sys.argv[1], bp.EngineConfig(segment_max_bytes=1 << 20))
    for line in sys.stdin:
        n = int(line)
        if n < 0:
            break
        e.append_batch([bp.BatchItem(bp.Coordinate("live", "s"), bp.Kind(1, 2), i) for i in range(n)])
        print(e.visible, flush=True)
    e.close()
""")


def start_writer(data_dir: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, data_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ask(writer: subprocess.Popen[str], n: int) -> int:
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write(f"{n}\n")
    writer.stdin.flush()
    line = writer.stdout.readline()
    assert line, writer.stderr.read() if writer.stderr else "writer died"
    return int(line)


def stop_writer(writer: subprocess.Popen[str]) -> None:
    assert writer.stdin is not None
    writer.stdin.write("-1\n")
    writer.stdin.flush()
    assert writer.wait(timeout=30) == 0


def test_offline_beside_a_live_writer(written: tuple[str, list[bp.Receipt]]) -> None:
    data_dir, receipts = written
    writer = start_writer(data_dir)
    try:
        visible = ask(writer, 5)  # the writer holds writer.lock from here on
        with pytest.raises(bp.StoreLocked):
            bp.Engine.open(data_dir)  # (the old CLI path failed here)
        with OfflineStore.open(data_dir) as off:
            assert off.visible == visible == len(receipts) + 5
            assert [ev.payload for ev in off.history("live")] == list(range(5))
            assert ask(writer, 7) == visible + 7  # the writer goes on while the offline view stays put
            assert off.query_after(visible - 1).events[-1].global_sequence == visible
        with OfflineStore.open(data_dir) as off:
            assert off.visible == visible + 7
    finally:
        stop_writer(writer)
    assert_verified(data_dir)


def test_a_writer_starts_beside_an_offline_reader(written: tuple[str, list[bp.Receipt]]) -> None:
    """No lock probe, no lock: a writer starting while the offline reader is open opens
    (no StoreLocked), recovers and writes; the offline view does not move."""
    data_dir, receipts = written
    tear_tail(data_dir)
    with OfflineStore.open(data_dir) as off:
        writer = start_writer(data_dir)
        try:
            assert ask(writer, 3) == len(receipts) + 3
            assert off.visible == len(receipts)
            assert [e[0] for e in everything(off)] == [r.event_id for r in receipts]
        finally:
            stop_writer(writer)
    assert_verified(data_dir)


# ---- the CLI's reads without a service ---------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``batpak-mp ARGS`` in this process (main: exit codes and one-line errors included):
    (exit code, stdout + stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out + out.err


def test_cli_reads_offline_write_nothing(written: tuple[str, list[bp.Receipt]],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, receipts = written
    tear_tail(data_dir)
    writer_lock_absent = not os.path.exists(os.path.join(data_dir, LOCK_FILE))
    before = snapshot(data_dir)
    code, out = run_cli(capsys, "get", data_dir, receipts[7].event_id.hex(), "--json")
    assert code == 0 and json.loads(out)["global_sequence"] == 8
    code, out = run_cli(capsys, "history", data_dir, "ent3", "--json")
    assert code == 0 and len(json.loads(out)) == sum(1 for i in range(len(receipts)) if i % 11 == 3)
    code, out = run_cli(capsys, "tail", data_dir, "--limit", "3", "--json")
    assert code == 0 and [json.loads(line)["global_sequence"] for line in out.splitlines()] == [
        len(receipts) - 2, len(receipts) - 1, len(receipts)]
    code, out = run_cli(capsys, "tail", data_dir, "--after", str(len(receipts) - 1), "--json")
    assert code == 0 and len(out.splitlines()) == 1
    assert snapshot(data_dir) == before
    assert writer_lock_absent == (not os.path.exists(os.path.join(data_dir, LOCK_FILE)))


def test_cli_reads_while_a_writer_holds_the_lock(written: tuple[str, list[bp.Receipt]],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, receipts = written
    writer = start_writer(data_dir)
    try:
        visible = ask(writer, 2)
        code, out = run_cli(capsys, "tail", data_dir, "--limit", "2", "--json")
        assert code == 0, out
        assert [json.loads(line)["global_sequence"] for line in out.splitlines()] == [visible - 1, visible]
        code, out = run_cli(capsys, "get", data_dir, receipts[0].event_id.hex(), "--json")
        assert code == 0 and json.loads(out)["global_sequence"] == 1
    finally:
        stop_writer(writer)


def test_cli_not_a_store(tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "history", os.fspath(tmp_path), "x")
    assert code == 2 and "not a batpak-mp data directory" in out
