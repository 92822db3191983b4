"""Careful mode (worker.careful) on a fake consumer: the plan read at assignment, the try
markers, a record run alone and settled, a stop during its run."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeConsumer, RealClock
from worker.answers import Answers, Slot
from worker.careful import CarefulMode, commit_marker
from worker.errors import InferenceError
from worker.flow import POLL_RECORDS
from worker.intake import Deferred
from worker.kafka import KafkaFailure, Record, TopicPartition
from worker.observability import Metrics
from worker.offsets import OffsetTracker
from worker.partitions import CAREFUL, Partitions
from worker.recovery import CLEAN, CRASH_LIMIT, Careful, run_marker, try_marker
from worker.retries import Retries
from worker.settings import Settings

A, B, C = (TopicPartition("in", i) for i in range(3))


@pytest.fixture(autouse=True)
def _brief_run_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A careful record's run is awaited 50 ms, not RUN_WAIT_S, before the rounds go on."""
    monkeypatch.setattr("worker.careful.RUN_WAIT_S", 0.05)


def _record(tp: TopicPartition, offset: int) -> Record:
    return Record(tp.topic, tp.partition, offset, None, b"v", [], 1)


class _Committer:
    def __init__(self) -> None:
        self.epochs: dict[TopicPartition, int] = {}
        self.found_at: dict[TopicPartition, int] = {}
        self.found_last: dict[TopicPartition, int | None] = {}
        self.seen: list[Record] = []

    def found(self, tp: TopicPartition, offset: int, last: int | None = None) -> None:
        self.found_at[tp], self.found_last[tp] = offset, last

    def saw(self, records: list[Record]) -> None:
        self.seen.extend(records)


class _Consumer(FakeConsumer):
    def __init__(self) -> None:
        super().__init__({}, [A, B], clock=RealClock())
        self.metadata_fails: KafkaFailure | None = None
        self.prefetched: list[Record] = []
        self.poll_args: list[tuple[int, float]] = []  # every poll's (max_records, timeout_s)

    def committed_metadata(self, tps: Any) -> dict[TopicPartition, tuple[int | None, str]]:
        if self.metadata_fails is not None:
            raise self.metadata_fails
        return super().committed_metadata(tps)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self.poll_args.append((max_records, timeout_s))
        assert len(self.poll_args) < 500, "polled without end (a wait that never ends)"
        got, self.prefetched = self.prefetched, []
        return got + super().poll(max_records, timeout_s)


class _Rig:
    def __init__(self, tmp_path: Path, *, latest: bool = False) -> None:
        settings = Settings(input_topics=("in",), output_topic="out", model_repository=tmp_path)
        self.consumer = _Consumer()
        for tp in (A, B):
            for _ in range(5):
                self.consumer.append(tp, b"v")
        self.committer = _Committer()
        self.partitions = Partitions()
        self.tracker: OffsetTracker[TopicPartition, Slot] = OffsetTracker()
        self.retries = Retries(1, 0.1)
        self.deferred = Deferred(self.committer)  # type: ignore[arg-type]
        self.stopping = threading.Event()
        self.admitted: list[tuple[Slot, Callable[[], None] | None]] = []
        self.rounds = 0
        self.on_round: Callable[[], None] = lambda: None
        self.careful = CarefulMode(
            consumer=self.consumer,
            committer=self.committer,  # type: ignore[arg-type]
            partitions=self.partitions,
            tracker=self.tracker,
            retries=self.retries,
            answers=Answers(settings, Metrics()),
            admit=lambda slot, before: self.admitted.append((slot, before)),
            run_now=lambda: None,
            settle_round=self._round,
            deferred=self.deferred,
            stopping=self.stopping,
            latest=latest,
        )

    def _round(self) -> None:
        self.rounds += 1
        assert self.rounds < 500, "rounds without end (a wait that never ends)"
        self.on_round()

    def slot(self, tp: TopicPartition, offset: int) -> Slot:
        slot = Slot(_record(tp, offset))
        self.tracker.add(tp, slot)
        return slot

    def settle(self, tp: TopicPartition) -> None:
        """The next round answers and commits everything of ``tp`` polled so far."""
        self.on_round = lambda: self.tracker.forget([tp])


# -- at assignment --------------------------------------------------------------------------------


@pytest.mark.parametrize(("latest", "start"), [(False, 0), (True, 5)])
def test_a_partition_with_nothing_committed_gets_its_start_committed_as_running(
    tmp_path: Path, latest: bool, start: int
) -> None:
    rig = _Rig(tmp_path, latest=latest)
    rig.partitions.assigned([A])
    rig.careful.check_assigned()
    assert rig.consumer.commits == [({A: start}, run_marker(start - 1))]  # nothing may run yet
    assert rig.committer.found_at == {A: start} and rig.partitions.careful(A) is None


def test_a_partition_left_mid_stream_is_run_carefully_up_to_its_marker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A: the last owner died running record 2 alone (its try marker): just that record
    # runs carefully. B: it died serving, its marker reaching 8: records 3..8 run one at
    # a time, but no further than what the partition holds (its high watermark, 5).
    rig = _Rig(tmp_path)
    rig.consumer.commit({A: 2}, try_marker(2, 1))
    rig.consumer.commit({B: 3}, run_marker(8))
    rig.consumer.commits.clear()
    rig.partitions.assigned([A, B, C])  # C: no longer assigned by the time it is checked
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        rig.careful.check_assigned()
    assert rig.partitions.careful(A) == Careful(2, 3, 1)
    assert rig.partitions.careful(B) == Careful(3, 5, 0)
    assert C not in rig.committer.found_at
    assert rig.committer.found_at == {A: 2, B: 3} and rig.consumer.commits == []
    # What the group's marker covers is known: nothing past it runs without a new one.
    assert rig.committer.found_last == {A: 2, B: 4}
    assert not rig.partitions.has_unchecked
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"in[{tp.partition}]: the last owner stopped mid-stream at offset {offset}; "
            f"records up to {until} run one at a time",
        )
        for tp, offset, until in ((A, 2, 3), (B, 3, 5))
    ]


def test_after_a_clean_stop_the_watermarks_are_not_asked(tmp_path: Path) -> None:
    # A clean handover (every rebalance) or an operator's commit: nothing runs carefully
    # whatever the log holds, so no round trip that waits behind the fetch (0.5 s each).
    rig = _Rig(tmp_path)
    asked: list[TopicPartition] = []
    watermarks = rig.consumer.watermarks

    def counted(tp: TopicPartition) -> tuple[int, int] | None:
        asked.append(tp)
        return watermarks(tp)

    rig.consumer.watermarks = counted  # type: ignore[method-assign]
    rig.consumer.commit({A: 2}, CLEAN + "\x00")  # librdkafka's trailing NUL
    rig.consumer.commit({B: 3}, "")
    rig.partitions.assigned([A, B])
    rig.careful.check_assigned()
    assert asked == [] and rig.committer.found_at == {A: 2, B: 3}
    assert rig.partitions.careful(A) is None and rig.partitions.careful(B) is None
    rig.consumer.commit({A: 2}, run_marker(4))  # mid-stream: asked
    rig.partitions.assigned([A])
    rig.careful.check_assigned()
    assert asked == [A] and rig.partitions.careful(A) == Careful(2, 5, 0)


def test_unknown_committed_offsets_skip_the_check_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = _Rig(tmp_path)
    rig.consumer.metadata_fails = KafkaFailure("coordinator moving")
    rig.partitions.assigned([A])
    rig.careful.check_assigned()
    assert rig.consumer.commits == [] and rig.committer.found_at == {}
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "committed offsets unknown (coordinator moving): no poison-pill check this time",
        )
    ]


def test_a_start_that_cannot_be_committed_is_logged_and_not_taken_as_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = _Rig(tmp_path)
    rig.consumer.fail.append(KafkaFailure("rebalancing"))
    rig.partitions.assigned([A])
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        rig.careful.check_assigned()
    assert rig.consumer.commits == [] and rig.committer.found_at == {}
    assert caplog.messages == ["in[0]: start failed: rebalancing"]


def test_a_marker_commit_that_fails_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    consumer = _Consumer()
    consumer.fail.append(KafkaFailure("rebalancing"))
    caplog.set_level(logging.WARNING, logger="worker.loop")
    assert not commit_marker(consumer, {A: 3}, CLEAN, "the clean-stop marker")
    assert "the clean-stop marker failed: rebalancing" in caplog.text
    assert commit_marker(consumer, {A: 3}, CLEAN, "again")
    assert consumer.commits == [({A: 3}, CLEAN)]


# -- one record at a time -------------------------------------------------------------------------


def test_a_covered_records_try_marker_counts_its_crashes(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    rig.partitions.set_careful(A, Careful(2, 5, 1))
    assert rig.careful.try_marker(Slot(_record(A, 5))) is None  # past the careful range
    assert rig.careful.try_marker(Slot(_record(B, 2))) is None  # not a careful partition
    for offset, marker in ((2, "try:2:2"), (3, "try:3:1")):
        commit = rig.careful.try_marker(Slot(_record(A, offset)))
        assert commit is not None
        commit()
        assert rig.consumer.commits[-1] == ({A: offset}, marker)


def test_a_careful_record_runs_behind_its_marker_and_is_committed_clean_once_settled(
    tmp_path: Path,
) -> None:
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, 0)
    rig.partitions.set_careful(A, careful)
    slot = rig.slot(A, 2)

    polls_at_round: list[int] = []

    def answered() -> None:
        polls_at_round.append(len(rig.consumer.poll_args))
        slot.out = object()  # type: ignore[assignment]
        rig.tracker.forget([A])

    rig.on_round = answered
    rig.careful.run(slot, careful, 0)
    # still running when handed over: its answer is awaited (polling) before a round
    assert polls_at_round[0] > 1
    [(admitted, before)] = rig.admitted
    assert admitted is slot and before is not None  # the try marker, called before it runs
    assert rig.consumer.commits == [({A: 3}, CLEAN)] and rig.committer.found_at == {A: 3}


def test_a_record_rewound_while_settling_gets_no_clean_marker(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, 0)
    rig.partitions.set_careful(A, careful)
    slot = rig.slot(A, 2)

    def rewound() -> None:
        slot.out = object()  # type: ignore[assignment]
        rig.committer.epochs[A] = 1
        rig.tracker.forget([A])

    rig.on_round = rewound
    rig.careful.run(slot, careful, 0)
    assert rig.consumer.commits == []


def test_a_record_that_crashed_the_worker_enough_is_dead_lettered_unrun(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, CRASH_LIMIT - 1)
    rig.partitions.set_careful(A, careful)
    slot = Slot(Record("in", 0, 2, None, b"v", [("model", b"mnist-mlp")], 1))
    rig.tracker.add(A, slot)
    polls_at_round: list[int] = []

    def settled() -> None:
        polls_at_round.append(len(rig.consumer.poll_args))
        rig.tracker.forget([A])

    rig.on_round = settled
    rig.careful.run(slot, careful, 0)
    assert rig.admitted == []
    assert polls_at_round == [0]  # answered already: its round comes at once, no run awaited
    assert slot.out is not None and not slot.out.ok
    headers = slot.out.headers
    assert dict(headers)["error-message"] == (
        b"crashed the worker %d times (the process died while running it); "
        b"dead-lettered without running it again" % CRASH_LIMIT
    )
    # as every dead letter: the original headers, what went wrong, where, and the model
    assert headers[0] == ("model", b"mnist-mlp")
    assert headers[-4:] == [
        ("source-topic", b"in"),
        ("source-partition", b"0"),
        ("source-offset", b"2"),
        ("model", b"mnist-mlp"),
    ]
    assert rig.consumer.commits == [({A: 3}, CLEAN)]


def test_everything_before_a_careful_record_settles_first_with_every_partition_paused(
    tmp_path: Path,
) -> None:
    rig = _Rig(tmp_path)
    rig.consumer.pause(rig.partitions.hold([B], "retry"))
    rig.slot(A, 0)
    polled = _record(B, 9)
    rig.consumer.prefetched.append(polled)
    calls: list[tuple[int, int]] = []  # (the round, the polls before it)

    def round_() -> None:
        calls.append((rig.rounds, len(rig.consumer.poll_args)))
        assert rig.rounds <= 2, "a round after everything was settled"
        assert rig.partitions.held(CAREFUL) == {A, B}
        if rig.rounds == 2:
            rig.tracker.forget([A])

    rig.on_round = round_
    assert rig.careful.settle_before(A, 1)
    assert calls == [(1, 0), (2, 1)] and rig.consumer.pauses[-1] == {A}
    # between the rounds (not after the last) a brief poll keeps the group protocol going
    assert rig.consumer.poll_args == [(POLL_RECORDS, 0.01)]
    assert rig.consumer.resumes == [{A}] and rig.partitions.held(CAREFUL) == set()
    assert rig.deferred.take() == (polled, 0)  # polled while waiting: for afterwards


def test_a_stop_while_settling_abandons_the_careful_record_uncharged(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, 0)
    rig.partitions.set_careful(A, careful)
    slot = rig.slot(A, 2)
    rig.on_round = rig.stopping.set  # SIGTERM while it runs
    rig.careful.run(slot, careful, 0)
    assert rig.consumer.commits == [] and rig.tracker.pending() == 0


def test_nothing_pending_before_the_offset_is_settled_at_once(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    rig.slot(B, 0)  # another partition's record does not count
    assert rig.careful.settle_before(A, 3) is True
    assert rig.rounds == 0 and rig.consumer.pauses == [] and rig.consumer.poll_args == []


def _stop_after(rig: _Rig, rounds: int, each: Callable[[], None] = lambda: None) -> None:
    """Each round does ``each``; the ``rounds``-th also stops the worker (a test that
    would otherwise wait for ever ends, and fails on what it asserts)."""

    def round_() -> None:
        each()
        if rig.rounds >= rounds:
            rig.stopping.set()

    rig.on_round = round_


def test_a_record_at_the_offset_is_not_waited_for(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    first = rig.slot(A, 0)
    rig.slot(A, 1)  # unanswered: not before the offset settled
    _stop_after(rig, 3, lambda: rig.tracker.settle_window([(A, first)]))
    assert rig.careful.settle_before(A, 1) is True
    assert rig.rounds == 1 and not rig.stopping.is_set()


def test_a_careful_record_waits_for_its_own_settling_only(tmp_path: Path) -> None:
    # what follows it in its line is not its business: its clean marker goes at once
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, 0)
    rig.partitions.set_careful(A, careful)
    slot = rig.slot(A, 2)
    rig.slot(A, 3)

    def answered() -> None:
        if slot.live:
            slot.out = object()  # type: ignore[assignment]
            rig.tracker.settle_window([(A, slot)])

    _stop_after(rig, 3, answered)
    rig.careful.run(slot, careful, 0)
    assert rig.consumer.commits == [({A: 3}, CLEAN)] and rig.committer.found_at == {A: 3}
    assert rig.rounds == 1


def test_a_settled_marker_that_fails_is_logged_and_nothing_is_taken_as_committed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, 0)
    rig.partitions.set_careful(A, careful)
    slot = rig.slot(A, 2)

    def answered() -> None:
        slot.out = object()  # type: ignore[assignment]
        rig.tracker.forget([A])

    rig.on_round = answered
    rig.consumer.fail.append(KafkaFailure("rebalancing"))
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        rig.careful.run(slot, careful, 0)
    assert rig.consumer.commits == [] and rig.committer.found_at == {}
    assert caplog.messages == ["in[0]@2: settled marker failed: rebalancing"]


def test_a_try_marker_that_fails_is_logged_with_its_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = _Rig(tmp_path)
    rig.partitions.set_careful(A, Careful(2, 5, 0))
    commit = rig.careful.try_marker(Slot(_record(A, 2)))
    assert commit is not None
    rig.consumer.fail.append(KafkaFailure("coordinator moved"))
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        commit()  # runs all the same
    assert rig.consumer.commits == []
    assert caplog.messages == ["in[0]@2: try marker failed: coordinator moved"]


def test_a_stop_during_the_careful_run_is_logged_as_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, 0)
    rig.partitions.set_careful(A, careful)
    slot = rig.slot(A, 2)
    rig.on_round = rig.stopping.set
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        rig.careful.run(slot, careful, 0)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "in[0]@2: stopping during its careful run; abandoned (answered after the "
            "restart, not counted as a crash)",
        )
    ]
    assert rig.tracker.pending() == 0


@pytest.mark.parametrize("state", ["answered", "waiting for its retry"])
def test_a_stop_while_a_careful_record_is_not_running_abandons_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, state: str
) -> None:
    # Answered (the drain commits it) or waiting for a retry: not "abandoned".
    rig = _Rig(tmp_path)
    careful = Careful(2, 5, 0)
    rig.partitions.set_careful(A, careful)
    slot = rig.slot(A, 2)
    if state == "answered":
        slot.out = object()  # type: ignore[assignment]
    else:
        assert rig.retries.retry(slot, InferenceError("out of memory")) is not None
    polls_at_round: list[int] = []

    def stop() -> None:
        polls_at_round.append(len(rig.consumer.poll_args))
        rig.stopping.set()

    rig.on_round = stop
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        rig.careful.run(slot, careful, 0)
    assert polls_at_round == [0]  # no run to await: the round comes at once
    assert [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()] == []
    assert rig.tracker.pending() == 1 and rig.consumer.commits == []


def test_a_running_careful_record_is_awaited_for_a_while_before_a_round(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    slot = rig.slot(A, 2)
    polls_at_round: list[int] = []

    def answered() -> None:
        polls_at_round.append(len(rig.consumer.poll_args))
        slot.out = object()  # type: ignore[assignment]
        rig.tracker.forget([A])

    rig.on_round = answered
    assert rig.careful.settle_before(A, 3, running=slot)
    # never answered: polled (briefly, many times) for the wait, then the rounds go on
    assert polls_at_round[0] == len(rig.consumer.poll_args) > 1
    assert all(max_records == POLL_RECORDS for max_records, _ in rig.consumer.poll_args)
