"""Flow control (worker.flow) and per-partition state (worker.partitions): plain rules,
and FlowControl applying them to a fake consumer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.fakes import Clock, FakeConsumer
from worker.flow import (
    LAG_EVERY_S,
    PAUSE_AFTER_S,
    POLL_RECORDS,
    POLL_WAIT_S,
    TXN_POLL_WAIT_S,
    Budget,
    FlowControl,
    poll_wait_s,
    to_pause,
    to_resume,
)
from worker.kafka import TopicPartition
from worker.observability import Metrics
from worker.offsets import Entry, OffsetTracker
from worker.partitions import BACKPRESSURE, DRAINING, LOADING, RETRY, Partitions
from worker.recovery import Careful

A, B, C = (TopicPartition("in", i) for i in range(3))


# -- the budget -----------------------------------------------------------------------------------


def test_the_budget_waits_while_spent_for_less_than_the_pause_delay() -> None:
    clock = Clock()
    b = Budget(1000, clock=clock.monotonic)
    assert not b.waiting(999) and b.spent_s() == 0.0
    assert b.waiting(1000)
    clock.sleep(PAUSE_AFTER_S - 0.01)
    assert b.waiting(1500) and b.spent_s() == pytest.approx(PAUSE_AFTER_S - 0.01)
    clock.sleep(0.01)
    assert not b.waiting(1500)  # spent long enough: poll again (the fullest pause)
    assert b.spent_s() == pytest.approx(PAUSE_AFTER_S)
    assert not b.waiting(10) and b.spent_s() == 0.0  # room again: the clock restarts


def test_a_poll_asks_for_no_more_records_than_there_is_room_for() -> None:
    b = Budget(10_000)
    b.record_bytes = 100.0
    assert b.poll_records(0) == 100
    assert b.poll_records(9_000) == 10
    assert b.poll_records(9_950) == 1
    assert b.poll_records(10_000) == 1 and b.poll_records(20_000) == 1
    assert Budget(10**12).poll_records(0) == POLL_RECORDS


def test_the_record_size_is_a_running_mean_of_a_sixteenth_per_record() -> None:
    b = Budget(1)
    b.polled(1024 + 160)
    assert b.record_bytes == 1024 + 10
    b.polled(0)  # an empty record counts as one byte
    assert b.record_bytes == pytest.approx(1034 + (1 - 1034) / 16)


def test_to_pause_picks_the_fullest_until_half_the_limit_is_left() -> None:
    held = {A: 600, B: 300, C: 100}
    assert to_pause(held, 1000, 800, PAUSE_AFTER_S, ()) == {A}  # 1000 - 400 = 600 over
    assert to_pause(held, 1000, 400, PAUSE_AFTER_S, ()) == {A, B}
    assert to_pause(held, 1000, 400, PAUSE_AFTER_S, {A}) == {B}  # paused already
    assert to_pause(held, 1000, 800, PAUSE_AFTER_S - 0.01, ()) == set()  # not long enough
    assert to_pause(held, 1000, 1000, PAUSE_AFTER_S, ()) == set()  # at the limit, not over


def test_to_pause_picks_the_fullest_whatever_order_the_partitions_come_in() -> None:
    held = {A: 100, B: 300, C: 600}
    assert to_pause(held, 1000, 800, PAUSE_AFTER_S, ()) == {C}
    assert to_pause(held, 1000, 400, PAUSE_AFTER_S, ()) == {B, C}


def test_to_resume_frees_those_under_half_their_share_or_all_under_half_the_limit() -> None:
    held = {A: 300, B: 100}
    assert to_resume(held, 1000, 1000, {A, B}) == set()  # not under the limit
    assert to_resume(held, 900, 1000, {A, B}) == {B}  # share: 1000 / (2 * 2) = 250
    assert to_resume(held, 499, 1000, {A, B}) == {A, B}
    assert to_resume(held, 10, 1000, set()) == set()


def test_to_resume_at_its_edges() -> None:
    # Exactly half the limit is not under it: only the partitions under half their share.
    assert to_resume({A: 300, B: 200}, 500, 1000, {A, B}) == {B}
    assert to_resume({A: 250, B: 300}, 600, 1000, {A, B}) == set()  # at its share: not under
    assert to_resume({A: 300}, 600, 1000, {A, B}) == {B}  # B holds nothing any more
    assert to_resume({A: 300}, 600, 1000, {A}) == {A}  # alone: its share is 1000 / 2
    # A tiny limit: the share is one byte; what holds it stays paused, what holds none goes.
    assert to_resume({A: 1, C: 2}, 3, 4, {A, B}) == {B}


def test_a_poll_waits_until_the_next_deadline_at_most_the_longest_wait() -> None:
    assert poll_wait_s(10.0, [None, None]) == POLL_WAIT_S
    assert poll_wait_s(10.0, [10.03, None]) == pytest.approx(0.03)
    assert poll_wait_s(10.0, [10.5, 10.02]) == pytest.approx(0.02)
    assert poll_wait_s(10.0, [9.0]) == 0.0
    assert poll_wait_s(10.0, [20.0]) == POLL_WAIT_S
    assert poll_wait_s(10.0, [20.0], txn_answers_due=True) == TXN_POLL_WAIT_S


# -- pause reasons --------------------------------------------------------------------------------


def test_a_partition_pauses_with_its_first_reason_and_resumes_with_its_last() -> None:
    p = Partitions()
    assert p.hold([A, B], BACKPRESSURE) == {A, B}
    assert p.hold([B, C], RETRY) == {C}  # B is paused already
    assert p.release([B], BACKPRESSURE) == set()  # still waiting for its retry
    assert p.paused(B)
    assert p.release([A, B], RETRY) == {B}  # A was never held for a retry
    assert p.held(BACKPRESSURE) == {A} and p.held(RETRY) == {C}
    assert not p.paused(B) and p.paused(A)


def test_releasing_a_reason_that_does_not_hold_frees_nothing() -> None:
    p = Partitions()
    p.hold([A], LOADING)
    assert p.release([A, B], DRAINING) == set()
    assert p.release([A], LOADING) == {A}
    assert p.release([A], LOADING) == set()


def test_forget_is_one_deletion_of_everything_about_a_partition() -> None:
    p = Partitions()
    p.assigned([A, B])
    p.hold([A], RETRY)
    p.set_careful(A, Careful(0, 5, 1))
    p.forget([A])
    assert A not in p and p.careful(A) is None and not p.paused(A)
    assert p.take_unchecked() == [B]
    p.assigned([A])  # owned again: a fresh state
    assert not p.paused(A) and p.careful(A) is None


def test_newly_assigned_partitions_are_checked_once() -> None:
    p = Partitions()
    assert not p.has_unchecked
    p.assigned([A, B])
    assert p.has_unchecked
    assert sorted(p.take_unchecked()) == [A, B]
    assert not p.has_unchecked and p.take_unchecked() == []
    p.hold([C], RETRY)  # a state made by a pause is not "newly assigned"
    assert p.take_unchecked() == []


def test_the_careful_plan_of_a_partition_is_kept_until_cleared() -> None:
    p = Partitions()
    plan = Careful(3, 9, 0)
    p.set_careful(A, plan)
    assert p.careful(A) is plan and p.careful(B) is None
    p.set_careful(A, None)
    assert p.careful(A) is None


# -- FlowControl: the rules applied to the consumer -----------------------------------------------


class _Batcher:
    def __init__(self) -> None:
        self.waiting = 0  # groups waiting for a run slot
        self.deadline: float | None = None

    def __len__(self) -> int:
        return self.waiting

    def next_deadline(self) -> float | None:
        return self.deadline


class _Rig:
    """A FlowControl over a fake consumer owning A, B, C, a real tracker and books."""

    def __init__(self, limit: int = 1000, *, txn: bool = False) -> None:
        self.clock = Clock()
        self.consumer = FakeConsumer({}, [A, B, C], clock=self.clock)
        self.tracker: OffsetTracker[TopicPartition, Entry] = OffsetTracker()
        self.partitions = Partitions()
        self.metrics = Metrics()
        self.batcher = _Batcher()
        self.inference = SimpleNamespace(running=set(), next_free=lambda: None)
        self.retries = SimpleNamespace(next_due=lambda: None)
        self.flow = FlowControl(
            limit,
            consumer=self.consumer,
            committer=SimpleNamespace(sends_on_commit=txn),
            tracker=self.tracker,
            partitions=self.partitions,
            batcher=self.batcher,
            inference=self.inference,
            retries=self.retries,
            metrics=self.metrics,
            clock=self.clock.monotonic,
        )

    def hold(self, tp: TopicPartition, nbytes: int) -> Entry:
        entry = Entry(len(self.tracker.bytes_by_partition()), nbytes)
        self.tracker.add(tp, entry)
        return entry

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(f"inference_worker_{name}")


def test_flow_control_waits_then_pauses_the_fullest_partition_and_resumes_it_when_drained() -> None:
    rig = _Rig(1000)
    rig.hold(A, 900)
    rig.hold(B, 200)
    assert rig.flow.waiting()  # spent: wait for acknowledgements, pause nothing yet
    rig.flow.backpressure()
    assert rig.consumer.paused == set() and rig.gauge("paused_partitions") == 0
    rig.clock.sleep(PAUSE_AFTER_S)
    assert not rig.flow.waiting()  # spent for a second: poll again, the fullest paused
    rig.flow.backpressure()
    assert rig.consumer.paused == {A} and rig.partitions.held(BACKPRESSURE) == {A}
    assert rig.gauge("paused_partitions") == 1 and rig.gauge("inflight_bytes") == 1100
    rig.tracker.forget([A])  # its bytes committed
    rig.flow.backpressure()
    assert rig.consumer.paused == set() and rig.consumer.resumes == [{A}]
    assert rig.partitions.held(BACKPRESSURE) == set() and rig.gauge("paused_partitions") == 0


def test_flow_control_resumes_a_drained_partition_though_the_others_keep_the_total_up() -> None:
    rig = _Rig(1000)
    rig.hold(A, 900)
    rig.hold(B, 200)
    rig.flow.waiting()
    rig.clock.sleep(PAUSE_AFTER_S)
    rig.flow.waiting()
    rig.flow.backpressure()
    assert rig.consumer.paused == {A}
    rig.tracker.forget([A])  # its bytes committed; a little more came in before the pause
    rig.hold(A, 100)
    rig.hold(C, 500)  # 800 in flight: over half the limit, A under its share (500)
    rig.flow.backpressure()
    assert rig.consumer.resumes == [{A}] and rig.partitions.held(BACKPRESSURE) == set()
    assert rig.gauge("paused_partitions") == 0 and rig.gauge("inflight_bytes") == 800


def test_flow_control_keeps_another_reasons_pause_when_backpressure_lets_go() -> None:
    rig = _Rig(1000)
    rig.hold(A, 1500)
    rig.flow.waiting()
    rig.clock.sleep(PAUSE_AFTER_S)
    rig.flow.waiting()
    rig.consumer.pause(rig.partitions.hold([A], RETRY))
    rig.flow.backpressure()
    assert rig.partitions.held(BACKPRESSURE) == {A}
    rig.tracker.forget([A])
    rig.flow.backpressure()
    assert rig.consumer.paused == {A}  # still waiting for its retry
    assert rig.partitions.held(BACKPRESSURE) == set()


def test_flow_control_resumes_only_assigned_partitions_and_keeps_the_others_in_its_books() -> None:
    rig = _Rig(1000)
    rig.hold(A, 1500)
    rig.flow.waiting()
    rig.clock.sleep(PAUSE_AFTER_S)
    rig.flow.waiting()
    rig.flow.backpressure()
    assert rig.consumer.paused == {A}
    rig.consumer.assigned.discard(A)  # between two rebalance callbacks
    rig.tracker.forget([A])
    rig.flow.backpressure()
    assert rig.consumer.resumes == [] and rig.partitions.held(BACKPRESSURE) == {A}


def test_flow_control_polls_no_more_records_than_the_budget_has_room_for() -> None:
    rig = _Rig(1_000_000)
    assert rig.flow.poll_records() == POLL_RECORDS
    rig.flow.budget.polled(1024)
    rig.hold(A, 1_000_000 - 3 * 1024)
    assert rig.flow.poll_records() == 3


def test_flow_control_waits_for_the_next_deadline_and_briefly_for_a_transaction() -> None:
    rig = _Rig()
    assert rig.flow.poll_wait_s() == POLL_WAIT_S
    rig.retries.next_due = lambda: rig.clock.now + 0.03
    assert rig.flow.poll_wait_s() == pytest.approx(0.03)
    rig.batcher.deadline = rig.clock.now + 0.01
    assert rig.flow.poll_wait_s() == pytest.approx(0.01)
    rig.inference.running = {object()}  # at-least-once: pool threads send their own
    assert rig.flow.poll_wait_s() == pytest.approx(0.01)
    rig.inference.next_free = lambda: rig.clock.now + 0.002
    assert rig.flow.poll_wait_s() == pytest.approx(0.01)  # no group waits for a slot
    rig.batcher.waiting = 1
    assert rig.flow.poll_wait_s() == pytest.approx(0.002)
    txn = _Rig(txn=True)
    assert txn.flow.poll_wait_s() == POLL_WAIT_S  # nothing due
    txn.inference.running = {object()}
    assert txn.flow.poll_wait_s() == TXN_POLL_WAIT_S


def test_flow_control_reports_each_partitions_lag_at_most_every_second() -> None:
    rig = _Rig()
    for i in range(5):
        rig.consumer.append(A, b"x")
        if i < 2:
            rig.consumer.append(B, b"x")
    lag = {"topic": "in", "partition": "0"}

    def gauge() -> float | None:
        return rig.metrics.registry.get_sample_value("inference_worker_consumer_lag", lag)

    rig.flow.report_lag()
    assert gauge() == 5
    assert (
        rig.metrics.registry.get_sample_value(
            "inference_worker_consumer_lag", {"topic": "in", "partition": "1"}
        )
        == 2
    )
    rig.consumer.group[A] = 4
    rig.clock.sleep(LAG_EVERY_S - 0.01)
    rig.flow.report_lag()
    assert gauge() == 5  # not read again yet
    rig.clock.sleep(0.01)
    rig.flow.report_lag()
    assert gauge() == 1
