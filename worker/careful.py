"""Careful mode: after an unclean stop, the records the last owner was in the middle of
run one at a time, each behind its own ``try`` marker.

:mod:`worker.recovery` decides (from a newly assigned partition's committed
offset and metadata) what to do; :class:`CarefulMode` does it with the
consumer: it reads the metadata before a partition's first record
(:meth:`~CarefulMode.check_assigned`), and runs a covered record alone
(:meth:`~CarefulMode.run`): everything before it settled first, its
``try:<offset>:<n>`` marker committed right before it runs, the record
settled, then ``offset + 1`` committed as clean. A record that takes the
process down again and again is dead-lettered unrun after the third crash.
The normal path pays nothing for any of it.

Called from the loop's thread only; the loop's own steps (a forced round of
retries, runs, sends and commits; the admission of a slot) are passed in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from worker.answers import Answers, Slot, model_header
from worker.commit import Committer
from worker.errors import InferenceError
from worker.flow import POLL_RECORDS
from worker.intake import Deferred
from worker.kafka import Consumer, KafkaFailure, TopicPartition
from worker.lifecycle import Deadline
from worker.offsets import OffsetTracker
from worker.partitions import CAREFUL, Partitions
from worker.recovery import CLEAN, Careful, needs_watermarks, plan, run_marker, try_marker
from worker.retries import Retries

__all__ = ["RUN_WAIT_S", "CarefulMode", "commit_marker"]

log = logging.getLogger("worker.loop")  # a step of the loop logs as the loop

# How long a careful record's own run is awaited before the settling rounds commit
# around it (CarefulMode._await_answer), and the poll wait meanwhile.
RUN_WAIT_S = 1.0
AWAIT_POLL_S = 0.002


def commit_marker(
    consumer: Consumer, offsets: Mapping[TopicPartition, int], metadata: str, what: str
) -> bool:
    """Best effort: commit ``offsets`` with ``metadata``; a failure is logged (as
    ``what`` failed), not raised. Whether the commit went through."""
    try:
        consumer.commit(offsets, metadata)
    except KafkaFailure as exc:
        log.warning("%s failed: %s", what, exc)
        return False
    return True


class CarefulMode:
    """The partitions whose last owner stopped mid-stream, run one record at a time."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        committer: Committer[Slot],
        partitions: Partitions,
        tracker: OffsetTracker[TopicPartition, Slot],
        retries: Retries,
        answers: Answers,
        admit: Callable[[Slot, Callable[[], None] | None], None],
        run_now: Callable[[], None],
        settle_round: Callable[[], None],
        deferred: Deferred,
        stopping: threading.Event,
        latest: bool,
    ) -> None:
        self._consumer, self._committer = consumer, committer
        self._partitions, self._tracker, self._retries = partitions, tracker, retries
        self._answers = answers
        self._admit, self._run_now, self._settle_round = admit, run_now, settle_round
        self._deferred, self._stopping = deferred, stopping
        # auto.offset.reset: a partition with nothing committed starts at its end
        self._latest = latest

    def check_assigned(self) -> None:
        """Read the committed metadata of newly assigned partitions: commit the start of
        one with nothing committed, and note the careful plan of one whose last owner
        stopped mid-stream."""
        consumer, committer = self._consumer, self._committer
        assigned = consumer.assignment()
        tps = [tp for tp in self._partitions.take_unchecked() if tp in assigned]
        try:
            committed = consumer.committed_metadata(tps)
        except KafkaFailure as exc:
            log.warning("committed offsets unknown (%s): no poison-pill check this time", exc)
            return
        for tp, (offset, metadata) in committed.items():
            marks = consumer.watermarks(tp) if needs_watermarks(offset, metadata) else None
            p = plan(offset, metadata, marks, latest=self._latest)
            careful = p.careful
            if offset is not None:
                committer.found(tp, offset, None if careful is None else careful.until - 1)
            if p.start is not None and commit_marker(
                consumer,
                {tp: p.start},
                run_marker(p.start - 1),
                f"{tp.topic}[{tp.partition}]: start",
            ):
                committer.found(tp, p.start)
            if careful is None:
                continue
            self._partitions.set_careful(tp, careful)
            log.warning(
                "%s[%d]: the last owner stopped mid-stream at offset %d; records up to %d "
                "run one at a time",
                tp.topic,
                tp.partition,
                offset,
                careful.until,
            )

    def run(self, slot: Slot, careful: Careful, epoch: int) -> None:
        """Everything before this record is settled: commit ``try:<offset>:<n>``, run it
        alone and wait until it is settled (however long it runs), then commit
        ``offset + 1`` as clean. If it takes the process down, the next owner reads how
        often it did; a record never waits behind a marker that is not its own."""
        tp, offset = slot.record.tp, slot.record.offset
        attempt = careful.attempt(offset)
        if careful.give_up(offset):
            slot.out = self._answers.dead_letter(
                slot,
                InferenceError(
                    f"crashed the worker {attempt} times (the process died while running "
                    "it); dead-lettered without running it again"
                ),
                model_header(slot.record),
            )
        else:
            self._admit(slot, self.try_marker(slot))
            self._run_now()
        if self.settle_before(tp, offset + 1, running=slot):
            live = self._committer.epochs.get(tp, 0) == epoch  # not rewound meanwhile
            # Settled: its marker goes before anything else runs.
            if (
                live
                and slot.out is not None
                and tp in self._partitions
                and commit_marker(
                    self._consumer, {tp: offset + 1}, CLEAN, f"{slot.where}: settled marker"
                )
            ):
                self._committer.found(tp, offset + 1)
            return
        if slot.out is None and slot.live and not self._retries.waiting(slot):
            # A stop (SIGTERM) during a careful run: the run is abandoned, not charged.
            # Its line holds nothing else (what came before is settled): the drain
            # commits the last settled offset as clean over its try marker.
            log.warning(
                "%s: stopping during its careful run; abandoned (answered after the "
                "restart, not counted as a crash)",
                slot.where,
            )
            self._tracker.forget([tp])

    def try_marker(self, slot: Slot) -> Callable[[], None] | None:
        """For a careful record: commit ``try:<offset>:<n>`` (called right before it runs,
        its model loaded: a death while loading charges no record)."""
        tp, offset = slot.record.tp, slot.record.offset
        careful = self._partitions.careful(tp)
        if careful is None or not careful.covers(offset):
            return None
        marker = try_marker(offset, careful.attempt(offset))

        def commit() -> None:
            commit_marker(self._consumer, {tp: offset}, marker, f"{slot.where}: try marker")

        return commit

    def settle_before(
        self, tp: TopicPartition, offset: int, *, running: Slot | None = None
    ) -> bool:
        """Answer and commit every record of ``tp`` before ``offset``, however long that
        takes; meanwhile every partition is paused (records polled before the pause wait
        in the deferred list), the group protocol and health go on. False when a stop
        ended the wait first. ``running``: the careful record just handed to its run,
        whose answer is awaited first (:meth:`_await_answer`)."""

        def settled() -> bool:
            first = self._tracker.first_offsets().get(tp)
            return first is None or first >= offset

        if settled():
            return True
        consumer, parts = self._consumer, self._partitions
        consumer.pause(parts.hold(consumer.assignment(), CAREFUL))
        try:
            if running is not None:
                self._await_answer(running)
            while not settled() and not self._stopping.is_set():
                self._settle_round()
                if not settled():
                    self._deferred.defer(consumer.poll(POLL_RECORDS, 0.01))
        finally:
            released = parts.release(parts.held(CAREFUL), CAREFUL)
            consumer.resume(released & consumer.assignment())
        return settled()

    def _await_answer(self, slot: Slot) -> None:
        """Poll (the partitions paused) until ``slot``'s run has answered it, for at most
        :data:`RUN_WAIT_S`, before a round commits anything. A round while it still runs
        commits the other partitions' answers without it (a whole transaction with
        ``--exactly-once``), and it waits for the round after: twice as long behind its
        try marker, where a death of the process for any reason charges it a crash. A
        run longer than the wait (one that hangs) is left to the rounds, which keep
        committing the rest; a stop, a retry or a revocation ends the wait at once."""
        deadline = Deadline(RUN_WAIT_S)
        while (
            slot.out is None
            and slot.live
            and not self._retries.waiting(slot)
            and not self._stopping.is_set()
            and not deadline.passed
        ):
            self._deferred.defer(self._consumer.poll(POLL_RECORDS, AWAIT_POLL_S))
