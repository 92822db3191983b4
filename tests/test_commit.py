"""The committers' logic over in-memory fakes of the Kafka seam (no broker).

The fakes (:mod:`tests.fakes`) behave as the Protocols in ``worker.kafka``
say: a send returns a pending :class:`Delivery` that ``poll``/``flush``
resolve later, within their timeout (as a client's delivery callbacks do), a
commit may be deferred, every transaction step can fail, and so can an abort.
The broker-backed tests (test_loop, test_faults, test_loss) run the same
committers for real; test_flow runs the whole loop on these fakes.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Collection, Iterator, Sequence

import pytest

from tests.fakes import FakeConsumer, FakeProducer, Group
from worker.commit import (
    COVER_AHEAD,
    EXTEND_WITHIN,
    STABLE_READS,
    AtLeastOnce,
    Committer,
    Transactional,
    committer_for,
)
from worker.errors import FatalError
from worker.kafka import (
    CommitDeferred,
    Delivery,
    KafkaFailure,
    Producer,
    Record,
    TopicPartition,
    TransactionFailed,
)
from worker.offsets import Entry, OffsetTracker
from worker.recovery import CLEAN, RUNNING, run_marker

A = TopicPartition("in", 0)
B = TopicPartition("in", 1)
C = TopicPartition("in", 2)
NEVER = 3600.0  # an interval that never comes due within a test


def _value(tp: TopicPartition, offset: int) -> bytes:
    return f"{tp.partition}@{offset}".encode()


class Rig:
    """A tracker, the fakes, and the committers' outbox: what it sent, rescued, retired."""

    def __init__(self, assigned: Collection[TopicPartition] = (A, B)) -> None:
        self.tracker: OffsetTracker[TopicPartition, Entry] = OffsetTracker()
        self.group: Group = {}
        self.consumer = FakeConsumer(self.group, assigned)
        self.producer = FakeProducer(self.group)
        self.retired: list[Entry] = []
        self.opened: list[FakeProducer] = []
        self.rescued: list[tuple[Entry, BaseException]] = []
        self.rescue_as: bytes | None = None  # what a refused answer becomes; None: cannot
        self.rescuing = False  # an outbox that never rescues (and is never seen asked)

    # -- the outbox ----------------------------------------------------------------

    def emit(self, producer: Producer, entry: Entry) -> Delivery:
        return producer.send("out", entry.out, None, [], None)

    def retire(self, entries: Sequence[Entry]) -> None:
        self.retired.extend(entries)

    def rescue(self, entry: Entry, error: BaseException) -> bool:
        if not self.rescuing:
            return False
        self.rescued.append((entry, error))
        if self.rescue_as is None:
            return False
        entry.out = self.rescue_as + b"@" + str(entry.offset).encode()
        return True

    def add(self, tp: TopicPartition, offsets: range, answered: bool = True) -> list[Entry]:
        entries = []
        for o in offsets:
            e = Entry(o, 10)
            if answered:
                e.out = _value(tp, o)
            self.tracker.add(tp, e)
            entries.append(e)
        return entries

    def at_least_once(self, interval_s: float = 0.0, rescue: bool = False) -> AtLeastOnce[Entry]:
        self.rescuing = rescue
        return AtLeastOnce(self.tracker, self.consumer, self.producer, self, interval_s)

    def reopen(self) -> FakeProducer:
        p = FakeProducer(self.group, f"p{len(self.opened) + 2}")
        self.opened.append(p)
        return p

    def transactional(self, interval_s: float = 0.0, rescue: bool = False) -> Transactional[Entry]:
        self.rescuing = rescue
        return Transactional(
            self.tracker, self.consumer, self.producer, self, interval_s, reopen=self.reopen
        )


def _values(entries: list[Entry]) -> list[bytes]:
    return [e.out for e in entries]


@pytest.fixture()
def rig() -> Rig:
    return Rig()


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """``worker.commit``'s monotonic clock, set by the test."""
    now = [1000.0]
    monkeypatch.setattr("worker.commit.time", types.SimpleNamespace(monotonic=lambda: now[0]))
    yield now


# -- the common interface ---------------------------------------------------------------------


def test_the_base_committer_leaves_the_steps_to_its_subclasses(rig: Rig) -> None:
    base: Committer[Entry] = Committer(rig.tracker, rig.consumer, rig.producer, rig, 0.0)
    with pytest.raises(NotImplementedError):
        base.send()
    with pytest.raises(NotImplementedError):
        base.commit()
    with pytest.raises(NotImplementedError):
        base.revoke([A])


def test_clean_offsets_are_the_committed_offsets_of_the_partitions_asked(rig: Rig) -> None:
    c = rig.at_least_once()
    c.committed_offsets.update({A: 5, B: 7})
    assert c.clean_offsets([A, C]) == {A: 5}
    assert c.clean_offsets([]) == {}


def test_pending_counts_polled_and_acknowledged_records_not_yet_committed(rig: Rig) -> None:
    c = rig.at_least_once(NEVER)
    rig.add(A, range(0, 3))
    rig.add(B, range(0, 1), answered=False)
    c.send()
    assert c.commit() == 0  # acknowledged, not due
    assert c.pending() == 4 == rig.tracker.pending()


# -- at-least-once ---------------------------------------------------------------------------


def test_send_emits_answered_heads_in_offset_order_once(rig: Rig) -> None:
    c = rig.at_least_once()
    a = rig.add(A, range(0, 4), answered=False)
    b = rig.add(B, range(10, 12))
    a[1].out, a[3].out = _value(A, 1), _value(A, 3)
    c.send([A])
    assert rig.producer.sent == []  # 0 unanswered: 1 and 3 wait
    a[0].out = _value(A, 0)
    c.send([A])
    assert [v for v, _ in rig.producer.sent] == [b"0@0", b"0@1"]
    c.send()
    c.send()
    assert [v for v, _ in rig.producer.sent] == [b"0@0", b"0@1", b"1@10", b"1@11"]
    assert [len(e.deliveries) for e in a + b] == [1, 1, 0, 0, 1, 1]
    assert all(not d.done for _, d in rig.producer.sent)  # resolved later, by poll


def test_commit_commits_the_acknowledged_offsets_plus_one_and_settles_them(rig: Rig) -> None:
    c = rig.at_least_once()
    a = rig.add(A, range(100, 103))
    b = rig.add(B, range(7, 8))
    rig.add(B, range(8, 9), answered=False)
    c.send()
    assert rig.tracker.inflight_bytes == 50
    assert c.commit() == 4
    assert rig.producer.calls[-1] == "poll"  # deliveries are read before acknowledging
    assert rig.consumer.commits == [({A: 103, B: 8}, {A: "run", B: "run"})]
    assert rig.retired == a + b
    assert c.committed_offsets == {A: 103, B: 8}
    assert c.pending() == 1 and rig.tracker.inflight_bytes == 10
    # Nothing new: no empty commit reaches the broker.
    assert c.commit(force=True) == 0
    assert len(rig.consumer.commits) == 1


def test_commit_passes_its_metadata(rig: Rig) -> None:
    c = rig.at_least_once()
    rig.add(A, range(0, 1))
    c.send()
    assert c.commit(force=True, metadata="clean") == 1
    assert rig.consumer.commits == [({A: 1}, "clean")]


def test_commit_waits_for_deliveries_and_keeps_offset_order(rig: Rig) -> None:
    c = rig.at_least_once()
    rig.add(A, range(0, 4))
    rig.producer.hold = {b"0@1"}
    c.send()
    assert c.commit() == 1
    assert rig.consumer.commits == [({A: 1}, {A: "run"})]
    assert c.commit() == 0  # 2 and 3 acknowledged, but 1 is not: nothing more
    assert rig.consumer.commits == [({A: 1}, {A: "run"})]
    rig.producer.hold.clear()
    assert c.commit() == 3
    assert rig.consumer.commits[-1] == ({A: 4}, {A: "run"})


def test_commit_only_when_the_interval_has_passed_or_forced(rig: Rig, clock: list[float]) -> None:
    c = rig.at_least_once(5.0)
    assert c.last_commit == 1000.0
    a = rig.add(A, range(0, 2))
    c.send()
    clock[0] = 1004.999
    assert c.commit() == 0
    assert rig.consumer.commits == []
    assert rig.retired == a  # acknowledged all the same
    clock[0] = 1005.0
    assert c.commit() == 2
    assert rig.consumer.commits == [({A: 2}, {A: "run"})]
    assert c.last_commit == 1005.0
    rig.add(A, range(2, 3))
    c.send()
    clock[0] = 1006.0
    assert c.commit() == 0
    assert c.commit(force=True) == 1
    assert c.last_commit == 1006.0


def test_a_deferred_commit_keeps_its_offsets_for_the_next_one(rig: Rig, clock: list[float]) -> None:
    c = rig.at_least_once(1.0)
    rig.add(A, range(0, 3))
    rig.add(B, range(0, 1))
    c.send()
    rig.consumer.fail = [CommitDeferred("rebalance", name="REBALANCE_IN_PROGRESS")]
    clock[0] += 2
    assert c.commit() == 0
    assert rig.consumer.commits == []
    assert c.committed_offsets == {}
    assert c.last_commit == 1000.0  # not a commit: still due
    assert c.pending() == 4
    rig.add(A, range(3, 5))
    c.send()
    assert c.commit() == 6
    assert rig.consumer.commits == [({A: 5, B: 1}, {A: "run", B: "run"})]
    assert c.pending() == 0 and c.last_commit == 1002.0


def test_a_failed_commit_is_raised_and_counts_nothing(rig: Rig) -> None:
    c = rig.at_least_once()
    rig.add(A, range(0, 2))
    c.send()
    rig.consumer.fail = [KafkaFailure("coordinator gone", retriable=True)]
    with pytest.raises(KafkaFailure, match="coordinator gone"):
        c.commit()
    assert rig.consumer.commits == [] and c.committed_offsets == {}
    assert c.pending() == 2


def test_a_refused_answer_is_fatal_and_nothing_at_or_after_it_is_ever_committed(
    rig: Rig,
) -> None:
    c = rig.at_least_once()
    a = rig.add(A, range(10, 16))
    b = rig.add(B, range(0, 2))
    boom = KafkaFailure("MSG_SIZE_TOO_LARGE")
    rig.producer.refuse = {b"0@12": boom}
    c.send()
    with pytest.raises(FatalError, match="MSG_SIZE_TOO_LARGE"):
        c.commit()
    assert rig.consumer.commits == []
    assert rig.retired == [a[0], a[1], *b]  # what precedes it is acknowledged
    # Should the loop go on: later answers succeed, commits happen, a deferred one
    # is restored, another partition is forgotten; A never passes 12.
    rig.add(A, range(16, 18))
    rig.add(C, range(0, 1))
    c.send()
    rig.consumer.fail = [CommitDeferred("rebalance")]
    assert c.commit(force=True) == 0
    rig.tracker.forget([B, C])
    assert c.commit(force=True) == 2
    c.send()
    assert c.commit(force=True) == 0
    assert rig.consumer.commits == [({A: 12}, {A: "run"})]
    assert rig.tracker.first_offsets() == {A: 12}
    assert c.pending() == 6  # 12..17 held, never settled
    assert c.revoke([A]) == ({A: 12}, 0)  # the clean offset, not a step further


def test_revoke_sends_flushes_and_returns_the_offsets_and_settled_count(rig: Rig) -> None:
    c = rig.at_least_once(NEVER)
    c.committed_offsets.update({A: 3, B: 40})
    rig.add(A, range(3, 5))
    c.send()
    assert c.commit() == 0  # acknowledged 3 and 4, not due
    rig.add(A, range(5, 7))  # answered, not yet sent
    rig.add(A, range(7, 8), answered=False)
    rig.add(B, range(40, 42))
    offsets, settled = c.revoke([A])
    assert (offsets, settled) == ({A: 7}, 4)
    assert [v for v, _ in rig.producer.sent] == [b"0@3", b"0@4", b"0@5", b"0@6"]
    assert rig.producer.calls[-1] == "flush"
    assert rig.consumer.commits == []  # the client commits what revoke returns
    assert rig.tracker.first_offsets() == {A: 7, B: 40}
    assert c.pending() == 1 + 2


def test_revoke_gives_the_clean_offset_of_a_partition_with_nothing_new(rig: Rig) -> None:
    c = rig.at_least_once(NEVER)
    c.committed_offsets.update({A: 3, B: 9})
    rig.add(A, range(3, 4), answered=False)
    assert c.revoke([A, C]) == ({A: 3}, 0)
    assert rig.producer.sent == []


def test_revoke_stops_at_an_answer_the_flush_did_not_acknowledge(rig: Rig) -> None:
    c = rig.at_least_once(NEVER)
    rig.add(A, range(0, 4))
    rig.producer.hold = {b"0@2"}
    assert c.revoke([A]) == ({A: 2}, 2)
    assert rig.tracker.first_offsets() == {A: 2}


def test_revoke_carries_the_offsets_of_a_deferred_commit(rig: Rig) -> None:
    c = rig.at_least_once()
    rig.add(A, range(0, 2))
    c.send()
    rig.consumer.fail = [CommitDeferred("rebalance")]
    assert c.commit() == 0
    assert c.revoke([A]) == ({A: 2}, 2)
    assert c.pending() == 0


# -- transactional ----------------------------------------------------------------------------


def test_send_sends_nothing_outside_a_transaction(rig: Rig) -> None:
    c = rig.transactional()
    rig.add(A, range(0, 2))
    c.send()
    c.send([A])
    assert rig.producer.calls == []


def test_a_transaction_holds_the_window_answers_and_offsets(rig: Rig) -> None:
    c = rig.transactional()
    a = rig.add(A, range(0, 3))
    rig.add(A, range(3, 4), answered=False)
    a += rig.add(A, range(4, 5))  # after an unanswered record: not in this window
    b = rig.add(B, range(20, 22))
    assert c.commit(metadata="run") == 5
    p = rig.producer
    assert p.calls == [
        "begin_transaction",
        *["send"] * 5,
        "flush",
        "send_offsets_to_transaction",
        "commit_transaction",
    ]
    assert p.transactions == [
        ([b"0@0", b"0@1", b"0@2", b"1@20", b"1@21"], {A: 3, B: 22}, rig.consumer.metadata, "run")
    ]
    assert rig.consumer.commits == []  # the offsets went in the transaction
    assert rig.retired == [*a[:3], *b]
    assert c.committed_offsets == {A: 3, B: 22}
    assert rig.tracker.first_offsets() == {A: 3}
    assert c.pending() == 2 and rig.tracker.inflight_bytes == 20
    assert c.aborted == 0 and rig.consumer.seeks == []


def test_no_transaction_without_answers_or_before_it_is_due(rig: Rig, clock: list[float]) -> None:
    c = rig.transactional(5.0)
    rig.add(A, range(0, 1), answered=False)
    assert c.commit(force=True) == 0
    assert rig.producer.calls == []
    rig.add(B, range(0, 1))
    clock[0] = 1004.0
    assert c.commit() == 0
    assert rig.producer.calls == []
    clock[0] = 1005.0
    assert c.commit(metadata="clean") == 1
    assert rig.producer.transactions[0][1:] == ({B: 1}, rig.consumer.metadata, "clean")
    assert c.last_commit == 1005.0


def test_consecutive_transactions_commit_consecutive_windows(rig: Rig) -> None:
    c = rig.transactional()
    rig.add(A, range(0, 2))
    assert c.commit() == 2
    rig.add(A, range(2, 5))
    assert c.commit() == 3
    assert [(t[0], t[1]) for t in rig.producer.transactions] == [
        ([b"0@0", b"0@1"], {A: 2}),
        ([b"0@2", b"0@3", b"0@4"], {A: 5}),
    ]
    assert c.pending() == 0 and rig.tracker.inflight_bytes == 0


def _abort_scenario(rig: Rig) -> tuple[Transactional, list[Entry]]:
    """One transaction committed (A 0..1); then A 2..3, A 4 unanswered, B 0, C 0 (unassigned)."""
    c = rig.transactional()
    rig.add(A, range(0, 2))
    assert c.commit() == 2
    rig.producer.calls.clear()
    window = rig.add(A, range(2, 4)) + rig.add(B, range(0, 1))
    rig.add(A, range(4, 5), answered=False)
    rig.add(C, range(9, 10))
    return c, window


def _assert_rewound(rig: Rig, c: Transactional) -> None:
    """Aborted and rewound to the first uncommitted record of every assigned line."""
    assert c.aborted == 1
    assert sorted(rig.consumer.seeks) == [(A, 2), (B, 0)]  # C is not assigned: not sought
    assert c.epochs == {A: 1, B: 1, C: 1}  # what was polled of them before is stale
    assert rig.tracker.first_offsets() == {}  # every line forgotten, re-read from Kafka
    assert c.pending() == 0 and rig.tracker.inflight_bytes == 0
    assert c.committed_offsets == {A: 2}
    assert rig.retired[2:] == []  # only the first transaction's records were retired
    assert len(rig.retired) == 2


@pytest.mark.parametrize(
    "step", ["begin_transaction", "send", "send_offsets_to_transaction", "commit_transaction"]
)
@pytest.mark.parametrize("error", [KafkaFailure, TransactionFailed])
def test_a_failing_step_aborts_and_rewinds(
    rig: Rig, step: str, error: Callable[[str], KafkaFailure]
) -> None:
    c, _ = _abort_scenario(rig)
    rig.producer.fail[step] = error(f"{step} failed")
    assert c.commit() == 0
    assert rig.producer.calls[-1] == "abort_transaction"
    assert rig.producer.calls.index(step) < rig.producer.calls.index("abort_transaction")
    assert len(rig.producer.transactions) == 1
    assert c.producer is rig.producer and rig.opened == []
    _assert_rewound(rig, c)


def test_a_refused_send_aborts_before_the_commit_and_rewinds(rig: Rig) -> None:
    c, _ = _abort_scenario(rig)
    rig.producer.lenient = True  # commit_transaction would return normally (kafka-python's fault)
    rig.producer.refuse = {b"0@3": KafkaFailure("NOT_ENOUGH_REPLICAS")}
    assert c.commit() == 0
    assert rig.producer.calls[-2:] == ["flush", "abort_transaction"]
    assert "commit_transaction" not in rig.producer.calls[-4:]
    _assert_rewound(rig, c)


def test_a_send_unacknowledged_at_the_commit_aborts_and_rewinds(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    c, _ = _abort_scenario(rig)
    rig.producer.lenient = True
    rig.producer.hold = {b"1@0"}
    with caplog.at_level("WARNING", logger="worker.commit"):
        assert c.commit() == 0
    assert rig.producer.calls[-2:] == ["flush", "abort_transaction"]
    assert rig.producer.timeouts[-1] == ("flush", 30.0)  # waited 30 s for it, no longer
    _assert_rewound(rig, c)
    assert caplog.messages == [
        "transaction aborted (a send of the transaction is unacknowledged before the commit); "
        "rewinding to the first uncommitted records"
    ]


def test_a_fresh_producer_replaces_the_old_only_once_everything_sent_is_acknowledged(
    rig: Rig,
) -> None:
    c = rig.transactional()
    old = rig.producer
    old.hold_all = True
    old.send("out", b"answer", None, [], None)
    assert c.replace_producer() is False  # an answer unacknowledged: the old one stays
    assert c.producer is old and not old.closed and rig.opened == []
    assert ("flush", 5.0) in old.timeouts
    old.hold_all = False
    assert c.replace_producer() is True
    assert old.closed and c.producer is rig.opened[0]
    # at least once there is nothing to open one with: the producer stays
    plain = rig.at_least_once()
    assert plain.replace_producer() is False and plain.producer is old


def test_an_abort_that_fails_opens_a_fresh_producer(rig: Rig) -> None:
    c, _ = _abort_scenario(rig)
    old = rig.producer
    old.fail = {
        "commit_transaction": TransactionFailed("fenced?"),
        "abort_transaction": KafkaFailure("abort failed"),
    }
    assert c.commit() == 0
    assert old.calls[-2:] == ["abort_transaction", "close"] and old.closed
    assert [p.name for p in rig.opened] == ["p2"]
    assert c.producer is rig.opened[0]
    _assert_rewound(rig, c)
    # The records are read again and the next transaction goes through the new producer.
    rig.add(A, range(2, 4))
    assert c.commit() == 2
    new = rig.opened[0]
    assert new.transactions == [([b"0@2", b"0@3"], {A: 4}, rig.consumer.metadata, {A: "run"})]
    assert len(old.transactions) == 1


def test_an_error_outside_the_kafka_seam_is_not_swallowed(rig: Rig) -> None:
    c = rig.transactional()
    rig.add(A, range(0, 1))
    rig.producer.fail["send"] = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        c.commit()
    assert c.aborted == 0 and rig.consumer.seeks == []


def test_transactional_revoke_abandons_in_flight_work_and_gives_clean_offsets(
    rig: Rig,
) -> None:
    c = rig.transactional()
    rig.add(A, range(0, 2))
    assert c.commit() == 2
    rig.add(A, range(2, 4))
    rig.add(B, range(0, 1))
    assert c.revoke([A, C]) == ({A: 2}, 0)
    assert len(rig.producer.transactions) == 1 and rig.producer.calls.count("send") == 2
    assert rig.tracker.first_offsets() == {A: 2, B: 0}  # the loop forgets them, not revoke


def test_an_abort_rewinds_to_what_the_broker_holds_when_the_transaction_landed(
    rig: Rig,
) -> None:
    # commit_transaction raised after the broker had committed it: reading again from
    # the first uncommitted record would answer 2, 3 and B 0 twice.
    c, _ = _abort_scenario(rig)
    rig.producer.land_then_fail = KafkaFailure("commit timed out")
    assert c.commit() == 0
    assert c.aborted == 1
    assert rig.consumer.asked[-1] == [A, B]  # only what is assigned
    assert sorted(rig.consumer.seeks) == [(A, 4), (B, 1)]
    assert c.committed_offsets == {A: 4, B: 1}
    assert rig.tracker.first_offsets() == {} and c.pending() == 0


def test_an_abort_reads_the_committed_offsets_again_until_the_broker_says(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Never a guess: the transaction may have landed although commit_transaction failed.
    naps: list[float] = []
    monkeypatch.setattr("worker.commit._sleep", naps.append)
    c, _ = _abort_scenario(rig)
    rig.producer.land_then_fail = KafkaFailure("commit timed out")
    rig.consumer.committed_errors = [KafkaFailure("coordinator not available")] * 2
    with caplog.at_level("WARNING", logger="worker.commit"):
        assert c.commit() == 0
    assert len(rig.consumer.asked) == 3 and naps == [0.5, 1.0]  # the wait doubles
    assert sorted(rig.consumer.seeks) == [(A, 4), (B, 1)]
    assert c.committed_offsets == {A: 4, B: 1}
    asking = [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]
    unknown = "committed offsets unknown after the abort (coordinator not available)"
    assert asking == [f"{unknown}; asking again"] * 2


def test_an_abort_exits_when_the_broker_never_says_what_is_committed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    naps: list[float] = []
    monkeypatch.setattr("worker.commit._sleep", naps.append)
    c, _ = _abort_scenario(rig)
    rig.group[A] = 99  # what the broker holds, unread: committed() fails
    rig.consumer.committed_fails = KafkaFailure("coordinator not available")
    rig.producer.fail["commit_transaction"] = TransactionFailed("abortable")
    with pytest.raises(FatalError, match="committed offsets"):
        c.commit()
    assert rig.consumer.seeks == []  # no rewind point guessed
    assert len(rig.consumer.asked) == STABLE_READS
    assert naps == [0.5, 1.0, 2.0, 4.0]  # 7.5 s in all, then the exit


def test_every_abort_is_counted_and_logged_with_its_cause(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    c = rig.transactional()
    rig.add(A, range(0, 1))
    rig.producer.refuse = {b"0@0": KafkaFailure("NOT_ENOUGH_REPLICAS")}
    rig.producer.lenient = True
    rig.producer.fail["abort_transaction"] = KafkaFailure("fenced")
    with caplog.at_level("WARNING", logger="worker.commit"):
        assert c.commit() == 0
    rig.add(A, range(0, 1))
    rig.producer = c.producer  # type: ignore[assignment]
    c.producer.fail["begin_transaction"] = KafkaFailure("broker down")  # type: ignore[attr-defined]
    assert c.commit() == 0
    assert c.aborted == 2
    assert caplog.messages[:2] == [
        "transaction aborted (a send of the transaction was refused before the commit: "
        "NOT_ENOUGH_REPLICAS); rewinding to the first uncommitted records",
        "abort failed (fenced); starting a fresh producer",
    ]


def test_a_forced_transaction_does_not_wait_for_the_interval(rig: Rig) -> None:
    c = rig.transactional(NEVER)
    rig.add(A, range(0, 2))
    assert c.commit() == 0
    assert rig.producer.calls == []
    assert c.commit(force=True) == 2
    assert rig.producer.transactions[0][1] == {A: 2}


def test_a_failed_transaction_lets_rescue_see_each_refused_answer(rig: Rig) -> None:
    c = rig.transactional(rescue=True)
    a = rig.add(A, range(0, 4))
    b = rig.add(B, range(0, 1))
    big = KafkaFailure("MSG_SIZE_TOO_LARGE")
    rig.producer.refuse = {b"0@1": big, b"1@0": big}
    assert c.commit() == 0
    assert rig.rescued == [(a[1], big), (b[0], big)]
    assert c.aborted == 1 and sorted(rig.consumer.seeks) == [(A, 0), (B, 0)]


def test_no_rescue_when_the_transaction_failed_before_any_send(rig: Rig) -> None:
    c = rig.transactional(rescue=True)
    rig.add(A, range(0, 2))
    rig.producer.fail["begin_transaction"] = KafkaFailure("broker down")
    assert c.commit() == 0
    assert rig.rescued == [] and c.aborted == 1


# -- at-least-once: an answer the broker refused, rescued -------------------------------------


def test_a_rescued_answer_is_sent_again_and_its_line_goes_on(rig: Rig) -> None:
    c = rig.at_least_once(rescue=True)
    rig.rescue_as = b"dead-letter"
    a = rig.add(A, range(10, 14))
    rig.add(B, range(0, 2))
    big = KafkaFailure("MSG_SIZE_TOO_LARGE")
    rig.producer.refuse = {b"0@11": big}
    c.send()
    # The round that rescues commits up to the refused answer, and the other line.
    assert c.commit() == 3
    assert rig.rescued == [(a[1], big)]
    assert rig.consumer.commits == [({A: 11, B: 2}, {A: "run", B: "run"})]
    assert rig.producer.sent[-1][0] == b"dead-letter@11"
    assert len(a[1].deliveries) == 1 and a[1].deliveries[0] is rig.producer.sent[-1][1]
    assert c.commit() == 3
    assert rig.consumer.commits[-1] == ({A: 14}, {A: "run"})
    assert rig.retired == [a[0], *rig.retired[1:3], a[1], a[2], a[3]]


def test_a_refusal_that_cannot_be_rescued_is_fatal(rig: Rig) -> None:
    c = rig.at_least_once(rescue=True)
    a = rig.add(A, range(0, 2))
    boom = KafkaFailure("TOPIC_AUTHORIZATION_FAILED")
    rig.producer.refuse = {b"0@0": boom}
    c.send()
    with pytest.raises(FatalError) as err:
        c.commit()
    assert str(err.value) == (
        "the broker refused an answer (TOPIC_AUTHORIZATION_FAILED); nothing at or after it "
        "is committed, and it is answered again after a restart"
    )
    assert rig.rescued == [(a[0], boom)]
    assert rig.consumer.commits == []


def test_refusals_on_two_lines_at_once_are_both_rescued(rig: Rig) -> None:
    c = rig.at_least_once(rescue=True)
    rig.rescue_as = b"dead-letter"
    a = rig.add(A, range(0, 2))
    b = rig.add(B, range(0, 2))
    big = KafkaFailure("MSG_SIZE_TOO_LARGE")
    rig.producer.refuse = {b"0@0": big, b"1@0": big}
    c.send()
    for _ in range(4):
        c.commit()
    assert {e.offset for e, _ in rig.rescued} == {0} and len(rig.rescued) == 2
    assert rig.rescued[0][0] in (a[0], b[0]) and rig.rescued[1][0] in (a[0], b[0])
    assert rig.group == {A: 2, B: 2}


# -- what the calls look like to the client --------------------------------------------------


def test_commit_polls_without_blocking_and_revoke_flushes_for_at_most_5_s(rig: Rig) -> None:
    timeouts: list[tuple[str, float | None]] = []
    poll, flush = rig.producer.poll, rig.producer.flush

    def spy_poll(timeout_s: float = 0.0) -> None:
        timeouts.append(("poll", timeout_s))
        poll(timeout_s)

    def spy_flush(timeout_s: float) -> int:
        timeouts.append(("flush", timeout_s))
        return flush(timeout_s)

    rig.producer.poll, rig.producer.flush = spy_poll, spy_flush  # type: ignore[method-assign]
    c = rig.at_least_once()
    rig.add(A, range(0, 1))
    c.send()
    c.commit()
    c.revoke([A])
    assert timeouts == [("poll", 0), ("flush", 5.0)]
    assert all(type(t) in (int, float) for _, t in timeouts)


def test_revoke_leaves_the_other_partitions_offsets_for_the_next_commit(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    c = rig.at_least_once(NEVER)
    rig.add(A, range(0, 2))
    rig.add(B, range(0, 3))
    c.send()
    assert c.commit() == 0  # both acknowledged, not due
    rig.add(B, range(3, 4))
    c.send()
    rig.producer.hold = {b"1@3"}
    with caplog.at_level("WARNING", logger="worker.commit"):
        assert c.revoke([A]) == ({A: 2}, 2)
        rig.add(A, range(2, 3))
        rig.producer.hold = {b"0@2", b"1@3"}
        assert c.revoke([A]) == ({}, 0)
    # A flush waits for every partition's answers: B's held one counts too.
    assert caplog.messages == [
        "revocation: 1 answers unacknowledged after 5 s",
        "revocation: 2 answers unacknowledged after 5 s",
    ]
    assert c.pending() == 4 + 1
    assert c.commit(force=True) == 3
    assert rig.consumer.commits == [({B: 3}, {B: "run"})]


def test_a_deferred_commit_is_logged_with_its_reason_and_offsets(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    c = rig.at_least_once()
    rig.add(A, range(0, 2))
    rig.add(B, range(5, 6))
    c.send()
    rig.consumer.fail = [
        CommitDeferred("Broker: group rebalance in progress", name="REBALANCE_IN_PROGRESS"),
        CommitDeferred("Broker: not coordinator"),
    ]
    with caplog.at_level("WARNING", logger="worker.commit"):
        assert c.commit() == 0
        assert c.commit() == 0
    assert caplog.messages == [
        "commit deferred (REBALANCE_IN_PROGRESS): in[0]@2, in[1]@6",
        "commit deferred (Broker: not coordinator): in[0]@2, in[1]@6",
    ]


def test_a_refusal_seen_during_a_revocation_is_still_fatal_at_the_next_commit(rig: Rig) -> None:
    # The revocation acknowledges only the partitions it gives up: B's refused answer
    # must not be swallowed there, or no commit would ever report it.
    c = rig.at_least_once(NEVER)
    rig.add(A, range(0, 1))
    rig.add(B, range(0, 2))
    rig.producer.refuse = {b"1@0": KafkaFailure("MSG_SIZE_TOO_LARGE")}
    assert c.revoke([A]) == ({A: 1}, 1)  # sends only A's answers
    c.send()
    assert c.revoke([A]) == ({}, 0)  # B's delivery resolved by this flush
    with pytest.raises(FatalError, match="MSG_SIZE_TOO_LARGE"):
        c.commit(force=True)
    assert rig.consumer.commits == []


def test_a_transaction_waits_up_to_its_timeout_for_slow_acknowledgements(rig: Rig) -> None:
    rig.producer.latency_s = 1.0  # the broker takes a second to acknowledge
    c = rig.transactional()
    rig.add(A, range(0, 2))
    assert c.commit() == 2
    assert rig.group == {A: 2} and c.aborted == 0


def test_a_revocation_waits_for_slow_acknowledgements_before_it_gives_offsets(rig: Rig) -> None:
    rig.producer.latency_s = 1.0
    c = rig.at_least_once()
    rig.add(A, range(0, 3))
    assert c.revoke([A]) == ({A: 3}, 3)


def test_the_fake_producer_acknowledges_only_what_is_due_within_the_timeout(rig: Rig) -> None:
    p = rig.producer
    p.latency_s = 1.0
    d = p.send("out", b"v", None, [])
    p.poll(0.0)
    assert not d.done
    assert p.flush(0.5) == 1 and not d.done
    assert p.flush(0.5) == 0 and d.done and d.error is None


@pytest.mark.parametrize("exactly_once", [False, True])
def test_the_committer_is_chosen_once_by_the_mode_and_answers_the_loops_questions(
    rig: Rig, exactly_once: bool
) -> None:
    c = committer_for(
        exactly_once, rig.tracker, rig.consumer, rig.producer, rig, 0.0, reopen=rig.reopen
    )
    assert type(c) is (Transactional if exactly_once else AtLeastOnce)
    assert c.producer is rig.producer and c.outbox is rig
    # at-least-once finishes a revoked partition's work; a transaction abandons it
    assert c.finishes_revoked is not exactly_once
    # a transaction's answers leave only when the loop commits
    assert c.sends_on_commit is exactly_once
    # a fresh producer comes from the reopen given
    assert c.replace_producer() is True and c.producer is rig.opened[0]


def test_offsets_found_at_assignment_are_committed_again_as_clean_until_forgotten(
    rig: Rig,
) -> None:
    c = rig.at_least_once()
    c.found(A, 7)
    c.found(B, 3)
    assert c.clean_offsets([A]) == {A: 7}
    assert c.revoke([A, B]) == ({A: 7, B: 3}, 0)
    before = c.epochs.get(A, 0)
    c.forget([A, C])  # C was never found: nothing to forget but its epoch
    assert c.clean_offsets([A, B]) == {B: 3}
    once = c.epochs[A]
    c.forget([A])  # every forget makes the records polled before it stale
    assert len({before, once, c.epochs[A]}) == 3


def test_every_rewind_and_every_forget_gives_a_partition_an_epoch_it_never_had(
    rig: Rig,
) -> None:
    # Records polled under an earlier epoch are stale: an epoch that came back (an abort
    # undoing a forget, or two aborts alike) would let them run after the rewind.
    c = rig.transactional()
    seen = [c.epochs.get(A, 0)]
    for step in ("abort", "forget", "abort", "abort", "forget", "forget", "abort"):
        if step == "abort":
            rig.add(A, range(0, 1))
            rig.producer.fail["begin_transaction"] = KafkaFailure("broker down")
            assert c.commit() == 0
        else:
            c.forget([A])
        seen.append(c.epochs.get(A, 0))
    assert c.aborted == 4
    assert len(set(seen)) == len(seen), seen


def test_a_transactional_committer_takes_its_arguments_by_name(rig: Rig) -> None:
    c: Transactional[Entry] = Transactional(
        tracker=rig.tracker,
        consumer=rig.consumer,
        producer=rig.producer,
        outbox=rig,
        interval_s=NEVER,
        reopen=rig.reopen,
    )
    rig.add(A, range(0, 1))
    assert c.commit() == 0  # the interval given by name: not due
    assert c.commit(force=True) == 1 and rig.producer.transactions[0][1] == {A: 1}


# -- the run marker: the group's metadata reaches every record handed to inference ----------


def _polled(tp: TopicPartition, offsets: range) -> list[Record]:
    return [Record(tp.topic, tp.partition, o, None, b"", [], None) for o in offsets]


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_record_past_the_marker_runs_after_a_marker_reaching_the_last_polled(
    rig: Rig, exactly_once: bool
) -> None:
    c = rig.transactional() if exactly_once else rig.at_least_once()
    c.found(A, 10)
    c.saw(_polled(A, range(10, 612)))
    c.cover(A, 10)  # the first record handed over: the marker reaches the whole poll
    last = 611 + COVER_AHEAD  # and the lead past it
    assert rig.consumer.commits == [({A: 10}, {A: run_marker(last)})]
    assert rig.consumer.metadata_of[A] == f"run:{last}" and rig.group[A] == 10  # none settled
    for o in range(11, 612):
        c.cover(A, o)  # the rest of the poll is covered: no more commits
    assert len(rig.consumer.commits) == 1
    c.saw(_polled(A, range(612, last + 1)))
    for o in range(612, last + 1):
        c.cover(A, o)  # later polls inside the lead: no commit either
    assert len(rig.consumer.commits) == 1
    c.saw(_polled(A, range(last + 1, last + 3)))
    c.cover(A, last + 1)  # past it: a new marker before it runs
    assert rig.consumer.commits[-1] == ({A: 10}, {A: run_marker(last + 2 + COVER_AHEAD)})


def test_the_lead_saves_the_commits_of_a_stream_of_one_record_per_poll(rig: Rig) -> None:
    c = rig.at_least_once()
    c.found(A, 0)
    for o in range(10 * COVER_AHEAD):
        c.saw(_polled(A, range(o, o + 1)))
        c.cover(A, o)
    assert len(rig.consumer.commits) == 10  # one per COVER_AHEAD + 1 records, not 640
    assert 1 <= COVER_AHEAD <= 100  # a longer lead ran innocent records alone after kills


@pytest.mark.parametrize("exactly_once", [False, True])
def test_between_polls_a_marker_the_records_come_near_moves_ahead_of_them(
    rig: Rig, exactly_once: bool
) -> None:
    # One record per poll: extend() between polls keeps the marker ahead, so cover()
    # never commits on a record's way to inference after the first.
    c = rig.transactional() if exactly_once else rig.at_least_once()
    c.found(A, 0)
    on_the_way, moved = 0, []
    for o in range(10 * COVER_AHEAD):
        c.saw(_polled(A, range(o, o + 1)))
        before = len(rig.consumer.commits)
        c.cover(A, o)
        on_the_way += len(rig.consumer.commits) - before
        before = len(rig.consumer.commits)
        c.extend([A])
        moved += [(o, commit) for commit in rig.consumer.commits[before:]]
    assert on_the_way == 1  # the first record's own marker
    last = COVER_AHEAD  # the first marker: record 0 and the lead
    for o, commit in moved:
        # once the records polled came within EXTEND_WITHIN of the marker, not before;
        # COVER_AHEAD past the highest polled, never further (the careful window's bound)
        assert last - o == EXTEND_WITHIN - 1
        assert commit == ({A: 0}, {A: run_marker(o + COVER_AHEAD)})
        last = o + COVER_AHEAD
    assert len(moved) == 10 * COVER_AHEAD // (COVER_AHEAD - EXTEND_WITHIN + 1)


def test_a_marker_further_than_extend_within_ahead_stays(rig: Rig) -> None:
    c = rig.at_least_once()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 1)))
    c.cover(A, 0)  # run:COVER_AHEAD
    c.saw(_polled(A, range(1, COVER_AHEAD - EXTEND_WITHIN + 1)))
    c.extend([A])  # exactly EXTEND_WITHIN ahead of the highest polled: kept
    assert len(rig.consumer.commits) == 1
    c.saw(_polled(A, range(COVER_AHEAD - EXTEND_WITHIN + 1, COVER_AHEAD - EXTEND_WITHIN + 2)))
    c.extend([A])
    last = COVER_AHEAD - EXTEND_WITHIN + 1 + COVER_AHEAD
    assert rig.consumer.commits[-1] == ({A: 0}, {A: run_marker(last)})
    assert c.markers([A]) == {A: run_marker(last)}  # the next commits carry it


def test_extend_moves_only_the_partitions_it_is_given_with_a_known_marker(rig: Rig) -> None:
    c = rig.at_least_once()
    c.found(A, 3)
    c.found(B, 0)
    c.saw(_polled(A, range(3, 10)) + _polled(B, range(0, 5)) + _polled(C, range(0, 5)))
    c.extend([B])  # A is not given (a careful partition, say), C has no marker known
    assert rig.consumer.commits == [({B: 0}, {B: run_marker(4 + COVER_AHEAD)})]
    c.extend([A, C])
    assert rig.consumer.commits[-1] == ({A: 3}, {A: run_marker(9 + COVER_AHEAD)})
    assert len(rig.consumer.commits) == 2
    c.extend([A, B, C])  # both far ahead now: nothing to commit
    assert len(rig.consumer.commits) == 2


def test_a_marker_not_moved_ahead_is_left_to_cover(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    c = rig.at_least_once()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 3)))
    rig.consumer.fail = [KafkaFailure("coordinator moved")]
    with caplog.at_level("DEBUG", logger="worker.commit"):
        c.extend([A])
    assert rig.consumer.commits == []
    assert caplog.messages == [
        "run markers not moved ahead (coordinator moved): cover() commits them when due"
    ]
    c.cover(A, 0)  # the marker is not there: the record's own commit
    assert rig.consumer.commits == [({A: 0}, {A: run_marker(2 + COVER_AHEAD)})]


def test_at_least_once_commits_carry_each_partitions_marker(rig: Rig) -> None:
    c = rig.at_least_once()
    c.found(A, 100)
    c.found(B, 7)
    c.saw(_polled(A, range(100, 700)) + _polled(B, range(7, 9)))
    c.cover(A, 100)
    c.cover(B, 7)
    rig.add(A, range(100, 103))
    rig.add(B, range(7, 8))
    c.send()
    assert c.commit() == 4
    markers = {A: f"run:{699 + COVER_AHEAD}", B: f"run:{8 + COVER_AHEAD}"}
    assert rig.consumer.commits[-1] == ({A: 103, B: 8}, markers)


def test_a_transactions_offsets_carry_each_partitions_marker(rig: Rig) -> None:
    c = rig.transactional()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 900)))
    c.cover(A, 0)
    rig.add(A, range(0, 2))
    assert c.commit() == 2
    assert rig.producer.transactions == [
        ([b"0@0", b"0@1"], {A: 2}, rig.consumer.metadata, {A: f"run:{899 + COVER_AHEAD}"})
    ]


def test_a_marker_at_assignment_that_reaches_further_is_kept(rig: Rig) -> None:
    # A careful window up to 49: nothing before 50 needs a new marker.
    c = rig.at_least_once()
    c.found(A, 5, last=49)
    c.saw(_polled(A, range(5, 60)))
    c.cover(A, 49)
    assert rig.consumer.commits == []
    c.cover(A, 50)
    assert rig.consumer.commits == [({A: 5}, {A: run_marker(59 + COVER_AHEAD)})]


def test_a_cover_commits_only_its_own_partition(rig: Rig) -> None:
    # Another partition may hold a try marker (a careful record running alone): untouched.
    c = rig.at_least_once()
    c.found(A, 3)
    c.found(B, 0)
    c.saw(_polled(A, range(3, 10)) + _polled(B, range(0, 5)))
    c.cover(B, 0)
    assert rig.consumer.commits == [({B: 0}, {B: run_marker(4 + COVER_AHEAD)})]


def test_without_a_known_committed_offset_no_marker_and_a_bare_run(rig: Rig) -> None:
    # The committed offsets could not be read at assignment: as an older worker did.
    c = rig.at_least_once()
    c.saw(_polled(A, range(0, 5)))
    c.cover(A, 0)
    assert rig.consumer.commits == []
    rig.add(A, range(0, 2))
    c.send()
    c.commit()
    assert rig.consumer.commits == [({A: 2}, {A: RUNNING})]


def test_a_marker_that_fails_is_tried_again_by_the_next_record(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    c = rig.at_least_once()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 5)))
    rig.consumer.fail = [KafkaFailure("coordinator moved")]
    with caplog.at_level("WARNING", logger="worker.commit"):
        c.cover(A, 0)  # runs all the same; the marker is not there
    assert rig.consumer.commits == []
    assert caplog.messages == [
        f"in[0]: run marker up to {4 + COVER_AHEAD} not committed: coordinator moved"
    ]
    c.cover(A, 1)
    assert rig.consumer.commits == [({A: 0}, {A: run_marker(4 + COVER_AHEAD)})]


def test_a_clean_commit_means_a_marker_again_before_the_next_record(rig: Rig) -> None:
    c = rig.at_least_once()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 5)))
    c.cover(A, 0)
    rig.add(A, range(0, 2))
    c.send()
    c.commit(metadata=CLEAN)
    assert rig.consumer.commits[-1] == ({A: 2}, CLEAN)
    c.cover(A, 2)
    assert rig.consumer.commits[-1] == ({A: 2}, {A: run_marker(4 + COVER_AHEAD)})


def test_a_clean_transaction_means_a_marker_again_before_the_next_record(rig: Rig) -> None:
    c = rig.transactional()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 5)))
    c.cover(A, 0)
    rig.add(A, range(0, 2))
    assert c.commit(metadata=CLEAN) == 2
    assert rig.producer.transactions[-1][1:] == ({A: 2}, rig.consumer.metadata, CLEAN)
    c.cover(A, 2)
    assert rig.consumer.commits[-1] == ({A: 2}, {A: run_marker(4 + COVER_AHEAD)})


@pytest.mark.parametrize("exactly_once", [False, True])
def test_after_a_clean_commit_the_marker_says_what_ran_as_found_at_assignment(
    rig: Rig, exactly_once: bool
) -> None:
    # committed clean at 2: records up to 1 ran, as if offset 2 had been found clean
    c = rig.transactional() if exactly_once else rig.at_least_once()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 5)))
    c.cover(A, 0)
    rig.add(A, range(0, 2))
    c.send()
    assert c.commit(metadata=CLEAN) == 2
    assert c.markers([A]) == {A: run_marker(1)}
    fresh = rig.at_least_once()
    fresh.found(A, 2)
    assert fresh.markers([A]) == c.markers([A])


def test_the_marker_reaches_the_highest_offset_ever_polled(rig: Rig) -> None:
    # the first records of a partition count too; records read again after a rewind
    # do not lower it
    c = rig.at_least_once()
    c.found(A, 0)
    c.found(B, 0)
    c.saw(_polled(A, range(0, 2)))
    c.cover(A, 0)
    assert rig.consumer.commits[-1] == ({A: 0}, {A: run_marker(1 + COVER_AHEAD)})
    c.saw(_polled(B, range(0, 50)))
    c.saw(_polled(B, range(10, 20)))
    c.cover(B, 10)
    assert rig.consumer.commits[-1] == ({B: 0}, {B: run_marker(49 + COVER_AHEAD)})


def test_a_record_handed_over_before_any_poll_was_seen_is_covered_up_to_itself(rig: Rig) -> None:
    # no saw() for A: the marker reaches the record itself and the lead, no guess past it
    c = rig.at_least_once()
    c.found(A, 0)
    c.cover(A, 3)
    assert rig.consumer.commits[-1] == ({A: 0}, {A: run_marker(3 + COVER_AHEAD)})


def test_a_forgotten_partitions_marker_and_polls_are_forgotten(rig: Rig) -> None:
    c = rig.at_least_once()
    c.found(A, 0)
    c.saw(_polled(A, range(0, 50)))
    c.cover(A, 0)
    c.forget([A])
    assert c.markers([A]) == {A: RUNNING}  # its last marker is another owner's business
    c.found(A, 20)  # given back: its records are polled again from 20
    c.saw(_polled(A, range(20, 25)))
    c.cover(A, 20)
    assert rig.consumer.commits[-1] == ({A: 20}, {A: run_marker(24 + COVER_AHEAD)})
