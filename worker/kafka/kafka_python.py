"""Kafka client construction, the rebalance listener, and transactions.

kafka-python 3 runs each client's network I/O on its own thread and calls
rebalance listeners on that thread, so the listener is the async variant:
it may wait (heartbeats keep flowing) but must not call the consumer's
blocking API; it commits through the coordinator's own coroutine.

kafka-python retries a refused login or an untrusted certificate like any
other connection failure until ``bootstrap_timeout_ms`` (30 s), then raises a
bare "Unable to bootstrap". :func:`open_client` turns those into one
:class:`BrokerAccessError` that says what was refused, within a few seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import kafka.errors as Errors
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.config import Settings, consumer_config, producer_config

__all__ = [
    "BrokerAccessError",
    "RevocationHandler",
    "make_consumer",
    "make_producer",
    "open_client",
]

log = logging.getLogger("worker.kafka")

T = TypeVar("T")


class BrokerAccessError(Errors.KafkaError):
    """The broker refused us for good (bad credentials, untrusted certificate): retrying won't help.

    The message is one line naming the broker and the reason, never a secret.
    """

    retriable = False

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class RevocationHandler(AsyncConsumerRebalanceListener):
    """Finishes the in-flight work of revoked partitions before giving them up.

    ``ready(tps)`` tells whether every polled record of ``tps`` has its
    answer; ``settle(tps)`` sends those answers, waits for the broker's
    acknowledgement and returns the offsets to commit; ``forget(tps)`` drops
    whatever is left. If the work does not finish within ``timeout_s`` it is
    abandoned without committing (the next owner answers it again).
    """

    def __init__(
        self,
        consumer_ref: Callable[[], KafkaConsumer],
        *,
        ready: Callable[[Collection[TopicPartition]], bool],
        settle: Callable[[Collection[TopicPartition]], dict[TopicPartition, OffsetAndMetadata]],
        forget: Callable[[Collection[TopicPartition]], None],
        timeout_s: float,
    ) -> None:
        self._consumer_ref = consumer_ref
        self._ready, self._settle, self._forget = ready, settle, forget
        self._timeout_s = timeout_s

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        if not revoked:
            return
        consumer = self._consumer_ref()
        deadline = time.monotonic() + self._timeout_s
        while not self._ready(revoked) and time.monotonic() < deadline:
            await consumer._net.sleep(0.005)  # yields to heartbeats, unlike time.sleep
        try:
            if self._ready(revoked):
                offsets = self._settle(revoked)
                if offsets:
                    await consumer._coordinator._commit_offsets_sync_async(offsets)
                log.info(
                    "revoked %s: finished and committed %s", _fmt(revoked), fmt_offsets(offsets)
                )
            else:
                log.warning("revoked %s: in-flight work abandoned uncommitted", _fmt(revoked))
        except Errors.KafkaError as exc:
            # Answered but not committed: the next owner answers them again
            # (at-least-once). Raising here would only abort the rebalance.
            log.warning("revoked %s: commit failed (%s); answers may repeat", _fmt(revoked), exc)
        finally:
            self._forget(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        if assigned:
            log.info("assigned %s", _fmt(assigned))

    async def on_partitions_lost(self, lost: Collection[TopicPartition]) -> None:
        # Evicted: a commit would be refused, and another member owns them now.
        log.warning("lost %s: in-flight work abandoned", _fmt(lost))
        self._forget(lost)


def _fmt(tps: Collection[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


def fmt_offsets(offsets: dict[TopicPartition, OffsetAndMetadata]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]@{om.offset}" for tp, om in sorted(offsets.items())
    )


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


def open_client(factory: Callable[..., T], config: dict[str, Any]) -> T:
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
                    raise
        round_s *= 2


def make_consumer(settings: Settings, listener: AsyncConsumerRebalanceListener) -> KafkaConsumer:
    consumer = open_client(KafkaConsumer, consumer_config(settings))
    # Learn the topics' partitions before joining: a first JoinGroup without
    # them assigns nothing, and kafka-python's metadata-triggered rejoin that
    # follows can leave a member without partitions for a long time.
    deadline = time.monotonic() + 10
    for topic in settings.input_topics:
        while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            time.sleep(0.1)  # a topic created a moment ago: its metadata is on the way
    consumer.subscribe(list(settings.input_topics), listener=listener)
    return consumer


def make_producer(settings: Settings) -> KafkaProducer:
    producer = open_client(KafkaProducer, producer_config(settings))
    if settings.exactly_once:
        # Fences any earlier producer with this id and aborts its open transaction.
        producer.init_transactions()
    return producer


def committed_or_start(consumer: KafkaConsumer, tp: TopicPartition) -> None:
    """Rewind ``tp`` to its committed offset (or the beginning when none)."""
    committed = consumer.committed(tp)
    if committed is None:
        consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, committed)
