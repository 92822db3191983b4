"""Metrics, the ``/metrics`` ``/healthz`` ``/readyz`` endpoints, and logging.

Metrics live in an injected :class:`prometheus_client.CollectorRegistry` (no
process-wide singleton), so tests build a fresh :class:`Metrics` and read it
with ``registry.get_sample_value``. Every name carries the
``inference_worker_`` prefix, next to the standard ``process_*``,
``python_info`` and ``python_gc_*`` series. A scrape leaves out the
``_created`` series prometheus_client adds beside each counter and histogram
(filtered at the scrape, so other registries in the process keep theirs).

Per-model series carry ``model`` and ``version``; the loop observes through a
:class:`ModelSeries`, whose label children are bound once per model version,
so a record costs no label look-up. Only a model version the repository
resolved becomes a label value: anything else (a misspelt name in a request,
a record that never decoded) is counted under ``model=""``, ``version=""``.

``/metrics`` is prometheus_client's own WSGI app (gzip, OpenMetrics
negotiation, ``name[]`` filtering); the health endpoints share its small
threaded server. :class:`Health` is what the loop reports to: liveness fails
when the loop stops passing, or when records wait while commits stop
succeeding (a group that never settles answers forever and commits nothing).
"""

from __future__ import annotations

import errno
import json
import logging
import platform
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from copy import copy
from functools import partial
from importlib import metadata
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from worker.errors import ConfigError
from worker.health import Health

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "DEFAULT_METRICS_PORT",
    "Health",
    "HealthServer",
    "Metrics",
    "ModelSeries",
    "RepeatedLines",
    "configure_logging",
]

NAMESPACE = "inference_worker"

# Why 8099: Prometheus' register of default exporter ports (9100-9999) has
# been fully allocated since 2023, and the project asks software that
# instruments itself to stay outside that range; 9400 in particular is
# dcgm-exporter's, which runs beside GPU workers. 8099 also misses what
# usually shares a node or a pod with an inference worker: Prometheus and its
# Alertmanager/Pushgateway (9090-9094), Kafka (9092), node-exporter (9100),
# Calico (9099), JMX exporter (7071, 9404), Triton and vLLM (8000-8002),
# TorchServe/MLServer/KServe and Kafka Connect/Schema Registry (8080-8083),
# Splunk's forwarder (8089), the OpenTelemetry Collector (4317/4318,
# 8888/8889), Istio (15000-15090), the kubelet and kube-proxy (10249-10256);
# and it lies below Linux's ephemeral range (32768+), so an outgoing
# connection never holds it at start.
DEFAULT_METRICS_PORT = 8099

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _dist_version(*names: str) -> str:
    """The installed version of the first distribution found (e.g. onnxruntime-gpu)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


class Metrics:
    """Every metric the worker exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # auto_describe: the process/platform/GC collectors have no describe(), and
        # without it /metrics?name[]=process_... would filter them all away.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        if r is not REGISTRY:
            # The default registry already holds these three; any other gets its own.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.build_info = Info("build", "Versions this worker runs with.", namespace=ns, registry=r)
        self._build: dict[str, str] = {
            "version": _dist_version("inference-worker"),
            "python": platform.python_version(),
            "onnxruntime": _dist_version(
                "onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"
            ),
            "kafka_client": "unknown",
        }
        self.build_info.info(self._build)
        per_model = ["model", "version"]
        self.messages = Counter(
            "messages",
            "Input records by outcome (ok, dlq), model version and, for dead letters, error type.",
            ["status", *per_model, "error_type"],
            namespace=ns,
            registry=r,
        )
        self.rows = Counter(
            "rows", "Rows answered, per model version.", per_model, namespace=ns, registry=r
        )
        self.batch_rows = Histogram(
            "batch_rows",
            "Rows per session.run call.",
            per_model,
            namespace=ns,
            registry=r,
            buckets=_ROW_BUCKETS,
        )
        self.inference_seconds = Histogram(
            "inference_seconds",
            "Wall time of one session.run.",
            per_model,
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_seconds = Histogram(
            "queue_seconds",
            "Time from poll to the start of the run that answers the record.",
            per_model,
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.end_to_end_seconds = Histogram(
            "end_to_end_seconds",
            "Record timestamp to response acknowledged.",
            per_model,
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.rebalances = Counter(
            "rebalances",
            "Rebalances that changed this worker's partitions (each assignment, "
            "revocation or loss counts one).",
            namespace=ns,
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "assigned_partitions", "Input partitions this worker owns.", namespace=ns, registry=r
        )
        self._owned: set[Any] = set()
        self._aborted: Callable[[], int] = lambda: 0
        r.register(_AbortedTransactions(f"{ns}_transactions_aborted", lambda: self._aborted()))
        self.kafka_broker_rtt_seconds = Gauge(
            "kafka_broker_rtt_seconds",
            "Mean broker round-trip time librdkafka measured over its last statistics "
            "interval (set statistics.interval.ms with --kafka-option).",
            ["client", "broker"],
            namespace=ns,
            registry=r,
        )
        self.kafka_fetch_queue_messages = Gauge(
            "kafka_fetch_queue_messages",
            "Messages librdkafka has fetched and the worker has not polled yet.",
            ["client"],
            namespace=ns,
            registry=r,
        )
        self.kafka_producer_queue_messages = Gauge(
            "kafka_producer_queue_messages",
            "Messages waiting in librdkafka's producer queues (sent or not, unacknowledged).",
            ["client"],
            namespace=ns,
            registry=r,
        )
        self.kafka_producer_queue_bytes = Gauge(
            "kafka_producer_queue_bytes",
            "Bytes of the messages waiting in librdkafka's producer queues.",
            ["client"],
            namespace=ns,
            registry=r,
        )
        self._series: dict[tuple[str, int], ModelSeries] = {}
        self.unknown = ModelSeries(self, "", "")
        self.dlq = Counter(
            "dlq", "Dead-letter records by error type.", ["error_type"], namespace=ns, registry=r
        )
        self.retries = Counter(
            "retries",
            "Transient failures retried, by error type.",
            ["error_type"],
            namespace=ns,
            registry=r,
        )
        self.inline_batches = Counter(
            "inline_batches",
            "Batches run on the polling thread (their model's runs are shorter than "
            "--inline-below-ms), not handed to an inference thread.",
            namespace=ns,
            registry=r,
        )
        self.model_cache_hits = Counter(
            "model_cache_hits", "Session cache hits.", namespace=ns, registry=r
        )
        self.model_cache_misses = Counter(
            "model_cache_misses",
            "Session cache misses (a load followed).",
            namespace=ns,
            registry=r,
        )
        self.model_cache_evictions = Counter(
            "model_cache_evictions", "Sessions evicted from the cache.", namespace=ns, registry=r
        )
        self.model_cache_models = Gauge(
            "model_cache_models", "Sessions currently loaded.", namespace=ns, registry=r
        )
        self.model_cache_bytes = Gauge(
            "model_cache_bytes", "Bytes charged to loaded sessions.", namespace=ns, registry=r
        )
        self.device_memory_bytes = Gauge(
            "device_memory_bytes",
            "This process's GPU memory, read after each model load and eviction "
            "(shows that evicting a model gives its memory back).",
            namespace=ns,
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "model_load_seconds",
            "Time to load and warm up one session.",
            namespace=ns,
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.response_cache_hits = Counter(
            "response_cache_hits",
            "Requests answered from the response cache.",
            namespace=ns,
            registry=r,
        )
        self.response_cache_misses = Counter(
            "response_cache_misses",
            "Response cache look-ups that missed.",
            namespace=ns,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "consumer_lag",
            "High watermark minus position, per assigned partition.",
            ["topic", "partition"],
            namespace=ns,
            registry=r,
        )
        self.last_commit_age_seconds = Gauge(
            "last_commit_age_seconds",
            "Seconds since the last successful commit (or start, before the first).",
            namespace=ns,
            registry=r,
        )
        # NaN until a Health is watched: no number is better than a made-up one.
        self.last_commit_age_seconds.set_function(lambda: float("nan"))
        self.paused_partitions = Gauge(
            "paused_partitions", "Partitions paused for backpressure.", namespace=ns, registry=r
        )
        self.inflight_bytes = Gauge(
            "inflight_bytes",
            "Request bytes polled but not yet committed.",
            namespace=ns,
            registry=r,
        )

    def set_build_info(self, **labels: str) -> None:
        """Set or override build-info labels, e.g. ``kafka_client="confluent"``."""
        self._build.update(labels)
        self.build_info.info(self._build)

    def watch_health(self, health: Health) -> None:
        """Compute ``last_commit_age_seconds`` from ``health`` at each scrape."""
        self.last_commit_age_seconds.set_function(health.last_commit_age)

    def series(self, model: str, version: int) -> ModelSeries:
        """The bound series of a model version the repository resolved."""
        found = self._series.get((model, version))
        if found is None:
            bound = ModelSeries(self, model, str(version))
            found = self._series.setdefault((model, version), bound)
        return found

    def rebalanced(self, *, assigned: Collection[Any] = (), revoked: Collection[Any] = ()) -> None:
        """Partitions assigned, or revoked or lost, in one rebalance callback."""
        self.rebalances.inc()
        self._owned |= set(assigned)
        self._owned -= set(revoked)
        self.assigned_partitions.set(len(self._owned))

    def watch_transactions(self, aborted: Callable[[], int]) -> None:
        """Read ``transactions_aborted_total`` from ``aborted`` at each scrape."""
        self._aborted = aborted

    def kafka_statistics(self, client: str) -> Callable[[str], None]:
        """A librdkafka ``stats_cb`` that sets the ``kafka_*`` gauges of ``client``."""
        return partial(self._kafka_statistics, client)

    def _kafka_statistics(self, client: str, text: str) -> None:
        try:
            stats = json.loads(text)
        except ValueError:
            return  # librdkafka writes valid JSON; a bad document only loses one sample
        for broker in stats.get("brokers", {}).values():
            rtt = broker.get("rtt", {}).get("avg", 0)
            if broker.get("nodeid", -1) >= 0 and rtt:  # not the bootstrap entries
                self.kafka_broker_rtt_seconds.labels(client, broker["name"]).set(rtt / 1e6)
        if stats.get("type") == "consumer":
            fetchq = sum(
                p.get("fetchq_cnt", 0)
                for topic in stats.get("topics", {}).values()
                for p in topic.get("partitions", {}).values()
                if p.get("partition", -1) >= 0
            )
            self.kafka_fetch_queue_messages.labels(client).set(fetchq)
        else:
            self.kafka_producer_queue_messages.labels(client).set(stats.get("msg_cnt", 0))
            self.kafka_producer_queue_bytes.labels(client).set(stats.get("msg_size", 0))

    def exposition(self) -> bytes:
        """The text format, as ``/metrics`` serves it without content negotiation."""
        return generate_latest(_Scraped(self.registry))


class ModelSeries:
    """One model version's label children, bound once: the hot path looks nothing up."""

    __slots__ = (
        "_failed",
        "_messages",
        "batch_rows",
        "end_to_end_seconds",
        "inference_seconds",
        "model",
        "ok",
        "queue_seconds",
        "rows",
        "version",
    )

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.model, self.version = model, version
        self._messages = metrics.messages
        self.ok = metrics.messages.labels("ok", model, version, "")
        self.rows = metrics.rows.labels(model, version)
        self.batch_rows = metrics.batch_rows.labels(model, version)
        self.inference_seconds = metrics.inference_seconds.labels(model, version)
        self.queue_seconds = metrics.queue_seconds.labels(model, version)
        self.end_to_end_seconds = metrics.end_to_end_seconds.labels(model, version)
        self._failed: dict[str, Any] = {}

    def failed(self, error_type: str) -> Any:
        """The ``messages_total{status="dlq"}`` child of ``error_type``."""
        child = self._failed.get(error_type)
        if child is None:
            child = self._failed[error_type] = self._messages.labels(
                "dlq", self.model, self.version, error_type
            )
        return child

    def queued(self, now: float, polled: Iterable[float]) -> None:
        """Observe the time from each record's poll (monotonic) to its run's start."""
        observe = self.queue_seconds.observe
        for at in polled:
            observe(max(0.0, now - at))


class _AbortedTransactions:
    """``transactions_aborted_total``, read from the committer at each scrape."""

    def __init__(self, name: str, count: Callable[[], int]) -> None:
        self._name, self._count = name, count

    def describe(self) -> list[Metric]:
        return [self._family(0)]

    def collect(self) -> list[Metric]:
        return [self._family(self._count())]

    def _family(self, value: int) -> Metric:
        return CounterMetricFamily(
            self._name,
            "Transactions aborted (--exactly-once); their records are answered again.",
            value=value,
        )


class _Scraped:
    """A registry as ``/metrics`` serves it: no ``_created`` samples.

    prometheus_client's own switch (``disable_created_metrics``) is process-wide;
    this view leaves every other registry as it is.
    """

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            samples = [s for s in family.samples if not s.name.endswith("_created")]
            if len(samples) != len(family.samples):
                family = copy(family)
                family.samples = samples
            yield family

    def restricted_registry(self, names: Iterable[str]) -> _Scraped:
        return _Scraped(self._registry.restricted_registry(names))


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # Probe threads are fire-and-forget: close never waits for a slow scraper.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the real logs


def _text(start_response: StartResponse, status: str, body: str) -> Iterable[bytes]:
    data = body.encode() + b"\n"
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))],
    )
    return [data]


def _app(metrics: Metrics, health: Health, v2: WSGIApplication | None) -> WSGIApplication:
    metrics_app = make_wsgi_app(_Scraped(metrics.registry))

    def route(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if v2 is not None and (path == "/v2" or path.startswith("/v2/")):
            return v2(environ, start_response)  # the Open Inference Protocol (worker.oip)
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            why = health.liveness()
            return _text(
                start_response, "503 Service Unavailable" if why else "200 OK", why or "ok"
            )
        if path == "/readyz":
            why = health.readiness()
            return _text(
                start_response,
                "503 Service Unavailable" if why else "200 OK",
                f"not ready: {why}" if why else "ready",
            )
        return _text(start_response, "404 Not Found", "not found: try /metrics, /healthz, /readyz")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return route(environ, start_response)
        # HEAD: the GET's status and headers (Content-Length included), no body.
        environ = {**environ, "REQUEST_METHOD": "GET"}
        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured[:] = [status, headers]
            return lambda _data: None

        body = b"".join(route(environ, capture))
        status, headers = captured
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [b""]

    return app


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on one small threaded HTTP server.

    ``v2`` answers every ``/v2`` path (:func:`worker.oip.oip_app`).

    Port 0 takes any free port; ``.port`` says which. A port that is taken,
    out of range or not allowed, or an address that is not this host's,
    raises :class:`ConfigError` naming the flag, never a traceback.
    """

    def __init__(
        self,
        port: int,
        metrics: Metrics,
        health: Health,
        *,
        bind: str = "0.0.0.0",
        v2: WSGIApplication | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError("--metrics-port", f"{port} is not a TCP port (0-65535)")
        try:
            info = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(
                "--metrics-bind", f"cannot resolve {bind!r}: {exc.strerror}"
            ) from None

        family, host = info[0][0], str(info[0][4][0])

        class Server(_ThreadingWSGIServer):
            address_family = family  # IPv6 binds (e.g. "::") need AF_INET6

        metrics.watch_health(health)
        try:
            self._server = make_server(
                host, port, _app(metrics, health, v2), Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise _bind_error(exc, bind, port) from None
        self.port: int = self._server.server_address[1]
        # A short poll interval: shutdown() waits up to one interval (0.5 s by default).
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="health-http", daemon=True
        )

    def __enter__(self) -> HealthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _bind_error(exc: OSError, bind: str, port: int) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            "--metrics-port", f"port {port} on {bind} is already in use; choose another port"
        )
    if exc.errno == errno.EACCES:
        return ConfigError(
            "--metrics-port", f"not allowed to listen on port {port} (below 1024 needs privileges)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError("--metrics-bind", f"{bind} is not an address of this host")
    return ConfigError("--metrics-port", f"cannot listen on {bind}:{port}: {exc.strerror or exc}")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # ISO-8601 UTC with milliseconds, e.g. 2026-12-01T15:20:03.123Z.
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("topic", "partition", "offset", "model", "error_type", "trace_id", "span_id"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class _TextFormatter(logging.Formatter):
    """``2026-12-01T15:20:03.123Z INFO worker: ...``: UTC, and says so."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{ts}.{int(record.msecs):03d}Z"


# The Kafka clients' own loggers: librdkafka's lines, and kafka-python's.
KAFKA_CLIENT_LOGGERS = ("worker.kafka.librdkafka", "kafka")


class RepeatedLines(logging.Filter):
    """A Kafka client that cannot reach its broker says so many times a second, in
    several words (kafka-python logs one refused connection four ways).

    Per client logger family, the first warning or error passes; for the next
    ``interval_s`` the family's warnings and errors are counted instead, and
    the first one after that passes as one summary line ("N more in the last
    10 s, the latest: ...") that opens the next window. A family quiet for a
    whole window starts afresh. Other loggers, and lines below WARNING (asked
    for with --log-level DEBUG), pass untouched.
    """

    def __init__(
        self,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        families: tuple[str, ...] = KAFKA_CLIENT_LOGGERS,
    ) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._families = families
        self._lock = threading.Lock()
        # family -> (start of its window, lines held back in it)
        self._windows: dict[str, tuple[float, int]] = {}

    def _family(self, name: str) -> str | None:
        return next((f for f in self._families if name == f or name.startswith(f + ".")), None)

    def filter(self, record: logging.LogRecord) -> bool:
        family = self._family(record.name)
        if family is None or record.levelno < logging.WARNING:
            return True
        now = self._clock()
        with self._lock:
            start, held = self._windows.get(family, (-float("inf"), 0))
            if now - start < self._interval_s:
                self._windows[family] = (start, held + 1)
                return False
            self._windows[family] = (now, 0)
        if held:
            text = record.getMessage()
            record.msg = f"{held + 1} more in the last {now - start:.0f} s, the latest: {text}"
            record.args = ()
        return True


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    """One stderr handler on the root logger: ``text`` for people, ``json`` for collectors;
    both with UTC timestamps, and a Kafka client's repeated lines summarised."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatedLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kafka-python is chatty at INFO (every connection and rebalance step).
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
