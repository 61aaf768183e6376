"""eventsourcing's own conformance suites (``eventsourcing.tests.persistence`` and
``eventsourcing.tests.application``) against ``PERSISTENCE_MODULE=batpak_mp.eventsourcing``
over a real served store (supervisor, writer, POSIX queues): every recorder, the
non-interleaving notification ids, the infrastructure factory, the example application and
the application behaviour. One store serves the module; each test gets a namespace of its
own (``BATPAK_MP_NAMESPACE``), so each application's notification ids start at 1 as the
suites expect, while sharing the store as applications do. The suites' performance tests
are skipped here (tools/bench_eventsourcing.py runs them for figures). The store must
verify at the end."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("eventsourcing")

from conftest import assert_verified
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DataError,
    InfrastructureFactory,
    IntegrityError,
    OperationalError,
    ProcessRecorder,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.tests import application as suite_app
from eventsourcing.tests import persistence as suite
from eventsourcing.utils import Environment

import batpak_mp as bp
from batpak_mp.eventsourcing import (
    BatpakAggregateRecorder,
    BatpakApplicationRecorder,
    BatpakProcessRecorder,
    BatpakTrackingRecorder,
    Datastore,
    Factory,
    topic_kind,
)

MODULE = "batpak_mp.eventsourcing"
PERF = "long figures: tools/bench_eventsourcing.py runs it"
_DATA: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("es") / "data")
    svc = bp.serve(path, segment_max_bytes=1 << 20)
    _DATA["dir"] = path
    try:
        yield path
    finally:
        _DATA.clear()
        assert svc.stop() == 0
    assert_verified(path)


@pytest.fixture(autouse=True)
def namespace(served: str) -> Iterator[str]:
    """The persistence module, the store and a fresh namespace in os.environ (the
    application suites construct applications from the process environment)."""
    ns = f"t{uuid.uuid4().hex[:12]}"
    env = {"PERSISTENCE_MODULE": MODULE, "BATPAK_MP_DATA_DIR": served, "BATPAK_MP_NAMESPACE": ns}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield ns
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _datastore() -> Datastore:
    return Datastore(_DATA["dir"])


def _scope() -> str:
    return f"t{uuid.uuid4().hex[:12]}/app"


class TestAggregateRecorder(suite.AggregateRecorderTestCase):
    def create_recorder(self) -> AggregateRecorder:
        return BatpakAggregateRecorder(_datastore(), _scope() + ".snapshots")

    def test_performance(self) -> None:
        pytest.skip(PERF)


class TestApplicationRecorder(suite.ApplicationRecorderTestCase[BatpakApplicationRecorder]):
    def create_recorder(self) -> BatpakApplicationRecorder:
        return BatpakApplicationRecorder(_datastore(), _scope())

    def test_insert_subscribe(self) -> None:
        self.optional_test_insert_subscribe()

    def test_concurrent_throughput(self) -> None:
        pytest.skip(PERF)

    def test_performance(self) -> None:
        pytest.skip(PERF)


class TestTrackingRecorder(suite.TrackingRecorderTestCase):
    def create_recorder(self) -> TrackingRecorder:
        return BatpakTrackingRecorder(_datastore(), _scope())


class TestProcessRecorder(suite.ProcessRecorderTestCase):
    def create_recorder(self) -> ProcessRecorder:
        return BatpakProcessRecorder(_datastore(), _scope())

    def test_performance(self) -> None:
        pytest.skip(PERF)


class TestNonInterleavingNotificationIDs(suite.NonInterleavingNotificationIDsBaseCase):
    def create_recorder(self) -> ApplicationRecorder:
        return BatpakApplicationRecorder(_datastore(), _scope())


class _TrackingSubclass(BatpakTrackingRecorder):
    pass


class TestInfrastructureFactory(suite.InfrastructureFactoryTestCase[Factory]):
    def setUp(self) -> None:
        self.env = Environment("TestCase")
        self.env[InfrastructureFactory.PERSISTENCE_MODULE] = MODULE
        self.env[Factory.BATPAK_MP_DATA_DIR] = _DATA["dir"]
        super().setUp()

    def expected_factory_class(self) -> type[Factory]:
        return Factory

    def expected_aggregate_recorder_class(self) -> type[AggregateRecorder]:
        return BatpakAggregateRecorder

    def expected_application_recorder_class(self) -> type[ApplicationRecorder]:
        return BatpakApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[TrackingRecorder]:
        return BatpakTrackingRecorder

    def tracking_recorder_subclass(self) -> type[TrackingRecorder]:
        return _TrackingSubclass

    def expected_process_recorder_class(self) -> type[ProcessRecorder]:
        return BatpakProcessRecorder


class TestExampleApplication(suite_app.ExampleApplicationTestCase):
    expected_factory_topic = "batpak_mp.eventsourcing:Factory"


class TestApplication(suite_app.ApplicationTestCase):
    pass


# -- what the suites do not ask, and this module promises --------------------------------

def test_factory_needs_a_data_dir_and_a_served_store(tmp_path: Any) -> None:
    with pytest.raises(OSError, match="BATPAK_MP_DATA_DIR"):
        Factory(Environment("App", {"PERSISTENCE_MODULE": MODULE}))
    with pytest.raises(OSError, match="BATPAK_MP_TIMEOUT"):
        Factory(Environment("App", {Factory.BATPAK_MP_DATA_DIR: _DATA["dir"], Factory.BATPAK_MP_TIMEOUT: "soon"}))
    with pytest.raises(OperationalError):  # nothing serves that directory: a typed error at once, not at first use
        Factory(Environment("App", {Factory.BATPAK_MP_DATA_DIR: str(tmp_path)}))


def test_applications_share_a_store_each_numbered_from_one() -> None:
    env = {"PERSISTENCE_MODULE": MODULE, "BATPAK_MP_DATA_DIR": _DATA["dir"]}
    ds = _datastore()
    a = BatpakApplicationRecorder(ds, _scope())
    b = BatpakApplicationRecorder(ds, _scope())
    ev = [StoredEvent(uuid.uuid4(), 1, "t", b"x") for _ in range(3)]
    assert a.insert_events(ev[:2]) == [1, 2]
    assert b.insert_events(ev[2:]) == [1]  # not 3: b's notification ids are b's own
    assert a.max_notification_id() == 2 and b.max_notification_id() == 1
    # application-prefixed variables: ALPHA_BATPAK_MP_SCOPE names only Alpha's scope
    f = Factory(Environment("Alpha", dict(env, ALPHA_BATPAK_MP_SCOPE="custom/alpha")))
    assert f.scope == "custom/alpha"
    assert Factory(Environment("Beta", env)).scope == "es/Beta"
    f.close()


def test_a_version_at_or_below_the_newest_is_an_integrity_error_and_nothing_is_written() -> None:
    rec = BatpakApplicationRecorder(_datastore(), _scope())
    oid = uuid.uuid4()
    rec.insert_events([StoredEvent(oid, 1, "t", b"1"), StoredEvent(oid, 2, "t", b"2")])
    other = uuid.uuid4()
    for versions in ([2], [1], [3, 3], [4, 3]):
        with pytest.raises(IntegrityError):  # the good event of `other` goes with the bad ones
            rec.insert_events([StoredEvent(other, 1, "t", b"o")] + [StoredEvent(oid, v, "t", b"v") for v in versions])
    assert rec.select_events(other) == []
    assert [s.originator_version for s in rec.select_events(oid)] == [1, 2]
    assert rec.max_notification_id() == 2
    assert [s.originator_version for s in rec.select_events(oid, desc=True, limit=1)] == [2]
    assert [s.originator_version for s in rec.select_events(oid, gt=1)] == [2]


def test_an_originator_id_the_store_cannot_name_is_a_data_error() -> None:
    rec = BatpakApplicationRecorder(_datastore(), _scope())
    with pytest.raises(DataError, match="control character"):
        rec.insert_events([StoredEvent("bad\x00id", 1, "t", b"x")])
    with pytest.raises(DataError):
        rec.select_events("x" * 2000)  # past the 1024-byte name limit
    assert rec.max_notification_id() is None


def test_text_originator_ids_and_topics_filter() -> None:
    rec = BatpakApplicationRecorder(_datastore(), _scope())
    rec.insert_events([StoredEvent("order-1/x", 0, "a", b"1"), StoredEvent("order-2", 0, "b", b"2"),
                       StoredEvent("order-1/x", 1, "b", b"3")])
    got = rec.select_notifications(None, 10, topics=["b"])
    assert [(n.id, n.originator_id, n.topic) for n in got] == [(2, "order-2", "b"), (3, "order-1/x", "b")]
    assert [s.state for s in rec.select_events("order-1/x")] == [b"1", b"3"]


def test_a_topic_filter_reads_by_kind_and_the_payload_topic_decides() -> None:
    """Topics share a kind when their hashes meet: the filter still returns only the topic asked for."""
    seen: dict[bp.Kind, str] = {}
    i = 0
    while True:  # two topics whose kinds collide (4095 kinds: found within a few hundred)
        topic = f"app.events:Thing{i}"
        kind = topic_kind(topic)
        if kind in seen:
            a, b = seen[kind], topic
            break
        seen[kind] = topic
        i += 1
    rec = BatpakApplicationRecorder(_datastore(), _scope())
    rec.insert_events([StoredEvent(uuid.uuid4(), 1, t, t.encode()) for t in (a, "other", b, a)])
    assert [(n.id, n.topic) for n in rec.select_notifications(None, 10, topics=[a])] == [(1, a), (4, a)]
    assert [n.id for n in rec.select_notifications(2, 1, topics=[a, b])] == [3]
    assert [n.id for n in rec.select_notifications(None, 10, stop=3, topics=[b, "other"])] == [2, 3]


def test_subscription_from_none_starts_at_the_first_notification() -> None:
    rec = BatpakApplicationRecorder(_datastore(), _scope())
    rec.insert_events([StoredEvent(uuid.uuid4(), 1, "t", b"1"), StoredEvent(uuid.uuid4(), 1, "t", b"2")])
    with rec.subscribe(gt=None) as sub:
        assert [next(sub).id, next(sub).id] == [1, 2]
    with rec.subscribe(gt=1) as sub:
        assert next(sub).id == 2


@pytest.mark.parametrize("versions", [[1, 2, 3, 4, 5], [0, 1, 2], [1, 5, 9, 10, 20]])
def test_select_events_windows_agree_with_a_plain_filter(versions: list[int]) -> None:
    """Reads by version are windows of entity clocks; contiguous or gapped (snapshots),
    every combination of bounds gives what a filter of the whole chain gives."""
    rec = BatpakAggregateRecorder(_datastore(), _scope() + ".snapshots")
    oid = uuid.uuid4()
    for v in versions:
        rec.insert_events([StoredEvent(oid, v, "t", str(v).encode())])
    bounds: list[int | None] = [None, *range(min(versions) - 1, max(versions) + 2)]
    for gt in bounds:
        for lte in bounds:
            for desc in (False, True):
                for limit in (None, 1, 2):
                    want = [v for v in versions if (gt is None or v > gt) and (lte is None or v <= lte)]
                    want = (want[::-1] if desc else want)[:limit]
                    got = rec.select_events(oid, gt=gt, lte=lte, desc=desc, limit=limit)
                    assert [s.originator_version for s in got] == want, (gt, lte, desc, limit)


def test_a_stopped_service_is_an_operational_error_and_nothing_half_written(tmp_path: Any) -> None:
    data = str(tmp_path / "own")
    svc = bp.serve(data, segment_max_bytes=1 << 20)
    try:
        rec = BatpakProcessRecorder(Datastore(data, timeout=5), "solo/app")
        oid = uuid.uuid4()
        assert rec.insert_events([StoredEvent(oid, 1, "t", b"1")], tracking=Tracking("up", 1)) == [1]
    finally:
        assert svc.stop() == 0
    with pytest.raises(OperationalError):  # eventsourcing's type, the store's error chained
        rec.insert_events([StoredEvent(oid, 2, "t", b"2")], tracking=Tracking("up", 2))
    with bp.serve(data, segment_max_bytes=1 << 20):
        again = BatpakProcessRecorder(Datastore(data), "solo/app")
        assert [s.originator_version for s in again.select_events(oid)] == [1]
        assert again.max_tracking_id("up") == 1 and again.max_notification_id() == 1
        assert again.insert_events([StoredEvent(oid, 2, "t", b"2")], tracking=Tracking("up", 2)) == [2]
    assert_verified(data)


def test_wait_wakes_when_the_tracking_record_commits() -> None:
    """``wait`` blocks on the writer's wake-up, not on eventsourcing's 0.1-0.8 s sleeps:
    a record committed at 0.3 s ends it well before the library's polling (0.1 + 0.2 +
    0.4 s) would look again."""
    import threading
    import time

    rec = BatpakTrackingRecorder(_datastore(), _scope())
    timer = threading.Timer(0.3, rec.insert_tracking, args=(Tracking("up", 5),))
    started = time.monotonic()
    timer.start()
    rec.wait("up", 5, timeout=10)
    took = time.monotonic() - started
    timer.join()
    assert 0.3 <= took < 0.65, took


def test_closing_the_datastore_lets_a_call_in_flight_finish() -> None:
    """eventsourcing's runners close an application while its processing thread may still
    be inside insert_events: that call completes, its connection is closed after it, and
    only later calls are refused."""
    import threading

    ds = _datastore()
    rec = BatpakApplicationRecorder(ds, _scope())
    inside, closed = threading.Event(), threading.Event()
    got: list[Any] = []

    def in_flight() -> None:
        with ds.store() as store:
            inside.set()
            closed.wait(10)
            got.append(store.frontier().visible)  # still usable: closed under it, not yet
        got.append(store)

    t = threading.Thread(target=in_flight)
    t.start()
    assert inside.wait(10)
    ds.close()
    closed.set()
    t.join(10)
    assert isinstance(got[0], int) and got[0] > 0
    with pytest.raises(bp.StoreClosed):
        got[1].frontier()  # closed once its call ended
    with pytest.raises(OperationalError):
        rec.insert_events([StoredEvent(uuid.uuid4(), 1, "t", b"x")])
