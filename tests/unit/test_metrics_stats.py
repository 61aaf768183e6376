"""The stats region's layout and the writer's accumulator (``_ipc/stats.py``, pure), the
metric families made from figures (``_metrics.families``), the address parser, and a
frame of ``top`` (``_top.frame``): no processes, no files."""

from __future__ import annotations

import io
import os

import pytest
from batpak_supervisor.__main__ import parse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

import batpak_mp as bp
from batpak_mp._errors import InvalidArgument
from batpak_mp._ipc import codes as C
from batpak_mp._ipc import stats as S
from batpak_mp._ipc.control import FIELDS_PAGE, NOTIFY_AT, STATS_AT, ControlSnapshot
from batpak_mp._metrics import Figures, families, parse_address
from batpak_mp._top import frame


def test_layout_fits_the_first_page_after_the_notify_word() -> None:
    assert STATS_AT >= NOTIFY_AT + 4 and STATS_AT + S.STATS.size <= FIELDS_PAGE
    assert S.STATS.size == 8 * len(S.STATS_FIELDS) and len(set(S.STATS_FIELDS)) == len(S.STATS_FIELDS)
    assert S.STATS_FIELDS[:2] == ("appended_events", "appended_bytes")


def test_encode_decode_round_trip() -> None:
    values = tuple(range(1, len(S.STATS_FIELDS) + 1))
    stats = S.decode(values)
    assert S.encode(stats) == values
    assert stats.group_size.buckets == values[2:2 + len(S.GROUP_BOUNDS) + 1]
    with pytest.raises(ValueError):
        S.decode(values[:-1])


def test_writer_stats_counts_groups_commits_and_fsyncs() -> None:
    w = S.WriterStats()
    item = (b"e", b"s", 1, b"\x81\xa1a\x01", 0, b"", None, b"", b"")  # a Prepared: payload at index 3
    w.group([[item], [item, item], [item]], [[], [], ValueError("refused")], written=1, start_ns=1_000)
    w.group([[item] * 3], [[]], written=2, start_ns=2_000)
    w.published(1, now_ns=1_000 + 30_000)  # group 1: 30 us; group 2 not yet
    w.fsync(400_000)
    stats = S.decode(w.values())
    assert stats.appended_events == 3 + 3  # the refused request's event is not counted
    assert stats.appended_bytes == 6 * 4
    assert stats.group_size.observations == 2 and stats.group_size.total == 3 + 1
    assert stats.group_size.buckets[S.GROUP_BOUNDS.index(1)] == 1  # a group of 1 request
    assert stats.group_size.buckets[S.GROUP_BOUNDS.index(4)] == 1  # 3 requests: at most 4
    assert stats.commit_ns.observations == 1 and stats.commit_ns.total == 30_000
    assert stats.commit_ns.buckets[S.LATENCY_BOUNDS_NS.index(50_000)] == 1
    assert stats.fsync_ns.observations == 1 and stats.fsync_ns.quantile(0.99) == 500_000
    w.published(2, now_ns=10_000_000_000)  # 10 s: past every bound
    stats = S.decode(w.values())
    assert stats.commit_ns.observations == 2 and stats.commit_ns.buckets[-1] == 1
    assert stats.commit_ns.quantile(0.99) is None  # in the +Inf bucket: a histogram cannot say more
    assert stats.commit_ns.cumulative()[-1] == stats.commit_ns.observations


def test_a_group_of_more_than_256_requests_lands_in_the_inf_bucket() -> None:
    w = S.WriterStats()
    w.group([[]] * 300, [[]] * 300, written=1, start_ns=0)
    assert S.decode(w.values()).group_size.buckets[-1] == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("localhost:0", ("localhost", 0)), ("[::1]:80", ("::1", 80)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "9464", ":9464", "host:", "host:65536", "host:-1", "host:9x", "::1:80",
                                  "[host]:80", "a b:80", "host:٣"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_address(text)
    assert info.value.name == "metrics" and info.value.value == text


def _figures(**cursors: int) -> Figures:
    w = S.WriterStats()
    w.group([[(b"", b"", 0, b"xy", 0, b"", None, b"", b"")]] * 2, [[], []], written=1, start_ns=0)
    w.published(1, 2_000_000)
    w.fsync(1_500_000)
    snap = ControlSnapshot(2, 3, 4242, 2, 1, 100, 99, 0, 0, 1, 2, 7, 3, 5, 1, 0, 1, 2, 16 << 20, "")
    return Figures("/data", snap, S.decode(w.values()), 2, True, 0.01, 1, 10, dict(cursors), 0, 10**9)


def test_families_are_valid_exposition_with_consistent_histograms() -> None:
    registry = CollectorRegistry(auto_describe=False)
    f = _figures(billing=60)

    class One:
        def collect(self) -> object:
            return families(f)

    registry.register(One())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = {s.name + str(sorted(s.labels.items())): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples["batpak_group_size_count[]"] == 1 and samples["batpak_group_size_sum[]"] == 2
    assert samples["batpak_group_size_bucket[('le', '1')]"] == 0 and samples["batpak_group_size_bucket[('le', '2')]"] == 1
    assert samples["batpak_commit_latency_seconds_sum[]"] == pytest.approx(0.002)
    assert samples["batpak_fsync_latency_seconds_bucket[('le', '0.0025')]"] == 1
    assert samples["batpak_cursor_lag_events[('cursor', 'billing')]"] == 40
    assert samples["batpak_restarts_total[]"] == 2 and samples["batpak_writer_up[]"] == 1
    assert samples["batpak_appended_bytes_total[]"] == 4 and samples["batpak_queue_depth[]"] == 1


def test_top_frame_shows_the_figures_and_rates() -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, color_system=None)
    before = _figures(billing=60, audit=100)
    after = _figures(billing=70, audit=100)._replace(read_ns=2 * 10**9)
    after = after._replace(stats=after.stats._replace(appended_events=12))
    console.print(frame(after, before))
    text = out.getvalue()
    assert "up" in text and "ready, epoch 3, pid 4242" in text and "restarts 2" in text
    assert "visible 100, durable 99" in text
    assert "12 events (10/s)" in text  # 10 more events in one second
    assert "1 / 10 messages" in text
    assert text.index("billing") < text.index("audit")  # the most lagging first


def test_the_supervisor_parses_the_metrics_socket_it_is_given() -> None:
    r, w = os.pipe()
    try:
        argv = C.with_metrics_fd(C.supervisor_argv("/data", bp.RestartPolicy.once(), writer_args=["--sync", "none"]), r)
        assert argv[argv.index(C.OPT_METRICS_FD) + 1] == str(r) and argv[-3:] == [C.WRITER_ARGS_AFTER, "--sync", "none"]
        config = parse(argv[3:])
        assert config.metrics_fd == r and config.writer_args == ("--sync", "none")
        assert parse(C.supervisor_argv("/data", bp.RestartPolicy.once())[3:]).metrics_fd is None
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(SystemExit) as info:  # a closed descriptor: bad usage, exit 2
        parse(C.with_metrics_fd(C.supervisor_argv("/data", bp.RestartPolicy.once()), r)[3:])
    assert info.value.code == C.SupervisorExit.USAGE
