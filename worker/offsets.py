"""What is polled, answered, acknowledged: the offsets that may be committed.

Plain data, no Kafka inside, so it is tested without a broker. Each input
partition has a *line* of :class:`Entry` in offset order, from the oldest
record not yet committed to the newest polled. An entry is *answered* once its
``out`` is set (a response or a dead letter), *sent* once handed to the
producer, *acknowledged* once every delivery of it succeeded. Only the
acknowledged head of a line becomes an offset to commit; a refused delivery
stops its line for good, so nothing at or after it is ever committed.

Threads: the loop's thread adds and commits, inference threads answer and
send; every method takes the one lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Acknowledged", "Entry", "OffsetTracker"]

K = TypeVar("K", bound=Hashable)  # a partition, whatever the caller names it by
E = TypeVar("E", bound="Entry")  # the caller's entry: an Entry with its own fields


class Entry:
    """One polled record's place in its partition's line."""

    __slots__ = ("deliveries", "live", "nbytes", "offset", "out", "sent")

    def __init__(self, offset: int, nbytes: int) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.out: Any = None  # the answer; set by the loop or an inference thread
        self.deliveries: list[Any] = []  # objects with .done and .error
        self.sent = False
        self.live = True  # still in its line (not committed, not forgotten)

    @property
    def answered(self) -> bool:
        return self.out is not None


@dataclass
class Acknowledged(Generic[K, E]):
    """What :meth:`OffsetTracker.acknowledge` found."""

    retired: list[E] = field(default_factory=list)
    refused: E | None = None  # the first entry whose delivery the broker refused
    error: BaseException | None = None
    # Every head refused for the first time by this call: (partition, entry, error).
    refusals: list[tuple[K, E, BaseException]] = field(default_factory=list)


class OffsetTracker(Generic[K, E]):
    """Lines of ``E`` entries by partition ``K``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._lines: dict[K, deque[E]] = {}
        self._unsent: dict[K, deque[E]] = {}  # the tail of each line not yet sent
        self._to_commit: dict[K, int] = {}  # next offset to read, per partition
        self._uncommitted: dict[K, int] = {}  # acknowledged records not yet committed
        self._refused: dict[K, E] = {}
        self.inflight_bytes = 0

    # -- 1. polled -------------------------------------------------------------

    def add(self, tp: K, entry: E) -> None:
        with self.lock:
            self._lines.setdefault(tp, deque()).append(entry)
            self._unsent.setdefault(tp, deque()).append(entry)
            self.inflight_bytes += entry.nbytes

    def grow(self, entry: E, nbytes: int) -> None:
        """``entry``'s answer adds ``nbytes`` in flight until it is committed."""
        with self.lock:
            if entry.live:
                entry.nbytes += nbytes
                self.inflight_bytes += nbytes

    # -- 5. sent ---------------------------------------------------------------

    def sendable(self, tps: Collection[K] | None = None) -> Iterator[tuple[K, E]]:
        """Answered entries at the head of each unsent queue, in offset order.

        Call with :attr:`lock` held; an entry counts as sent once the caller
        resumes the iterator (it stays unsent if the caller raises).
        """
        for tp, unsent in self._unsent.items():
            if tps is not None and tp not in tps:
                continue
            while unsent and unsent[0].out is not None:
                entry = unsent[0]
                yield tp, entry
                entry.sent = True
                unsent.popleft()

    # -- 6. acknowledged -> committed -----------------------------------------------

    def acknowledge(self, tps: Collection[K] | None = None) -> Acknowledged[K, E]:
        """Move acknowledged heads of lines to the offsets to commit."""
        result: Acknowledged[K, E] = Acknowledged()
        with self.lock:
            for tp, line in self._lines.items():
                if tps is not None and tp not in tps:
                    continue
                if tp in self._refused:
                    if result.refused is None:
                        result.refused = self._refused[tp]
                    continue
                while line and line[0].sent and all(d.done for d in line[0].deliveries):
                    head = line[0]
                    failed = next((d.error for d in head.deliveries if d.error is not None), None)
                    if failed is not None:
                        # Stays at the head: the line never commits past it.
                        self._refused[tp] = head
                        if result.error is None:
                            result.refused, result.error = head, failed
                        result.refusals.append((tp, head, failed))
                        break
                    line.popleft()
                    head.live = False
                    self.inflight_bytes -= head.nbytes
                    self._to_commit[tp] = head.offset + 1
                    self._uncommitted[tp] = self._uncommitted.get(tp, 0) + 1
                    result.retired.append(head)
        return result

    def refused(self) -> list[tuple[K, E]]:
        with self.lock:
            return list(self._refused.items())

    def clear_refusal(self, tp: K) -> None:
        """The refused head was sent again (as something the broker takes)."""
        with self.lock:
            self._refused.pop(tp, None)

    def to_commit(self, tps: Collection[K] | None = None) -> dict[K, int]:
        """Take the offsets ready to commit; give them back with :meth:`restore` on failure."""
        with self.lock:
            keys = [tp for tp in self._to_commit if tps is None or tp in tps]
            return {tp: self._to_commit.pop(tp) for tp in keys}

    def restore(self, offsets: dict[K, int]) -> None:
        with self.lock:
            for tp, offset in offsets.items():
                if tp in self._lines and self._to_commit.get(tp, -1) < offset:
                    self._to_commit[tp] = offset

    def committed(self, offsets: dict[K, int]) -> int:
        """The broker took ``offsets``: returns how many records that settled."""
        with self.lock:
            return sum(self._uncommitted.pop(tp, 0) for tp in offsets)

    # -- exactly-once ----------------------------------------------------------

    def window(self) -> list[tuple[K, E]]:
        """Every answered entry at the head of each line (one transaction's worth)."""
        with self.lock:
            return [
                (tp, entry) for tp, line in self._lines.items() for entry in _answered_prefix(line)
            ]

    def settle_window(self, window: list[tuple[K, E]]) -> None:
        """The transaction holding ``window`` committed: drop those entries."""
        with self.lock:
            for tp, entry in window:
                line, unsent = self._lines[tp], self._unsent[tp]
                assert line[0] is entry
                line.popleft()
                if unsent and unsent[0] is entry:
                    unsent.popleft()
                entry.live = False
                self.inflight_bytes -= entry.nbytes

    # -- rebalance and shutdown -------------------------------------------------

    def answered(self, tps: Collection[K]) -> bool:
        with self.lock:
            return all(e.out is not None for tp in tps for e in self._lines.get(tp, ()))

    def first_offsets(self) -> dict[K, int]:
        """The oldest uncommitted offset of every line (where to rewind to)."""
        with self.lock:
            return {tp: line[0].offset for tp, line in self._lines.items() if line}

    def forget(self, tps: Collection[K]) -> None:
        with self.lock:
            for tp in tps:
                line = self._lines.pop(tp, deque())
                self._unsent.pop(tp, None)
                for e in line:
                    e.live = False
                    self.inflight_bytes -= e.nbytes
                self._to_commit.pop(tp, None)
                self._uncommitted.pop(tp, None)
                self._refused.pop(tp, None)

    def pending(self) -> int:
        """Polled records not yet committed."""
        with self.lock:
            return sum(len(line) for line in self._lines.values()) + sum(self._uncommitted.values())

    def bytes_by_partition(self) -> dict[K, int]:
        with self.lock:
            return {tp: sum(e.nbytes for e in line) for tp, line in self._lines.items() if line}

    def partitions(self) -> list[K]:
        with self.lock:
            return list(self._lines)

    def has_due_answers(self) -> bool:
        with self.lock:
            return any(q and q[0].out is not None for q in self._unsent.values())


def _answered_prefix(line: deque[E]) -> Iterator[E]:
    for entry in line:
        if entry.out is None:
            return
        yield entry
