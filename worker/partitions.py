"""One state per owned partition: why it is paused, and whether to run it carefully.

A partition pauses for one or more reasons -- :data:`BACKPRESSURE` (it holds
the most bytes of a spent in-flight budget), :data:`RETRY` (a record of it
waits for its next try), :data:`LOADING` (a model loads, the loop polls only
to stay in its group), :data:`CAREFUL` (a record runs alone after an unclean
stop, likewise), :data:`DRAINING` (the worker stops) -- and resumes
when its last reason goes, so one rule never undoes another's pause.
:meth:`Partitions.hold` and :meth:`Partitions.release` return the partitions
to pause or resume; the loop tells the consumer. A partition whose last owner
stopped mid-stream has its :class:`~worker.recovery.Careful` plan here, and a
newly assigned one waits here until its committed metadata is read. Giving a
partition up is one deletion (:meth:`Partitions.forget`).

Threading contract: only the loop's thread touches this, with no lock. The
rebalance callbacks that assign and forget partitions re-enter only while
that thread is inside ``Consumer.poll()`` (see
:class:`~worker.kafka.RebalanceHandler`), never between two of its steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from worker.kafka import TopicPartition
from worker.recovery import Careful

__all__ = [
    "BACKPRESSURE",
    "CAREFUL",
    "DRAINING",
    "LOADING",
    "RETRY",
    "PartitionState",
    "Partitions",
]

BACKPRESSURE = "backpressure"
RETRY = "retry"
LOADING = "loading"
CAREFUL = "careful"
DRAINING = "draining"


@dataclass
class PartitionState:
    paused_for: set[str] = field(default_factory=set)  # the reasons it is paused
    careful: Careful | None = None  # the last owner stopped mid-stream
    unchecked: bool = True  # assigned; its committed metadata not read yet


class Partitions:
    """The states of the partitions this worker owns, by partition."""

    def __init__(self) -> None:
        self._states: dict[TopicPartition, PartitionState] = {}
        self.has_unchecked = False  # cheap to ask on every record

    def state(self, tp: TopicPartition) -> PartitionState:
        st = self._states.get(tp)
        if st is None:
            st = self._states[tp] = PartitionState(unchecked=False)
        return st

    # -- assignment --------------------------------------------------------------

    def assigned(self, tps: Iterable[TopicPartition]) -> None:
        """Newly owned: each waits for its committed metadata to be read."""
        for tp in tps:
            self.state(tp).unchecked = True
            self.has_unchecked = True

    def take_unchecked(self) -> list[TopicPartition]:
        """The partitions whose committed metadata is to be read now (once each)."""
        tps = [tp for tp, st in self._states.items() if st.unchecked]
        for tp in tps:
            self._states[tp].unchecked = False
        self.has_unchecked = False
        return tps

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Given up (revoked, lost): everything known about them goes."""
        for tp in tps:
            self._states.pop(tp, None)

    # -- pause reasons -------------------------------------------------------------

    def hold(self, tps: Iterable[TopicPartition], reason: str) -> set[TopicPartition]:
        """Pause ``tps`` for ``reason``: those that were running, to pause now."""
        newly = set()
        for tp in tps:
            st = self.state(tp)
            if not st.paused_for:
                newly.add(tp)
            st.paused_for.add(reason)
        return newly

    def release(self, tps: Iterable[TopicPartition], reason: str) -> set[TopicPartition]:
        """``reason`` no longer holds ``tps``: those with no reason left, to resume now."""
        freed = set()
        for tp in tps:
            st = self._states.get(tp)
            if st is None or reason not in st.paused_for:
                continue
            st.paused_for.discard(reason)
            if not st.paused_for:
                freed.add(tp)
        return freed

    def held(self, reason: str) -> set[TopicPartition]:
        """The partitions ``reason`` holds."""
        return {tp for tp, st in self._states.items() if reason in st.paused_for}

    def paused(self, tp: TopicPartition) -> bool:
        st = self._states.get(tp)
        return st is not None and bool(st.paused_for)

    # -- after an unclean stop --------------------------------------------------------

    def careful(self, tp: TopicPartition) -> Careful | None:
        st = self._states.get(tp)
        return None if st is None else st.careful

    def set_careful(self, tp: TopicPartition, careful: Careful | None) -> None:
        self.state(tp).careful = careful

    def __contains__(self, tp: object) -> bool:
        return tp in self._states

    def __len__(self) -> int:
        return len(self._states)
