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
3. ``Batcher``: jobs for the same model and row shape are coalesced; due
   batches go to the inference pool, or run right here when their model's
   runs are shorter than ``--inline-below-ms`` (``_submit``).
4. ``_infer`` (pool thread; ONNX Runtime releases the GIL): one run per
   batch, outputs split per request and encoded into the slot.
5. ``committer.send``: each line sends its answered head slots, in offset
   order (``_emit`` picks the topic, partition and size check).
6. ``committer.commit``: the acknowledged head of each line is committed;
   with ``--exactly-once`` steps 5 and 6 are one transaction instead
   (:mod:`worker.commit` numbers the steps of both).

Poison pills: offsets carry a marker in their metadata (:mod:`worker.recovery`).
A new owner that finds the last one died mid-stream runs the records it was in
the middle of one at a time (``_run_carefully``); a record that crashes the
process again and again is dead-lettered after the third crash. The normal
path pays nothing for it.

Backpressure: when the bytes between steps 1 and 6 reach
``--max-inflight-bytes``, the loop stops polling and waits for acknowledgements
(librdkafka keeps what it prefetched); if that lasts a second, the partitions
holding the most are paused and the loop polls again, so the consumer stays in
its group.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from worker.batching import Batch, Batcher, Job, run_batch
from worker.cache import ResponseCache, SessionCache
from worker.commit import AtLeastOnce, Committer, Transactional
from worker.errors import (
    ConfigError,
    DecodeError,
    FatalError,
    InferenceError,
    ModelNotFound,
    TooLarge,
    WorkerError,
)
from worker.kafka import (
    Admin,
    ClientConfig,
    Consumer,
    Delivery,
    KafkaFailure,
    Producer,
    Record,
    TopicPartition,
    fmt_tps,
    open_admin,
    open_consumer,
    open_producer,
)
from worker.kafka.partition import output_partition
from worker.observability import Health, HealthServer, Metrics, ModelSeries
from worker.offsets import Entry, OffsetTracker
from worker.protocol import (
    Bound,
    Limits,
    Request,
    decode_request,
    dlq_headers,
    encode_response,
    response_headers,
)
from worker.protocol.headers import get_header
from worker.recovery import CLEAN, RUNNING, Careful, assess, try_marker
from worker.repository import ModelRepository
from worker.runtime import RuntimeOptions, device_memory, load_session, resolve_device
from worker.settings import Settings
from worker.signature import Signature
from worker.tracing import Trace, Tracing

__all__ = [
    "FatalError",
    "Outgoing",
    "Slot",
    "Worker",
    "run_worker",
]

log = logging.getLogger("worker.loop")

# Bytes a record adds to its value inside a one-record batch (batch and record
# headers, with room to spare), for the check against max.message.bytes.
_RECORD_OVERHEAD = 128
_METADATA_REFRESH_S = 30.0
_MAX_BACKOFF_S = 5.0
# How long the loop waits for acknowledgements, not polling, with the in-flight
# budget spent, before the fullest partitions pause (a pause throws librdkafka's
# prefetch away; not polling at all would hold rebalances and max.poll.interval.ms).
_PAUSE_AFTER_S = 1.0
# Past --drain-timeout, the time a stop may take to close the clients before the
# watchdog ends the process (see _install_signal_handlers).
_STOP_SLACK_S = 2.0
# Test-only fault hook: a request with this id aborts the process when it runs,
# as a crash inside a native kernel would (read once; unset in production).
_CRASH_ON = os.environ.get("INFERENCE_WORKER_TEST_CRASH_ON")
_POLL_RECORDS = 500


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[Any, bytes | None]]
    ok: bool  # a response (True) or a dead letter (False)


class Slot(Entry):
    """One input record's place in its partition's line (``out``: its :class:`Outgoing`)."""

    __slots__ = (
        "attempts",
        "bound",
        "cache_key",
        "polled",
        "record",
        "request",
        "series",
        "trace",
    )

    def __init__(self, record: Record) -> None:
        super().__init__(record.offset, len(record.value or b""))
        self.record = record
        self.attempts = 1  # runs so far, counting the one under way
        self.request: Request | None = None
        self.bound: Bound | None = None
        self.cache_key: bytes | None = None  # response-cache key, when that cache is on
        self.polled = time.monotonic()  # for queue_seconds
        self.series: ModelSeries | None = None  # its model version's metrics, once resolved
        self.trace: Trace | None = None  # set while tracing is on

    @property
    def where(self) -> str:
        return self.record.where


class Worker:
    """The whole pipeline for one process; ``run()`` until ``stop()`` or a bound."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        health: Health | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing.from_environment()
        # _infer inside the batch's process span (itself when tracing is off)
        self._run_batch = self.tracing.around_batch(
            self._infer, lambda batch: [job.token.trace for job in batch.jobs]
        )
        self._admit_first = self.tracing.around_decode(self._admit)  # in its decode span
        # Liveness fails when nothing is committed for longer than a session timeout.
        session_s = float(settings.kafka_properties.get("session.timeout.ms", 45_000)) / 1000
        self.health = health or Health(commit_stall_after_s=session_s)
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._closed = threading.Event()  # set once run() has closed every client
        self._limits = Limits(
            max_bytes=settings.max_request_bytes or settings.max_message_bytes,
            max_rows=settings.max_request_rows,
        )
        self._batcher = Batcher(
            settings.max_batch_rows,
            settings.max_batch_delay_ms / 1000,
            settings.coalesce_below_rows,
        )
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        # Transient failures waiting for their next try: (due, slot); pool threads add.
        self._retries: list[tuple[float, Slot]] = []
        self._retries_lock = threading.Lock()
        self._retry_paused: set[TopicPartition] = set()
        self._deferred: deque[Record] = deque()  # polled while a model loaded
        self._loader: ThreadPoolExecutor | None = None
        self._record_bytes = 1024.0  # mean request size, for the poll budget
        self._new_assigned: set[TopicPartition] = set()  # committed metadata not read yet
        self._careful: dict[TopicPartition, Careful] = {}
        self._running: set[Future[None]] = set()
        self._paused: set[TopicPartition] = set()
        self._spent_since: float | None = None  # when the in-flight budget ran out
        self._run_s: dict[tuple[str, int], float] = {}  # mean run time per model version
        # ONNX Runtime runs on the calling thread alone (CPU, one intra-op thread);
        # set by run() once the device is known
        self._one_cpu_thread = False
        self._last_lag = 0.0
        self._last_metadata = 0.0
        self._partitions: dict[str, int | None] = {}  # output/DLQ topic -> partition count
        self._size_limits: dict[str, int] = {}  # output/DLQ topic -> max.message.bytes
        # Answers the broker refused as too large (exactly-once re-reads them after the
        # abort): dead-lettered at once the next time.
        self._refused_large: set[tuple[str, int, int]] = set()
        self.committed_records = 0
        self._cache: SessionCache | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._consumer: Consumer | None = None
        self._committer: Committer | None = None
        self._admin: Admin | None = None
        self._responses = ResponseCache(settings.response_cache_size, metrics=self.metrics)

    def assignment(self) -> set[TopicPartition]:
        """Partitions this worker owns now (empty before it joined its group)."""
        consumer = self._consumer
        return consumer.assignment() if consumer is not None else set()

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
        producer = open_producer(self._client_config("producer", transactional_id=txn))
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
        self._one_cpu_thread = device == "cpu" and s.intra_op_threads == 1
        options = RuntimeOptions(
            device=device,
            intra_op_threads=s.intra_op_threads,
            optimized_dir=s.optimized_dir,
            cuda_mem_limit=s.cuda_mem_limit,
            # Warm up (and measure device memory) at the largest batch a run can have.
            warmup_max_rows=s.max_batch_rows,
        )
        if s.cudnn_conv_algo_search:
            options = replace(options, cudnn_conv_algo_search=s.cudnn_conv_algo_search)
        self.metrics.set_build_info(kafka_client=s.kafka_client)
        self._closed.clear()
        with ExitStack() as stack:
            stack.callback(self._closed.set)  # the last callback: after every close
            stack.callback(self.tracing.close)
            cache = SessionCache(
                ModelRepository(s.model_repository),
                partial(load_session, options=options),
                max_models=s.cache_max_models,
                max_bytes=s.cache_max_bytes,
                metrics=self.metrics,
                # A failed load is remembered no longer than the first retry's wait,
                # so a model file still being written loads on that retry.
                retry_after_s=min(_MAX_BACKOFF_S, s.retry_backoff_ms / 1000),
                on_evict=partial(self._evicted, device) if device.startswith("cuda") else None,
            )
            stack.callback(cache.close)
            self._cache = cache
            server = stack.enter_context(
                HealthServer(s.metrics_port, self.metrics, self.health, bind=s.metrics_bind)
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
            self._pool = pool
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="load")
            stack.callback(self._loader.shutdown, wait=False, cancel_futures=True)
            admin = open_admin(self._client_config("admin"))
            stack.callback(admin.close)
            self._admin = admin
            producer = self._open_producer()
            consumer = open_consumer(self._client_config("consumer", group_id=s.group_id))
            self._consumer = consumer
            stack.callback(consumer.close)
            committer: Committer
            if s.exactly_once:
                txn = Transactional(
                    self._tracker,
                    consumer,
                    producer,
                    self._emit,
                    self._retire,
                    s.commit_interval_ms / 1000,
                    rescue=self._rescue,
                    reopen=self._open_producer,
                )
                self.metrics.watch_transactions(lambda: txn.aborted)
                committer = txn
            else:
                committer = AtLeastOnce(
                    self._tracker,
                    consumer,
                    producer,
                    self._emit,
                    self._retire,
                    s.commit_interval_ms / 1000,
                    rescue=self._rescue,
                )
            self._committer = committer
            stack.callback(lambda: committer.producer.close())
            self._refresh_metadata(force=True)
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

    def _evicted(self, device: str, _sessions: list[Any]) -> None:
        used, _how = device_memory(device)
        if used is not None:
            self.metrics.device_memory_bytes.set(used)

    def _install_signal_handlers(self, stack: ExitStack) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded (tests): the owner calls stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, lambda *_: self.stop())
            stack.callback(signal.signal, sig, previous)
        # That handler runs only once this thread is back in Python. A call stuck in
        # the Kafka client (librdkafka holds a commit for a whole rebalance, and a
        # group whose other member hangs does not settle for its session timeout)
        # would hold the stop past --drain-timeout. Python's C-level handler writes
        # the signal to this pipe at once; a watchdog exits when the drain's time is
        # up, as kill -9 would, which loses nothing: offsets only follow answers.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        stack.callback(os.close, write_fd)  # the watchdog's read ends: it returns
        stack.callback(signal.set_wakeup_fd, signal.set_wakeup_fd(write_fd))
        threading.Thread(
            target=self._exit_if_drain_overruns,
            args=(read_fd,),
            name="drain-watchdog",
            daemon=True,
        ).start()

    def _exit_if_drain_overruns(self, read_fd: int) -> None:
        with open(read_fd, "rb", buffering=0) as signals:
            while (got := signals.read(64)) and not {signal.SIGTERM, signal.SIGINT} & set(got):
                pass
        if not got or self._closed.wait(self.settings.drain_timeout_s + _STOP_SLACK_S):
            return  # stopped in time (or never asked to)
        log.error(
            "still running %g s after the stop signal (--drain-timeout %g): a call into "
            "the Kafka client is stuck; exiting without waiting for it (what was not "
            "committed is answered again after a restart)",
            self.settings.drain_timeout_s + _STOP_SLACK_S,
            self.settings.drain_timeout_s,
        )
        logging.shutdown()
        os._exit(1)

    # -- the loop --------------------------------------------------------------

    def _serve(
        self, consumer: Consumer, committer: Committer, count: int | None, timeout: float | None
    ) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.is_set():
            if end is not None and time.monotonic() >= end:
                break
            if count is not None and self.committed_records >= count:
                break
            self.health.beat()
            # 1. poll: short waits while answers are being computed. With the in-flight
            # budget spent, wait for acknowledgements instead: librdkafka keeps its
            # prefetch, which a pause throws away (partitions pause only when the
            # budget stays spent, see _backpressure).
            if self._budget_spent():
                committer.producer.poll(self._poll_wait_s())
                # Bytes leave the budget when committed: commit what is acknowledged
                # now, not at the next interval (at 275 MB/s of requests, 200 ms of
                # them spend 64 MiB, and every record would wait for the interval).
                self._committed(committer.commit(force=True))
            else:
                for record in consumer.poll(self._poll_records(), self._poll_wait_s()):
                    self._accept(record)  # 2. decode, bind, batch (or dead-letter)
            while self._deferred:  # polled while a model was loading
                self._accept(self._deferred.popleft())
            self._retry_due(consumer)  # 2 again, for transient failures whose wait is over
            # 3. batches whose window closed go to the inference pool
            for batch in self._batcher.due():
                self._submit(batch)
            committer.send()  # 5. dead letters; pool threads send the rest
            self._committed(committer.commit())  # 6. acknowledged heads (or one transaction)
            self._backpressure(consumer)
            self._report_lag(consumer)
            self._refresh_metadata()

    def _budget_spent(self) -> bool:
        """No room in --max-inflight-bytes, for less than _PAUSE_AFTER_S so far."""
        if self._tracker.inflight_bytes < self.settings.max_inflight_bytes:
            self._spent_since = None
            return False
        now = time.monotonic()
        if self._spent_since is None:
            self._spent_since = now
        return now - self._spent_since < _PAUSE_AFTER_S

    def _poll_records(self) -> int:
        """No more records than the in-flight budget has room for, so that one poll
        does not pause its own partitions (a pause throws librdkafka's prefetch away)."""
        room = self.settings.max_inflight_bytes - self._tracker.inflight_bytes
        if room <= 0:
            return 1
        return max(1, min(_POLL_RECORDS, int(room / self._record_bytes)))

    def _poll_wait_s(self) -> float:
        # At-least-once: pool threads send their own answers, so the main thread
        # may wait in poll() for records. A transaction is driven from here, so
        # with --exactly-once it checks back often while answers are due.
        if self.settings.exactly_once and (self._running or self._tracker.has_due_answers()):
            return 0.002
        deadlines = [d for d in (self._batcher.next_deadline(), self._next_retry()) if d]
        if deadlines:
            return max(0.0, min(min(deadlines) - time.monotonic(), 0.1))
        return 0.1

    def _committed(self, records: int) -> None:
        if records:
            self.committed_records += records
            self.health.committed()
        self.health.set_pending(self._tracker.pending())

    # -- 2. decode -------------------------------------------------------------

    def _accept(self, record: Record) -> None:
        if self._new_assigned:
            self._check_assigned()
        slot = Slot(record)
        self._tracker.add(record.tp, slot)
        self._record_bytes += (max(slot.nbytes, 1) - self._record_bytes) / 16  # running mean
        careful = self._careful.get(record.tp)
        if careful is not None:
            if careful.covers(record.offset):
                self._run_carefully(slot, careful)
                return
            del self._careful[record.tp]
            log.info("%s[%d]: back to normal", record.topic, record.partition)
        self._admit_first(slot)

    def _admit(self, slot: Slot) -> None:
        """Decode and bind a slot's request and hand it to the batcher (or fail it)."""
        record = slot.record
        model: str | None = None
        try:
            if record.header_error is not None:
                raise DecodeError(record.header_error)
            request = decode_request(
                record.value,  # type: ignore[arg-type]
                record.headers,
                default_id=f"{record.topic}/{record.partition}/{record.offset}",
                limits=self._limits,
                key=record.key,
            )
            model = request.model or self.settings.default_model
            if not model:
                raise ModelNotFound(
                    "no model named: expected a `model` header or body field "
                    "(or a worker started with --default-model)"
                )
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
                slot.out = self._response(slot, model, version, cached)  # type: ignore[arg-type]
                slot.request = slot.bound = None
                return
        job = Job.for_request(slot, model, version, signature, bound)
        for batch in self._batcher.add(job):
            self._submit(batch)

    def _signature(self, model: str, version: int | None) -> tuple[Signature, int]:
        """The model's signature and version; a model not loaded yet loads on the
        loader thread while this one keeps polling with its partitions paused (a
        load longer than max.poll.interval.ms must not cost the group membership)."""
        assert self._cache is not None and self._loader is not None
        if any(n == model and version in (None, v) for n, v in self._cache.loaded()):
            with self._cache.acquire(model, version) as session:
                return session.signature, session.ref.version
        future = self._loader.submit(self._load_signature, model, version)
        try:
            return future.result(timeout=0.05)  # a small model: no pause at all
        except FutureTimeout:
            pass
        consumer = self._consumer
        assert consumer is not None
        hold = consumer.assignment() - self._paused - self._retry_paused
        consumer.pause(hold)
        try:
            while not future.done():
                self.health.beat()
                self._deferred.extend(consumer.poll(_POLL_RECORDS, 0.05))
        finally:
            consumer.resume(hold & consumer.assignment())
        return future.result()

    def _load_signature(self, model: str, version: int | None) -> tuple[Signature, int]:
        assert self._cache is not None
        with self._cache.acquire(model, version) as session:
            return session.signature, session.ref.version

    def _failed(self, slot: Slot, exc: WorkerError, model: str | None) -> None:
        """A transient failure waits and tries again (its partition paused, so order
        holds); anything else, or the last try, becomes the slot's dead letter."""
        s = self.settings
        if exc.transient and slot.attempts <= s.retry_attempts:
            delay = min(_MAX_BACKOFF_S, s.retry_backoff_ms / 1000 * 2 ** (slot.attempts - 1))
            self.metrics.retries.labels(error_type=exc.error_type).inc()
            log.warning(
                "%s: %s (%s); retry %d of %d in %.2f s",
                slot.where,
                exc.error_type,
                exc.message,
                slot.attempts,
                s.retry_attempts,
                delay,
                extra=_where(slot.record),
            )
            slot.attempts += 1
            with self._retries_lock:
                self._retries.append((time.monotonic() + delay, slot))
            return
        slot.out = self._dead_letter(slot, exc, model)

    def _next_retry(self) -> float | None:
        with self._retries_lock:
            return min((due for due, _ in self._retries), default=None)

    def _retry_due(self, consumer: Consumer) -> None:
        now = time.monotonic()
        with self._retries_lock:
            due = [slot for t, slot in self._retries if t <= now]
            self._retries = [(t, slot) for t, slot in self._retries if t > now]
            waiting = {slot.record.tp for _, slot in self._retries}
        for slot in due:
            if slot.out is None and slot.record.tp in self._tracker.partitions():
                self._admit(slot)
        # A partition with a record waiting for its retry takes nothing new meanwhile.
        assigned = consumer.assignment()
        new = (waiting & assigned) - self._retry_paused - self._paused
        if new:
            consumer.pause(new)
        self._retry_paused |= new
        done = (self._retry_paused - waiting) & assigned
        if done:
            consumer.resume(done - self._paused)
            self._retry_paused -= done

    # -- poison pills ------------------------------------------------------------

    def _check_assigned(self) -> None:
        """Read the committed metadata of newly assigned partitions (see the docstring)."""
        consumer = self._consumer
        assert consumer is not None
        tps = [tp for tp in self._new_assigned if tp in consumer.assignment()]
        self._new_assigned.clear()
        try:
            committed = consumer.committed_metadata(tps)
        except KafkaFailure as exc:
            log.warning("committed offsets unknown (%s): no poison-pill check this time", exc)
            return
        latest = self.settings.kafka_properties.get("auto.offset.reset", "") in (
            "latest",
            "largest",
            "end",
        )
        for tp, (offset, metadata) in committed.items():
            if offset is not None and self._committer is not None:
                self._committer.committed_offsets[tp] = offset
            marks = consumer.watermarks(tp)
            if offset is None:
                # Nothing committed yet: commit the start, so that a crash before the
                # first real commit is recognised as one.
                if marks is not None:
                    start = {tp: marks[1] if latest else marks[0]}
                    with _logged(KafkaFailure, f"{tp.topic}[{tp.partition}]: start"):
                        consumer.commit(start, RUNNING)
                        if self._committer is not None:
                            self._committer.committed_offsets.update(start)
                continue
            careful = assess(offset, metadata, marks[1] if marks is not None else None)
            if careful is None:
                continue
            self._careful[tp] = careful
            log.warning(
                "%s[%d]: the last owner stopped mid-stream at offset %d; records up to %d "
                "run one at a time",
                tp.topic,
                tp.partition,
                offset,
                self._careful[tp].until,
            )

    def _run_carefully(self, slot: Slot, careful: Careful) -> None:
        """Commit everything before this record, then ``try:<offset>:<n>``, then run it
        alone: if it takes the process down, the next owner reads how often it did."""
        consumer, committer = self._consumer, self._committer
        assert consumer is not None and committer is not None
        tp, offset = slot.record.tp, slot.record.offset
        self._settle_before(tp, offset)
        attempt = careful.attempt(offset)
        if careful.give_up(offset):
            slot.out = self._dead_letter(
                slot,
                InferenceError(
                    f"crashed the worker {attempt} times (the process died while running "
                    "it); dead-lettered without running it again"
                ),
                _model_header(slot.record),
            )
            return
        with _logged(KafkaFailure, f"{slot.where}: try marker"):
            consumer.commit({tp: offset}, try_marker(offset, attempt))
        self._admit(slot)
        for batch in self._batcher.due(force=True):
            self._submit(batch)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while slot.out is None and time.monotonic() < deadline and not self._waiting(slot):
            time.sleep(0.001)
        self.health.beat()

    def _settle_before(self, tp: TopicPartition, offset: int) -> None:
        """Answer and commit every record of ``tp`` before ``offset`` (bounded)."""
        committer, consumer = self._committer, self._consumer
        assert committer is not None and consumer is not None
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline:
            first = self._tracker.first_offsets().get(tp)
            if first is None or first >= offset:
                return
            for batch in self._batcher.due(force=True):
                self._submit(batch)
            self._retry_due(consumer)
            committer.send()
            committer.producer.flush(0.05)
            self._committed(committer.commit(force=True))
            self.health.beat()

    def _waiting(self, slot: Slot) -> bool:
        with self._retries_lock:
            return any(s is slot for _, s in self._retries)

    def _dead_letter(self, slot: Slot, exc: WorkerError, model: str | None) -> Outgoing:
        r = slot.record
        log.warning(
            "%s -> dead letter (%s): %s",
            slot.where,
            exc.error_type,
            exc.message,
            extra={**_where(r), "error_type": exc.error_type},
        )
        self.metrics.dlq.labels(error_type=exc.error_type).inc()
        headers = dlq_headers(
            list(r.headers),
            exc,
            topic=r.topic,
            partition=r.partition,
            offset=r.offset,
            model=model,
        )
        if slot.attempts > 1:
            headers.append(("error-attempts", str(slot.attempts).encode()))
        if slot.trace is not None:
            headers = self.tracing.stamp(slot.trace, headers, r, model, None)
        return Outgoing(self.settings.dead_letter_topic, r.key, r.value or b"", headers, ok=False)

    # -- 3/4. infer ------------------------------------------------------------

    def _submit(self, batch: Batch) -> None:
        assert self._pool is not None
        mean_s = self._run_s.get((batch.model, batch.version))
        if mean_s is not None and mean_s * 1000 < self.settings.inline_below_ms:
            # A run this short costs less than handing it to another thread and back
            # (docs/performance.md): run it here, as a one-thread loop would.
            self.metrics.inline_batches.inc()
            try:
                self._run_batch(batch)
            except Exception as exc:  # as from the pool: the main loop sends the rest
                log.warning("sending after an inline run failed: %s", exc)
            return
        future = self._pool.submit(self._run_batch, batch)
        self._running.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: Future[None]) -> None:
        self._running.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # answers stay unsent; the main loop sends them
            log.warning("sending from the inference pool failed: %s", future.exception())

    def _infer(self, batch: Batch) -> None:
        """Pool thread: run one batch and put an answer into every slot."""
        assert self._cache is not None
        metrics, model = self.metrics, batch.model
        series = metrics.series(model, batch.version)
        if _CRASH_ON is not None:
            _crash_if_asked(batch)
        try:
            with self._cache.acquire(batch.model, batch.version) as session:
                series.queued(time.monotonic(), (job.token.polled for job in batch.jobs))

                def timed(feeds: dict[str, Any]) -> dict[str, Any]:
                    start, cpu = time.monotonic(), time.thread_time()
                    with self.tracing.running(model, batch.version):
                        out = session.run(feeds)
                    took = time.monotonic() - start
                    series.inference_seconds.observe(took)
                    # For the inline rule: on one CPU thread, the run's own CPU time (the
                    # wall time of a pool thread includes waiting for the GIL back).
                    run_s = time.thread_time() - cpu if self._one_cpu_thread else took
                    key = (model, batch.version)
                    mean = self._run_s.get(key)
                    self._run_s[key] = run_s if mean is None else 0.8 * mean + 0.2 * run_s
                    return out

                results = run_batch(
                    timed, batch, self.settings.max_batch_rows, on_run=series.batch_rows.observe
                )
        except WorkerError as exc:
            results = [exc] * len(batch.jobs)
        except Exception as exc:
            results = [InferenceError(f"{type(exc).__name__}: {exc}")] * len(batch.jobs)
        for job, result in zip(batch.jobs, results, strict=True):
            slot: Slot = job.token
            try:
                if isinstance(result, WorkerError):
                    raise result
                slot.out = self._response(slot, batch.model, batch.version, result)
                # Answers count against --max-inflight-bytes too, until committed.
                self._tracker.grow(slot, len(slot.out.value))
                series.rows.inc(job.rows)
                if slot.cache_key is not None:
                    self._responses.put(slot.cache_key, result, _nbytes(result))
            except WorkerError as exc:
                self._failed(slot, exc, model)
            except Exception as exc:
                self._failed(slot, InferenceError(f"{type(exc).__name__}: {exc}"), model)
            finally:
                slot.request = slot.bound = None  # let the input buffers go
        committer = self._committer
        if committer is not None:
            committer.send()  # 5, from this thread: no wait for the next poll

    def _response(self, slot: Slot, model: str, version: int, outputs: dict[str, Any]) -> Outgoing:
        assert slot.request is not None
        r = slot.record
        body, content_type = encode_response(
            slot.request,
            slot.bound,
            outputs,
            model=model,
            model_version=version,
            output_format=self.settings.output_format,
        )
        headers = response_headers(
            slot.request,
            content_type=content_type,
            model=model,
            model_version=version,
            topic=r.topic,
            partition=r.partition,
            offset=r.offset,
        )
        if slot.trace is not None:
            headers = self.tracing.stamp(slot.trace, headers, r, model, version)
        return Outgoing(self.settings.output_topic, r.key, body, headers, ok=True)

    # -- 5. what an answer is on the wire ----------------------------------------

    def _emit(self, producer: Producer, entry: Entry) -> Delivery:
        """Send a slot's answer to its partition; one over its topic's limit becomes a
        dead letter, a dead letter over *its* topic's limit keeps its headers and
        drops its value."""
        slot: Slot = entry  # type: ignore[assignment]
        o: Outgoing = slot.out
        size, limit = _record_size(o), self._limit(o.topic)
        if o.ok and (slot.record.topic, slot.record.partition, slot.offset) in self._refused_large:
            size = max(size, limit + 1)  # refused before: the broker's limit is lower
        if o.ok and size > limit:  # the response is too large: dead-letter the request
            o = slot.out = self._dead_letter(
                slot,
                TooLarge(
                    "the response", size, limit, where=f"topic {o.topic!r} (max.message.bytes)"
                ),
                get_header(o.headers, "model"),
            )
        if not o.ok and _record_size(o) > self._limit(o.topic):
            log.error("%s: dead letter too large to publish; value omitted", slot.where)
            o = slot.out = replace(
                o,
                value=b"",
                headers=[*o.headers, ("value-omitted", str(len(o.value)).encode())],
            )
        r = slot.record
        partition = output_partition(r.partition, o.key, self._partitions.get(o.topic))
        return producer.send(o.topic, o.value, o.key, o.headers, partition)

    def _limit(self, topic: str) -> int:
        """The largest record ``topic`` takes: its max.message.bytes, within our clients'."""
        ours = self.settings.max_message_bytes
        return min(self._size_limits.get(topic, ours), ours)

    def _rescue(self, entry: Entry, error: BaseException) -> bool:
        """A delivery the broker refused as too large: the answer becomes a dead letter
        (a dead letter loses its value), and the topic's limit is learnt."""
        if not isinstance(error, KafkaFailure) or not error.too_large:
            return False
        slot: Slot = entry  # type: ignore[assignment]
        o: Outgoing = slot.out
        r = slot.record
        size = _record_size(o)
        self._size_limits[o.topic] = min(self._size_limits.get(o.topic, size), size - 1)
        if o.ok:
            self._refused_large.add((r.topic, r.partition, r.offset))
            slot.out = self._dead_letter(
                slot,
                TooLarge(
                    "the response, refused by the broker",
                    size,
                    self._limit(o.topic),
                    where=f"topic {o.topic!r} (max.message.bytes)",
                ),
                get_header(o.headers, "model"),
            )
            return True
        if o.value:
            log.error("%s: dead letter too large to publish; value omitted", slot.where)
            slot.out = replace(
                o, value=b"", headers=[*o.headers, ("value-omitted", str(len(o.value)).encode())]
            )
            return True
        return False

    def _retire(self, slots: list[Entry]) -> None:
        now = time.time()
        for entry in slots:
            slot: Slot = entry  # type: ignore[assignment]
            if slot.trace is not None:
                self.tracing.delivered(slot.trace)
            series = slot.series or self.metrics.unknown
            out = slot.out
            if out is not None and out.ok:
                series.ok.inc()
            else:
                failure = get_header(out.headers, "error-type") if out is not None else None
                series.failed(failure or "").inc()
            ts = slot.record.timestamp_ms
            if ts and ts > 0:
                series.end_to_end_seconds.observe(max(0.0, now - ts / 1000))

    def _refresh_metadata(self, *, force: bool = False) -> None:
        """Partition counts and max.message.bytes of the output and dead-letter topics."""
        now = time.monotonic()
        if self._admin is None or (not force and now - self._last_metadata < _METADATA_REFRESH_S):
            return
        self._last_metadata = now
        topics = [self.settings.output_topic, self.settings.dead_letter_topic]
        for topic in topics:
            count = self._admin.partitions(topic)
            if count is not None or topic not in self._partitions:
                self._partitions[topic] = count
        self._size_limits.update(self._admin.max_message_bytes(topics))

    # -- rebalance (RebalanceHandler; called from inside poll) --------------------

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        log.info("assigned %s", fmt_tps(tps))
        self.metrics.rebalanced(assigned=tps)
        self._new_assigned.update(tps)  # checked on this thread before their first record

    def on_revoked(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int], str]:
        """At-least-once finishes a revoked partition's work (fewer repeats); exactly-once
        abandons it: never committed, the next owner answers it in its own transaction."""
        committer = self._committer
        offsets: dict[TopicPartition, int] = {}
        self.metrics.rebalanced(revoked=tps)
        try:
            if committer is not None and not self.settings.exactly_once:
                deadline = time.monotonic() + min(self.settings.drain_timeout_s, 10.0)
                for batch in self._batcher.due(force=True):
                    self._submit(batch)
                while not self._tracker.answered(tps) and time.monotonic() < deadline:
                    time.sleep(0.005)
                if self._tracker.answered(tps):
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
        self._paused.difference_update(tps)
        self._retry_paused.difference_update(tps)
        self._new_assigned.difference_update(tps)
        for tp in tps:
            self._careful.pop(tp, None)
            if self._committer is not None:
                self._committer.committed_offsets.pop(tp, None)
        with self._retries_lock:
            self._retries = [(t, s) for t, s in self._retries if s.record.tp not in tps]

    # -- backpressure and lag --------------------------------------------------

    def _backpressure(self, consumer: Consumer) -> None:
        """Pause the partitions holding the most bytes while over the limit; resume each
        as it drains below half its share."""
        limit = self.settings.max_inflight_bytes
        held = self._tracker.bytes_by_partition()
        total = self._tracker.inflight_bytes
        assigned = consumer.assignment()
        spent_s = 0.0 if self._spent_since is None else time.monotonic() - self._spent_since
        if total > limit and spent_s >= _PAUSE_AFTER_S:
            over = total - limit // 2
            pause: set[TopicPartition] = set()
            for tp, nbytes in sorted(held.items(), key=lambda kv: -kv[1]):
                if over <= 0:
                    break
                pause.add(tp)
                over -= nbytes
            new = (pause & assigned) - self._paused
            if new:
                consumer.pause(new)
                self._paused |= new
        if self._paused and total < limit:
            share = max(1, limit // (2 * max(1, len(self._paused))))
            drained = {tp for tp in self._paused if held.get(tp, 0) < share}
            if total < limit // 2:
                drained = set(self._paused)
            # Only what really was resumed leaves the set: a partition the client does
            # not list as assigned right now stays paused in our books and in its.
            resumed = drained & assigned
            if resumed:
                consumer.resume(resumed)
                self._paused -= resumed
        self.metrics.paused_partitions.set(len(self._paused))
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

    def _drain(self, consumer: Consumer, committer: Committer) -> int:
        """Answer and commit everything already polled, within --drain-timeout."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # No new records from here on; poll() still drives the group protocol, so
        # a rebalance under way completes and the last commit can go through.
        consumer.pause(consumer.assignment())
        for batch in self._batcher.due(force=True):
            self._submit(batch)
        while self._tracker.pending() and time.monotonic() < deadline:
            self._retry_due(consumer)
            for batch in self._batcher.due(force=True):
                self._submit(batch)
            committer.send()
            committer.producer.flush(max(0.0, min(0.2, deadline - time.monotonic())))
            self._committed(committer.commit(force=True, metadata=CLEAN))
            if self._tracker.pending():
                for record in consumer.poll(1, 0.01):
                    # Paused: only a record fetched before the pause; it is not ours
                    # to answer now (the next owner reads it from the committed offset).
                    log.debug("%s: left for after the restart", record.where)
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


def _crash_if_asked(batch: Batch) -> None:
    for job in batch.jobs:
        request = job.token.request
        if request is not None and request.request_id == _CRASH_ON:
            log.error("test fault hook: aborting on request %s", _CRASH_ON)
            logging.shutdown()
            os.abort()


def _model_header(record: Record) -> str | None:
    try:
        return get_header(record.headers, "model")
    except WorkerError:
        return None


@contextmanager
def _logged(kind: type[BaseException], what: str) -> Iterator[None]:
    """Best effort: a failure of ``kind`` is logged, not raised."""
    try:
        yield
    except kind as exc:
        log.warning("%s failed: %s", what, exc)


def _where(r: Record) -> dict[str, Any]:
    return {"topic": r.topic, "partition": r.partition, "offset": r.offset}


def _record_size(o: Outgoing) -> int:
    headers = sum(len(k) + len(v or b"") + 4 for k, v in o.headers)
    return len(o.value) + len(o.key or b"") + headers + _RECORD_OVERHEAD


def _nbytes(outputs: dict[str, Any]) -> int:
    return sum(v.nbytes if hasattr(v, "nbytes") else 64 * len(v) for v in outputs.values())


def run_worker(settings: Settings) -> int:
    return Worker(settings).run()
