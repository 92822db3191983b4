"""The worker's three Kafka clients, opened through the :class:`~worker.kafka.Clients` seam.

Every client gets the worker's bootstrap servers, backend, properties and a
``client_id`` naming its role (librdkafka's statistics go to the metrics under
that role). The producer's record batches stay within the smallest
``max.message.bytes`` of the output and dead-letter topics (the broker checks
a whole batch against it); when a topic's limit goes down while the worker
runs, the committer swaps in a producer cut for the new one. Only the producer
asks the delivery mode: with ``--exactly-once`` it is transactional.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.answers import Answers
from worker.commit import Committer
from worker.kafka import Admin, ClientConfig, Clients, Consumer, Producer
from worker.observability import Metrics
from worker.settings import Settings

__all__ = ["Connections"]

log = logging.getLogger("worker.loop")  # a step of the loop logs as the loop


class Connections:
    """Opens the worker's consumer, producer and admin client with its settings."""

    def __init__(
        self, settings: Settings, clients: Clients, metrics: Metrics, answers: Answers
    ) -> None:
        self.settings = settings
        self._clients, self._metrics, self._answers = clients, metrics, answers
        self.batch_bytes = answers.batch_bytes()  # what the producer's batches hold

    def config(self, role: str, **kwargs: Any) -> ClientConfig:
        s = self.settings
        return ClientConfig(
            bootstrap_servers=s.bootstrap_servers,
            backend=s.kafka_client,
            client_id=f"{s.group_id}-{role}",
            max_message_bytes=s.max_message_bytes,
            properties=s.kafka_properties,
            on_stats=self._metrics.kafka_statistics(role),
            **kwargs,
        )

    def admin(self) -> Admin:
        return self._clients.admin(self.config("admin"))

    def consumer(self) -> Consumer:
        return self._clients.consumer(self.config("consumer", group_id=self.settings.group_id))

    def producer(self) -> Producer:
        """A producer whose batches fit the output topics as last read (transactional,
        its earlier incarnation fenced, with ``--exactly-once``)."""
        s = self.settings
        txn = s.txn_id if s.exactly_once else None
        self.batch_bytes = self._answers.batch_bytes()
        producer = self._clients.producer(
            self.config("producer", transactional_id=txn, batch_max_bytes=self.batch_bytes)
        )
        if s.exactly_once:
            # Fences any earlier producer with this id and aborts its open transaction.
            producer.init_transactions()
        return producer

    def refresh_limits(self, admin: Admin, committer: Committer[Any]) -> None:
        """The output topics' metadata; a lower size limit than the producer's batches
        were cut for gets a fresh producer (once what the old one sent is acknowledged)."""
        self._answers.refresh(admin)
        batch = self._answers.batch_bytes()
        if batch < self.batch_bytes and committer.replace_producer():
            log.info("a topic's max.message.bytes went down: producer batches now %d bytes", batch)
