"""The pure-Python backend (kafka-python), chosen with ``--kafka-client kafka-python``.

kafka-python 3 runs each client's network I/O on its own thread and calls
rebalance listeners on that thread, so the listener is the async variant: it
runs the loop's (blocking) handler on a thread of its own and waits for it
with the client's own sleep, which keeps heartbeats flowing, then commits
through the coordinator's coroutine.

kafka-python retries a refused login or an untrusted certificate like any
other connection failure until ``bootstrap_timeout_ms`` (30 s), then raises a
bare "Unable to bootstrap". :func:`_open` turns those into one
:class:`BrokerAccessError` that says what was refused, within a few seconds.

Where kafka-python itself is patched, and why: :mod:`worker.kafka.kafka_python_patches`.

Known limits of this client (use the default ``confluent`` backend where they
matter): it cannot send a header whose value is NULL (sent as an empty value
here), and a header *name* that is not UTF-8 fails the whole fetch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import kafka.errors as Errors
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KTP

from worker.errors import BrokerAccessError, FatalError
from worker.kafka import (
    ClientConfig,
    CommitDeferred,
    Delivery,
    KafkaFailure,
    Metadata,
    ProducerFenced,
    RebalanceHandler,
    Record,
    TopicPartition,
    TransactionFailed,
    fmt_offsets,
    fmt_tps,
    kafka_python_patches,
    metadata_for,
)
from worker.kafka.options import kafka_python_config

__all__ = [
    "KafkaPythonAdmin",
    "KafkaPythonConsumer",
    "KafkaPythonProducer",
    "open_admin",
    "open_consumer",
    "open_producer",
]

log = logging.getLogger("worker.kafka")
# In the "kafka" family of loggers (kafka-python's own), whose repeated warnings are
# summarised every 10 s: what kafka-python raised rather than logged.
client_log = logging.getLogger("kafka.worker")

T = TypeVar("T")

# kafka-python's loggers that report a failed connection with the exception as an argument.
_NET_LOGGERS = ("kafka.net.manager", "kafka.net.connection", "kafka.net.transport")
_TLS_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "Handshake failed")


def _access_failure(exc: BaseException, config: dict[str, Any]) -> str | None:
    """One line for an authentication or TLS failure; ``None`` for anything retriable."""
    where = config.get("bootstrap_servers")
    protocol = config.get("security_protocol", "PLAINTEXT")
    if isinstance(exc, Errors.SaslAuthenticationFailedError):
        user = config.get("sasl_plain_username") or "?"
        mechanism = config.get("sasl_mechanism") or "?"
        return (
            f"authentication failed at {where} for user {user!r} ({protocol}, {mechanism}): "
            f"the broker refused the credentials; check KAFKA_SASL_USERNAME and "
            f"KAFKA_SASL_PASSWORD / KAFKA_SASL_PASSWORD_FILE"
        )
    if isinstance(exc, (Errors.UnsupportedSaslMechanismError, Errors.IllegalSaslStateError)):
        return (
            f"SASL handshake failed at {where}: {type(exc).__name__}; "
            "check KAFKA_SASL_MECHANISM and KAFKA_SECURITY_PROTOCOL"
        )
    text = str(exc)
    if isinstance(exc, Errors.KafkaConnectionError) and any(m in text for m in _TLS_MARKERS):
        reason = text.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]
        return (
            f"TLS handshake with {where} failed: {reason}; check KAFKA_SSL_CAFILE "
            "(the CA that signed the broker's certificate) and the broker's host name"
        )
    return None


class _AccessFailures(logging.Filter):
    """Records the first permanent failure kafka-python logs while it bootstraps (and
    keeps those records out of the log: the caller reports them in one line)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self._config = config
        self.failure: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.failure is not None:
            return False  # the retries that follow say nothing new
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, Errors.KafkaTimeoutError):
                return False  # the end of one of our short rounds, not a real timeout
            if isinstance(arg, BaseException):
                self.failure = _access_failure(arg, self._config)
                if self.failure is not None:
                    return False
        return True


@contextmanager
def _watch(config: dict[str, Any]) -> Iterator[_AccessFailures]:
    watcher = _AccessFailures(config)
    loggers = [logging.getLogger(name) for name in _NET_LOGGERS]
    for logger in loggers:
        logger.addFilter(watcher)
    try:
        yield watcher
    finally:
        for logger in loggers:
            logger.removeFilter(watcher)


def _open(factory: Callable[..., T], config: dict[str, Any]) -> T:
    """``factory(**config)`` (KafkaProducer, KafkaConsumer, KafkaAdminClient), failing fast
    with :class:`BrokerAccessError` when the broker refuses the login or the certificate.

    Bootstrap is tried in short rounds (2 s, 4 s, 8 s, ...) within the client's own
    ``bootstrap_timeout_ms``; a round that saw a permanent failure ends the attempt. A
    broker that is merely down still gets the whole timeout, as before.
    """
    total_s = float(config.get("bootstrap_timeout_ms", 30_000)) / 1000
    deadline = time.monotonic() + total_s
    round_s = 2.0
    while True:
        left = deadline - time.monotonic()
        this_round = min(round_s, max(left, 0.1))
        with _watch(config) as watcher:
            try:
                return factory(**{**config, "bootstrap_timeout_ms": int(this_round * 1000)})
            except Errors.KafkaTimeoutError:
                if watcher.failure is not None:
                    raise BrokerAccessError(watcher.failure) from None
                if time.monotonic() >= deadline - 0.05:
                    raise FatalError(
                        f"no answer from the Kafka cluster at {config.get('bootstrap_servers')} "
                        f"within {total_s:.0f} s"
                    ) from None
        round_s *= 2


def _failure(exc: Errors.KafkaError, kind: type[KafkaFailure] = KafkaFailure) -> KafkaFailure:
    return kind(str(exc), retriable=bool(getattr(exc, "retriable", False)), name=type(exc).__name__)


_DEFERRED = (
    Errors.CommitFailedError,
    Errors.RebalanceInProgressError,
    Errors.IllegalGenerationError,
    Errors.UnknownMemberIdError,
)
_FENCED = (
    Errors.ProducerFencedError,
    Errors.InvalidProducerEpochError,
    Errors.TransactionalIdAuthorizationFailedError,
)


kafka_python_patches.apply()


def _headers(raw: Any) -> list[tuple[Any, bytes | None]]:
    """Header names that were not UTF-8 go on as ``bytes`` (a dead letter follows)."""
    return [(getattr(name, "raw", name), value) for name, value in raw or ()]


class _Listener(AsyncConsumerRebalanceListener):
    def __init__(self, consumer: KafkaPythonConsumer, handler: RebalanceHandler) -> None:
        self._consumer, self._handler = consumer, handler

    async def on_partitions_revoked(self, revoked: Collection[KTP]) -> None:
        if not revoked:
            return
        tps = [TopicPartition(tp.topic, tp.partition) for tp in revoked]
        box: list[Any] = []
        worker = threading.Thread(
            target=lambda: box.append(_call(self._handler.on_revoked, tps)),
            name="revoke",
            daemon=True,
        )
        worker.start()
        while worker.is_alive():
            await self._consumer._c._net.sleep(0.005)  # heartbeats keep flowing
        result = box[0] if box else ({}, "")
        if isinstance(result, BaseException):
            log.warning("revoked %s: handler failed: %s", fmt_tps(tps), result)
            return
        offsets, metadata = result
        if not offsets:
            return
        try:
            await self._consumer._c._coordinator._commit_offsets_sync_async(
                _kafka_offsets(offsets, metadata)
            )
            log.info("revoked %s: committed %s", fmt_tps(tps), fmt_offsets(offsets))
        except Errors.KafkaError as exc:
            # Answered but not committed: the next owner answers them again.
            log.warning("revoked %s: commit failed (%s); answers may repeat", fmt_tps(tps), exc)

    async def on_partitions_assigned(self, assigned: Collection[KTP]) -> None:
        if assigned:
            self._handler.on_assigned([TopicPartition(tp.topic, tp.partition) for tp in assigned])

    async def on_partitions_lost(self, lost: Collection[KTP]) -> None:
        if lost:
            self._handler.on_lost([TopicPartition(tp.topic, tp.partition) for tp in lost])


def _call(fn: Callable[..., T], *args: Any) -> T | BaseException:
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def _kafka_offsets(
    offsets: Mapping[TopicPartition, int], metadata: Metadata = ""
) -> dict[KTP, OffsetAndMetadata]:
    return {
        KTP(*tp): OffsetAndMetadata(o, _written(metadata_for(metadata, tp)), -1)
        for tp, o in offsets.items()
    }


def _written(metadata: str) -> str:
    # Written as librdkafka writes it, with a trailing NUL: confluent-kafka reads
    # metadata as a C string, and without one it reads past the end (seen: 'cleanV').
    return metadata + "\x00" if metadata else ""


class KafkaPythonConsumer:
    def __init__(self, config: ClientConfig, overrides: Mapping[str, str]) -> None:
        base: dict[str, Any] = {
            "bootstrap_servers": config.bootstrap_servers,
            "group_id": config.group_id,
            "client_id": config.client_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "isolation_level": "read_committed",
            "partition_assignment_strategy": (CooperativeStickyAssignor,),
            "max_partition_fetch_bytes": config.max_message_bytes,
            "fetch_max_bytes": max(config.max_message_bytes, 64 * 1024 * 1024),
            "metadata_max_age_ms": config.metadata_max_age_ms,
        }
        base.update(kafka_python_config({**config.properties, **overrides}, "consumer"))
        self._c: KafkaConsumer = _open(KafkaConsumer, base)

    def subscribe(self, topics: list[str], handler: RebalanceHandler) -> None:
        # Learn the topics' partitions before joining: a first JoinGroup without
        # them assigns nothing, and kafka-python's metadata-triggered rejoin that
        # follows can leave a member without partitions for a long time.
        deadline = time.monotonic() + 10
        for topic in topics:
            while not self._c.partitions_for_topic(topic) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._c.subscribe(topics, listener=_Listener(self, handler))

    def assign(self, positions: Mapping[TopicPartition, int]) -> None:
        """Read exactly these partitions from these offsets (no group rebalancing)."""
        self._c.assign([KTP(t, p) for t, p in positions])
        for (t, p), offset in positions.items():
            self._c.seek(KTP(t, p), offset)

    def position(self, tp: TopicPartition) -> int | None:
        try:
            return int(self._c.position(KTP(tp.topic, tp.partition)))
        except (Errors.KafkaError, AssertionError):
            return None

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        try:
            polled = self._c.poll(timeout_ms=timeout_s * 1000, max_records=max_records)
        except Errors.KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise
            # kafka-python raises a connection failure met while it looks for the group
            # coordinator (librdkafka retries it inside poll): nothing was read, so
            # nothing is lost; the next poll tries again. Logged as the client's own
            # lines are, so repeats are summarised (observability.RepeatedLines).
            client_log.warning("poll: %s: %s; trying again", type(exc).__name__, exc)
            time.sleep(min(timeout_s, 0.1))
            return []
        return [
            Record(
                r.topic,
                r.partition,
                r.offset,
                r.key,
                r.value,
                _headers(r.headers),
                r.timestamp if r.timestamp is not None and r.timestamp >= 0 else None,
            )
            for records in polled.values()
            for r in records
        ]

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._c.assignment()}

    # kafka-python changes the assignment on its I/O thread: a partition listed as
    # assigned a moment ago may be gone (KeyError from its subscription state), and a
    # partition that is gone needs no pause or resume.
    def pause(self, tps: Collection[TopicPartition]) -> None:
        for t, p in tps:
            with suppress(KeyError):
                self._c.pause(KTP(t, p))

    def resume(self, tps: Collection[TopicPartition]) -> None:
        for t, p in tps:
            with suppress(KeyError):
                self._c.resume(KTP(t, p))

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: Metadata = "") -> None:
        try:
            self._c.commit(_kafka_offsets(offsets, metadata))
        except _DEFERRED as exc:
            raise _failure(exc, CommitDeferred) from None
        except Errors.KafkaError as exc:
            kind = CommitDeferred if getattr(exc, "retriable", False) else KafkaFailure
            raise _failure(exc, kind) from None

    def committed(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, int | None]:
        out: dict[TopicPartition, int | None] = {}
        for t, p in tps:
            try:
                out[TopicPartition(t, p)] = self._c.committed(KTP(t, p))
            except Errors.KafkaError as exc:
                raise _failure(exc) from None
        return out

    def committed_metadata(
        self, tps: Collection[TopicPartition]
    ) -> dict[TopicPartition, tuple[int | None, str]]:
        out: dict[TopicPartition, tuple[int | None, str]] = {}
        for t, p in tps:
            try:
                got = self._c.committed(KTP(t, p), metadata=True)
            except Errors.KafkaError as exc:
                raise _failure(exc) from None
            if got is None:
                out[TopicPartition(t, p)] = (None, "")
            else:  # librdkafka (the other backend) writes metadata with a trailing NUL
                out[TopicPartition(t, p)] = (got.offset, (got.metadata or "").rstrip("\x00"))
        return out

    def watermarks(self, tp: TopicPartition) -> tuple[int, int] | None:
        ktp = KTP(tp.topic, tp.partition)
        try:
            low = self._c.beginning_offsets([ktp], timeout_ms=10_000)[ktp]
            high = self._c.end_offsets([ktp], timeout_ms=10_000)[ktp]
        except Errors.KafkaError:
            return None
        return int(low), int(high)

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        ktp = KTP(tp.topic, tp.partition)
        if offset is None:
            self._c.seek_to_beginning(ktp)
        else:
            self._c.seek(ktp, offset)

    def lag(self, tp: TopicPartition) -> int | None:
        ktp = KTP(tp.topic, tp.partition)
        high = self._c.highwater(ktp)
        try:
            position = self._c.position(ktp, timeout_ms=0)
        except (Errors.KafkaError, AssertionError):
            return None
        if high is None or position is None:
            return None
        return max(0, high - position)

    def group_metadata(self) -> Any:
        return self._c.group_metadata()

    def close(self) -> None:
        self._c.close()


DEFAULT_BATCH_SIZE = 16384  # kafka-python's batch_size


class KafkaPythonProducer:
    def __init__(self, config: ClientConfig, overrides: Mapping[str, str]) -> None:
        base: dict[str, Any] = {
            "bootstrap_servers": config.bootstrap_servers,
            "client_id": config.client_id,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 1,
            "max_request_size": config.max_message_bytes,
        }
        if config.transactional_id:
            base["transactional_id"] = config.transactional_id
            base["transaction_timeout_ms"] = 10_000
        base.update(kafka_python_config({**config.properties, **overrides}, "producer"))
        if config.batch_max_bytes is not None:
            batch = int(base.get("batch_size", DEFAULT_BATCH_SIZE))
            base["batch_size"] = max(1, min(batch, config.batch_max_bytes))
        self.transactional = bool(base.get("transactional_id"))
        self._p: KafkaProducer = _open(KafkaProducer, base)

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[Any, bytes | None]],
        partition: int | None = None,
    ) -> Delivery:
        delivery = Delivery()
        # kafka-python refuses NULL header values and bytes names (see the module docstring).
        clean = [
            (k if isinstance(k, str) else k.decode("utf-8", "replace"), v or b"")
            for k, v in headers
        ]
        try:
            future = self._p.send(topic, value=value, key=key, headers=clean, partition=partition)
        except Errors.KafkaError as exc:
            delivery.resolve(_failure(exc))
            return delivery
        future.add_callback(lambda _meta: delivery.resolve(None))
        future.add_errback(
            lambda exc: delivery.resolve(
                _failure(exc) if isinstance(exc, Errors.KafkaError) else KafkaFailure(str(exc))
            )
        )
        return delivery

    def poll(self, timeout_s: float = 0.0) -> None:
        # kafka-python resolves deliveries on its own I/O thread: nothing to serve,
        # but a caller waiting for acknowledgements must not spin.
        if timeout_s > 0:
            time.sleep(min(timeout_s, 0.002))

    def flush(self, timeout_s: float) -> int:
        try:
            self._p.flush(timeout=timeout_s)
        except Errors.KafkaTimeoutError:
            return 1
        return 0

    def _txn(self, call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except _FENCED as exc:
            raise ProducerFenced(f"transactional producer: {type(exc).__name__}: {exc}") from None
        except Errors.KafkaError as exc:
            raise _failure(exc, TransactionFailed) from None

    def init_transactions(self) -> None:
        self._txn(self._p.init_transactions)

    def begin_transaction(self) -> None:
        self._txn(self._p.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: Any, metadata: Metadata = ""
    ) -> None:
        self._txn(
            self._p.send_offsets_to_transaction, _kafka_offsets(offsets, metadata), group_metadata
        )

    def commit_transaction(self) -> None:
        self._txn(self._p.commit_transaction)

    def abort_transaction(self) -> None:
        self._txn(self._p.abort_transaction)

    def close(self) -> None:
        self._p.close(timeout=5)


class KafkaPythonAdmin:
    def __init__(self, config: ClientConfig) -> None:
        base: dict[str, Any] = {
            "bootstrap_servers": config.bootstrap_servers,
            "client_id": config.client_id,
        }
        base.update(kafka_python_config(config.properties, "admin"))
        self._a: KafkaAdminClient = _open(KafkaAdminClient, base)

    def partitions(self, topic: str) -> int | None:
        try:
            (meta,) = self._a.describe_topics([topic])
        except (Errors.KafkaError, ValueError):
            return None
        if meta.get("error_code"):
            return None
        return len(meta.get("partitions") or ()) or None

    def max_message_bytes(self, topics: Collection[str]) -> dict[str, int]:
        if not topics:
            return {}
        try:
            responses = self._a.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
            )
        except Errors.KafkaError as exc:
            log.debug("max.message.bytes unknown: %s", exc)
            return {}
        limits: dict[str, int] = {}
        for name, configs in (responses or {}).get("topic", {}).items():
            entry = (configs or {}).get("max.message.bytes")
            if entry and entry.get("value") is not None:
                limits[name] = int(entry["value"])
        return limits

    def close(self) -> None:
        self._a.close()


def open_consumer(config: ClientConfig, overrides: Mapping[str, str]) -> KafkaPythonConsumer:
    return KafkaPythonConsumer(config, overrides)


def open_producer(config: ClientConfig, overrides: Mapping[str, str]) -> KafkaPythonProducer:
    return KafkaPythonProducer(config, overrides)


def open_admin(config: ClientConfig) -> KafkaPythonAdmin:
    return KafkaPythonAdmin(config)
