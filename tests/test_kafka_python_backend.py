"""The kafka-python backend's consumer seam (worker/kafka/kafka_python.py), with
kafka-python's client replaced where the backend opens it.

A connection reset while kafka-python looks for the group coordinator is raised
out of ``KafkaConsumer.poll`` (librdkafka retries it inside its poll). Seen in CI:
the careful-mode worker died of it under Toxiproxy's ``reset_peer``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import kafka.errors as Errors
import pytest

from worker.kafka import ClientConfig, Record, TopicPartition
from worker.kafka import kafka_python as kp
from worker.observability import RepeatedLines


class _Client:
    """Raises each queued exception from ``poll`` in turn, then returns records."""

    def __init__(self, raises: list[Exception]) -> None:
        self.raises, self.polls = raises, 0

    def poll(self, timeout_ms: float, max_records: int) -> dict[Any, list[Any]]:
        self.polls += 1
        if self.raises:
            raise self.raises.pop(0)
        record = SimpleNamespace(
            topic="in", partition=0, offset=7, key=b"k", value=b"v", headers=[], timestamp=5
        )
        return {("in", 0): [record]}


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def build(raises: list[Exception]) -> tuple[kp.KafkaPythonConsumer, _Client]:
        client = _Client(raises)
        monkeypatch.setattr(kp, "_open", lambda cls, config: client)
        return kp.KafkaPythonConsumer(ClientConfig(group_id="g"), {}), client

    yield build


def test_a_connection_reset_in_poll_reads_nothing_and_the_next_poll_reads_on(
    consumer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c, client = consumer([Errors.KafkaConnectionError("[Errno 104] Connection reset by peer")])
    with caplog.at_level(logging.WARNING, logger="kafka"):
        assert c.poll(10, 0.01) == []
    assert c.poll(10, 0.01) == [Record("in", 0, 7, b"k", b"v", [], 5)]
    assert client.polls == 2
    assert any("KafkaConnectionError" in r.getMessage() for r in caplog.records)


def test_retriable_failures_in_a_row_are_summarised_as_the_clients_own_lines(
    consumer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker's log handler carries RepeatedLines (configure_logging): one line, then
    # one summary per 10 s, for the Kafka clients' loggers.
    c, _ = consumer([Errors.NodeNotReadyError("not ready") for _ in range(20)])
    now = [0.0]
    caplog.handler.addFilter(RepeatedLines(clock=lambda: now[0]))
    with caplog.at_level(logging.WARNING, logger="kafka"):
        for _ in range(19):
            assert c.poll(10, 0.0) == []
        now[0] = 10.0
        assert c.poll(10, 0.0) == []
    lines = [r.getMessage() for r in caplog.records if "poll:" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[1].startswith("19 more in the last 10 s, the latest: poll: NodeNotReadyError")


def test_a_failure_that_will_not_pass_still_raises(consumer: Any) -> None:
    c, _ = consumer([Errors.TopicAuthorizationFailedError("denied")])
    with pytest.raises(Errors.TopicAuthorizationFailedError):
        c.poll(10, 0.01)


def test_pausing_or_resuming_a_partition_revoked_meanwhile_is_no_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # kafka-python changes the assignment on its I/O thread, between the loop's
    # assignment() and its pause(): its subscription state raises KeyError then.
    class Assigned:
        def __init__(self) -> None:
            self.paused: list[Any] = []

        def pause(self, tp: Any) -> None:
            if tp.partition == 1:
                raise KeyError(tp)
            self.paused.append(tp)

        resume = pause

    client = Assigned()
    monkeypatch.setattr(kp, "_open", lambda cls, config: client)
    c = kp.KafkaPythonConsumer(ClientConfig(group_id="g"), {})
    c.pause([TopicPartition("in", 1), TopicPartition("in", 0)])
    c.resume([TopicPartition("in", 1), TopicPartition("in", 2)])
    assert [(tp.topic, tp.partition) for tp in client.paused] == [("in", 0), ("in", 2)]
