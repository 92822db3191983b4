"""Transient failures: when a record is tried again, and which partitions wait for it.

A record whose failure is transient (a model file still being written, a run
that failed for want of memory) is tried again after a backoff that doubles
each time, up to :data:`MAX_BACKOFF_S`, at most ``attempts`` more times; its
partition takes nothing new meanwhile, so offset order holds. Plain data with
an injected clock: the loop asks what is due and which partitions to hold.

Threads: inference threads schedule, the loop's thread takes; one lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection

from worker.answers import Slot
from worker.errors import WorkerError
from worker.kafka import TopicPartition

__all__ = ["MAX_BACKOFF_S", "Retries", "backoff_s"]

MAX_BACKOFF_S = 5.0


def backoff_s(first_s: float, attempt: int) -> float:
    """The wait before try ``attempt + 1``: ``first_s`` doubled per try, capped."""
    return min(MAX_BACKOFF_S, first_s * 2 ** (attempt - 1))


class Retries:
    """Records waiting for their next try, each with the time it is due."""

    def __init__(
        self, attempts: int, first_backoff_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.attempts = attempts  # tries after the first
        self.first_backoff_s = first_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: list[tuple[float, Slot]] = []

    def retry(self, slot: Slot, error: WorkerError) -> float | None:
        """Schedule ``slot`` again when ``error`` is transient and it has tries left:
        the wait, or ``None`` when it is to be dead-lettered now. Counts the try."""
        if not error.transient or slot.attempts > self.attempts:
            return None
        delay = backoff_s(self.first_backoff_s, slot.attempts)
        slot.attempts += 1
        with self._lock:
            self._waiting.append((self._clock() + delay, slot))
        return delay

    def take_due(self) -> tuple[list[Slot], set[TopicPartition]]:
        """The records due now (no longer waiting), and the partitions still holding one."""
        now = self._clock()
        with self._lock:
            due = [slot for t, slot in self._waiting if t <= now]
            self._waiting = [(t, slot) for t, slot in self._waiting if t > now]
            holding = {slot.record.tp for _, slot in self._waiting}
        return due, holding

    def next_due(self) -> float | None:
        """When the next record is due (on the injected clock), if any waits."""
        with self._lock:
            return min((t for t, _ in self._waiting), default=None)

    def waiting(self, slot: Slot) -> bool:
        with self._lock:
            return any(s is slot for _, s in self._waiting)

    def forget(self, tps: Collection[TopicPartition]) -> None:
        """Partitions given up: their records are not tried again here."""
        with self._lock:
            self._waiting = [(t, s) for t, s in self._waiting if s.record.tp not in tps]
