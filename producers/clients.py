"""Every Kafka call the producer tools make, behind three small objects.

The commands (publish, record, replay, collect, redrive) never touch a Kafka
client library: they get a :class:`Consumer`, a :class:`Producer` or the
topic's size limit from :class:`KafkaSettings`, and read :class:`Record`
values. Swapping the client library is a change to this file only.

``--kafka-option KEY=VALUE`` settings go to every kafka-python client whose
``DEFAULT_CONFIG`` knows the key, so one flag set serves the producer, the
consumer and the admin client alike (TLS, SASL, timeouts).

Offsets are always "the next offset to read", Kafka's committed-offset
convention.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple

from producers.errors import ProducerError, UsageError

__all__ = [
    "DEFAULT_MESSAGE_LIMIT",
    "Consumer",
    "Headers",
    "KafkaSettings",
    "Producer",
    "Record",
    "TopicPartition",
    "parse_kafka_options",
    "record_size",
    "topic_message_limit",
]

# Kafka's default for max.message.bytes / message.max.bytes.
DEFAULT_MESSAGE_LIMIT = 1048588
# Room for the producer to send big messages; the topic limit is what binds.
_MAX_REQUEST_SIZE = 16 * 1024 * 1024

Headers = list[tuple[str, bytes | None]]


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True)
class Record:
    """One consumed record, independent of the client that read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp: int  # record timestamp, ms since the epoch

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


def parse_kafka_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["acks=1", "security.protocol=SSL"]`` -> typed settings, by the worker's rule."""
    from worker.config import ConfigError
    from worker.config import parse_kafka_options as _parse

    try:
        return _parse(list(pairs))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def record_size(key: bytes | None, value: bytes, headers: Headers) -> int:
    """Upper bound of the record batch holding just this record: what the broker checks."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


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

    def consumer_config(self, group_id: str | None = None) -> dict[str, Any]:
        from kafka import KafkaConsumer

        base: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            # The tools assign partitions themselves and commit only to their own
            # group (redrive): reading a topic must not move anybody else's.
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            # What the worker reads: records of aborted transactions never count.
            "isolation_level": "read_committed",
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

    def producer(self, *, batch_size: int | None = None,
                 compression: str | None = None) -> Producer:
        from kafka import KafkaProducer

        config = self.producer_config(batch_size=batch_size, compression=compression)
        return Producer(_connect(KafkaProducer, config, self))

    def consumer(self, group_id: str | None = None) -> Consumer:
        """A consumer that joins no group unless ``group_id`` (then only to commit to it)."""
        from kafka import KafkaConsumer

        return Consumer(_connect(KafkaConsumer, self.consumer_config(group_id), self))

    def admin(self) -> Any:
        from kafka.admin import KafkaAdminClient

        return _connect(KafkaAdminClient, self.admin_config(), self)


def _connect(factory: Any, config: dict[str, Any], settings: KafkaSettings) -> Any:
    from kafka.errors import KafkaError

    try:
        return factory(**config)
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


class Consumer:
    """Manual assignment, polling, and (for redrive) commits to the tool's own group."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def partitions(self, topic: str, timeout_s: float = 10.0) -> list[TopicPartition]:
        """Every partition of ``topic``; a missing topic is a usage error."""
        deadline = time.monotonic() + timeout_s
        while True:
            parts = self._raw.partitions_for_topic(topic)
            if parts:
                return [TopicPartition(topic, p) for p in sorted(parts)]
            if time.monotonic() >= deadline:
                raise UsageError(f"topic {topic!r} does not exist on the broker")
            time.sleep(0.2)

    def assign_all(self, topic: str, *, from_beginning: bool) -> list[TopicPartition]:
        """Assign every partition of ``topic`` at its start or its current end.

        The positions are resolved at once, so "latest" means latest when the
        command started, not whenever the first fetch happens to go out.
        """
        tps = self.partitions(topic)
        ends = self.watermarks(tps)
        self.assign({tp: lo if from_beginning else hi for tp, (lo, hi) in ends.items()})
        return tps

    def assign(self, positions: Mapping[TopicPartition, int]) -> None:
        """Read exactly these partitions, each from the given offset."""
        from kafka import TopicPartition as KTP

        raw = {tp: KTP(tp.topic, tp.partition) for tp in positions}
        self._raw.assign(list(raw.values()))
        for tp, offset in positions.items():
            self._raw.seek(raw[tp], offset)

    def watermarks(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """``(low, high)`` per partition: the first offset still kept, the next to be written."""
        from kafka import TopicPartition as KTP

        raw = [KTP(tp.topic, tp.partition) for tp in tps]
        lows = self._raw.beginning_offsets(raw)
        highs = self._raw.end_offsets(raw)
        return {TopicPartition(k.topic, k.partition): (int(lows[k]), int(highs[k])) for k in raw}

    def position(self, tp: TopicPartition) -> int:
        """The next offset this consumer will read from ``tp``."""
        from kafka import TopicPartition as KTP

        return int(self._raw.position(KTP(tp.topic, tp.partition)))

    def committed(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's committed offset per partition (None: never committed)."""
        from kafka import TopicPartition as KTP

        return {tp: self._raw.committed(KTP(tp.topic, tp.partition)) for tp in tps}

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit synchronously: when this returns, the offsets are stored."""
        from kafka import TopicPartition as KTP
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return
        try:
            self._raw.commit({KTP(tp.topic, tp.partition): OffsetAndMetadata(o, "", -1)
                              for tp, o in offsets.items()})
        except KafkaError as exc:
            raise ProducerError(f"committing offsets failed: {exc}") from exc

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Record]:
        polled = self._raw.poll(timeout_ms=max(1, int(timeout_s * 1000)),
                                max_records=max_records)
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []),
                   int(r.timestamp))
            for records in polled.values() for r in records
        ]

    def close(self) -> None:
        self._raw.close()


class Producer:
    """A producer that remembers the first failed delivery; :meth:`flush` raises it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._error: BaseException | None = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _failed(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc

    def send(self, topic: str, value: bytes | None, key: bytes | None, headers: Headers,
             partition: int | None = None) -> None:
        from kafka.errors import KafkaError

        if self._error is not None:
            raise ProducerError(f"sending to {topic} failed: {self._error}")
        try:
            future = self._raw.send(topic, value=value, key=key, headers=headers,
                                    partition=partition)
        except KafkaError as exc:
            raise ProducerError(f"sending to {topic} failed: {exc}") from exc
        future.add_errback(self._failed)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every record sent so far is acknowledged; raise if any was refused."""
        from kafka.errors import KafkaError

        try:
            self._raw.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise ProducerError(f"flushing failed: {exc}") from exc
        if self._error is not None:
            raise ProducerError(f"sending failed: {self._error}")

    def partitions(self, topic: str) -> int | None:
        """How many partitions ``topic`` has (None if it does not exist)."""
        from kafka.errors import KafkaError

        try:
            parts = self._raw.partitions_for(topic)
        except KafkaError:
            return None
        return len(parts) if parts else None

    def close(self) -> None:
        self._raw.close(timeout=10)
