"""Flow control: how much to poll, how long to wait, which partitions to pause.

The in-flight budget (``--max-inflight-bytes``) counts the bytes of every
record polled and not yet committed, answers included. Under it, a poll asks
for no more records than the room left (so one poll does not pause its own
partitions). At it, the loop stops polling and waits for acknowledgements
(librdkafka keeps what it prefetched); if that lasts :data:`PAUSE_AFTER_S`,
the partitions holding the most are paused, and each resumes once it holds
less than half its share. Plain rules on numbers and an injected clock; the
loop does the pausing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

__all__ = [
    "PAUSE_AFTER_S",
    "POLL_RECORDS",
    "POLL_WAIT_S",
    "TXN_POLL_WAIT_S",
    "Budget",
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
