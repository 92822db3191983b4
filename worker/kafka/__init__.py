"""The Kafka seam: the only place in the worker that knows a Kafka client exists.

The loop (and the producer tools) speak to three small objects, built by
:func:`open_consumer`, :func:`open_producer` and :func:`open_admin` from a
:class:`ClientConfig`:

- :class:`Consumer`: ``subscribe`` (cooperative-sticky, with a
  :class:`RebalanceHandler`), ``poll`` a batch of :class:`Record`,
  ``pause``/``resume``, ``commit`` offsets, ``committed``, ``seek``,
  ``lag``, ``group_metadata``;
- :class:`Producer`: ``send`` (returns a :class:`Delivery`), ``poll``, ``flush``,
  and the transaction calls;
- :class:`Admin`: partition counts and ``max.message.bytes`` of topics.

:class:`Clients` groups the three ``open_*`` functions: the worker opens its
clients through one, so a test can hand it doubles of this seam instead of a
broker (:data:`KAFKA` is the real one).

Two backends implement them: :mod:`.confluent` (confluent-kafka, i.e.
librdkafka, the default) and :mod:`.kafka_python` (the pure-Python client).
Settings use Kafka's own property names (``security.protocol``,
``fetch.max.bytes``, …); :mod:`.options` parses them and maps them for
kafka-python. Offsets everywhere are "the next offset to read" (Kafka's
committed-offset convention).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from worker.errors import BrokerAccessError, FatalError

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "KAFKA",
    "Admin",
    "BrokerAccessError",
    "ClientConfig",
    "Clients",
    "CommitDeferred",
    "Consumer",
    "Delivery",
    "FatalError",
    "KafkaFailure",
    "Metadata",
    "Producer",
    "ProducerFenced",
    "RebalanceHandler",
    "Record",
    "TopicPartition",
    "TransactionFailed",
    "fmt_offsets",
    "fmt_tps",
    "metadata_for",
    "open_admin",
    "open_consumer",
    "open_producer",
]

BACKENDS = ("confluent", "kafka-python")
DEFAULT_BACKEND = "confluent"


class TopicPartition(NamedTuple):
    topic: str
    partition: int


Headers = list[tuple[Any, bytes | None]]

# What a commit writes beside its offsets: one string for all, or one per partition.
Metadata = str | Mapping[TopicPartition, str]


def metadata_for(metadata: Metadata, tp: TopicPartition) -> str:
    return metadata if isinstance(metadata, str) else metadata.get(tp, "")


@dataclass(slots=True)
class Record:
    """One consumed record, the same whichever client read it.

    ``headers`` names are ``str``; a name that is not UTF-8 arrives as ``bytes``
    (the record becomes a dead letter). ``header_error`` is set when the client
    could not read the headers at all.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None
    header_error: str | None = None
    tp: TopicPartition = field(init=False, repr=False, compare=False)
    """``(topic, partition)``, made once: the loop asks for it several times a record."""

    def __post_init__(self) -> None:
        self.tp = TopicPartition(self.topic, self.partition)

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class Delivery:
    """The broker's answer to one send: pending until ``done``; then ``error`` or ``None``.

    Set from the client's delivery callback, possibly on another thread;
    reading two attributes needs no lock.
    """

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None

    def resolve(self, error: BaseException | None) -> None:
        self.error = error
        self.done = True

    @property
    def failed(self) -> bool:
        return self.done and self.error is not None


class KafkaFailure(Exception):
    """A client call failed; ``retriable`` says whether trying again may succeed."""

    def __init__(self, message: str, *, retriable: bool = False, name: str = "") -> None:
        super().__init__(message)
        self.retriable = retriable
        self.name = name

    @property
    def too_large(self) -> bool:
        """The broker refused a record over the topic's ``max.message.bytes``."""
        return self.name in _TOO_LARGE


# The record (or, unseen from here, its batch) over the limit; the batch over the limit.
_TOO_LARGE = {
    "MSG_SIZE_TOO_LARGE",
    "MessageSizeTooLargeError",
    "RecordTooLargeError",
    "RECORD_LIST_TOO_LARGE",
    "RecordListTooLargeError",
}


class CommitDeferred(KafkaFailure):
    """A commit refused for now (rebalance, coordinator moving): keep the offsets, retry."""


class TransactionFailed(KafkaFailure):
    """The transaction must be aborted and its records read again."""


class ProducerFenced(FatalError):
    """Another producer with our transactional id took over, or ours hit a fatal error."""


class RebalanceHandler(Protocol):
    """What the loop does when the group moves partitions.

    Called on the thread that polls (confluent) or the client's network thread
    (kafka-python); ``on_revoked`` returns the offsets to commit before the
    partitions are given up (an empty dict to commit nothing) and the metadata
    to commit them with.
    """

    def on_assigned(self, tps: list[TopicPartition]) -> None: ...
    def on_revoked(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int], str]: ...
    def on_lost(self, tps: list[TopicPartition]) -> None: ...


class Consumer(Protocol):
    def subscribe(self, topics: list[str], handler: RebalanceHandler) -> None: ...
    def assign(self, positions: Mapping[TopicPartition, int]) -> None: ...
    def position(self, tp: TopicPartition) -> int | None: ...
    def poll(self, max_records: int, timeout_s: float) -> list[Record]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def pause(self, tps: Collection[TopicPartition]) -> None: ...
    def resume(self, tps: Collection[TopicPartition]) -> None: ...
    def commit(self, offsets: Mapping[TopicPartition, int], metadata: Metadata = "") -> None: ...
    def committed(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, int | None]: ...
    def committed_metadata(
        self, tps: Collection[TopicPartition]
    ) -> dict[TopicPartition, tuple[int | None, str]]: ...
    def watermarks(self, tp: TopicPartition) -> tuple[int, int] | None: ...
    def seek(self, tp: TopicPartition, offset: int | None) -> None: ...
    def lag(self, tp: TopicPartition) -> int | None: ...
    def group_metadata(self) -> Any: ...
    def close(self) -> None: ...


class Producer(Protocol):
    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: Headers,
        partition: int | None = None,
    ) -> Delivery: ...
    def poll(self, timeout_s: float = 0.0) -> None: ...
    def flush(self, timeout_s: float) -> int: ...
    def init_transactions(self) -> None: ...
    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: Any, metadata: Metadata = ""
    ) -> None: ...
    def commit_transaction(self) -> None: ...
    def abort_transaction(self) -> None: ...
    def close(self) -> None: ...


class Admin(Protocol):
    def partitions(self, topic: str) -> int | None: ...
    def max_message_bytes(self, topics: Collection[str]) -> dict[str, int]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class ClientConfig:
    """Everything a backend needs to build its clients.

    ``properties`` are Kafka property names -> string values (flags, a
    properties file and ``KAFKA_*`` credentials merged); kept out of ``repr``
    because they may hold a password.
    """

    bootstrap_servers: str = "localhost:9092"
    backend: str = DEFAULT_BACKEND
    client_id: str = "inference-worker"
    group_id: str | None = None
    transactional_id: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    # The producer's batches stay within this (batch.size, kafka-python's batch_size):
    # the broker checks a topic's max.message.bytes against a whole batch, so a batch
    # of answers that each fit is refused when it does not.
    batch_max_bytes: int | None = None
    properties: Mapping[str, str] = field(default_factory=dict, repr=False)
    # librdkafka's default is 5 minutes: a topic created after start would wait that long.
    metadata_max_age_ms: int = 30_000
    on_error: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    # librdkafka's statistics JSON, every statistics.interval.ms (confluent only).
    on_stats: Callable[[str], None] | None = field(default=None, repr=False, compare=False)


def _backend(config: ClientConfig) -> Any:
    if config.backend == "confluent":
        from worker.kafka import confluent

        return confluent
    if config.backend == "kafka-python":
        from worker.kafka import kafka_python

        return kafka_python
    raise ValueError(f"unknown Kafka client {config.backend!r}; expected one of {BACKENDS}")


def open_consumer(config: ClientConfig, **overrides: str) -> Consumer:
    """A consumer of ``config.group_id`` (manual commits, read_committed, earliest)."""
    consumer: Consumer = _backend(config).open_consumer(config, overrides)
    return consumer


def open_producer(config: ClientConfig, **overrides: str) -> Producer:
    """An idempotent producer (acks=all); transactional when ``config.transactional_id``."""
    producer: Producer = _backend(config).open_producer(config, overrides)
    return producer


def open_admin(config: ClientConfig) -> Admin:
    admin: Admin = _backend(config).open_admin(config)
    return admin


@dataclass(frozen=True)
class Clients:
    """How a worker opens its three clients; :data:`KAFKA` opens real ones."""

    consumer: Callable[[ClientConfig], Consumer] = open_consumer
    producer: Callable[[ClientConfig], Producer] = open_producer
    admin: Callable[[ClientConfig], Admin] = open_admin


KAFKA = Clients()


def fmt_tps(tps: Collection[TopicPartition]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(tps))


def fmt_offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(offsets.items()))
