"""What exists only while a worker runs: its clients, its threads, and the collaborators
its loop asks, opened and wired in one place.

:meth:`Resources.open` is called from ``Worker.run()`` once the sessions are
ready; every client and thread pool it opens is closed by the run's
``ExitStack``, in the reverse order. Each field is there for the whole run
(none is optional), so the loop never asks whether one exists.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from threading import Event

from worker.answers import Answers, Slot
from worker.batching import Batcher
from worker.cache import ResponseCache, SessionCache
from worker.careful import CarefulMode
from worker.commit import Committer, committer_for
from worker.connections import Connections
from worker.flow import FlowControl
from worker.health import Health
from worker.inference import Inference
from worker.intake import Deferred, Failures, Intake
from worker.kafka import Admin, Clients, Consumer, TopicPartition
from worker.observability import Metrics
from worker.offsets import OffsetTracker
from worker.partitions import Partitions
from worker.recovery import LATEST_RESETS
from worker.repository import ModelRepository
from worker.retries import Retries
from worker.settings import Settings
from worker.tracing import Tracing

__all__ = ["Resources"]


@dataclass(frozen=True)
class Resources:
    """One worker's run: built by :meth:`open`, closed by the run's ExitStack."""

    cache: SessionCache
    pool: ThreadPoolExecutor  # inference runs
    loader: ThreadPoolExecutor  # model loads, off the polling thread
    admin: Admin
    consumer: Consumer
    committer: Committer[Slot]  # 5 and 6
    connections: Connections  # the output topics' limits, a producer cut for them
    partitions: Partitions  # one state per owned partition
    retries: Retries  # transient failures waiting for their next try
    deferred: Deferred  # polled while a model loaded or a careful record ran
    batcher: Batcher  # 3
    inference: Inference  # 3 and 4
    intake: Intake  # 2
    careful: CarefulMode  # after an unclean stop
    flow: FlowControl  # the in-flight budget, backpressure, poll waits

    @classmethod
    def open(
        cls,
        stack: ExitStack,
        settings: Settings,
        *,
        device: str,
        cache: SessionCache,
        repository: ModelRepository,
        clients: Clients,
        metrics: Metrics,
        health: Health,
        tracing: Tracing,
        tracker: OffsetTracker[TopicPartition, Slot],
        stopping: Event,
        settle_round: Callable[[], None],
    ) -> Resources:
        """Open the clients and pools (``stack`` closes each) and wire the collaborators;
        ``settle_round`` is the loop's forced round, for a careful record settling."""
        s = settings
        pool = ThreadPoolExecutor(s.inference_threads, thread_name_prefix="infer")
        # Never wait for a stuck run on the way out (the CLI exits regardless).
        stack.callback(pool.shutdown, wait=False, cancel_futures=True)
        loader = ThreadPoolExecutor(1, thread_name_prefix="load")
        stack.callback(loader.shutdown, wait=False, cancel_futures=True)
        answers = Answers(s, metrics, tracing=tracing)
        connections = Connections(s, clients, metrics, answers)
        admin = connections.admin()
        stack.callback(admin.close)
        answers.refresh(admin, force=True)
        producer = connections.producer()
        consumer = connections.consumer()
        stack.callback(consumer.close)
        committer = committer_for(
            s.exactly_once,
            tracker,
            consumer,
            producer,
            answers,
            s.commit_interval_ms / 1000,
            reopen=connections.producer,
        )
        metrics.watch_transactions(lambda: committer.aborted)
        stack.callback(lambda: committer.producer.close())
        partitions, deferred = Partitions(), Deferred(committer)
        retries = Retries(s.retry_attempts, s.retry_backoff_ms / 1000)
        failed = Failures(retries, answers, metrics)
        responses = ResponseCache(s.response_cache_size, metrics=metrics)
        batcher = Batcher(
            s.max_batch_rows,
            s.max_batch_delay_ms / 1000,
            s.coalesce_below_rows,
            settings_for=repository.settings,  # per-model batching
        )
        inference = Inference(
            cache,
            pool,
            metrics=metrics,
            answers=answers,
            tracker=tracker,
            responses=responses,
            failed=failed,
            sent=lambda: committer.send(),
            max_rows=s.max_batch_rows,
            slots=s.inference_threads,
            inline_below_ms=s.inline_below_ms,
            one_cpu_thread=device == "cpu" and s.intra_op_threads == 1,
            tracing=tracing,
        )
        intake = Intake(
            answers=answers,
            metrics=metrics,
            responses=responses,
            batcher=batcher,
            submit=inference.submit,
            cover=committer.cover,
            failed=failed,
            cache=cache,
            loader=loader,
            consumer=consumer,
            partitions=partitions,
            deferred=deferred,
            beat=health.beat,
            tracing=tracing,
        )
        careful = CarefulMode(
            consumer=consumer,
            committer=committer,
            partitions=partitions,
            tracker=tracker,
            retries=retries,
            answers=answers,
            admit=intake.admit_first,
            run_now=lambda: inference.dispatch(batcher, force=True),
            settle_round=settle_round,
            deferred=deferred,
            stopping=stopping,
            latest=s.kafka_properties.get("auto.offset.reset", "") in LATEST_RESETS,
        )
        flow = FlowControl(
            s.max_inflight_bytes,
            consumer=consumer,
            committer=committer,
            tracker=tracker,
            partitions=partitions,
            batcher=batcher,
            inference=inference,
            retries=retries,
            metrics=metrics,
        )
        return cls(
            cache=cache,
            pool=pool,
            loader=loader,
            admin=admin,
            consumer=consumer,
            committer=committer,
            connections=connections,
            partitions=partitions,
            retries=retries,
            deferred=deferred,
            batcher=batcher,
            inference=inference,
            intake=intake,
            careful=careful,
            flow=flow,
        )
