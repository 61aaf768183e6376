"""Metrics of a served store: what the Prometheus endpoint and ``batpak-mp top`` show.

Owns: the figures of one store read in one go (``Source.read`` -> ``Figures``): the
control block's fields and stats region (docs/PROTOCOL.md §4, §4.4), the depth of the
kernel request queue, and the position of every durable cursor and consumer group, found
in the journal (FORMAT.md §3.7: kind 0x0:0x010 on ``cursor:<name>`` or ``group:<name>`` in
scope ``system``, payload ``{"cursor": name, "through": seq, ...}``), read with the reader
and scanned incrementally (each read scans only the records added since the last one);
the metric
families made from them (``Collector``, a ``prometheus_client`` custom collector: the
library writes the exposition format); the endpoint's address (``parse_address``,
``listen``: bound by the process that asks for it, so a bad or busy address is the
caller's typed error) and the HTTP server on such a socket (``MetricsServer``: one
thread, ``prometheus_client``'s WSGI app), which the supervisor runs.

Invariants: reading figures changes nothing anywhere (read-only mappings, the request
queue opened but never written to); every counter is cumulative over one writer's life
(a restarted writer starts again from zero, which Prometheus's ``rate`` handles), so any
number of scrapers see the same values; a failure to read one part (the queue gone, a
damaged index) leaves that part out of one scrape and counts it in
``batpak_metrics_errors_total``, it never fails the scrape.
Uses the read side and ``_ipc``. Must not import the engine, the writer, the client or
the supervisor (which imports this module only when it is asked to serve metrics).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import posix_ipc
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ._errors import BatpakError, InvalidArgument, MetricsUnavailable
from ._ipc import codes as C
from ._ipc import objects
from ._ipc.control import ControlBlock, ControlSnapshot
from ._ipc.names import request_queue_name
from ._ipc.stats import Histogram, Stats
from ._read.reader import Reader, View
from ._values import CATEGORY_SYSTEM, SYSTEM_CURSOR_ACK, Kind, WriterState

PREFIX = "batpak"  # every metric's name starts with it
CURSOR_ACK = Kind(CATEGORY_SYSTEM, SYSTEM_CURSOR_ACK)  # _replay's position records (the same kind)
CURSOR_ENTITY = "cursor:"  # a cursor's records live on entity "cursor:<name>" ...
GROUP_ENTITY = "group:"  # ... a consumer group's on "group:<name>" (shown as that, beside the cursors) ...
CURSOR_SCOPE = "system"  # ... in this scope
CURSOR_PAGE = 4096  # acks per query_after call of the incremental scan
HANDLER_TIMEOUT_S = 5.0  # a scraper that stalls mid-request is dropped after this (one thread serves all)
STALE_HEARTBEAT_NS = C.HANG_TIMEOUT_MS * 1_000_000  # older than the supervisor's hang timeout: the writer is down


# -- the address ------------------------------------------------------------------------------------
def parse_address(text: object) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 literal) as (host, port); port 0 lets the
    kernel pick one. ``InvalidArgument`` naming the text otherwise."""
    if not isinstance(text, str):
        raise InvalidArgument("metrics", text, "must be a 'HOST:PORT' string, e.g. '127.0.0.1:9464'")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument("metrics", text, f"{host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise InvalidArgument("metrics", text, "an IPv6 address goes in brackets: '[::1]:9464'")
    if not sep or not host or any(c.isspace() for c in host):
        raise InvalidArgument("metrics", text, "must be 'HOST:PORT', e.g. '127.0.0.1:9464'")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidArgument("metrics", text, f"the port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


def listen(address: str) -> socket.socket:
    """A listening TCP socket on ``address`` (``parse_address``): the endpoint's, made by
    the process that asks for metrics and handed to the supervisor. ``InvalidArgument``
    for a host that does not resolve; ``MetricsUnavailable`` when it cannot be bound (in
    use, not an address of this machine, a privileged port)."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgument("metrics", address, f"the host {host!r} does not resolve ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restartable at once; never SO_REUSEPORT
        sock.bind(sockaddr)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "the address is in use (another process listens there): pick another port",
               errno.EADDRNOTAVAIL: f"{host!r} is not an address of this machine",
               errno.EACCES: f"port {port} needs privileges: pick a port above 1023"}.get(exc.errno or 0, str(exc))
        raise MetricsUnavailable(address, why) from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port/metrics`` of a listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


# -- the figures ------------------------------------------------------------------------------------
class Figures(NamedTuple):
    """Everything shown, read at ``read_ns`` (``CLOCK_MONOTONIC``)."""

    data_dir: str
    control: ControlSnapshot
    stats: Stats
    restarts: int
    writer_up: bool
    heartbeat_age_s: float | None
    queue_depth: int | None  # messages in the kernel request queue (None: no queue now)
    queue_capacity: int | None
    cursors: dict[str, int]  # durable cursor name (a consumer group: "group:<name>") -> acknowledged position
    errors: int  # parts that could not be read, since the source was made
    read_ns: int

    def cursor_lag(self, name: str) -> int:
        """Events between a cursor's position and the visible frontier (all events, not
        only those its filter matches: what it still has to look at)."""
        return max(0, self.control.visible - self.cursors[name])


class CursorPositions:
    """Each durable cursor's position (and each consumer group's: all its members have
    finished everything up to it), from the records in the journal. The scan resumes
    where the last one stopped, so a read costs the records appended meanwhile."""

    def __init__(self, data_dir: str, control: ControlBlock) -> None:
        self._control = control
        self._reader = Reader(data_dir, self._view)
        self._after = 0
        self.positions: dict[str, int] = {}

    def _view(self) -> View:
        vis, base, delta, _state, revealed = self._control.frontier()
        return View(vis, base, delta, revealed)

    def update(self) -> dict[str, int]:
        while True:
            page = self._reader.query_after(self._after, CURSOR_PAGE, kind=CURSOR_ACK)
            for ev in page.events:
                coord = ev.coordinate
                entity = coord.entity
                if coord.scope != CURSOR_SCOPE:
                    continue
                if entity.startswith(CURSOR_ENTITY):
                    name = label = entity[len(CURSOR_ENTITY):]
                elif entity.startswith(GROUP_ENTITY):
                    name, label = entity[len(GROUP_ENTITY):], entity
                else:
                    continue
                doc = ev.payload
                through = doc.get("through") if isinstance(doc, dict) else None
                if type(through) is int and through >= 0 and doc.get("cursor") == name:
                    self.positions[label] = through  # the newest record is the position
            self._after = max(self._after, page.next_after)
            if len(page.events) < CURSOR_PAGE:
                return self.positions

    def close(self) -> None:
        self._reader.close()


class Source:
    """Reads ``Figures`` of one served data directory. ``restarts``: the supervisor's own
    count (default: the one it publishes in the control block)."""

    def __init__(self, data_dir: str, *, restarts: Callable[[], int] | None = None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self._restarts = restarts
        self._control = ControlBlock.attach(self.data_dir)  # WriterUnavailable when nothing serves it
        self._cursors: CursorPositions | None = None
        self._lock = threading.Lock()  # scrapes may overlap (HTTP and top): one reader at a time
        self.errors = 0

    def read(self) -> Figures:
        with self._lock:
            return self._read()

    def _read(self) -> Figures:
        snap, stats = self._control.read_stats()
        now = time.monotonic_ns()
        age = (now - snap.heartbeat_ns) / 1e9 if snap.heartbeat_ns else None
        up = (snap.state == WriterState.READY and snap.heartbeat_ns and now - snap.heartbeat_ns < STALE_HEARTBEAT_NS
              and objects.pid_alive(snap.writer_pid))
        depth = capacity = None
        try:
            mq = objects.open_request_queue(request_queue_name(self.data_dir), os.stat(self.data_dir).st_uid)
            try:
                depth, capacity = mq.current_messages, mq.max_messages
            finally:
                mq.close()
        except posix_ipc.ExistentialError:
            pass  # between writers (or stopped): no queue, no depth
        except (posix_ipc.Error, OSError, BatpakError):
            self.errors += 1
        cursors: dict[str, int] = {}
        try:
            if self._cursors is None:
                self._cursors = CursorPositions(self.data_dir, self._control)
            cursors = dict(self._cursors.update())
        except BatpakError:
            self.errors += 1
            if self._cursors is not None:
                cursors = dict(self._cursors.positions)  # what was known: still the best figure
        restarts = self._restarts() if self._restarts is not None else snap.restarts
        return Figures(self.data_dir, snap, stats, restarts, bool(up), age, depth, capacity, cursors, self.errors, now)

    def close(self) -> None:
        with self._lock:
            if self._cursors is not None:
                self._cursors.close()
            self._control.close()


# -- Prometheus ---------------------------------------------------------------------------------------
def _buckets(h: Histogram, scale: float) -> list[tuple[str, float]]:
    cumulative = h.cumulative()
    out = [(repr(bound * scale) if scale != 1 else str(bound), float(n)) for bound, n in zip(h.bounds, cumulative, strict=False)]
    return [*out, ("+Inf", float(cumulative[-1]))]


def families(f: Figures) -> list[Metric]:
    """The metric families of ``f`` (docs/OPERATIONS.md §11 lists them)."""
    s, c = f.stats, f.control
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float) -> None:
        out.append(GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value))

    def counter(name: str, doc: str, value: float) -> None:
        out.append(CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value))

    gauge("writer_up", "1 when the writer is READY, alive and its heartbeat is fresh", 1.0 if f.writer_up else 0.0)
    states = GaugeMetricFamily(f"{PREFIX}_writer_state", "The writer's state (1 for the current one)", labels=["state"])
    for st in WriterState:
        states.add_metric([st.name.lower()], 1.0 if c.state == st else 0.0)
    out.append(states)
    gauge("writer_epoch", "Writer epoch: +1 at each writer start", c.writer_epoch)
    if f.heartbeat_age_s is not None:
        gauge("writer_heartbeat_age_seconds", "Seconds since the control block's last heartbeat", f.heartbeat_age_s)
    counter("restarts", "Writer restarts in the supervisor's life", f.restarts)
    gauge("clients", "Client areas the writer has mapped", c.clients)
    counter("dropped_messages", "Queue messages the writer dropped (stale, malformed, dead client)", c.dropped_messages)
    gauge("visible_sequence", "Visible frontier: the newest sequence readers may see", c.visible)
    gauge("durable_sequence", "Durable frontier: the newest sequence known fsynced", c.durable)
    if f.queue_depth is not None and f.queue_capacity is not None:
        gauge("queue_depth", "Messages waiting in the kernel request queue", f.queue_depth)
        gauge("queue_capacity", "Messages the kernel request queue holds at most", f.queue_capacity)
    counter("commit_groups", "Commit groups with appends (one write and one fsync each)", c.groups)
    counter("append_requests", "Append requests in those groups", c.requests)
    counter("appended_events", "Events of append requests answered with receipts", s.appended_events)
    counter("appended_bytes", "Payload bytes (msgpack) of those events", s.appended_bytes)
    out.append(HistogramMetricFamily(f"{PREFIX}_group_size", "Append requests per commit group",
                                     buckets=_buckets(s.group_size, 1), sum_value=s.group_size.total))
    out.append(HistogramMetricFamily(f"{PREFIX}_commit_latency_seconds",
                                     "A group's write until it is published (with sync=group: its fsync included)",
                                     buckets=_buckets(s.commit_ns, 1e-9), sum_value=s.commit_ns.total / 1e9))
    out.append(HistogramMetricFamily(f"{PREFIX}_fsync_latency_seconds", "fdatasync of written groups (sync=group)",
                                     buckets=_buckets(s.fsync_ns, 1e-9), sum_value=s.fsync_ns.total / 1e9))
    position = GaugeMetricFamily(f"{PREFIX}_cursor_position", "A durable cursor's acknowledged sequence", labels=["cursor"])
    lag = GaugeMetricFamily(f"{PREFIX}_cursor_lag_events", "Events between a durable cursor and the visible frontier",
                            labels=["cursor"])
    for name in sorted(f.cursors):
        position.add_metric([name], f.cursors[name])
        lag.add_metric([name], f.cursor_lag(name))
    out += [position, lag]
    counter("metrics_errors", "Parts of the figures that could not be read (queue, cursors)", f.errors)
    return out


class Collector:
    """A ``prometheus_client`` collector over a ``Source`` (one read per scrape)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(self.source.read())


class _QuietHandler(WSGIRequestHandler):
    timeout = HANDLER_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """Serves ``/metrics`` of ``source`` on the listening socket ``sock`` (owned from now
    on) from one daemon thread: requests are answered one at a time, no thread per
    request (the supervisor forks its writers; a scrape takes a few milliseconds)."""

    def __init__(self, sock: socket.socket, source: Source) -> None:
        self.source = source
        self.url = url_of(sock)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(source))
        server = WSGIServer(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock  # bound and listening already: by whoever asked for it (``listen``)
        server.server_address = sock.getsockname()
        server.server_name, server.server_port = str(server.server_address[0]), int(server.server_address[1])
        server.setup_environ()
        server.set_app(make_wsgi_app(registry))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.5,), name="batpak-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.source.read()  # first read before the thread: imports and maps done here, a broken source fails here
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        self.source.close()


def serve_on_fd(fd: int, data_dir: str, restarts: Callable[[], int] | None = None) -> MetricsServer:
    """The supervisor's entry: serve metrics of ``data_dir`` on the inherited listening
    socket ``fd``."""
    sock = socket.socket(fileno=fd)
    try:
        return MetricsServer(sock, Source(data_dir, restarts=restarts)).start()
    except BaseException:
        sock.close()
        raise
