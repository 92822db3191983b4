"""One frozen settings object for the worker, and the Kafka client dicts derived from it.

Only :mod:`worker.cli` reads the environment; everything else receives a
:class:`Settings`. Kafka options given with ``--kafka-option`` are routed to
each client (consumer, producer, admin) that accepts the key.
"""

from __future__ import annotations

import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ConfigError",
    "Settings",
    "admin_config",
    "consumer_config",
    "credentials_from_env",
    "parse_kafka_options",
    "producer_config",
]

# Raised together on broker (scripts/kafka-local), producer and consumer: a
# 1024-row float32 batch of the demo MLP is 3 MiB; 16 MiB leaves room for
# wider models without tuning.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ConfigError(ValueError):
    """A bad setting; ``flag`` names it so the CLI can print one line and exit 2."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag


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
    """Stable id for --exactly-once; default ``<group-id>-<hostname>`` so a restarted
    worker fences its predecessor and aborts its open transaction at once."""
    metrics_port: int = 9400
    kafka_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """kafka-python settings for every client that accepts them; may hold
    credentials, so it is kept out of ``repr`` (and so out of every log line)."""
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
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}"


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if re.fullmatch(r"-?\d+\.\d*", value):
        return float(value)
    return value


def parse_kafka_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["max_poll_records=100", "security_protocol=SSL"]`` -> typed dict.

    Keys are kafka-python's (``snake_case``); Java-style dotted keys are
    accepted too (``max.poll.records``) because that is what people paste.
    """
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    known = (
        set(KafkaConsumer.DEFAULT_CONFIG)
        | set(KafkaProducer.DEFAULT_CONFIG)
        | set(KafkaAdminClient.DEFAULT_CONFIG)
    )
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace(".", "_").replace("-", "_")
        if not sep or not key:
            raise ConfigError("--kafka-option", f"expected KEY=VALUE, got {pair!r}")
        if key not in known:
            raise ConfigError("--kafka-option", f"unknown kafka-python setting {key!r}")
        options[key] = _coerce(value)
    return options


# Credentials come from the environment (a Kubernetes Secret) or files, never
# from flags, which show up in `ps` and shell history.
_CREDENTIAL_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "KAFKA_SASL_USERNAME": "sasl_plain_username",
    "KAFKA_SASL_PASSWORD": "sasl_plain_password",
    "KAFKA_SSL_CAFILE": "ssl_cafile",
    "KAFKA_SSL_CERTFILE": "ssl_certfile",
    "KAFKA_SSL_KEYFILE": "ssl_keyfile",
}


def credentials_from_env(env: dict[str, str]) -> dict[str, Any]:
    """kafka-python security settings from ``KAFKA_*`` variables.

    ``KAFKA_SASL_PASSWORD_FILE`` (a mounted Secret) is read when
    ``KAFKA_SASL_PASSWORD`` is not set. Raises :class:`ConfigError` naming the
    variable, never the value.
    """
    options = {key: env[var] for var, key in _CREDENTIAL_ENV.items() if env.get(var)}
    path = env.get("KAFKA_SASL_PASSWORD_FILE")
    if path and "sasl_plain_password" not in options:
        try:
            options["sasl_plain_password"] = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                "KAFKA_SASL_PASSWORD_FILE", f"cannot read {path}: {exc.strerror}"
            ) from None
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if key in options and not Path(options[key]).is_file():
            var = next(v for v, k in _CREDENTIAL_ENV.items() if k == key)
            raise ConfigError(var, f"no such file: {options[key]}")
    return options


def _accepted(defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in defaults}


def consumer_config(s: Settings) -> dict[str, Any]:
    from kafka import KafkaConsumer
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor

    base: dict[str, Any] = {
        "bootstrap_servers": s.bootstrap_servers,
        "group_id": s.group_id,
        "client_id": f"{s.group_id}-consumer",
        # Offsets are committed by the loop once outputs are acknowledged.
        "enable_auto_commit": False,
        # Spec §3: a new group starts at the beginning, nothing is skipped.
        "auto_offset_reset": "earliest",
        # Inputs written transactionally upstream are read only once committed.
        "isolation_level": "read_committed",
        "partition_assignment_strategy": (CooperativeStickyAssignor,),
        "max_partition_fetch_bytes": s.max_message_bytes,
        "fetch_max_bytes": max(s.max_message_bytes, 64 * 1024 * 1024),
        "max_poll_records": 500,
        # An input topic created after the worker started is noticed within
        # 30 s rather than kafka-python's default 5 minutes.
        "metadata_max_age_ms": 30_000,
    }
    base.update(_accepted(KafkaConsumer.DEFAULT_CONFIG, s.kafka_options))
    return base


def producer_config(s: Settings) -> dict[str, Any]:
    from kafka import KafkaProducer

    base: dict[str, Any] = {
        "bootstrap_servers": s.bootstrap_servers,
        "client_id": f"{s.group_id}-producer",
        "acks": "all",
        # Idempotence keeps per-partition order across retries.
        "enable_idempotence": True,
        "linger_ms": 1,
        "max_request_size": s.max_message_bytes,
    }
    if s.exactly_once:
        base["transactional_id"] = s.txn_id
        # A killed worker's open transaction blocks read_committed readers until
        # it times out; keep that short (a restart with the same id aborts it at once).
        base["transaction_timeout_ms"] = 10_000
    base.update(_accepted(KafkaProducer.DEFAULT_CONFIG, s.kafka_options))
    return base


def admin_config(s: Settings) -> dict[str, Any]:
    from kafka.admin import KafkaAdminClient

    base: dict[str, Any] = {
        "bootstrap_servers": s.bootstrap_servers,
        "client_id": f"{s.group_id}-admin",
    }
    base.update(_accepted(KafkaAdminClient.DEFAULT_CONFIG, s.kafka_options))
    return base
