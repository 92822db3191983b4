"""Metrics, health endpoints and logging.

Metrics live in an injected :class:`prometheus_client.CollectorRegistry` (no
process-wide singleton), so tests build a fresh :class:`Metrics` and read it
with ``registry.get_sample_value``. Names follow spec §4 with the
``inference_worker_`` prefix.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

__all__ = ["Health", "HealthServer", "Metrics", "configure_logging"]

NAMESPACE = "inference_worker"

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


class Metrics:
    """Every metric the worker exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self.messages = Counter(
            "messages", "Input records by outcome (ok, dlq).", ["status"], namespace=ns, registry=r
        )
        self.rows = Counter(
            "rows", "Rows answered, per model.", ["model"], namespace=ns, registry=r
        )
        self.batch_rows = Histogram(
            "batch_rows",
            "Rows per session.run call.",
            namespace=ns,
            registry=r,
            buckets=_ROW_BUCKETS,
        )
        self.inference_seconds = Histogram(
            "inference_seconds",
            "Wall time of one session.run.",
            ["model"],
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.end_to_end_seconds = Histogram(
            "end_to_end_seconds",
            "Record timestamp to response acknowledged.",
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.dlq = Counter(
            "dlq", "Dead-letter records by error type.", ["error_type"], namespace=ns, registry=r
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
        self.paused_partitions = Gauge(
            "paused_partitions", "Partitions paused for backpressure.", namespace=ns, registry=r
        )
        self.inflight_bytes = Gauge(
            "inflight_bytes",
            "Request bytes polled but not yet committed.",
            namespace=ns,
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """What /healthz and /readyz report; the loop updates it."""

    def __init__(self, stall_after_s: float = 60.0) -> None:
        self._last_progress = time.monotonic()
        self._stall_after_s = stall_after_s
        self.broker_ok = False
        self.preloaded = False

    def beat(self) -> None:
        """The poll loop calls this once per iteration."""
        self._last_progress = time.monotonic()

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self._last_progress < self._stall_after_s

    @property
    def ready(self) -> bool:
        return self.broker_ok and self.preloaded


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on one small threaded HTTP server."""

    def __init__(self, port: int, metrics: Metrics, health: Health, host: str = "0.0.0.0") -> None:
        metrics_, health_ = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, metrics_.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = health_.healthy
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
                elif path == "/readyz":
                    ok = health_.ready
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the real logs

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-http", daemon=True
        )

    def __enter__(self) -> HealthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("topic", "partition", "offset", "model", "error_type"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kafka-python is chatty at INFO (every connection and rebalance step).
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
