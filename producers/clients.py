"""Kafka client construction for the producer tools.

``--kafka-option KEY=VALUE`` settings go to every kafka-python client whose
``DEFAULT_CONFIG`` knows the key, so one flag set serves the producer, the
consumer and the admin client alike (TLS, SASL, timeouts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from producers.errors import ProducerError, UsageError
from worker.config import ConfigError
from worker.config import parse_kafka_options as _parse

__all__ = [
    "DEFAULT_MESSAGE_LIMIT",
    "KafkaSettings",
    "assign_all",
    "parse_kafka_options",
    "topic_message_limit",
    "topic_partitions",
]

# Kafka's default for max.message.bytes / message.max.bytes.
DEFAULT_MESSAGE_LIMIT = 1048588
# Room for the producer to send big messages; the topic limit is what binds.
_MAX_REQUEST_SIZE = 16 * 1024 * 1024


def parse_kafka_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["acks=1", "security.protocol=SSL"]`` -> typed settings, by the worker's rule."""
    try:
        return _parse(list(pairs))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is and how to talk to it; clients are derived from it."""

    bootstrap_servers: str = "localhost:9092"
    options: Mapping[str, Any] = field(default_factory=dict)
    client_id: str = "inference-producer"

    def _config(self, defaults: Mapping[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        base.update({k: v for k, v in self.options.items() if k in defaults})
        return base

    def producer_config(
        self, *, batch_size: int | None = None, compression: str | None = None
    ) -> dict[str, Any]:
        from kafka import KafkaProducer

        base: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "acks": "all",
            "linger_ms": 5,
            "max_request_size": _MAX_REQUEST_SIZE,
            "compression_type": compression,
        }
        if batch_size is not None:
            base["batch_size"] = batch_size
        return self._config(KafkaProducer.DEFAULT_CONFIG, base)

    def consumer_config(self) -> dict[str, Any]:
        from kafka import KafkaConsumer

        base: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            # The tools assign partitions themselves and never commit: reading a
            # topic must not move anybody's consumer group.
            "group_id": None,
            "enable_auto_commit": False,
            "fetch_max_bytes": _MAX_REQUEST_SIZE * 4,
            "max_partition_fetch_bytes": _MAX_REQUEST_SIZE,
        }
        return self._config(KafkaConsumer.DEFAULT_CONFIG, base)

    def admin_config(self) -> dict[str, Any]:
        from kafka.admin import KafkaAdminClient

        base: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
        }
        return self._config(KafkaAdminClient.DEFAULT_CONFIG, base)

    def producer(self, **kwargs: Any) -> Any:
        from kafka import KafkaProducer

        return _connect(KafkaProducer, self.producer_config(**kwargs), self)

    def consumer(self) -> Any:
        from kafka import KafkaConsumer

        return _connect(KafkaConsumer, self.consumer_config(), self)

    def admin(self) -> Any:
        from kafka.admin import KafkaAdminClient

        return _connect(KafkaAdminClient, self.admin_config(), self)


def _connect(factory: Any, config: dict[str, Any], settings: KafkaSettings) -> Any:
    from kafka.errors import KafkaError

    from worker.kafka import open_client

    try:
        # a refused login or an untrusted certificate fails within seconds, in one line
        return open_client(factory, config)
    except KafkaError as exc:
        raise ProducerError(f"cannot connect to {settings.bootstrap_servers}: {exc}") from exc


def topic_message_limit(settings: KafkaSettings, topic: str) -> tuple[int, str]:
    """The topic's ``max.message.bytes`` and where it came from (for the log line).

    A topic that does not exist yet would be auto-created with the broker's
    default, which we cannot ask for without knowing a broker id, so Kafka's
    own default stands in.
    """
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.errors import KafkaError

    admin = settings.admin()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, ["max.message.bytes"])
        result = admin.describe_configs([resource], config_filter="all")
        entry = result.get("topic", {}).get(topic, {}).get("max.message.bytes")
        if entry is None or entry.get("value") is None:
            return DEFAULT_MESSAGE_LIMIT, "Kafka's default"
        return int(entry["value"]), f"topic {topic}'s max.message.bytes"
    except KafkaError:
        return DEFAULT_MESSAGE_LIMIT, "Kafka's default (topic not described)"
    finally:
        admin.close()


def topic_partitions(consumer: Any, topic: str, timeout_s: float = 10.0) -> list[Any]:
    """Every ``TopicPartition`` of ``topic``; a missing topic is a usage error."""
    import time

    from kafka import TopicPartition

    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() >= deadline:
            raise UsageError(f"topic {topic!r} does not exist on the broker")
        time.sleep(0.2)


def assign_all(consumer: Any, topic: str, *, from_beginning: bool) -> list[Any]:
    """Assign every partition of ``topic`` (no group) at its start or its current end.

    The positions are resolved at once, so "latest" means latest when the
    command started, not whenever the first fetch happens to go out.
    """
    parts = topic_partitions(consumer, topic)
    consumer.assign(parts)
    if from_beginning:
        consumer.seek_to_beginning(*parts)
    else:
        consumer.seek_to_end(*parts)
    for tp in parts:
        consumer.position(tp)
    return parts
