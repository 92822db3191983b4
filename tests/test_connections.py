"""The worker's clients (worker.connections), opened through fakes of the Clients seam."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import Clock, FakeKafka
from worker.answers import METADATA_REFRESH_S, RECORD_OVERHEAD, Answers
from worker.connections import Connections
from worker.observability import Metrics
from worker.settings import Settings


def _connections(
    tmp_path: Path,
    kafka: FakeKafka,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    **overrides: Any,
) -> tuple[Connections, Answers]:
    settings = Settings(
        input_topics=("in",),
        output_topic="out",
        model_repository=tmp_path,
        group_id="g",
        bootstrap_servers="broker:9093",
        kafka_properties={"linger.ms": "3"},
        **overrides,
    )
    metrics = metrics or Metrics()
    answers = Answers(settings, metrics, clock=(clock or Clock()).monotonic)
    return Connections(settings, kafka.clients, metrics, answers), answers


def test_each_client_is_named_for_its_role_with_the_workers_settings(tmp_path: Path) -> None:
    kafka = FakeKafka()
    connections, _ = _connections(
        tmp_path, kafka, kafka_client="kafka-python", max_message_bytes=2_000_000
    )
    assert connections.consumer() is kafka.consumer and connections.admin() is kafka.admin
    consumer, admin = kafka.configs
    assert (consumer.client_id, consumer.group_id) == ("g-consumer", "g")
    assert (admin.client_id, admin.group_id) == ("g-admin", None)
    for config in (consumer, admin):
        assert config.bootstrap_servers == "broker:9093"
        assert config.properties == {"linger.ms": "3"}
        assert (config.backend, config.max_message_bytes) == ("kafka-python", 2_000_000)
        assert config.on_stats is not None


def test_each_clients_librdkafka_statistics_go_to_the_gauges_of_its_role(tmp_path: Path) -> None:
    kafka, metrics = FakeKafka(), Metrics()
    connections, _ = _connections(tmp_path, kafka, metrics=metrics)
    connections.consumer()
    connections.producer()
    consumer, producer = kafka.configs
    assert consumer.on_stats is not None and producer.on_stats is not None
    fetched = {"in": {"partitions": {"0": {"partition": 0, "fetchq_cnt": 7}}}}
    consumer.on_stats(json.dumps({"type": "consumer", "topics": fetched}))
    producer.on_stats(json.dumps({"type": "producer", "msg_cnt": 3, "msg_size": 300}))

    def gauge(name: str, client: str) -> float | None:
        return metrics.registry.get_sample_value(f"inference_worker_{name}", {"client": client})

    assert gauge("kafka_fetch_queue_messages", "consumer") == 7
    assert gauge("kafka_producer_queue_messages", "producer") == 3
    assert gauge("kafka_producer_queue_bytes", "producer") == 300


@pytest.mark.parametrize("exactly_once", [False, True])
def test_the_producer_is_transactional_only_with_exactly_once(
    tmp_path: Path, exactly_once: bool
) -> None:
    kafka = FakeKafka()
    connections, _ = _connections(tmp_path, kafka, exactly_once=exactly_once)
    producer = connections.producer()
    [config] = kafka.configs
    assert config.client_id == "g-producer"
    if exactly_once:
        assert config.transactional_id == connections.settings.txn_id
        assert producer.calls == ["init_transactions"]  # fences an earlier incarnation
    else:
        assert config.transactional_id is None and producer.calls == []


def test_the_producers_batches_fit_the_smallest_output_topic_limit(tmp_path: Path) -> None:
    kafka = FakeKafka()
    kafka.admin.limits = {"out": 50_000, "out-dlq": 40_000}
    connections, answers = _connections(tmp_path, kafka, dlq_topic="out-dlq")
    answers.refresh(connections.admin(), force=True)
    connections.producer()
    assert kafka.configs[-1].batch_max_bytes == 40_000 - RECORD_OVERHEAD
    assert connections.batch_bytes == 40_000 - RECORD_OVERHEAD


class _Committer:
    def __init__(self, replaced: bool) -> None:
        self.replaced = replaced
        self.asked = 0

    def replace_producer(self) -> bool:
        self.asked += 1
        return self.replaced


def test_a_lower_topic_limit_gets_a_fresh_producer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka, clock = FakeKafka(), Clock()
    kafka.admin.limits = {"out": 50_000}
    connections, answers = _connections(tmp_path, kafka, clock)
    admin = connections.admin()
    answers.refresh(admin, force=True)
    connections.producer()
    committer = _Committer(replaced=True)
    connections.refresh_limits(admin, committer)  # type: ignore[arg-type]
    assert committer.asked == 0  # nothing changed
    kafka.admin.limits["out"] = 30_000
    connections.refresh_limits(admin, committer)  # type: ignore[arg-type]
    assert committer.asked == 0  # read again only every METADATA_REFRESH_S
    clock.sleep(METADATA_REFRESH_S)
    caplog.set_level(logging.INFO, logger="worker.loop")
    connections.refresh_limits(admin, committer)  # type: ignore[arg-type]
    assert committer.asked == 1
    assert [r.getMessage() for r in caplog.records if r.name == "worker.loop"] == [
        "a topic's max.message.bytes went down: producer batches now "
        f"{30_000 - RECORD_OVERHEAD} bytes"
    ]


def test_a_lower_limit_asks_again_while_the_old_producer_is_kept(tmp_path: Path) -> None:
    kafka, clock = FakeKafka(), Clock()
    kafka.admin.limits = {"out": 50_000}
    connections, answers = _connections(tmp_path, kafka, clock)
    admin = connections.admin()
    answers.refresh(admin, force=True)
    connections.producer()
    kafka.admin.limits["out"] = 30_000
    committer = _Committer(replaced=False)  # answers of the old one not yet acknowledged
    for _ in range(2):
        clock.sleep(METADATA_REFRESH_S)
        connections.refresh_limits(admin, committer)  # type: ignore[arg-type]
    assert committer.asked == 2
