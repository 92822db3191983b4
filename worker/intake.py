"""Step 2 of the loop: a polled record's request decoded, its model found, bound, batched.

:class:`Intake` turns a slot's bytes into a job for the batcher: decode (its
``model`` header or body), the model's signature (a model not loaded yet
loads on the loader thread while the loop's thread keeps polling, every
partition paused, so a long load never costs the group membership), bind,
the response cache, then the batcher; due batches go to their run. Any error
goes to :class:`Failures`: a transient one is tried again later, anything
else becomes the slot's dead letter, so a record is never dropped.
:class:`Deferred` keeps what the loop polled while it waited (a model
loading, a careful record settling) for after the wait, each record with its
partition's epoch then, so one rewound or given up meanwhile is dropped.

Called from the loop's thread only (the run's failures come from the pool's).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout

from worker.answers import Answers, Slot, log_fields
from worker.batching import Batch, Batcher, Job
from worker.cache import ResponseCache, SessionCache
from worker.commit import Committer
from worker.errors import InferenceError, WorkerError
from worker.flow import POLL_RECORDS
from worker.kafka import Consumer, Record, TopicPartition
from worker.observability import Metrics
from worker.partitions import LOADING, Partitions
from worker.retries import Retries
from worker.signature import Signature
from worker.tracing import Tracing

__all__ = ["LOAD_WAIT_S", "Deferred", "Failures", "Intake"]

log = logging.getLogger("worker.loop")  # a step of the loop logs as the loop

# A model that loads within this needs no pause: the loop's thread just waits.
LOAD_WAIT_S = 0.05


class Deferred:
    """Records polled while the loop waited, in order, with their partition's epoch."""

    def __init__(self, committer: Committer[Slot]) -> None:
        self._committer = committer
        self._records: deque[tuple[Record, int]] = deque()

    def epoch(self, record: Record) -> int:
        """The record's partition's epoch now (a rewind or a revoke bumps it)."""
        return self._committer.epochs.get(record.tp, 0)

    def stale(self, record: Record, epoch: int) -> bool:
        """Polled before an abort rewound its partition (or it was given up): it is
        read again after the seek (or by its next owner)."""
        if self.epoch(record) == epoch:
            return False
        log.debug("%s: polled before its partition was rewound; dropped", record.where)
        return True

    def defer(self, records: list[Record]) -> None:
        self._committer.saw(records)  # a cover commit reaches them before they run
        self._records.extend((r, self.epoch(r)) for r in records)

    def take(self) -> tuple[Record, int] | None:
        """The oldest record deferred, with its epoch then; None when none waits."""
        return self._records.popleft() if self._records else None


class Failures:
    """What a failed slot becomes: a transient failure waits and is tried again (its
    partition paused, so order holds); anything else, or the last try, becomes the
    slot's dead letter."""

    def __init__(self, retries: Retries, answers: Answers, metrics: Metrics) -> None:
        self._retries, self._answers, self._metrics = retries, answers, metrics

    def __call__(self, slot: Slot, exc: WorkerError, model: str | None) -> None:
        delay = self._retries.retry(slot, exc)
        if delay is None:
            slot.out = self._answers.dead_letter(slot, exc, model)
            return
        self._metrics.retries.labels(error_type=exc.error_type).inc()
        log.warning(
            "%s: %s (%s); retry %d of %d in %.2f s",
            slot.where,
            exc.error_type,
            exc.message,
            slot.attempts - 1,
            self._retries.attempts,
            delay,
            extra=log_fields(slot.record),
        )


class Intake:
    """Decode, load, bind and batch one slot at a time (see the module docstring)."""

    def __init__(
        self,
        *,
        answers: Answers,
        metrics: Metrics,
        responses: ResponseCache,
        batcher: Batcher,
        submit: Callable[[Batch], None],
        cover: Callable[[TopicPartition, int], None],
        failed: Callable[[Slot, WorkerError, str | None], None],
        cache: SessionCache,
        loader: Executor,
        consumer: Consumer,
        partitions: Partitions,
        deferred: Deferred,
        beat: Callable[[], None],
        tracing: Tracing,
    ) -> None:
        self._answers, self._metrics, self._responses = answers, metrics, responses
        self._batcher, self._submit, self._failed = batcher, submit, failed
        self._cover = cover
        self._cache, self._loader = cache, loader
        self._consumer, self._partitions, self._deferred = consumer, partitions, deferred
        self._beat = beat
        self.admit_first = tracing.around_decode(self.admit)  # in its decode span

    def admit(self, slot: Slot, before_run: Callable[[], None] | None = None) -> None:
        """Decode and bind a slot's request and hand it to the batcher (or fail it);
        ``before_run`` is called once its model is loaded and its request decoded,
        right before it goes to the batcher (a careful record's try marker)."""
        record = slot.record
        model: str | None = None
        try:
            request, model = self._answers.decode(record)
            signature, version = self.signature(model, request.model_version)
            slot.series = self._metrics.series(model, version)
            bound = request.bind(signature)
        except WorkerError as exc:
            self._failed(slot, exc, model)
            return
        except Exception as exc:
            self._failed(slot, InferenceError(f"{type(exc).__name__}: {exc}"), model)
            return
        slot.request, slot.bound = request, bound
        if self._responses.enabled:
            # A redelivered duplicate (same bytes, same model version) costs a look-up.
            slot.cache_key = ResponseCache.key(model, version, record.value or b"")
            cached = self._responses.get(slot.cache_key)
            if cached is not None:
                slot.out = self._answers.response(slot, model, version, cached)  # type: ignore[arg-type]
                slot.request = slot.bound = None
                return
        job = Job.for_request(slot, model, version, signature, bound)
        if before_run is not None:
            job.guarded = True  # a careful record: off the polling thread
            before_run()
        else:  # the group's run marker reaches it before it runs (worker.recovery)
            self._cover(record.tp, record.offset)
        for batch in self._batcher.add(job):
            self._submit(batch)

    def signature(self, model: str, version: int | None) -> tuple[Signature, int]:
        """The model's signature and version; a model not loaded yet loads on the
        loader thread while this one keeps polling with its partitions paused (a
        load longer than max.poll.interval.ms must not cost the group membership)."""
        session = self._cache.peek(model, version)
        if session is not None:
            return session.signature, session.ref.version
        future = self._loader.submit(self._load, model, version)
        try:
            return future.result(timeout=LOAD_WAIT_S)  # a small model: no pause at all
        except FutureTimeout:
            pass
        consumer, parts = self._consumer, self._partitions
        consumer.pause(parts.hold(consumer.assignment(), LOADING))
        try:
            while not future.done():
                self._beat()
                self._deferred.defer(consumer.poll(POLL_RECORDS, 0.05))
        finally:
            loaded = parts.release(parts.held(LOADING), LOADING)
            consumer.resume(loaded & consumer.assignment())
        return future.result()

    def _load(self, model: str, version: int | None) -> tuple[Signature, int]:
        with self._cache.acquire(model, version) as session:
            return session.signature, session.ref.version
