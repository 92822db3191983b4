"""Flow control: how much to poll, how long to wait, which partitions to pause.

The in-flight budget (``--max-inflight-bytes``) counts the bytes of every
record polled and not yet committed, answers included. Under it, a poll asks
for no more records than the room left (so one poll does not pause its own
partitions). At it, the loop stops polling and waits for acknowledgements
(librdkafka keeps what it prefetched); if that lasts :data:`PAUSE_AFTER_S`,
the partitions holding the most are paused, and each resumes once it holds
less than half its share. Plain rules on numbers and an injected clock, and
:class:`FlowControl`, which applies them for the loop: it tells the consumer
which partitions to pause and resume, how many records to poll and how long
to wait, and keeps the in-flight and lag gauges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from worker.partitions import BACKPRESSURE, Partitions

if TYPE_CHECKING:  # for the annotations: the rules above run without any of them
    from worker.batching import Batcher
    from worker.commit import Committer
    from worker.inference import Inference
    from worker.kafka import Consumer, TopicPartition
    from worker.observability import Metrics
    from worker.offsets import OffsetTracker
    from worker.retries import Retries

__all__ = [
    "LAG_EVERY_S",
    "PAUSE_AFTER_S",
    "POLL_RECORDS",
    "POLL_WAIT_S",
    "TXN_POLL_WAIT_S",
    "Budget",
    "FlowControl",
    "poll_wait_s",
    "to_pause",
    "to_resume",
]

# How long the loop waits for acknowledgements, not polling, with the in-flight
# budget spent, before the fullest partitions pause (a pause throws librdkafka's
# prefetch away; not polling at all would hold rebalances and max.poll.interval.ms).
PAUSE_AFTER_S = 1.0
POLL_RECORDS = 500  # the most records one poll asks for
POLL_WAIT_S = 0.1  # the longest a poll waits when nothing else is due
TXN_POLL_WAIT_S = 0.002  # exactly-once, answers due: the transaction is driven from the loop
LAG_EVERY_S = 1.0  # how often the consumer-lag gauges are read

P = TypeVar("P")  # a partition


class Budget:
    """The in-flight budget: is it spent, and how many records the next poll may take."""

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self.record_bytes = 1024.0  # running mean of a request's size
        self._spent_since: float | None = None  # when the budget ran out

    def polled(self, nbytes: int) -> None:
        """A record of ``nbytes`` was polled: the running mean follows it."""
        self.record_bytes += (max(nbytes, 1) - self.record_bytes) / 16

    def waiting(self, inflight: int) -> bool:
        """No room left, for less than :data:`PAUSE_AFTER_S` so far: wait for
        acknowledgements instead of polling."""
        if inflight < self.max_bytes:
            self._spent_since = None
            return False
        now = self._clock()
        if self._spent_since is None:
            self._spent_since = now
        return now - self._spent_since < PAUSE_AFTER_S

    def spent_s(self) -> float:
        """How long the budget has been spent (0 while there is room)."""
        return 0.0 if self._spent_since is None else self._clock() - self._spent_since

    def poll_records(self, inflight: int) -> int:
        """No more records than the budget has room for (at least one)."""
        room = self.max_bytes - inflight
        if room <= 0:
            return 1
        return max(1, min(POLL_RECORDS, int(room / self.record_bytes)))


def to_pause(
    held: Mapping[P, int], total: int, limit: int, spent_s: float, paused: Collection[P]
) -> set[P]:
    """Over ``limit`` for :data:`PAUSE_AFTER_S`: the fullest partitions, until what
    stays unpaused is under half the limit (those paused already count)."""
    if total <= limit or spent_s < PAUSE_AFTER_S:
        return set()
    over = total - limit // 2
    pause: set[P] = set()
    for tp, nbytes in sorted(held.items(), key=lambda kv: -kv[1]):
        if over <= 0:
            break
        pause.add(tp)
        over -= nbytes
    return pause - set(paused)


def to_resume(held: Mapping[P, int], total: int, limit: int, paused: Collection[P]) -> set[P]:
    """Under ``limit``: each paused partition holding less than half its share, or
    all of them once the total is under half the limit."""
    if not paused or total >= limit:
        return set()
    if total < limit // 2:
        return set(paused)
    share = max(1, limit // (2 * max(1, len(paused))))
    return {tp for tp in paused if held.get(tp, 0) < share}


def poll_wait_s(
    now: float, deadlines: Collection[float | None], *, txn_answers_due: bool = False
) -> float:
    """How long a poll may wait: until the next deadline (a batch window, a retry),
    at most :data:`POLL_WAIT_S`; a moment when a transaction has answers due."""
    if txn_answers_due:
        return TXN_POLL_WAIT_S
    due = [d for d in deadlines if d]
    if due:
        return max(0.0, min(min(due) - now, POLL_WAIT_S))
    return POLL_WAIT_S


class FlowControl:
    """The rules above applied for the loop, on its thread: the budget, the
    backpressure pauses (a :data:`~worker.partitions.BACKPRESSURE` reason in
    :class:`~worker.partitions.Partitions`), the poll wait, the gauges."""

    def __init__(
        self,
        max_bytes: int,
        *,
        consumer: Consumer,
        committer: Committer[Any],
        tracker: OffsetTracker[TopicPartition, Any],
        partitions: Partitions,
        batcher: Batcher,
        inference: Inference,
        retries: Retries,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = Budget(max_bytes, clock=clock)
        self._consumer, self._committer, self._tracker = consumer, committer, tracker
        self._partitions, self._batcher, self._inference = partitions, batcher, inference
        self._retries, self._metrics, self._clock = retries, metrics, clock
        self._last_lag: float | None = None

    def waiting(self) -> bool:
        """The budget is spent: wait for acknowledgements instead of polling."""
        return self.budget.waiting(self._tracker.inflight_bytes)

    def poll_records(self) -> int:
        return self.budget.poll_records(self._tracker.inflight_bytes)

    def poll_wait_s(self) -> float:
        """How long the next poll (or wait for acknowledgements) may take."""
        # At-least-once: pool threads send their own answers, so the main thread
        # may wait in poll() for records. A transaction is driven from the loop, so
        # with --exactly-once it checks back often while answers are due.
        txn_due = self._committer.sends_on_commit and bool(
            self._inference.running or self._tracker.has_due_answers()
        )
        # A waiting group runs when a slot frees: look again when the runs should end.
        free = self._inference.next_free() if len(self._batcher) else None
        deadlines = (self._batcher.next_deadline(), free, self._retries.next_due())
        return poll_wait_s(self._clock(), deadlines, txn_answers_due=txn_due)

    def backpressure(self) -> None:
        """Pause the partitions holding the most bytes while over the limit; resume each
        as it drains below half its share."""
        consumer, parts, tracker = self._consumer, self._partitions, self._tracker
        limit = self.budget.max_bytes
        held = tracker.bytes_by_partition()
        total = tracker.inflight_bytes
        assigned = consumer.assignment()
        paused = parts.held(BACKPRESSURE)
        pause = to_pause(held, total, limit, self.budget.spent_s(), paused) & assigned
        newly = parts.hold(pause, BACKPRESSURE)
        if newly:
            consumer.pause(newly)
        paused |= pause
        # Only what really was resumed leaves the set: a partition the client does
        # not list as assigned right now stays paused in our books and in its.
        resumed = to_resume(held, total, limit, paused) & assigned
        freed = parts.release(resumed, BACKPRESSURE)
        if freed:
            consumer.resume(freed)
        paused -= resumed
        self._metrics.paused_partitions.set(len(paused))
        self._metrics.inflight_bytes.set(total)

    def report_lag(self) -> None:
        """The consumer-lag gauges, at most every :data:`LAG_EVERY_S`."""
        now = self._clock()
        if self._last_lag is not None and now - self._last_lag < LAG_EVERY_S:
            return
        self._last_lag = now
        for tp in self._consumer.assignment():
            lag = self._consumer.lag(tp)
            if lag is not None:
                labels = {"topic": tp.topic, "partition": str(tp.partition)}
                self._metrics.consumer_lag.labels(**labels).set(lag)
