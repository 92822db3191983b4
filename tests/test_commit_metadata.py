"""Commit metadata reads back as written, whichever backend wrote it, on a real broker.

One commit may write each partition's own metadata (``run:<last>`` differs per
partition), in a plain commit and inside a transaction alike.

librdkafka stores offset metadata with a trailing NUL (``clean\\x00``); a worker
switched to kafka-python must still read ``clean`` (not an unclean stop) and
``try:<offset>:<n>`` (a crash count, not a marker that never counts).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from worker.kafka import ClientConfig, Consumer, TopicPartition, open_consumer, open_producer
from worker.recovery import CLEAN, run_marker, try_marker

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


@pytest.mark.parametrize("reader", BACKENDS)
@pytest.mark.parametrize("writer", BACKENDS)
@pytest.mark.parametrize("transaction", [False, True], ids=["commit", "transaction"])
def test_each_partition_gets_its_own_metadata_in_one_commit(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    writer: str,
    reader: str,
    transaction: bool,
) -> None:
    topic = new_topic(partitions=2)
    a, b = TopicPartition(topic, 0), TopicPartition(topic, 1)
    offsets = {a: 3, b: 5}
    metadata = {a: run_marker(9000), b: try_marker(5, 2)}

    def config(backend: str, **kwargs: str) -> ClientConfig:
        return ClientConfig(
            bootstrap_servers=kafka_bootstrap, backend=backend, group_id=group_id, **kwargs
        )

    w = open_consumer(config(writer))
    try:
        if transaction:
            p = open_producer(config(writer, transactional_id=f"{group_id}-txn"))
            try:
                p.init_transactions()
                p.begin_transaction()
                p.send_offsets_to_transaction(offsets, w.group_metadata(), metadata)
                p.commit_transaction()
            finally:
                p.close()
        else:
            w.commit(offsets, metadata)
    finally:
        w.close()
    r = open_consumer(config(reader))
    try:
        got = r.committed_metadata([a, b])
    finally:
        r.close()
    assert got == {a: (3, "run:9000"), b: (5, "try:5:2")}
