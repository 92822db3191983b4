"""The retry policy (worker.retries) on a virtual clock; test_retries runs it on a broker."""

from __future__ import annotations

import pytest

from tests.fakes import Clock
from worker.answers import Slot
from worker.errors import DecodeError, InferenceError
from worker.kafka import Record, TopicPartition
from worker.retries import MAX_BACKOFF_S, Retries, backoff_s

A = TopicPartition("in", 0)
B = TopicPartition("in", 1)


def _slot(tp: TopicPartition = A, offset: int = 0) -> Slot:
    return Slot(Record(tp.topic, tp.partition, offset, None, b"v", [], None))


def test_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    assert [backoff_s(0.1, n) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff_s(1.0, 4) == MAX_BACKOFF_S == 5.0
    assert backoff_s(1.0, 20) == MAX_BACKOFF_S


def test_a_transient_failure_is_tried_again_after_its_backoff() -> None:
    clock = Clock()
    r, slot = Retries(2, 0.1, clock=clock.monotonic), _slot()
    assert r.retry(slot, InferenceError("oom")) == 0.1
    assert slot.attempts == 2 and r.waiting(slot)
    assert r.next_due() == pytest.approx(clock.now + 0.1)
    assert r.take_due() == ([], {A})
    clock.sleep(0.1)
    assert r.take_due() == ([slot], set())
    assert not r.waiting(slot) and r.next_due() is None


def test_tries_run_out_after_the_attempts_then_the_record_is_dead_lettered() -> None:
    r, slot = Retries(2, 0.1, clock=Clock().monotonic), _slot()
    assert r.retry(slot, InferenceError("x")) == 0.1
    assert r.retry(slot, InferenceError("x")) == 0.2
    assert r.retry(slot, InferenceError("x")) is None
    assert slot.attempts == 3  # the dead letter says 3 attempts


def test_a_permanent_failure_is_never_retried() -> None:
    r, slot = Retries(3, 0.1, clock=Clock().monotonic), _slot()
    assert r.retry(slot, DecodeError("bad")) is None
    assert slot.attempts == 1 and not r.waiting(slot)


def test_no_attempts_means_no_retry() -> None:
    assert Retries(0, 0.1).retry(_slot(), InferenceError("x")) is None


def test_holding_lists_each_partition_with_a_record_still_waiting() -> None:
    clock = Clock()
    r = Retries(3, 1.0, clock=clock.monotonic)
    a, b = _slot(A), _slot(B)
    r.retry(a, InferenceError("x"))
    clock.sleep(0.5)
    r.retry(b, InferenceError("x"))
    clock.sleep(0.5)
    assert r.take_due() == ([a], {B})
    assert r.next_due() == pytest.approx(clock.now + 0.5)


def test_forget_drops_the_records_of_partitions_given_up() -> None:
    clock = Clock()
    r = Retries(3, 0.1, clock=clock.monotonic)
    a, b = _slot(A), _slot(B)
    r.retry(a, InferenceError("x"))
    r.retry(b, InferenceError("x"))
    r.forget([A])
    clock.sleep(1)
    assert r.take_due() == ([b], set())
