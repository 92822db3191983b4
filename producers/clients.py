"""Every Kafka call the producer tools make, on the worker's Kafka seam.

The commands (publish, record, replay, collect, redrive) never touch a Kafka
client library: they get a :class:`Consumer`, a :class:`Producer` or a
topic's size limit from :class:`KafkaSettings`, and read :class:`Record`
values. Underneath is :mod:`worker.kafka`, the worker's own seam, so
``--kafka-client confluent|kafka-python``, ``--kafka-option`` (Kafka's
property names) and ``--kafka-config`` mean exactly what they mean for the
worker.

Offsets are always "the next offset to read", Kafka's committed-offset
convention.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from producers.errors import ProducerError, UsageError
from worker.errors import ConfigError, FatalError
from worker.kafka import (
    BACKENDS,
    DEFAULT_BACKEND,
    ClientConfig,
    Delivery,
    KafkaFailure,
    Record,
    TopicPartition,
    open_admin,
    open_consumer,
    open_producer,
)
from worker.kafka.options import kafka_properties as _kafka_properties

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DEFAULT_MESSAGE_LIMIT",
    "Consumer",
    "Headers",
    "KafkaSettings",
    "Producer",
    "Record",
    "TopicPartition",
    "kafka_properties",
    "record_size",
    "topic_message_limit",
]

# Kafka's default for max.message.bytes / message.max.bytes.
DEFAULT_MESSAGE_LIMIT = 1048588
# Room for the producer to send big messages; the topic limit is what binds.
_MAX_REQUEST_SIZE = 16 * 1024 * 1024
# The tools read with assigned partitions and never commit, except redrive to
# its own group; librdkafka wants some group id all the same.
_NO_GROUP = "inference-producer"

Headers = list[tuple[str, bytes | None]]


def kafka_properties(options: Iterable[str], config_file: Path | None,
                     env: Mapping[str, str], backend: str) -> dict[str, str]:
    """The properties file, then ``KAFKA_*`` credentials, then ``--kafka-option``: last wins.

    The worker's rule, checked against the chosen client before anything connects.
    """
    try:
        return _kafka_properties(config_file, env, options, backend)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def record_size(key: bytes | None, value: bytes, headers: Headers) -> int:
    """Upper bound of the record batch holding just this record: what the broker checks.

    kafka-python's estimate is the same arithmetic whichever client sends.
    """
    from kafka.record.default_records import DefaultRecordBatchBuilder

    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


def _failed(what: str, exc: Exception) -> ProducerError:
    if isinstance(exc, ConfigError):
        return UsageError(str(exc))
    if isinstance(exc, (FatalError, KafkaFailure)):
        return ProducerError(f"{what}: {exc}")
    return ProducerError(f"{what}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is, which client talks to it and how; clients are derived from it."""

    bootstrap_servers: str = "localhost:9092"
    properties: Mapping[str, str] = field(default_factory=dict, repr=False)
    backend: str = DEFAULT_BACKEND
    client_id: str = "inference-producer"

    def _config(self, group_id: str | None = None,
                transactional_id: str | None = None) -> ClientConfig:
        return ClientConfig(
            bootstrap_servers=self.bootstrap_servers,
            backend=self.backend,
            client_id=self.client_id,
            group_id=group_id,
            transactional_id=transactional_id,
            max_message_bytes=_MAX_REQUEST_SIZE,
            properties=self.properties,
        )

    def producer(self, *, batch_bytes: int | None = None, compression: str | None = None,
                 transactional_id: str | None = None) -> Producer:
        """An idempotent producer (acks=all); ``batch_bytes`` caps a record batch.

        With ``transactional_id`` it is transactional, its transactions
        initialised (which aborts one a killed predecessor left open).
        """
        overrides = {"linger.ms": "5"}
        if batch_bytes is not None:
            overrides["batch.size"] = str(batch_bytes)
        if compression is not None:
            overrides["compression.type"] = compression
        try:
            raw = open_producer(self._config(transactional_id=transactional_id), **overrides)
            if transactional_id is not None:
                raw.init_transactions()
        except Exception as exc:  # a client's own errors too (kafka-python's bootstrap timeout)
            raise _failed(f"cannot connect to {self.bootstrap_servers}", exc) from exc
        return Producer(raw, self.backend)

    def consumer(self, group_id: str | None = None) -> Consumer:
        """A read_committed consumer; it commits only to ``group_id``, and only when asked."""
        try:
            raw = open_consumer(self._config(group_id or _NO_GROUP))
        except Exception as exc:  # a client's own errors too (kafka-python's bootstrap timeout)
            raise _failed(f"cannot connect to {self.bootstrap_servers}", exc) from exc
        return Consumer(raw, self)

    def partitions(self, topic: str) -> int | None:
        """How many partitions ``topic`` has; None when it does not exist."""
        admin = self._admin()
        try:
            return admin.partitions(topic)
        finally:
            admin.close()

    def _admin(self) -> Any:
        try:
            return open_admin(self._config())
        except Exception as exc:  # a client's own errors too (kafka-python's bootstrap timeout)
            raise _failed(f"cannot connect to {self.bootstrap_servers}", exc) from exc


def topic_message_limit(settings: KafkaSettings, topic: str) -> tuple[int, str]:
    """The topic's ``max.message.bytes`` and where it came from (for the log line).

    A topic that does not exist yet would be auto-created with the broker's
    default, which we cannot ask for without knowing a broker id, so Kafka's
    own default stands in.
    """
    admin = settings._admin()
    try:
        limit = admin.max_message_bytes([topic]).get(topic)
    except (FatalError, KafkaFailure):
        limit = None
    finally:
        admin.close()
    if limit is None:
        return DEFAULT_MESSAGE_LIMIT, "Kafka's default (topic not described)"
    return limit, f"topic {topic}'s max.message.bytes"


class Consumer:
    """Assigned partitions, polling, and (for redrive) commits to the tool's own group.

    The seam's consumer joins groups (``subscribe``); the tools assign
    partitions themselves (``assign``).
    """

    def __init__(self, raw: Any, settings: KafkaSettings) -> None:
        self._raw = raw
        self._settings = settings

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def partitions(self, topic: str, timeout_s: float = 10.0) -> list[TopicPartition]:
        """Every partition of ``topic``; a missing topic is a usage error."""
        deadline = time.monotonic() + timeout_s
        while True:
            count = self._settings.partitions(topic)
            if count:
                return [TopicPartition(topic, p) for p in range(count)]
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
        self._raw.assign(positions)

    def watermarks(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """``(low, high)`` per partition: the first offset still kept, the next to be written."""
        marks = {tp: self._raw.watermarks(tp) for tp in tps}
        missing = [tp for tp, m in marks.items() if m is None]
        if missing:
            raise ProducerError(f"the broker did not say where {missing[0].topic} begins and ends")
        return {tp: m for tp, m in marks.items() if m is not None}

    def position(self, tp: TopicPartition) -> int | None:
        """The next offset this consumer will read from ``tp`` (None: not known yet)."""
        return self._raw.position(tp)

    def committed(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's committed offset per partition (None: never committed)."""
        try:
            return dict(self._raw.committed(tps))
        except KafkaFailure as exc:
            raise ProducerError(f"reading committed offsets failed: {exc}") from exc

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit synchronously: when this returns, the offsets are stored."""
        if not offsets:
            return
        try:
            self._raw.commit(offsets)
        except KafkaFailure as exc:
            raise ProducerError(f"committing offsets failed: {exc}") from exc

    def group_metadata(self) -> Any:
        """What a transaction needs to commit this consumer's group offsets."""
        return self._raw.group_metadata()

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Record]:
        try:
            return list(self._raw.poll(max_records or 500, timeout_s))
        except (FatalError, KafkaFailure) as exc:
            raise ProducerError(f"reading failed: {exc}") from exc

    def close(self) -> None:
        self._raw.close()


class Producer:
    """A producer whose :meth:`flush` raises the first refused delivery."""

    def __init__(self, raw: Any, backend: str) -> None:
        self._raw = raw
        self.backend = backend
        self._pending: list[Delivery] = []
        self._error: BaseException | None = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check(self) -> None:
        still = []
        for delivery in self._pending:
            if not delivery.done:
                still.append(delivery)
            elif delivery.error is not None and self._error is None:
                self._error = delivery.error
        self._pending = still
        if self._error is not None:
            raise ProducerError(f"the broker refused a record: {self._error}")

    def send(self, topic: str, value: bytes | None, key: bytes | None, headers: Headers,
             partition: int | None = None) -> None:
        if len(self._pending) >= 10_000:
            self._raw.poll(0)  # serve delivery callbacks (confluent) before the list grows
            self._check()
        self._pending.append(self._raw.send(topic, value, key, headers, partition))

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every record sent so far is acknowledged; raise if any was refused."""
        left = self._raw.flush(timeout_s)
        self._check()
        if left:
            raise ProducerError(f"{left} record(s) not acknowledged within {timeout_s:g} s")

    def commit_transaction(self, offsets: Mapping[TopicPartition, int],
                           consumer: Consumer) -> None:
        """Commit what was sent since :meth:`begin_transaction` together with ``consumer``'s
        group ``offsets``: both become visible, or neither does."""
        try:
            self._raw.send_offsets_to_transaction(offsets, consumer.group_metadata())
            self._raw.commit_transaction()
        except (FatalError, KafkaFailure) as exc:
            self.abort_transaction()
            raise ProducerError(f"the transaction failed and was aborted: {exc}") from exc
        self._check()
        self._pending.clear()

    def begin_transaction(self) -> None:
        try:
            self._raw.begin_transaction()
        except (FatalError, KafkaFailure) as exc:
            raise ProducerError(f"cannot begin a transaction: {exc}") from exc

    def abort_transaction(self) -> None:
        with contextlib.suppress(FatalError, KafkaFailure):  # the caller raises the cause
            self._raw.abort_transaction()

    def close(self) -> None:
        self._raw.close()
