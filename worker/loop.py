"""consume -> decode -> batch -> infer -> encode -> produce -> commit.

Follow one record down this file:

1. ``poll()`` (main thread): the record gets a :class:`Slot` at the back of
   its partition's line in the :class:`~worker.offsets.OffsetTracker`; lines
   keep offset order.
2. ``_accept``, then :class:`~worker.intake.Intake`: bytes -> Request ->
   model inputs. Any error turns the slot into a dead letter on the spot (a
   transient one is first retried with backoff, its partition paused); the
   record is never dropped. A model that is not loaded yet loads on another
   thread while this one keeps polling (paused), so the group never loses
   the worker.
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
the middle of one at a time (:mod:`worker.careful`); a record that crashes the
process again and again is dead-lettered after the third crash, however far
past the committed offset: the normal path commits a marker reaching a little
past the highest polled offset (``COVER_AHEAD``) before it hands over a record
past the last one (one commit per poll that goes past it, ``committer.cover``).

Backpressure: when the bytes between steps 1 and 6 reach
``--max-inflight-bytes``, the loop stops polling and waits for acknowledgements
(librdkafka keeps what it prefetched); if that lasts a second, the partitions
holding the most are paused and the loop polls again, so the consumer stays in
its group (:class:`~worker.flow.FlowControl`).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Collection
from contextlib import ExitStack

from worker.answers import Outgoing, Slot
from worker.careful import commit_marker
from worker.commit import Committer
from worker.errors import ConfigError, FatalError, WorkerError
from worker.health import Health
from worker.inference import Loader, session_cache
from worker.kafka import KAFKA, Clients, Consumer, Record, TopicPartition, fmt_tps
from worker.lifecycle import Deadline, install_stop_signals
from worker.observability import HealthServer, Metrics
from worker.offsets import OffsetTracker
from worker.oip import oip_app
from worker.partitions import DRAINING, RETRY
from worker.recovery import CLEAN
from worker.repository import ModelRepository
from worker.resources import Resources
from worker.runtime import load_session, resolve_device
from worker.settings import Settings
from worker.tracing import Tracing

__all__ = ["FatalError", "Outgoing", "Slot", "Worker"]

log = logging.getLogger("worker.loop")


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
        # Liveness fails when nothing is committed for longer than a session timeout.
        session_s = float(settings.kafka_properties.get("session.timeout.ms", 45_000)) / 1000
        self.health = health or Health(commit_stall_after_s=session_s)
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._closed = threading.Event()  # set once run() has closed every client
        self._tracker: OffsetTracker[TopicPartition, Slot] = OffsetTracker()
        self.committed_records = 0
        self._resources: Resources | None = None  # set by run()

    def assignment(self) -> set[TopicPartition]:
        """Partitions this worker owns now (empty before it joined its group)."""
        r = self._resources
        return r.consumer.assignment() if r is not None else set()

    @property
    def _r(self) -> Resources:
        if self._resources is None:
            raise RuntimeError("the worker is not running: call run() first")
        return self._resources

    def stop(self) -> None:
        """Stop polling, drain what is in flight, commit, leave the group."""
        self._stopping.set()

    # -- setup -----------------------------------------------------------------

    def run(self, *, count: int | None = None, timeout: float | None = None) -> int:
        """Serve until ``stop()``, or until ``count`` records are committed, or ``timeout`` s."""
        s = self.settings
        device = resolve_device(s.device)  # a ConfigError naming --device
        self.metrics.set_build_info(kafka_client=s.kafka_client)
        self._closed.clear()
        with ExitStack() as stack:
            stack.callback(self._closed.set)  # the last callback: after every close
            stack.callback(self.tracing.close)
            r = self._resources = self._open(stack, device)
            r.consumer.subscribe(list(s.input_topics), self)
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
            self._serve(r.consumer, r.committer, count, timeout)
            return self._drain(r.consumer, r.committer)

    def _open(self, stack: ExitStack, device: str) -> Resources:
        """Start the health server, load what is preloaded, then open the clients and
        wire the collaborators (:class:`~worker.resources.Resources`); ``stack`` closes each."""
        s, metrics = self.settings, self.metrics
        repository = ModelRepository(s.model_repository)
        cache = session_cache(s, device, repository, self._load, metrics)
        stack.callback(cache.close)
        server = stack.enter_context(
            HealthServer(
                s.metrics_port,
                metrics,
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
        return Resources.open(
            stack,
            s,
            device=device,
            cache=cache,
            repository=repository,
            clients=self._clients,
            metrics=metrics,
            health=self.health,
            tracing=self.tracing,
            tracker=self._tracker,
            stopping=self._stopping,
            settle_round=lambda: self._round(None, 0.05),
        )

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
        r = self._r
        flow, deferred = r.flow, r.deferred
        end = None if timeout is None else Deadline(timeout)
        while not self._stopping.is_set():
            if end is not None and end.passed:
                break
            if count is not None and self.committed_records >= count:
                break
            self.health.beat()
            records: list[Record] = []
            # 1. poll: short waits while answers are being computed. With the in-flight
            # budget spent, wait for acknowledgements instead: librdkafka keeps its
            # prefetch, which a pause throws away (partitions pause only when the
            # budget stays spent, see FlowControl.backpressure).
            waiting = flow.waiting()
            if waiting:
                committer.producer.poll(flow.poll_wait_s())  # acknowledgements: step 6
            else:
                # Epochs from before the poll: a revocation served inside it (librdkafka
                # returns records fetched ahead of it from the same call) makes the
                # revoked partitions' records stale; their next owner reads them.
                epochs = dict(committer.epochs)
                records = consumer.poll(flow.poll_records(), flow.poll_wait_s())
                committer.saw(records)
                for record in records:
                    # 2. decode, bind, batch (or dead-letter)
                    self._accept(record, epochs.get(record.tp, 0))
            while (waited := deferred.take()) is not None:  # polled while a model loaded
                self._accept(*waited)
            self._retry_due(consumer)  # 2 again, for transient failures whose wait is over
            # 3. waiting batches run: at once with a slot free, else when it frees or
            # their window closes
            self._dispatch()
            committer.send()  # 5. dead letters; pool threads send the rest
            # 6. acknowledged heads (or one transaction). On a spent budget at once, not
            # at the next interval: bytes leave the budget when acknowledged (at-least-
            # once, inside this call) or when their transaction commits (exactly-once),
            # and at 275 MB/s of requests 200 ms of them spend 64 MiB. One forced commit
            # per waiting iteration, here, after the waiting poll's acknowledgements.
            self._committed(committer.commit(force=waiting))
            if records:  # 7. run markers moved ahead while no record waits for them
                committer.extend(tp for tp in committer.polled if r.partitions.careful(tp) is None)
            flow.backpressure()
            flow.report_lag()
            r.connections.refresh_limits(r.admin, committer)

    def _committed(self, records: int) -> None:
        if records:
            self.committed_records += records
            self.health.committed()
        self.health.set_pending(self._tracker.pending())

    # -- 2. decode -------------------------------------------------------------

    def _accept(self, record: Record, epoch: int) -> None:
        r = self._r
        if r.deferred.stale(record, epoch):
            return
        if r.partitions.has_unchecked:
            r.careful.check_assigned()
        careful = r.partitions.careful(record.tp)
        if careful is not None and careful.covers(record.offset):
            r.careful.settle_before(record.tp, record.offset)
            if r.deferred.stale(record, epoch):
                return
            if self._stopping.is_set():
                # Not started: left for the next owner, which reads it from the offset
                # committed (clean) by the drain.
                log.debug("%s: stopping; left for after the restart", record.where)
                return
            r.careful.run(self._slot(record), careful, epoch)
            return
        if careful is not None:
            r.partitions.set_careful(record.tp, None)
            log.info("%s[%d]: back to normal", record.topic, record.partition)
        r.intake.admit_first(self._slot(record))

    def _slot(self, record: Record) -> Slot:
        """The record's place in its partition's line, its bytes in the budget."""
        slot = Slot(record)
        self._tracker.add(record.tp, slot)
        self._r.flow.budget.polled(slot.nbytes)
        return slot

    def _retry_due(self, consumer: Consumer) -> None:
        r = self._r
        due, waiting = r.retries.take_due()
        for slot in due:
            if slot.out is None and slot.live and slot.record.tp in self._tracker.partitions():
                r.intake.admit(slot, r.careful.try_marker(slot))
        # A partition with a record waiting for its retry takes nothing new meanwhile.
        assigned, parts = consumer.assignment(), r.partitions
        new = parts.hold(waiting & assigned, RETRY)
        if new:
            consumer.pause(new)
        done = parts.release((parts.held(RETRY) - waiting) & assigned, RETRY)
        if done:
            consumer.resume(done)

    # -- 3. dispatch (4, the run: worker.inference) ------------------------------

    def _dispatch(self, *, force: bool = False) -> None:
        """Waiting batches go to their run: at once while a run slot is free, else when
        their window closes (all of them, forced)."""
        self._r.inference.dispatch(self._r.batcher, force=force)

    def _round(
        self, deadline: Deadline | None, flush_s: float, metadata: str | None = None
    ) -> None:
        """One forced round (a careful record settling, the drain): due retries, every
        waiting batch, 5 and 6; the flush waits at most ``flush_s`` (within ``deadline``)."""
        consumer, committer = self._r.consumer, self._r.committer
        self._retry_due(consumer)
        self._dispatch(force=True)
        committer.send()
        committer.producer.flush(flush_s if deadline is None else deadline.left(flush_s))
        self._committed(committer.commit(force=True, metadata=metadata))
        self.health.beat()

    # -- rebalance (RebalanceHandler; called from inside poll) --------------------

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        log.info("assigned %s", fmt_tps(tps))
        self.metrics.rebalanced(assigned=tps)
        self._r.partitions.assigned(tps)  # checked on this thread before their first record

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
        r = self._r
        self._tracker.forget(tps)
        r.partitions.forget(tps)
        r.committer.forget(tps)
        r.retries.forget(tps)

    # -- shutdown --------------------------------------------------------------

    def _drain(self, consumer: Consumer, committer: Committer[Slot]) -> int:
        """Answer and commit everything already polled, within --drain-timeout."""
        deadline = Deadline(self.settings.drain_timeout_s)
        # No new records from here on; poll() still drives the group protocol, so
        # a rebalance under way completes and the last commit can go through.
        assigned = consumer.assignment()
        self._r.partitions.hold(assigned, DRAINING)
        consumer.pause(assigned)
        self._dispatch(force=True)
        while self._tracker.pending() and not deadline.passed:
            self._round(deadline, 0.2, CLEAN)
            if self._tracker.pending():
                for record in consumer.poll(1, 0.01):
                    # Paused: only a record fetched before the pause; it is not ours
                    # to answer now (the next owner reads it from the committed offset).
                    log.debug("%s: left for after the restart", record.where)
        left = self._tracker.pending()
        clean = committer.clean_offsets(consumer.assignment())
        if not left and clean:
            # A clean stop: the next owner need not run anything one at a time.
            commit_marker(consumer, clean, CLEAN, "the clean-stop marker")
        if left:
            log.error(
                "drain timed out: %d polled records left uncommitted (answered after a restart)",
                left,
            )
            return 1
        log.info("drained: everything polled was answered and committed")
        return 0
