"""Commit metadata reads back as written, whichever backend wrote it, on a real broker.

librdkafka stores offset metadata with a trailing NUL (``clean\\x00``); a worker
switched to kafka-python must still read ``clean`` (not an unclean stop) and
``try:<offset>:<n>`` (a crash count, not a marker that never counts).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from worker.kafka import ClientConfig, Consumer, TopicPartition, open_consumer
from worker.recovery import CLEAN, try_marker

pytestmark = pytest.mark.kafka

BACKENDS = ["confluent", "kafka-python"]


@pytest.mark.parametrize("reader", BACKENDS)
@pytest.mark.parametrize("writer", BACKENDS)
def test_metadata_reads_back_as_written_across_backends(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, writer: str, reader: str
) -> None:
    topic = new_topic(partitions=2)
    a, b = TopicPartition(topic, 0), TopicPartition(topic, 1)

    def consumer(backend: str) -> Consumer:
        return open_consumer(
            ClientConfig(bootstrap_servers=kafka_bootstrap, backend=backend, group_id=group_id)
        )

    w = consumer(writer)
    try:
        w.commit({a: 3}, CLEAN)
        w.commit({b: 5}, try_marker(5, 2))
    finally:
        w.close()
    r = consumer(reader)
    try:
        got = r.committed_metadata([a, b])
    finally:
        r.close()
    assert got == {a: (3, CLEAN), b: (5, try_marker(5, 2))}
