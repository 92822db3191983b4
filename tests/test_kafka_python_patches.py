"""The worker's patches of kafka-python (worker/kafka/kafka_python_patches.py).

The names they touch are private to kafka-python: the first tests fail as soon
as a release moves one. The last is defect (G) of docs/reliability.md, reduced
to kafka-python alone (no worker): it fails without the pending-join patch.
"""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import Any

import kafka.errors as Errors
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import NewPartitions, NewTopic
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.base import BaseCoordinator
from kafka.record.default_records import DefaultRecordBatch
from kafka.structs import OffsetAndMetadata

from worker.kafka import kafka_python_patches as patches


def test_every_private_name_the_patches_touch_is_in_this_kafka_python() -> None:
    assert patches.missing_names() == []
    names = {f"{owner.__name__}.{name}" for owner, name in patches.PRIVATE_NAMES}
    assert {"BaseCoordinator._join_task", "DefaultRecordBatch._read_msg"} <= names


def test_a_moved_private_name_is_reported_and_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        patches,
        "PRIVATE_NAMES",
        (*patches.PRIVATE_NAMES, (BaseCoordinator, "_join_future"), (DefaultRecordBatch, "_gone")),
    )
    assert patches.missing_names() == ["BaseCoordinator._join_future", "DefaultRecordBatch._gone"]
    with pytest.raises(patches.PatchTargetMissing, match=r"lacks BaseCoordinator\._join_future"):
        patches.apply()


def test_both_patches_are_installed_once() -> None:
    import worker.kafka.kafka_python  # noqa: F401  (applies them)

    need_rejoin, read_msg = BaseCoordinator.need_rejoin, DefaultRecordBatch._read_msg
    assert getattr(need_rejoin, "_or_pending", False)
    assert getattr(read_msg, "_tolerant", False)
    patches.apply()
    assert BaseCoordinator.need_rejoin is need_rejoin
    assert DefaultRecordBatch._read_msg is read_msg


@pytest.mark.parametrize(
    ("rejoin_needed", "join_task", "want"),
    [(False, None, False), (True, None, True), (False, object(), True), (True, object(), True)],
)
def test_need_rejoin_is_true_while_a_join_is_pending_or_uncollected(
    rejoin_needed: bool, join_task: object, want: bool
) -> None:
    patches.apply()
    coordinator = SimpleNamespace(rejoin_needed=rejoin_needed, _join_task=join_task)
    assert BaseCoordinator.need_rejoin(coordinator) is want  # type: ignore[arg-type]


def _commit_every(consumer: KafkaConsumer, positions: dict[Any, int]) -> bool:
    try:
        consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in positions.items()})
    except Errors.KafkaError:
        return False
    return True


@pytest.mark.kafka
@pytest.mark.slow
def test_short_polls_and_sync_commits_survive_a_metadata_rejoin(
    kafka_bootstrap: str, kafka_admin: Any
) -> None:
    """One cooperative-sticky member polls 2 ms at a time with 3 ms of work between
    polls and commits synchronously every 200 ms; the topic grows from 1 to 3
    partitions. Unpatched kafka-python 3.0.12: every commit after the growth is
    refused with RebalanceInProgressError and partitions 1 and 2 are never assigned.
    """
    patches.apply()
    topic = f"g-rejoin-{uuid.uuid4().hex[:12]}"
    kafka_admin.create_topics([NewTopic(topic, 1, 1)])
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, linger_ms=1, metadata_max_age_ms=500
    )
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=topic,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=1000,
        partition_assignment_strategy=(CooperativeStickyAssignor,),
    )
    try:
        consumer.subscribe([topic])
        positions: dict[Any, int] = {}
        ok_before = ok_after = refused_after = 0
        grown_at: float | None = None
        start = last_commit = time.monotonic()
        sent = 0
        while time.monotonic() - start < 30:
            now = time.monotonic()
            if grown_at is None and ok_before >= 5:
                kafka_admin.create_partitions({topic: NewPartitions(3)})
                grown_at = now
            partitions = len(producer.partitions_for(topic) or (0,))
            producer.send(topic, b"x", partition=sent % partitions)
            sent += 1
            for tp, records in consumer.poll(timeout_ms=2, max_records=500).items():
                positions[tp] = records[-1].offset + 1
            time.sleep(0.003)
            if now - last_commit >= 0.2 and positions:
                last_commit = now
                ok = _commit_every(consumer, positions)
                if grown_at is None:
                    ok_before += ok
                else:
                    ok_after += ok
                    refused_after += not ok
            if grown_at is not None and len(positions) == 3 and ok_after >= 10:
                break
        assert grown_at is not None, f"only {ok_before} commits succeeded before the growth"
        assert {tp.partition for tp in consumer.assignment()} == {0, 1, 2}
        assert {tp.partition for tp in positions} == {0, 1, 2}, "new partitions never read"
        # A commit that races the rebalance itself may be refused; then they succeed again.
        assert ok_after >= 10, f"after the growth: {ok_after} commits, {refused_after} refused"
        assert consumer._coordinator.need_rejoin() is False
        consumer.close()  # raises UnknownMemberIdError once the broker evicted the member
    finally:
        producer.close()
        kafka_admin.delete_topics([topic])
