"""consume -> decode -> batch -> infer -> encode -> produce -> commit.

Follow one record down this file:

1. ``poll()`` (main thread): the record gets a :class:`Slot` at the back of
   its partition's line in the :class:`~worker.offsets.OffsetTracker`; lines
   keep offset order.
2. ``_accept``/``_admit``: bytes -> Request -> model inputs. Any error turns
   the slot into a dead letter on the spot (a transient one is first retried
   with backoff, its partition paused); the record is never dropped. A model
   that is not loaded yet loads on another thread while this one keeps
   polling (paused), so the group never loses the worker.
3. ``Batcher``: jobs for the same model and row shape are coalesced while
   every run slot is busy (a request that finds one free runs at once, with
   what the same poll brought); batches go to the inference pool, or run right
   here when their model's runs are shorter than ``--inline-below-ms``
   (``_dispatch``, :mod:`worker.inference`).
4. :class:`~worker.inference.Inference` (pool thread; ONNX Runtime releases
   the GIL): one run per batch, outputs split per request and encoded into
   the slot.
5. ``committer.send``: each line sends its answered head slots, in offset
   order (:meth:`~worker.answers.Answers.emit` picks the topic, partition
   and size check).
6. ``committer.commit``: the acknowledged head of each line is committed;
   with ``--exactly-once`` steps 5 and 6 are one transaction instead
   (:mod:`worker.commit` numbers the steps of both).

Poison pills: offsets carry a marker in their metadata (:mod:`worker.recovery`).
A new owner that finds the last one died mid-stream runs the records it was in
the middle of one at a time (``_run_carefully``); a record that crashes the
process again and again is dead-lettered after the third crash, however far
past the committed offset: the normal path commits a marker reaching the
highest polled offset before it hands over a record past the last one (one
commit per poll that goes past it, ``committer.cover``).

Backpressure: when the bytes between steps 1 and 6 reach
``--max-inflight-bytes``, the loop stops polling and waits for acknowledgements
(librdkafka keeps what it prefetched); if that lasts a second, the partitions
holding the most are paused and the loop polls again, so the consumer stays in
its group.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from worker.answers import Answers, Outgoing, Slot, log_fields, model_header
from worker.batching import Batcher, Job
from worker.cache import ResponseCache, SessionCache
from worker.commit import Committer, committer_for
from worker.errors import (
    ConfigError,
    FatalError,
    InferenceError,
    WorkerError,
)
from worker.flow import POLL_RECORDS, Budget, poll_wait_s, to_pause, to_resume
from worker.inference import Inference, Loader, session_cache
from worker.kafka import (
    KAFKA,
    Admin,
    ClientConfig,
    Clients,
    Consumer,
    KafkaFailure,
    Producer,
    Record,
    TopicPartition,
    fmt_tps,
)
from worker.lifecycle import Deadline, install_stop_signals
from worker.observability import Health, HealthServer, Metrics
from worker.offsets import OffsetTracker
from worker.oip import oip_app
from worker.partitions import BACKPRESSURE, CAREFUL, DRAINING, LOADING, RETRY, Partitions
from worker.recovery import CLEAN, LATEST_RESETS, Careful, plan, run_marker, try_marker
from worker.repository import ModelRepository
from worker.retries import Retries
from worker.runtime import load_session, resolve_device
from worker.settings import Settings
from worker.signature import Signature
from worker.tracing import Tracing

__all__ = [
    "FatalError",
    "Outgoing",
    "Slot",
    "Worker",
    "run_worker",
]

log = logging.getLogger("worker.loop")


@dataclass(frozen=True)
class _Resources:
    """What exists only while ``run()`` runs (built there, closed by its ExitStack)."""

    cache: SessionCache
    pool: ThreadPoolExecutor  # inference runs
    loader: ThreadPoolExecutor  # model loads, off the polling thread
    admin: Admin
    consumer: Consumer
    committer: Committer[Slot]
    inference: Inference


class Worker:
    """The whole pipeline for one process; ``run()`` until ``stop()`` or a bound.

    ``clients`` opens the Kafka clients (real ones unless a test passes doubles
    of the seam); ``loader`` turns a model file into a session; ``tracing``
    makes the spans (by default as the ``OTEL_*`` variables say).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clients: Clients = KAFKA,
        loader: Loader = load_session,
        metrics: Metrics | None = None,
        health: Health | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self._clients = clients
        self._load = loader
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing.from_environment()
        self._admit_first = self.tracing.around_decode(self._admit)  # in its decode span
        # Liveness fails when nothing is committed for longer than a session timeout.
        session_s = float(settings.kafka_properties.get("session.timeout.ms", 45_000)) / 1000
        self.health = health or Health(commit_stall_after_s=session_s)
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._closed = threading.Event()  # set once run() has closed every client
        self._batcher = Batcher(
            settings.max_batch_rows,
            settings.max_batch_delay_ms / 1000,
            settings.coalesce_below_rows,
        )
        self._tracker: OffsetTracker[TopicPartition, Slot] = OffsetTracker()
        # Transient failures waiting for their next try: (due, slot); pool threads add.
        self._retries = Retries(settings.retry_attempts, settings.retry_backoff_ms / 1000)
        # Polled while a model loaded or a careful record ran, with the epoch of their
        # partition then (Committer.epochs: a rewind makes them stale).
        self._deferred: deque[tuple[Record, int]] = deque()
        self._budget = Budget(settings.max_inflight_bytes)
        self._partitions = Partitions()
        self._last_lag = 0.0
        self._answers = Answers(settings, self.metrics, tracing=self.tracing)
        self._producer_batch = self._answers.batch_bytes()  # what the producer's batches hold
        self.committed_records = 0
        self._resources: _Resources | None = None  # set by run()
        self._responses = ResponseCache(settings.response_cache_size, metrics=self.metrics)

    def assignment(self) -> set[TopicPartition]:
        """Partitions this worker owns now (empty before it joined its group)."""
        r = self._resources
        return r.consumer.assignment() if r is not None else set()

    @property
    def _r(self) -> _Resources:
        if self._resources is None:
            raise RuntimeError("the worker is not running: call run() first")
        return self._resources

    def stop(self) -> None:
        """Stop polling, drain what is in flight, commit, leave the group."""
        self._stopping.set()

    # -- setup -----------------------------------------------------------------

    def _client_config(self, role: str, **kwargs: Any) -> ClientConfig:
        s = self.settings
        return ClientConfig(
            bootstrap_servers=s.bootstrap_servers,
            backend=s.kafka_client,
            client_id=f"{s.group_id}-{role}",
            max_message_bytes=s.max_message_bytes,
            properties=s.kafka_properties,
            on_stats=self.metrics.kafka_statistics(role),
            **kwargs,
        )

    def _open_producer(self) -> Producer:
        s = self.settings
        txn = s.txn_id if s.exactly_once else None
        # Batches within the output and dead-letter topics' limits (read before).
        self._producer_batch = self._answers.batch_bytes()
        producer = self._clients.producer(
            self._client_config(
                "producer", transactional_id=txn, batch_max_bytes=self._producer_batch
            )
        )
        if s.exactly_once:
            # Fences any earlier producer with this id and aborts its open transaction.
            producer.init_transactions()
        return producer

    def run(self, *, count: int | None = None, timeout: float | None = None) -> int:
        """Serve until ``stop()``, or until ``count`` records are committed, or ``timeout`` s."""
        s = self.settings
        try:
            device = resolve_device(s.device)
        except ValueError as exc:
            raise ConfigError("--device", str(exc)) from None
        self.metrics.set_build_info(kafka_client=s.kafka_client)
        self._closed.clear()
        with ExitStack() as stack:
            stack.callback(self._closed.set)  # the last callback: after every close
            stack.callback(self.tracing.close)
            repository = ModelRepository(s.model_repository)
            self._batcher.settings_for = repository.settings  # per-model batching
            cache = session_cache(s, device, repository, self._load, self.metrics)
            stack.callback(cache.close)
            server = stack.enter_context(
                HealthServer(
                    s.metrics_port,
                    self.metrics,
                    self.health,
                    bind=s.metrics_bind,
                    v2=oip_app(repository, self.health),
                )
            )
            self.metrics_port = server.port
            for name, version in s.preload:
                try:
                    cache.preload(name, version)
                except WorkerError as exc:
                    raise ConfigError("--preload", f"{name}: {exc}") from None
            self.health.preloaded = True
            pool = ThreadPoolExecutor(s.inference_threads, thread_name_prefix="infer")
            # Never wait for a stuck run on the way out (the CLI exits regardless).
            stack.callback(pool.shutdown, wait=False, cancel_futures=True)
            loader = ThreadPoolExecutor(1, thread_name_prefix="load")
            stack.callback(loader.shutdown, wait=False, cancel_futures=True)
            admin = self._clients.admin(self._client_config("admin"))
            stack.callback(admin.close)
            self._answers.refresh(admin, force=True)
            producer = self._open_producer()
            consumer = self._clients.consumer(self._client_config("consumer", group_id=s.group_id))
            stack.callback(consumer.close)
            committer = committer_for(
                s.exactly_once,
                self._tracker,
                consumer,
                producer,
                self._answers,
                s.commit_interval_ms / 1000,
                reopen=self._open_producer,
            )
            self.metrics.watch_transactions(lambda: committer.aborted)
            inference = Inference(
                cache,
                pool,
                metrics=self.metrics,
                answers=self._answers,
                tracker=self._tracker,
                responses=self._responses,
                failed=self._failed,
                sent=lambda: committer.send(),
                max_rows=s.max_batch_rows,
                slots=s.inference_threads,
                inline_below_ms=s.inline_below_ms,
                one_cpu_thread=device == "cpu" and s.intra_op_threads == 1,
                tracing=self.tracing,
            )
            self._resources = _Resources(cache, pool, loader, admin, consumer, committer, inference)
            stack.callback(lambda: committer.producer.close())
            consumer.subscribe(list(s.input_topics), self)
            self.health.broker_ok = True
            self._install_signal_handlers(stack)
            # Start-up objects (modules, sessions, clients) live as long as the
            # process: keep them out of every later collection, whose pauses
            # otherwise show up as tail latency.
            gc.collect()
            gc.freeze()
            log.info(
                "serving %s -> %s (dlq %s, group %s, device %s, client %s, metrics :%s)",
                ",".join(s.input_topics),
                s.output_topic,
                s.dead_letter_topic,
                s.group_id,
                device,
                s.kafka_client,
                self.metrics_port,
            )
            self._serve(consumer, committer, count, timeout)
            return self._drain(consumer, committer)

    def _install_signal_handlers(self, stack: ExitStack) -> None:
        install_stop_signals(stack, self.stop, self._closed, self.settings.drain_timeout_s)

    # -- the loop --------------------------------------------------------------

    def _serve(
        self,
        consumer: Consumer,
        committer: Committer[Slot],
        count: int | None,
        timeout: float | None,
    ) -> None:
        end = None if timeout is None else Deadline(timeout)
        while not self._stopping.is_set():
            if end is not None and end.passed:
                break
            if count is not None and self.committed_records >= count:
                break
            self.health.beat()
            # 1. poll: short waits while answers are being computed. With the in-flight
            # budget spent, wait for acknowledgements instead: librdkafka keeps its
            # prefetch, which a pause throws away (partitions pause only when the
            # budget stays spent, see _backpressure).
            if self._budget.waiting(self._tracker.inflight_bytes):
                committer.producer.poll(self._poll_wait_s())
                # Bytes leave the budget when committed: commit what is acknowledged
                # now, not at the next interval (at 275 MB/s of requests, 200 ms of
                # them spend 64 MiB, and every record would wait for the interval).
                self._committed(committer.commit(force=True))
            else:
                room = self._budget.poll_records(self._tracker.inflight_bytes)
                records = consumer.poll(room, self._poll_wait_s())
                committer.saw(records)
                epochs = dict(committer.epochs)
                for record in records:
                    # 2. decode, bind, batch (or dead-letter)
                    self._accept(record, epochs.get(record.tp, 0))
            while self._deferred:  # polled while a model was loading
                self._accept(*self._deferred.popleft())
            self._retry_due(consumer)  # 2 again, for transient failures whose wait is over
            # 3. waiting batches run: at once with a slot free, else when it frees or
            # their window closes
            self._dispatch()
            committer.send()  # 5. dead letters; pool threads send the rest
            self._committed(committer.commit())  # 6. acknowledged heads (or one transaction)
            self._backpressure(consumer)
            self._report_lag(consumer)
            self._refresh_limits(committer)

    def _refresh_limits(self, committer: Committer[Slot]) -> None:
        """The output topics' metadata; a lower size limit than the producer's batches
        were cut for gets a fresh producer (once what the old one sent is acknowledged)."""
        self._answers.refresh(self._r.admin)
        batch = self._answers.batch_bytes()
        if batch < self._producer_batch and committer.replace_producer():
            log.info("a topic's max.message.bytes went down: producer batches now %d bytes", batch)

    def _poll_wait_s(self) -> float:
        # At-least-once: pool threads send their own answers, so the main thread
        # may wait in poll() for records. A transaction is driven from here, so
        # with --exactly-once it checks back often while answers are due.
        txn_due = self._r.committer.sends_on_commit and bool(
            self._r.inference.running or self._tracker.has_due_answers()
        )
        # A waiting group runs when a slot frees: look again when the runs should end.
        free = self._r.inference.next_free() if len(self._batcher) else None
        deadlines = (self._batcher.next_deadline(), free, self._retries.next_due())
        return poll_wait_s(time.monotonic(), deadlines, txn_answers_due=txn_due)

    def _committed(self, records: int) -> None:
        if records:
            self.committed_records += records
            self.health.committed()
        self.health.set_pending(self._tracker.pending())

    # -- 2. decode -------------------------------------------------------------

    def _stale(self, record: Record, epoch: int) -> bool:
        """Polled before an abort rewound its partition: it is read again after the seek."""
        if self._r.committer.epochs.get(record.tp, 0) == epoch:
            return False
        log.debug("%s: polled before its partition was rewound; dropped", record.where)
        return True

    def _defer(self, records: list[Record]) -> None:
        self._r.committer.saw(records)
        epochs = self._r.committer.epochs
        self._deferred.extend((r, epochs.get(r.tp, 0)) for r in records)

    def _accept(self, record: Record, epoch: int) -> None:
        if self._stale(record, epoch):
            return
        if self._partitions.has_unchecked:
            self._check_assigned()
        careful = self._partitions.careful(record.tp)
        if careful is not None and careful.covers(record.offset):
            self._settle_before(record.tp, record.offset)
            if self._stale(record, epoch):
                return
            if self._stopping.is_set():
                # Not started: left for the next owner, which reads it from the offset
                # committed (clean) by the drain.
                log.debug("%s: stopping; left for after the restart", record.where)
                return
            self._run_carefully(self._slot(record), careful, epoch)
            return
        if careful is not None:
            self._partitions.set_careful(record.tp, None)
            log.info("%s[%d]: back to normal", record.topic, record.partition)
        self._admit_first(self._slot(record))

    def _slot(self, record: Record) -> Slot:
        """The record's place in its partition's line, its bytes in the budget."""
        slot = Slot(record)
        self._tracker.add(record.tp, slot)
        self._budget.polled(slot.nbytes)
        return slot

    def _admit(self, slot: Slot, before_run: Callable[[], None] | None = None) -> None:
        """Decode and bind a slot's request and hand it to the batcher (or fail it);
        ``before_run`` is called once its model is loaded and its request decoded,
        right before it goes to the batcher (a careful record's try marker)."""
        record = slot.record
        model: str | None = None
        try:
            request, model = self._answers.decode(record)
            signature, version = self._signature(model, request.model_version)
            slot.series = self.metrics.series(model, version)
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
            before_run()
        else:  # the group's run marker reaches it before it runs (worker.recovery)
            self._r.committer.cover(record.tp, record.offset)
        for batch in self._batcher.add(job):
            self._r.inference.submit(batch)

    def _signature(self, model: str, version: int | None) -> tuple[Signature, int]:
        """The model's signature and version; a model not loaded yet loads on the
        loader thread while this one keeps polling with its partitions paused (a
        load longer than max.poll.interval.ms must not cost the group membership)."""
        r = self._r
        if any(n == model and version in (None, v) for n, v in r.cache.loaded()):
            with r.cache.acquire(model, version) as session:
                return session.signature, session.ref.version
        future = r.loader.submit(self._load_signature, model, version)
        try:
            return future.result(timeout=0.05)  # a small model: no pause at all
        except FutureTimeout:
            pass
        consumer = r.consumer
        consumer.pause(self._partitions.hold(consumer.assignment(), LOADING))
        try:
            while not future.done():
                self.health.beat()
                self._defer(consumer.poll(POLL_RECORDS, 0.05))
        finally:
            loaded = self._partitions.release(self._partitions.held(LOADING), LOADING)
            consumer.resume(loaded & consumer.assignment())
        return future.result()

    def _load_signature(self, model: str, version: int | None) -> tuple[Signature, int]:
        with self._r.cache.acquire(model, version) as session:
            return session.signature, session.ref.version

    def _failed(self, slot: Slot, exc: WorkerError, model: str | None) -> None:
        """A transient failure waits and tries again (its partition paused, so order
        holds); anything else, or the last try, becomes the slot's dead letter."""
        delay = self._retries.retry(slot, exc)
        if delay is None:
            slot.out = self._answers.dead_letter(slot, exc, model)
            return
        self.metrics.retries.labels(error_type=exc.error_type).inc()
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

    def _retry_due(self, consumer: Consumer) -> None:
        due, waiting = self._retries.take_due()
        for slot in due:
            if slot.out is None and slot.live and slot.record.tp in self._tracker.partitions():
                self._admit(slot, self._try_marker(slot))
        # A partition with a record waiting for its retry takes nothing new meanwhile.
        assigned = consumer.assignment()
        new = self._partitions.hold(waiting & assigned, RETRY)
        if new:
            consumer.pause(new)
        done = self._partitions.release((self._partitions.held(RETRY) - waiting) & assigned, RETRY)
        if done:
            consumer.resume(done)

    # -- poison pills ------------------------------------------------------------

    def _check_assigned(self) -> None:
        """Read the committed metadata of newly assigned partitions (see the docstring)."""
        consumer, committer = self._r.consumer, self._r.committer
        assigned = consumer.assignment()
        tps = [tp for tp in self._partitions.take_unchecked() if tp in assigned]
        try:
            committed = consumer.committed_metadata(tps)
        except KafkaFailure as exc:
            log.warning("committed offsets unknown (%s): no poison-pill check this time", exc)
            return
        latest = self.settings.kafka_properties.get("auto.offset.reset", "") in LATEST_RESETS
        for tp, (offset, metadata) in committed.items():
            p = plan(offset, metadata, consumer.watermarks(tp), latest=latest)
            careful = p.careful
            if offset is not None:
                committer.found(tp, offset, None if careful is None else careful.until - 1)
            if p.start is not None:
                with _logged(KafkaFailure, f"{tp.topic}[{tp.partition}]: start"):
                    consumer.commit({tp: p.start}, run_marker(p.start - 1))
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

    def _run_carefully(self, slot: Slot, careful: Careful, epoch: int) -> None:
        """Everything before this record is settled: commit ``try:<offset>:<n>``, run it
        alone and wait until it is settled (however long it runs), then commit
        ``offset + 1`` as clean. If it takes the process down, the next owner reads how
        often it did; a record never waits behind a marker that is not its own."""
        consumer = self._r.consumer
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
            self._admit_first(slot, self._try_marker(slot))
            self._dispatch(force=True)
        if self._settle_before(tp, offset + 1):
            live = self._r.committer.epochs.get(tp, 0) == epoch  # not rewound meanwhile
            if live and slot.out is not None and tp in self._partitions:
                # Settled: its marker goes before anything else runs.
                with _logged(KafkaFailure, f"{slot.where}: settled marker"):
                    consumer.commit({tp: offset + 1}, CLEAN)
                    self._r.committer.found(tp, offset + 1)
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

    def _try_marker(self, slot: Slot) -> Callable[[], None] | None:
        """For a careful record: commit ``try:<offset>:<n>`` (called right before it runs,
        its model loaded: a death while loading charges no record)."""
        tp, offset = slot.record.tp, slot.record.offset
        careful = self._partitions.careful(tp)
        if careful is None or not careful.covers(offset):
            return None
        marker = try_marker(offset, careful.attempt(offset))

        def commit() -> None:
            with _logged(KafkaFailure, f"{slot.where}: try marker"):
                self._r.consumer.commit({tp: offset}, marker)

        return commit

    def _settle_before(self, tp: TopicPartition, offset: int) -> bool:
        """Answer and commit every record of ``tp`` before ``offset``, however long that
        takes; meanwhile every partition is paused (records polled before the pause wait
        in the deferred list), the group protocol and health go on. False when a stop
        ended the wait first."""

        def settled() -> bool:
            first = self._tracker.first_offsets().get(tp)
            return first is None or first >= offset

        if settled():
            return True
        consumer, committer = self._r.consumer, self._r.committer
        consumer.pause(self._partitions.hold(consumer.assignment(), CAREFUL))
        try:
            while not settled() and not self._stopping.is_set():
                self._retry_due(consumer)
                self._dispatch(force=True)
                committer.send()
                committer.producer.flush(0.05)
                self._committed(committer.commit(force=True))
                self.health.beat()
                if not settled():
                    self._defer(consumer.poll(POLL_RECORDS, 0.01))
        finally:
            released = self._partitions.release(self._partitions.held(CAREFUL), CAREFUL)
            consumer.resume(released & consumer.assignment())
        return settled()

    def _pump(
        self,
        until: Callable[[], bool],
        deadline: Deadline,
        *,
        flush_s: float,
        metadata: str | None = None,
        poll: bool = False,
    ) -> None:
        """Retry, run, send and commit, forced, until ``until()`` or the deadline; with
        ``poll``, poll (paused) between rounds so the group protocol goes on."""
        consumer, committer = self._r.consumer, self._r.committer
        while not until() and not deadline.passed:
            self._retry_due(consumer)
            self._dispatch(force=True)
            committer.send()
            committer.producer.flush(deadline.left(flush_s))
            self._committed(committer.commit(force=True, metadata=metadata))
            self.health.beat()
            if poll and not until():
                for record in consumer.poll(1, 0.01):
                    # Paused: only a record fetched before the pause; it is not ours
                    # to answer now (the next owner reads it from the committed offset).
                    log.debug("%s: left for after the restart", record.where)

    # -- 3. dispatch (4, the run: worker.inference) ------------------------------

    def _dispatch(self, *, force: bool = False) -> None:
        """Waiting batches go to their run: at once while a run slot is free, else when
        their window closes (all of them, forced)."""
        self._r.inference.dispatch(self._batcher, force=force)

    # -- rebalance (RebalanceHandler; called from inside poll) --------------------

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        log.info("assigned %s", fmt_tps(tps))
        self.metrics.rebalanced(assigned=tps)
        self._partitions.assigned(tps)  # checked on this thread before their first record

    def on_revoked(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int], str]:
        """At-least-once finishes a revoked partition's work (fewer repeats); exactly-once
        abandons it: never committed, the next owner answers it in its own transaction."""
        committer = self._r.committer
        offsets: dict[TopicPartition, int] = {}
        self.metrics.rebalanced(revoked=tps)
        try:
            if committer.finishes_revoked:
                self._dispatch(force=True)
                deadline = Deadline(min(self.settings.drain_timeout_s, 10.0))
                if deadline.wait(lambda: self._tracker.answered(tps), 0.005):
                    offsets, settled = committer.revoke(tps)
                    self.committed_records += settled
                else:
                    log.warning("revoked %s: in-flight work abandoned uncommitted", fmt_tps(tps))
        finally:
            self._forget(tps)
        return offsets, CLEAN  # handed over in order: the next owner need not be careful

    def on_lost(self, tps: list[TopicPartition]) -> None:
        # Evicted: a commit would be refused, and another member owns them now.
        log.warning("lost %s: in-flight work abandoned", fmt_tps(tps))
        self.metrics.rebalanced(revoked=tps)
        self._forget(tps)

    def _forget(self, tps: Collection[TopicPartition]) -> None:
        self._tracker.forget(tps)
        self._partitions.forget(tps)
        self._r.committer.forget(tps)
        self._retries.forget(tps)

    # -- backpressure and lag --------------------------------------------------

    def _backpressure(self, consumer: Consumer) -> None:
        """Pause the partitions holding the most bytes while over the limit; resume each
        as it drains below half its share."""
        limit, parts = self.settings.max_inflight_bytes, self._partitions
        held = self._tracker.bytes_by_partition()
        total = self._tracker.inflight_bytes
        assigned = consumer.assignment()
        paused = parts.held(BACKPRESSURE)
        pause = to_pause(held, total, limit, self._budget.spent_s(), paused) & assigned
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
        self.metrics.paused_partitions.set(len(paused))
        self.metrics.inflight_bytes.set(total)

    def _report_lag(self, consumer: Consumer) -> None:
        now = time.monotonic()
        if now - self._last_lag < 1.0:
            return
        self._last_lag = now
        for tp in consumer.assignment():
            lag = consumer.lag(tp)
            if lag is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    lag
                )

    # -- shutdown --------------------------------------------------------------

    def _drain(self, consumer: Consumer, committer: Committer[Slot]) -> int:
        """Answer and commit everything already polled, within --drain-timeout."""
        deadline = Deadline(self.settings.drain_timeout_s)
        # No new records from here on; poll() still drives the group protocol, so
        # a rebalance under way completes and the last commit can go through.
        assigned = consumer.assignment()
        self._partitions.hold(assigned, DRAINING)
        consumer.pause(assigned)
        self._dispatch(force=True)
        self._pump(
            lambda: not self._tracker.pending(), deadline, flush_s=0.2, metadata=CLEAN, poll=True
        )
        left = self._tracker.pending()
        clean = committer.clean_offsets(consumer.assignment())
        if not left and clean:
            # A clean stop: the next owner need not run anything one at a time.
            with _logged(KafkaFailure, "the clean-stop marker"):
                consumer.commit(clean, CLEAN)
        if left:
            log.error(
                "drain timed out: %d polled records left uncommitted (answered after a restart)",
                left,
            )
            return 1
        log.info("drained: everything polled was answered and committed")
        return 0


@contextmanager
def _logged(kind: type[BaseException], what: str) -> Iterator[None]:
    """Best effort: a failure of ``kind`` is logged, not raised."""
    try:
        yield
    except kind as exc:
        log.warning("%s failed: %s", what, exc)


def run_worker(settings: Settings) -> int:
    return Worker(settings).run()
