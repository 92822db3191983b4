"""Committers: the last two steps of the loop, at-least-once or in transactions.

Both have the same small interface, called from the loop's thread:
``send(tps)`` hands answered records to the producer in offset order,
``commit(force)`` makes acknowledged progress durable and returns how many
records it settled, ``revoke(tps)`` gives the offsets to commit before a
partition is given up, ``pending()`` counts what is not yet committed.
``saw(records)`` and ``cover(tp, offset)`` keep the committed metadata ahead
of inference: no record runs past the ``run:<last>`` marker the group holds
(:mod:`worker.recovery`), so the next owner after a crash knows how far to
run one record at a time.
:func:`committer_for` chooses one, once; what the loop does differently per
mode it reads from the committer's attributes. What an answer *is* (its
topic, partition, headers) is the :class:`Outbox`'s business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from worker.errors import FatalError
from worker.kafka import (
    CommitDeferred,
    Consumer,
    Delivery,
    KafkaFailure,
    Metadata,
    Producer,
    Record,
    TopicPartition,
    TransactionFailed,
    fmt_offsets,
)
from worker.offsets import Entry, OffsetTracker
from worker.recovery import RUNNING, run_marker

__all__ = [
    "COVER_AHEAD",
    "EXTEND_WITHIN",
    "STABLE_READS",
    "AtLeastOnce",
    "Committer",
    "Outbox",
    "Transactional",
    "committer_for",
]

log = logging.getLogger("worker.commit")

# After an abort, reads of the committed offsets (0.5 s, 1 s, 2 s, 4 s apart) before
# the worker exits rather than guess where to read again.
STABLE_READS = 5
STABLE_BACKOFF_S = 0.5
# How far a run marker reaches past the highest offset polled. A stream that brings a
# record or two per poll would otherwise wait for one synchronous commit per record
# before it runs; with the lead it is one per COVER_AHEAD records. After a crash the
# next owner runs the lead one record at a time only where those records already exist
# (the careful window stops at the partition's end at assignment, recovery.assess), so on
# such a stream the lead costs nothing; behind a backlog it adds at most this many
# records to the careful window (a 500-record lead was too many: docs/performance.md).
COVER_AHEAD = 64
# Between polls, a marker that the records polled have come within this many records of
# is moved COVER_AHEAD past them (Committer.extend), so on a slow stream no record waits
# for cover()'s commit on its way to inference: the commit is made while none waits.
EXTEND_WITHIN = COVER_AHEAD // 4
_sleep = time.sleep

E = TypeVar("E", bound=Entry)
E_contra = TypeVar("E_contra", bound=Entry, contravariant=True)


class Outbox(Protocol[E_contra]):
    """Where the committers' answers come from and go: :class:`worker.answers.Answers`."""

    def emit(self, producer: Producer, entry: E_contra) -> Delivery:
        """Send ``entry``'s answer."""
        ...

    def rescue(self, entry: E_contra, error: BaseException) -> bool:
        """Turn an answer the broker refused into one it takes (a too-large response
        into a dead letter); False when nothing can be done."""
        ...

    def retire(self, entries: Sequence[E_contra]) -> None:
        """``entries`` are settled (committed)."""
        ...


class Committer(Generic[E]):
    # At-least-once answers and commits a revoked partition's work before it goes.
    finishes_revoked: ClassVar[bool] = True
    # Answers leave only when the loop commits (a transaction): poll briefly meanwhile.
    sends_on_commit: ClassVar[bool] = False

    def __init__(
        self,
        tracker: OffsetTracker[TopicPartition, E],
        consumer: Consumer,
        producer: Producer,
        outbox: Outbox[E],
        interval_s: float,
        *,
        reopen: Callable[[], Producer] | None = None,
    ) -> None:
        self.tracker = tracker
        self.consumer = consumer
        self.producer = producer
        self.outbox = outbox
        self._interval_s = interval_s
        self._reopen = reopen
        self.last_commit = time.monotonic()
        # What the group has committed for each partition (ours, or found at assignment).
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.aborted = 0  # transactions aborted (only a transactional committer has any)
        # Bumped for each partition a transaction abort rewinds or the group takes away:
        # records polled before (in a poll batch, deferred, waiting for a retry) are
        # read again (after the seek, or by whoever owns the partition next), not run.
        self.epochs: dict[TopicPartition, int] = {}
        # The highest offset polled of each partition, and the highest the group's
        # committed metadata says may have run ("run:<last>"): see cover().
        self.polled: dict[TopicPartition, int] = {}
        self.covered: dict[TopicPartition, int] = {}

    def found(self, tp: TopicPartition, offset: int, last: int | None = None) -> None:
        """The group's committed offset of ``tp``, read (or committed) at assignment or
        by a marker, and ``last``, the highest offset its metadata says may have run
        (none after ``offset - 1`` unless given)."""
        self.committed_offsets[tp] = offset
        self.covered[tp] = offset - 1 if last is None else last

    def forget(self, tps: Collection[TopicPartition]) -> None:
        """``tps`` were given up: their committed offsets are another owner's now, and
        records polled from them before are stale (given back at once, they are
        fetched again from the committed offset)."""
        for tp in tps:
            self.committed_offsets.pop(tp, None)
            self.polled.pop(tp, None)
            self.covered.pop(tp, None)
            self.epochs[tp] = self.epochs.get(tp, 0) + 1

    def saw(self, records: Iterable[Record]) -> None:
        """``records`` were polled: a cover commit reaches the highest of each partition."""
        polled = self.polled
        for r in records:
            if r.offset > polled.get(r.tp, -1):
                polled[r.tp] = r.offset

    def cover(self, tp: TopicPartition, offset: int) -> None:
        """The record at ``offset`` of ``tp`` is about to be handed to inference. Unless
        the group's committed metadata already reaches it, commit ``run:<last>`` first,
        ``last`` the highest offset of ``tp`` polled plus :data:`COVER_AHEAD`, at the
        committed offset (nothing is settled by it): if the record takes the process
        down, the next owner runs everything up to it one at a time. One commit per poll
        that goes past the marker; only ``tp``'s (another partition may hold a careful
        record's marker). Called from the loop's thread."""
        if offset <= self.covered.get(tp, offset):
            return  # covered, or the committed offset is unknown: nothing to commit at
        last = max(offset, self.polled.get(tp, offset)) + COVER_AHEAD
        try:
            self._mark({tp: last})
        except KafkaFailure as exc:
            # Runs all the same (as under an older marker); the next record tries again.
            log.warning(
                "%s[%d]: run marker up to %d not committed: %s", tp.topic, tp.partition, last, exc
            )

    def extend(self, tps: Iterable[TopicPartition]) -> None:
        """Between polls, with no record waiting for it: the marker of each of ``tps``
        whose highest offset polled has come within :data:`EXTEND_WITHIN` of it moves to
        :data:`COVER_AHEAD` past that offset, in one commit at the committed offsets (as
        :meth:`cover` does), so the next records find it committed. Only partitions
        running normally (a careful one's marker is its try marker); one whose committed
        offset is unknown is left to :meth:`cover`, and so is a failure."""
        ahead: dict[TopicPartition, int] = {}
        for tp in tps:
            polled, covered = self.polled.get(tp), self.covered.get(tp)
            if polled is None or covered is None:  # found() gives both marker and offset
                continue
            if covered - polled < EXTEND_WITHIN:
                ahead[tp] = polled + COVER_AHEAD
        if not ahead:
            return
        try:
            self._mark(ahead)
        except KafkaFailure as exc:
            log.debug("run markers not moved ahead (%s): cover() commits them when due", exc)

    def _mark(self, lasts: dict[TopicPartition, int]) -> None:
        """Commit ``run:<last>`` for each partition at its committed offset (nothing is
        settled by it) in one commit; once it is in, those records are covered. Raises
        :class:`KafkaFailure`."""
        self.consumer.commit(
            {tp: self.committed_offsets[tp] for tp in lasts},
            {tp: run_marker(last) for tp, last in lasts.items()},
        )
        self.covered.update(lasts)

    def markers(self, offsets: Collection[TopicPartition]) -> dict[TopicPartition, str]:
        """Each partition's ``run:<last>``; a bare ``run`` where ``last`` is unknown (the
        committed offset could not be read at assignment)."""
        covered = self.covered
        return {tp: run_marker(covered[tp]) if tp in covered else RUNNING for tp in offsets}

    def clean_offsets(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        """The committed offsets of ``tps``, to commit again as "clean" on the way out."""
        return {tp: o for tp, o in self.committed_offsets.items() if tp in tps}

    def pending(self) -> int:
        return self.tracker.pending()

    def replace_producer(self) -> bool:
        """A fresh producer (opened by ``reopen``) once every answer sent with this one
        is acknowledged; False, the old one kept, when some are not yet (or there is
        nothing to open one with). Called from the loop's thread, between transactions."""
        if self._reopen is None:
            return False
        with self.tracker.lock:  # no answer is sent meanwhile
            if self.producer.flush(5.0):
                return False
            self.producer.close()
            self.producer = self._reopen()
        return True

    def _due(self, force: bool) -> bool:
        return force or time.monotonic() - self.last_commit >= self._interval_s

    def send(self, tps: Collection[TopicPartition] | None = None) -> None:
        raise NotImplementedError

    def commit(self, *, force: bool = False, metadata: str | None = None) -> int:
        """``metadata`` goes with the offsets: each partition's ``run:<last>`` while
        serving (None), "clean" on the way out, so the next owner knows whether the
        last one died mid-stream."""
        raise NotImplementedError

    def _metadata(self, offsets: dict[TopicPartition, int], metadata: str | None) -> Metadata:
        if metadata is None:
            return self.markers(offsets)
        return metadata

    def _committed_as(self, offsets: dict[TopicPartition, int], metadata: str | None) -> None:
        self.committed_offsets.update(offsets)
        if metadata is not None:  # "clean": nothing past the offset may run unmarked now
            for tp, offset in offsets.items():
                self.covered[tp] = offset - 1

    def revoke(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int], int]:
        """Offsets to commit before ``tps`` are given up, and how many records they settle."""
        raise NotImplementedError


class AtLeastOnce(Committer[E]):
    """Commit only offsets whose answers the broker acknowledged."""

    def send(self, tps: Collection[TopicPartition] | None = None) -> None:
        """5. Answered heads go out in offset order (inference threads call this too)."""
        t = self.tracker
        with t.lock:
            for _tp, entry in t.sendable(tps):
                entry.deliveries.append(self.outbox.emit(self.producer, entry))

    def commit(self, *, force: bool = False, metadata: str | None = None) -> int:
        # 1. Deliveries are reported from the producer's poll.
        self.producer.poll(0)
        # 2. Acknowledged heads become offsets; a refused answer stops its line.
        acked = self.tracker.acknowledge()
        self.outbox.retire(acked.retired)
        for tp, entry, error in acked.refusals:
            if self.outbox.rescue(entry, error):
                # Sent again (alone, or as what the broker takes); its line goes on
                # from here. Under the lock: no answer of another thread joins its batch.
                with self.tracker.lock:
                    entry.deliveries = [self.outbox.emit(self.producer, entry)]
                self.tracker.clear_refusal(tp)
                continue
            raise FatalError(
                f"the broker refused an answer ({error}); nothing at or after it is "
                "committed, and it is answered again after a restart"
            )
        if not self._due(force):
            return 0
        # 3. Commit synchronously: the offsets are durable when this returns.
        offsets = self.tracker.to_commit()
        if not offsets:
            return 0
        try:
            self.consumer.commit(offsets, self._metadata(offsets, metadata))
        except CommitDeferred as exc:
            # 4. A rebalance or a coordinator move is under way: keep the offsets;
            # the revocation or the next commit sends them.
            log.warning("commit deferred (%s): %s", exc.name or exc, fmt_offsets(offsets))
            self.tracker.restore(offsets)
            return 0
        self.last_commit = time.monotonic()
        self._committed_as(offsets, metadata)
        return self.tracker.committed(offsets)

    def revoke(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int], int]:
        """Send and acknowledge what ``tps`` answered; their offsets to commit."""
        self.send(tps)
        left = self.producer.flush(5.0)  # bounded: a slow broker must not hold the rebalance
        if left:
            log.warning("revocation: %d answers unacknowledged after 5 s", left)
        acked = self.tracker.acknowledge(tps)
        self.outbox.retire(acked.retired)
        offsets = self.tracker.to_commit(tps)
        settled = self.tracker.committed(offsets)
        # Committed as "clean" by the client: the next owner need not be careful.
        return {**self.clean_offsets(tps), **offsets}, settled


class Transactional(Committer[E]):
    """Answers, dead letters and offsets in one Kafka transaction per batch window."""

    finishes_revoked = False
    sends_on_commit = True

    def __init__(
        self,
        *args: Any,
        reopen: Callable[[], Producer],
        txn_timeout_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, reopen=reopen, **kwargs)
        self._open_fresh = reopen
        self._txn_timeout_s = txn_timeout_s

    def send(self, tps: Collection[TopicPartition] | None = None) -> None:
        """Nothing leaves outside a transaction."""

    def commit(self, *, force: bool = False, metadata: str | None = None) -> int:
        if not self._due(force):
            return 0
        # 1. The window: every answered record at the head of each line.
        window = self.tracker.window()
        if not window:
            return 0
        offsets: dict[TopicPartition, int] = {}
        for tp, entry in window:
            offsets[tp] = entry.offset + 1
        p = self.producer
        deliveries: list[Delivery] = []
        try:
            # 2. Begin; 3. send every answer and dead letter of the window.
            p.begin_transaction()
            deliveries.extend(self.outbox.emit(p, entry) for _, entry in window)
            # 4. Every send acknowledged, none refused, *before* the commit: a send the
            # client refused at once never joined the transaction, and kafka-python can
            # report a commit after an epoch bump that dropped a send; either would
            # commit the offsets without the answer.
            p.flush(self._txn_timeout_s)
            _check(deliveries, "before the commit")
            # 5. The consumer's offsets join the transaction; 6. commit.
            p.send_offsets_to_transaction(
                offsets, self.consumer.group_metadata(), self._metadata(offsets, metadata)
            )
            p.commit_transaction()
        except (TransactionFailed, KafkaFailure) as exc:
            # Remembered, so the answer is sent as what the broker takes next time.
            for (_, entry), d in zip(window, deliveries, strict=False):
                if d.error is not None:
                    self.outbox.rescue(entry, d.error)
            self._abort(exc)
            return 0
        # 7. Settled: drop the window from the lines.
        self.tracker.settle_window(window)
        self.outbox.retire([entry for _, entry in window])
        self.last_commit = time.monotonic()
        self._committed_as(offsets, metadata)
        return len(window)

    def _abort(self, exc: BaseException) -> None:
        """Abort, rewind every line to its first uncommitted record, fresh producer if needed."""
        log.warning("transaction aborted (%s); rewinding to the first uncommitted records", exc)
        self.aborted += 1
        try:
            self.producer.abort_transaction()
        except KafkaFailure as abort_exc:
            log.warning("abort failed (%s); starting a fresh producer", abort_exc)
            try:
                self.producer.close()
            finally:
                self.producer = self._open_fresh()
        # Where to read again: what the broker holds as committed (a transaction that
        # returned "committed" while a send failed may or may not have landed), else
        # the first record not yet committed -- never the beginning of the topic.
        rewind = self.tracker.first_offsets()
        assigned = self.consumer.assignment()
        stable = self._stable([tp for tp in rewind if tp in assigned])
        for tp, first in rewind.items():
            self.epochs[tp] = self.epochs.get(tp, 0) + 1
            if tp in assigned:
                at = stable.get(tp)
                self.consumer.seek(tp, first if at is None else at)
                if at is not None:
                    self.committed_offsets[tp] = at
        self.tracker.forget(list(rewind))

    def _stable(self, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """What the broker holds as committed for ``tps``, read again a few times when
        it cannot say. Never guessed: a transaction whose commit call failed may have
        landed, and reading from the first uncommitted record would answer it twice."""
        wait = STABLE_BACKOFF_S
        for attempt in range(1, STABLE_READS + 1):
            try:
                return self.consumer.committed(tps)
            except KafkaFailure as exc:
                if attempt == STABLE_READS:
                    raise FatalError(
                        f"the committed offsets are unknown after an aborted transaction "
                        f"({exc}); exiting rather than guess where to read again"
                    ) from None
                log.warning("committed offsets unknown after the abort (%s); asking again", exc)
                _sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    def revoke(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int], int]:
        # In-flight work is abandoned: never committed, so the next owner answers it in
        # its own transaction. What was committed is marked "clean" (no crash here).
        return self.clean_offsets(tps), 0


def _check(deliveries: list[Delivery], when: str) -> None:
    failed = next((d.error for d in deliveries if d.error is not None), None)
    if failed is not None:
        raise TransactionFailed(f"a send of the transaction was refused {when}: {failed}")
    if not all(d.done for d in deliveries):
        raise TransactionFailed(f"a send of the transaction is unacknowledged {when}")


def committer_for(
    exactly_once: bool,
    tracker: OffsetTracker[TopicPartition, E],
    consumer: Consumer,
    producer: Producer,
    outbox: Outbox[E],
    interval_s: float,
    *,
    reopen: Callable[[], Producer],
) -> Committer[E]:
    """The committer of the delivery mode; ``reopen`` opens a fresh producer (after
    a failed abort, with exactly-once)."""
    if exactly_once:
        return Transactional(tracker, consumer, producer, outbox, interval_s, reopen=reopen)
    return AtLeastOnce(tracker, consumer, producer, outbox, interval_s, reopen=reopen)
