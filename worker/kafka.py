"""Kafka client construction, the rebalance listener, and transactions.

kafka-python 3 runs each client's network I/O on its own thread and calls
rebalance listeners on that thread, so the listener is the async variant:
it may wait (heartbeats keep flowing) but must not call the consumer's
blocking API; it commits through the coordinator's own coroutine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.config import Settings, consumer_config, producer_config

__all__ = ["RevocationHandler", "make_consumer", "make_producer"]

log = logging.getLogger("worker.kafka")


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
                    "revoked %s: finished and committed %s", _fmt(revoked), _fmt_offsets(offsets)
                )
            else:
                log.warning("revoked %s: in-flight work abandoned uncommitted", _fmt(revoked))
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


def _fmt_offsets(offsets: dict[TopicPartition, OffsetAndMetadata]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]@{om.offset}" for tp, om in sorted(offsets.items())
    )


def make_consumer(settings: Settings, listener: AsyncConsumerRebalanceListener) -> KafkaConsumer:
    consumer = KafkaConsumer(**consumer_config(settings))
    consumer.subscribe(list(settings.input_topics), listener=listener)
    return consumer


def make_producer(settings: Settings) -> KafkaProducer:
    producer = KafkaProducer(**producer_config(settings))
    if settings.exactly_once:
        # Fences any earlier producer with this id and aborts its open transaction.
        producer.init_transactions()
    return producer


def committed_or_start(consumer: KafkaConsumer, tp: TopicPartition) -> Any:
    """Rewind ``tp`` to its committed offset (or the beginning when none)."""
    committed = consumer.committed(tp)
    if committed is None:
        consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, committed)
    return committed
