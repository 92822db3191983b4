"""Flow control (worker.flow) and per-partition state (worker.partitions): plain rules."""

from __future__ import annotations

import pytest

from tests.fakes import Clock
from worker.flow import (
    PAUSE_AFTER_S,
    POLL_RECORDS,
    POLL_WAIT_S,
    TXN_POLL_WAIT_S,
    Budget,
    poll_wait_s,
    to_pause,
    to_resume,
)
from worker.kafka import TopicPartition
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


def test_to_resume_frees_those_under_half_their_share_or_all_under_half_the_limit() -> None:
    held = {A: 300, B: 100}
    assert to_resume(held, 1000, 1000, {A, B}) == set()  # not under the limit
    assert to_resume(held, 900, 1000, {A, B}) == {B}  # share: 1000 / (2 * 2) = 250
    assert to_resume(held, 499, 1000, {A, B}) == {A, B}
    assert to_resume(held, 10, 1000, set()) == set()


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
