"""The weaker sync modes: receipts say durable=False, the durable frontier moves only
after an fsync, and wait_for_durable asks for one."""

from __future__ import annotations

import os

from conftest import assert_verified

import batpak_mp as bp

K = bp.Kind(1, 1)
C = bp.Coordinate("s", "m")


def test_engine_none_mode_is_durable_only_after_sync(data_dir: str) -> None:
    with bp.Engine.open(data_dir, bp.EngineConfig(segment_max_bytes=1 << 20, sync=bp.SyncMode.NONE)) as e:
        r = e.append(C, K, 1)
        assert r.durable is False and e.visible == r.global_sequence
        assert e.durable < r.global_sequence
        assert e.sync() == r.global_sequence == e.durable
    assert_verified(data_dir)


def test_engine_interval_mode_fsyncs_when_the_interval_passed(data_dir: str) -> None:
    now = [1_000_000]
    cfg = bp.EngineConfig(segment_max_bytes=1 << 20, sync=bp.SyncMode.INTERVAL, sync_interval_ms=100)
    with bp.Engine.open(data_dir, cfg, clock_ms=lambda: now[0]) as e:
        first = e.append(C, K, 0)  # no fsync for 100 ms: this one is fsynced at once
        assert e.durable == first.global_sequence
        r = e.append(C, K, 1)
        assert r.durable is False and e.durable < r.global_sequence  # within the interval: not yet
        e.tick()
        assert e.durable < r.global_sequence
        now[0] += 150
        e.tick()
        assert e.durable == r.global_sequence
    assert_verified(data_dir)


def test_service_weaker_modes(tmp_path: os.PathLike[str]) -> None:
    for mode in ("interval", "none"):
        data = os.path.join(os.fspath(tmp_path), mode)
        with bp.serve(data, sync=mode, segment_max_bytes=1 << 20, sync_interval_ms=50), bp.connect(data) as s:
            r = s.append(C, K, {"mode": mode})
            assert r.durable is False
            assert s.get(r.event_id).payload == {"mode": mode}  # visible before durable
            s.wait_for_durable(r.global_sequence, 5.0)  # asks the writer for the fsync if need be
            assert s.frontier().durable >= r.global_sequence
        assert_verified(data)
