"""consume -> decode -> batch -> infer -> encode -> produce -> commit.

Follow one record down this file:

1. ``poll()`` (main thread): the record gets a :class:`Slot` at the back of
   its partition's line; lines keep offset order.
2. ``_accept``: bytes -> Request -> model inputs. Any error turns the slot
   into a dead letter on the spot; the record is never dropped.
3. ``Batcher``: jobs for the same model and row shape are coalesced; due
   batches go to the inference pool.
4. ``_infer`` (pool thread; ONNX Runtime releases the GIL): one run per
   batch, outputs split per request and encoded into the slot.
5. ``_produce``: each line sends its answered head slots, in offset order.
6. ``_commit``: the acknowledged head of each line is committed; with
   ``--exactly-once`` steps 5 and 6 are one transaction instead.

Backpressure: when the bytes between steps 1 and 6 exceed
``--max-inflight-bytes``, the partitions holding them are paused, and the
loop keeps polling so the consumer stays in its group.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    MessageSizeTooLargeError,
    RebalanceInProgressError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.batching import Batch, Batcher, Job, run_batch, run_mode
from worker.cache import ResponseCache, SessionCache
from worker.config import ConfigError, Settings
from worker.errors import InferenceError, ModelNotFound, TooLarge, WorkerError
from worker.kafka import (
    RevocationHandler,
    committed_or_start,
    fmt_offsets,
    make_consumer,
    make_producer,
)
from worker.observability import Health, HealthServer, Metrics
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
from worker.repository import ModelRepository
from worker.runtime import RuntimeOptions, load_session, resolve_device

__all__ = ["FatalError", "Worker", "run_worker"]

log = logging.getLogger("worker.loop")


class FatalError(RuntimeError):
    """The worker cannot go on without risking loss (e.g. the broker refused an output)."""


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    ok: bool  # a response (True) or a dead letter (False)


@dataclass(eq=False)
class Slot:
    """One input record's place in its partition's line."""

    record: ConsumerRecord
    nbytes: int
    out: Outgoing | None = None  # set once answered, by the main or a pool thread
    acks: list[Any] = field(default_factory=list)
    sent: bool = False
    request: Request | None = None
    bound: Bound | None = None
    cache_key: bytes | None = None  # response-cache key, when that cache is on

    @property
    def where(self) -> str:
        r = self.record
        return f"{r.topic}[{r.partition}]@{r.offset}"


class Worker:
    """The whole pipeline for one process; ``run()`` until ``stop()`` or a bound."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics | None = None, health: Health | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._limits = Limits(
            max_bytes=settings.max_request_bytes or settings.max_message_bytes,
            max_rows=settings.max_request_rows,
        )
        self._batcher = Batcher(
            settings.max_batch_rows,
            settings.max_batch_delay_ms / 1000,
            settings.coalesce_below_rows,
        )
        # Lines are shared by the main thread (append, commit) and the pool
        # threads (send answers as soon as they exist); one lock guards them.
        self._lock = threading.Lock()
        self._lines: dict[TopicPartition, deque[Slot]] = {}  # polled, not yet committed
        self._unsent: dict[TopicPartition, deque[Slot]] = {}  # the tail of each line not yet sent
        self._inflight_bytes = 0
        self._running: set[Future[None]] = set()
        self._to_commit: dict[TopicPartition, OffsetAndMetadata] = {}
        self._uncommitted: dict[TopicPartition, int] = {}  # popped, not yet committed
        self._last_commit = time.monotonic()
        self._paused: set[TopicPartition] = set()
        self._last_lag = 0.0
        self.committed_records = 0
        self._cache: SessionCache | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._responses = ResponseCache(settings.response_cache_size, metrics=self.metrics)

    def assignment(self) -> set[TopicPartition]:
        """Partitions this worker owns now (empty before it joined its group)."""
        consumer = self._consumer
        return set(consumer.assignment()) if consumer is not None else set()

    def stop(self) -> None:
        """Stop polling, drain what is in flight, commit, leave the group."""
        self._stopping.set()

    # -- setup -----------------------------------------------------------------

    def run(self, *, count: int | None = None, timeout: float | None = None) -> int:
        """Serve until ``stop()``, or until ``count`` records are committed, or ``timeout`` s."""
        s = self.settings
        try:
            device = resolve_device(s.device)
        except ValueError as exc:
            raise ConfigError("--device", str(exc)) from None
        options = RuntimeOptions(
            device=device, intra_op_threads=s.intra_op_threads, optimized_dir=s.optimized_dir
        )
        with ExitStack() as stack:
            cache = SessionCache(
                ModelRepository(s.model_repository),
                partial(load_session, options=options),
                max_models=s.cache_max_models,
                max_bytes=s.cache_max_bytes,
                metrics=self.metrics,
            )
            stack.callback(cache.close)
            self._cache = cache
            server = stack.enter_context(HealthServer(s.metrics_port, self.metrics, self.health))
            self.metrics_port = server.port
            for name, version in s.preload:
                try:
                    cache.preload(name, version)
                except WorkerError as exc:
                    raise ConfigError("--preload", f"{name}: {exc}") from None
            self.health.preloaded = True
            self._pool = stack.enter_context(
                ThreadPoolExecutor(s.inference_threads, thread_name_prefix="infer")
            )
            producer = make_producer(s)
            stack.callback(producer.close)
            self._producer = producer
            consumer_box: list[KafkaConsumer] = []
            # At-least-once finishes a revoked partition's work (fewer repeats);
            # exactly-once abandons it: its answers were never committed, so the
            # next owner answers them inside its own transaction.
            listener = RevocationHandler(
                lambda: consumer_box[0],
                ready=(lambda tps: False) if s.exactly_once else self._answered,
                settle=partial(self._settle, producer),
                forget=self._forget,
                timeout_s=0.0 if s.exactly_once else min(s.drain_timeout_s, 10.0),
            )
            consumer = make_consumer(s, listener)
            consumer_box.append(consumer)
            self._consumer = consumer
            stack.callback(consumer.close)
            self.health.broker_ok = True
            self._install_signal_handlers(stack)
            # Start-up objects (modules, sessions, clients) live as long as the
            # process: keep them out of every later collection, whose pauses
            # otherwise show up as tail latency.
            gc.collect()
            gc.freeze()
            log.info(
                "serving %s -> %s (dlq %s, group %s, device %s, metrics :%s)",
                ",".join(s.input_topics),
                s.output_topic,
                s.dead_letter_topic,
                s.group_id,
                device,
                self.metrics_port,
            )
            self._serve(consumer, producer, count, timeout)
            return self._drain(consumer, producer)

    def _install_signal_handlers(self, stack: ExitStack) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded (tests): the owner calls stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, lambda *_: self.stop())
            stack.callback(signal.signal, sig, previous)

    # -- the loop --------------------------------------------------------------

    def _serve(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        count: int | None,
        timeout: float | None,
    ) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.is_set():
            if end is not None and time.monotonic() >= end:
                break
            if count is not None and self.committed_records >= count:
                break
            self.health.beat()
            # 1. poll: short waits while answers are being computed
            polled = consumer.poll(timeout_ms=self._poll_wait_ms())
            for records in polled.values():
                for record in records:
                    self._accept(record)  # 2. decode, bind, batch (or dead-letter)
            # 3. batches whose window closed go to the inference pool
            for batch in self._batcher.due():
                self._submit(batch)
            if self.settings.exactly_once:
                self._transact(consumer, producer)  # 5+6 in one transaction
            else:
                self._produce(producer)  # 5. dead letters; pool threads send the rest
                self._commit(consumer)  # 6. acknowledged heads
            self._backpressure(consumer)
            self._report_lag(consumer)

    def _poll_wait_ms(self) -> float:
        # At-least-once: pool threads send their own answers, so the main thread
        # may wait in poll() for records. A transaction is driven from here, so
        # with --exactly-once it checks back often while answers are due.
        if self.settings.exactly_once and (
            self._running or any(q and q[0].out is not None for q in self._unsent.values())
        ):
            return 2
        deadline = self._batcher.next_deadline()
        if deadline is not None:
            return max(0.0, (deadline - time.monotonic()) * 1000)
        return 100

    # -- 2. decode -------------------------------------------------------------

    def _accept(self, record: ConsumerRecord) -> None:
        value = record.value or b""
        slot = Slot(record, nbytes=len(value))
        tp = TopicPartition(record.topic, record.partition)
        with self._lock:
            self._lines.setdefault(tp, deque()).append(slot)
            self._unsent.setdefault(tp, deque()).append(slot)
            self._inflight_bytes += slot.nbytes
        model: str | None = None
        assert self._cache is not None
        try:
            request = decode_request(
                value,
                list(record.headers or []),
                default_id=f"{record.topic}/{record.partition}/{record.offset}",
                limits=self._limits,
            )
            model = request.model or self.settings.default_model
            if not model:
                raise ModelNotFound(
                    "no model named: expected a `model` header or body field "
                    "(or a worker started with --default-model)"
                )
            with self._cache.acquire(model, request.model_version) as session:
                signature, version = session.signature, session.ref.version
            bound = request.bind(signature)
        except WorkerError as exc:
            slot.out = self._dead_letter(slot, exc, model)
            return
        except Exception as exc:
            slot.out = self._dead_letter(
                slot, InferenceError(f"{type(exc).__name__}: {exc}"), model
            )
            return
        slot.request, slot.bound = request, bound
        if self._responses.enabled:
            # A redelivered duplicate (same bytes, same model version) costs a look-up.
            slot.cache_key = ResponseCache.key(model, version, value)
            cached = self._responses.get(slot.cache_key)
            if cached is not None:
                slot.out = self._response(slot, model, version, cached)  # type: ignore[arg-type]
                slot.request = slot.bound = None
                return
        job = Job(slot, model, version, run_mode(signature), bound.feeds, bound.rows)
        for batch in self._batcher.add(job):
            self._submit(batch)

    def _dead_letter(self, slot: Slot, exc: WorkerError, model: str | None) -> Outgoing:
        r = slot.record
        log.warning(
            "%s -> dead letter (%s): %s",
            slot.where,
            exc.error_type,
            exc.message,
            extra={
                "topic": r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "error_type": exc.error_type,
            },
        )
        self.metrics.dlq.labels(error_type=exc.error_type).inc()
        headers = dlq_headers(
            list(r.headers or []),
            exc,
            topic=r.topic,
            partition=r.partition,
            offset=r.offset,
            model=model,
        )
        return Outgoing(self.settings.dead_letter_topic, r.key, r.value or b"", headers, ok=False)

    # -- 3/4. infer ------------------------------------------------------------

    def _submit(self, batch: Batch) -> None:
        assert self._pool is not None
        future = self._pool.submit(self._infer, batch)
        self._running.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: Future[None]) -> None:
        self._running.discard(future)
        if future.exception() is not None:  # answers stay unsent; the main loop retries
            log.warning("sending from the inference pool failed: %s", future.exception())

    def _infer(self, batch: Batch) -> None:
        """Pool thread: run one batch and put an answer into every slot."""
        assert self._cache is not None
        metrics, model = self.metrics, batch.model
        try:
            with self._cache.acquire(batch.model, batch.version) as session:

                def timed(feeds: dict[str, Any]) -> dict[str, Any]:
                    start = time.monotonic()
                    out = session.run(feeds)
                    metrics.inference_seconds.labels(model=model).observe(time.monotonic() - start)
                    return out

                results = run_batch(
                    timed, batch, self.settings.max_batch_rows, on_run=metrics.batch_rows.observe
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
                metrics.rows.labels(model=model).inc(job.rows)
                if slot.cache_key is not None:
                    self._responses.put(slot.cache_key, result, _nbytes(result))
            except WorkerError as exc:
                slot.out = self._dead_letter(slot, exc, model)
            except Exception as exc:
                slot.out = self._dead_letter(
                    slot, InferenceError(f"{type(exc).__name__}: {exc}"), model
                )
            finally:
                slot.request = slot.bound = None  # let the input buffers go
        if not self.settings.exactly_once and self._producer is not None:
            self._produce(self._producer)  # 5, from this thread: no wait for the next poll

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
        return Outgoing(self.settings.output_topic, r.key, body, headers, ok=True)

    # -- 5/6. produce and commit (at-least-once) -------------------------------

    def _produce(
        self, producer: KafkaProducer, tps: Collection[TopicPartition] | None = None
    ) -> None:
        with self._lock:
            for tp, unsent in self._unsent.items():
                if tps is not None and tp not in tps:
                    continue
                # Stop at the first record still running: answers leave in offset order.
                while unsent and unsent[0].out is not None:
                    slot = unsent[0]
                    slot.acks.append(self._send(producer, slot))  # raises: retried next loop
                    slot.sent = True
                    unsent.popleft()

    def _send(self, producer: KafkaProducer, slot: Slot) -> Any:
        """Send a slot's answer; one the producer refuses as too large becomes a dead letter."""
        o = slot.out
        assert o is not None
        try:
            return producer.send(o.topic, value=o.value, key=o.key, headers=o.headers)
        except MessageSizeTooLargeError as exc:
            if o.ok:  # the response is too large: dead-letter the request instead
                slot.out = self._dead_letter(
                    slot,
                    TooLarge(
                        f"the response of {len(o.value)} bytes is over the producer's "
                        f"limit of {self.settings.max_message_bytes}: {exc}"
                    ),
                    get_header(o.headers, "model"),
                )
            else:  # even the dead letter is: keep its headers, drop the value
                log.error("%s: dead letter too large to publish; value omitted", slot.where)
                slot.out = replace(
                    o,
                    value=b"",
                    headers=[*o.headers, ("value-omitted", str(len(o.value)).encode())],
                )
            return self._send(producer, slot)

    def _pop_acknowledged(self, tps: Collection[TopicPartition] | None = None) -> None:
        now = time.time()
        with self._lock:
            for tp, line in self._lines.items():
                if tps is not None and tp not in tps:
                    continue
                while line and line[0].sent and all(f.is_done for f in line[0].acks):
                    slot = line.popleft()
                    for ack in slot.acks:
                        if ack.failed():
                            raise FatalError(
                                f"{slot.where}: the broker refused its answer: {ack.exception}"
                            )
                    self._retire(slot, now)
                    self._to_commit[tp] = OffsetAndMetadata(slot.record.offset + 1, "", -1)
                    self._uncommitted[tp] = self._uncommitted.get(tp, 0) + 1

    def _retire(self, slot: Slot, now: float) -> None:
        assert slot.out is not None
        self._inflight_bytes -= slot.nbytes
        self.metrics.messages.labels(status="ok" if slot.out.ok else "dlq").inc()
        if slot.record.timestamp and slot.record.timestamp > 0:
            self.metrics.end_to_end_seconds.observe(max(0.0, now - slot.record.timestamp / 1000))

    def _commit(self, consumer: KafkaConsumer, *, force: bool = False) -> None:
        self._pop_acknowledged()
        interval = self.settings.commit_interval_ms / 1000
        if not self._to_commit or (not force and time.monotonic() - self._last_commit < interval):
            return
        offsets, self._to_commit = self._to_commit, {}
        try:
            consumer.commit(offsets)
        except KafkaError as exc:
            if not (
                exc.retriable or isinstance(exc, (RebalanceInProgressError, CommitFailedError))
            ):
                raise
            # A rebalance or a coordinator move is under way: keep the offsets; the
            # next poll() completes the rebalance, then the revocation handler or the
            # next commit sends them.
            log.warning("commit deferred (%s): %s", type(exc).__name__, fmt_offsets(offsets))
            for tp, om in offsets.items():
                if tp not in self._to_commit or self._to_commit[tp].offset < om.offset:
                    self._to_commit[tp] = om
            return
        self._last_commit = time.monotonic()
        self.committed_records += sum(self._uncommitted.pop(tp, 0) for tp in offsets)

    # -- 5+6. exactly-once -----------------------------------------------------

    def _transact(
        self, consumer: KafkaConsumer, producer: KafkaProducer, *, force: bool = False
    ) -> None:
        interval = self.settings.commit_interval_ms / 1000
        if not force and time.monotonic() - self._last_commit < interval:
            return
        window: list[tuple[TopicPartition, Slot]] = []
        for tp, line in self._lines.items():
            for slot in line:
                if slot.out is None:
                    break
                window.append((tp, slot))
        if not window:
            return
        offsets = {tp: OffsetAndMetadata(slot.record.offset + 1, "", -1) for tp, slot in window}
        try:
            producer.begin_transaction()
            for _, slot in window:
                self._send(producer, slot)
            producer.send_offsets_to_transaction(offsets, consumer.group_metadata())
            producer.commit_transaction()
        except KafkaError as exc:
            self._abort(consumer, producer, exc)
            return
        now = time.time()
        for tp, slot in window:
            self._lines[tp].popleft()
            self._unsent[tp].popleft()
            self._retire(slot, now)
        self._last_commit = time.monotonic()
        self.committed_records += len(window)

    def _abort(self, consumer: KafkaConsumer, producer: KafkaProducer, exc: KafkaError) -> None:
        name = type(exc).__name__
        if "Fenced" in name:
            raise FatalError(f"producer fenced ({name}): another worker uses this transactional id")
        log.warning("transaction aborted (%s); rewinding to the last committed offsets", exc)
        try:
            producer.abort_transaction()
        except KafkaError as abort_exc:
            raise FatalError(f"cannot abort the transaction: {abort_exc}") from exc
        for tp in list(self._lines):
            if tp in consumer.assignment():
                committed_or_start(consumer, tp)
        self._forget(list(self._lines))
        self._batcher.clear()  # their records are re-read from the committed offsets

    # -- rebalance -------------------------------------------------------------

    def _answered(self, tps: Collection[TopicPartition]) -> bool:
        """Revocation: every polled record of ``tps`` has its answer (flush their batches)."""
        for batch in self._batcher.due(force=True):
            self._submit(batch)
        return all(s.out is not None for tp in tps for s in self._lines.get(tp, ()))

    def _settle(
        self, producer: KafkaProducer, tps: Collection[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        self._produce(producer, tps)
        producer.flush()
        self._pop_acknowledged(tps)
        with self._lock:
            offsets = {tp: self._to_commit.pop(tp) for tp in tps if tp in self._to_commit}
            self.committed_records += sum(self._uncommitted.pop(tp, 0) for tp in offsets)
        return offsets

    def _forget(self, tps: Collection[TopicPartition]) -> None:
        with self._lock:
            for tp in tps:
                line = self._lines.pop(tp, deque())
                self._unsent.pop(tp, None)
                self._inflight_bytes -= sum(s.nbytes for s in line)
                self._to_commit.pop(tp, None)
                self._uncommitted.pop(tp, None)
                self._paused.discard(tp)

    # -- backpressure and lag --------------------------------------------------

    def _backpressure(self, consumer: KafkaConsumer) -> None:
        limit = self.settings.max_inflight_bytes
        assigned = consumer.assignment()
        if self._inflight_bytes > limit:
            ahead = {tp for tp, line in self._lines.items() if line and tp in assigned}
            new = ahead - self._paused
            if new:
                consumer.pause(*new)
                self._paused |= new
        elif self._paused and self._inflight_bytes < limit // 2:
            consumer.resume(*(self._paused & assigned))
            self._paused.clear()
        self.metrics.paused_partitions.set(len(self._paused))
        self.metrics.inflight_bytes.set(self._inflight_bytes)

    def _report_lag(self, consumer: KafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._last_lag < 1.0:
            return
        self._last_lag = now
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            try:
                position = consumer.position(tp, timeout_ms=0)
            except (KafkaError, AssertionError):
                continue
            if high is not None and position is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, high - position)
                )

    # -- shutdown --------------------------------------------------------------

    def _drain(self, consumer: KafkaConsumer, producer: KafkaProducer) -> int:
        """Answer and commit everything already polled, within --drain-timeout."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # No new records from here on; poll() still drives the group protocol, so
        # a rebalance under way completes and the last commit can go through.
        consumer.pause(*consumer.assignment())
        for batch in self._batcher.due(force=True):
            self._submit(batch)
        while self._pending() and time.monotonic() < deadline:
            if self.settings.exactly_once:
                self._transact(consumer, producer, force=True)
            else:
                self._produce(producer)
                producer.flush(timeout=max(0.1, deadline - time.monotonic()))
                self._commit(consumer, force=True)
            if self._pending():
                consumer.poll(timeout_ms=10)
        left = self._pending()
        if left:
            log.error(
                "drain timed out: %d polled records left uncommitted (answered after a restart)",
                left,
            )
            return 1
        log.info("drained: everything polled was answered and committed")
        return 0

    def _pending(self) -> int:
        """Polled records not yet committed."""
        with self._lock:
            lines = sum(len(line) for line in self._lines.values())
            return lines + sum(self._uncommitted.values())


def _nbytes(outputs: dict[str, Any]) -> int:
    return sum(v.nbytes if hasattr(v, "nbytes") else 64 * len(v) for v in outputs.values())


def run_worker(settings: Settings) -> int:
    return Worker(settings).run()
