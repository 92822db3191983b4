"""One frozen settings object for the worker.

Only :mod:`worker.cli` reads the environment; everything else receives a
:class:`Settings`. Kafka properties (``--kafka-option``, ``--kafka-config``,
``KAFKA_*`` credentials) keep Kafka's own names; :mod:`worker.kafka.options`
routes and maps them per client.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ConfigError
from worker.kafka import DEFAULT_BACKEND
from worker.kafka.options import credentials_from_env, parse_kafka_options
from worker.observability import DEFAULT_METRICS_PORT

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ConfigError",
    "Settings",
    "credentials_from_env",
    "parse_kafka_options",
]

# Raised together on broker (scripts/kafka-local), producer and consumer: a
# 1024-row float32 batch of the demo MLP is 3 MiB; 16 MiB leaves room for
# wider models without tuning.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    input_topics: tuple[str, ...]
    """Topics to consume; all share one consumer group."""
    output_topic: str
    """Where responses go."""
    model_repository: Path
    """Root of the model repository (spec §2)."""
    bootstrap_servers: str = "localhost:9092"
    dlq_topic: str | None = None
    """Dead letters; ``None`` means ``<first input topic>.dlq``."""
    group_id: str = "inference-worker"
    default_model: str | None = None
    """Model for requests that name none."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    cache_max_models: int = 4
    cache_max_bytes: int | None = None
    preload: tuple[tuple[str, int | None], ...] = ()
    """(name, version) pairs loaded at start and never evicted."""
    max_batch_rows: int = 1024
    max_batch_delay_ms: float = 5.0
    coalesce_below_rows: int = 64
    """Requests with at least this many rows run alone on their zero-copy view;
    copying them into a bigger batch costs more latency than the run it saves
    (docs/performance.md). Set it to --max-batch-rows to coalesce everything."""
    output_format: str = "same"
    exactly_once: bool = False
    transactional_id: str | None = None
    """Id for --exactly-once; default ``<group-id>-<hostname>-<pid>`` (see ``txn_id``)."""
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_bind: str = "0.0.0.0"
    kafka_client: str = DEFAULT_BACKEND
    """confluent (librdkafka) or kafka-python."""
    kafka_properties: dict[str, str] = field(default_factory=dict, repr=False)
    """Kafka properties by their Kafka names, for every client that accepts them;
    may hold credentials, so it is kept out of ``repr`` (and so out of every log line)."""
    cuda_mem_limit: int | None = None
    """The CUDA arena's limit per session, in bytes (None: no limit)."""
    cudnn_conv_algo_search: str | None = None
    """EXHAUSTIVE | HEURISTIC | DEFAULT (None: the runtime's default)."""
    retry_attempts: int = 3
    """Runs of a transiently failing record before it is dead-lettered."""
    retry_backoff_ms: float = 100.0
    """First wait before a retry; doubles each time, capped at 5 s."""
    log_format: str = "text"
    log_level: str = "INFO"
    drain_timeout_s: float = 30.0
    """Upper bound on the drain after SIGTERM; keep it below Kubernetes'
    terminationGracePeriodSeconds (the manifests use 45 s)."""
    intra_op_threads: int = 1
    """ONNX Runtime threads per run; the broker client needs a core too."""
    inference_threads: int = 1
    """Runs in parallel (each on its own thread; ORT releases the GIL)."""
    max_inflight_bytes: int = 64 * 1024 * 1024
    """Request bytes polled but not yet committed; above it partitions are paused."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Kafka record size the clients accept (match the broker's message.max.bytes)."""
    max_request_bytes: int | None = None
    """Largest request value decoded (default: max_message_bytes); larger -> too-large."""
    max_request_rows: int = 1_000_000
    """Most rows in one request; more -> too-large."""
    optimized_dir: Path | None = Path(tempfile.gettempdir()) / "inference-worker-optimized"
    """Where ONNX Runtime's optimized graphs are kept, so a reload skips optimizing
    (None: off). The Kubernetes manifests mount an emptyDir on /tmp for it."""
    response_cache_size: int = 0
    """Entries in the response cache; 0 turns it off."""
    commit_interval_ms: float = 200.0
    """How often acknowledged progress is committed (at-least-once)."""

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.input_topics[0]}.dlq"

    @property
    def txn_id(self) -> str:
        # Stable across restarts of one pod (its hostname; the pid is 1 in a
        # container), never shared by two workers on one host.
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}-{os.getpid()}"
