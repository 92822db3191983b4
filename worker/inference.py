"""Dispatch and the run: steps 3 and 4 of the loop.

Dispatch never makes a request wait for company it will not get: a waiting
group runs at once when its model has a run slot free (a pool thread not busy,
fewer runs of the model than its ``instances``; an inline model always has
one, the loop's own thread), so a request that finds the runs idle runs as it
arrives, together with whatever the same poll brought. Only while every slot
is busy do requests coalesce, until a slot frees (``next_free``, when the
runs under way should end, bounds the loop's poll wait) or the batching delay
passes.

A due batch runs on the inference pool (ONNX Runtime releases the GIL), or
right on the loop's thread when its model's runs are shorter than
``--inline-below-ms``: a run that short costs less than handing it to
another thread and back (docs/performance.md). The mean run time per model
version is learnt from the runs themselves; on one CPU thread it is the run's
own CPU time, since a pool thread's wall time includes waiting for the GIL.
Each job's outputs are encoded into its slot (or its error goes to
``failed``), then ``sent`` hands the answers to the producer at once.
Metrics go to the batch's model version (its ``queue_seconds``: each record's
poll to the start of its run); with tracing on, a batch runs inside its
``process`` span and each ``session.run`` in a ``run`` span.
No Kafka client inside; the clocks are injected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import replace
from typing import Any

from worker.answers import Answers, Slot
from worker.batching import Batch, Batcher, run_batch
from worker.cache import ResponseCache, SessionCache
from worker.errors import InferenceError, WorkerError
from worker.observability import Metrics
from worker.offsets import OffsetTracker
from worker.repository import ModelRef, ModelRepository
from worker.retries import MAX_BACKOFF_S
from worker.runtime import RuntimeOptions, Session, device_memory
from worker.settings import Settings
from worker.tracing import Tracing

__all__ = ["NEXT_FREE_MIN_S", "RUN_TIME_WEIGHT", "Inference", "Loader", "session_cache"]

Loader = Callable[[ModelRef, RuntimeOptions], Session]

log = logging.getLogger(__name__)

RUN_TIME_WEIGHT = 0.2  # of the newest run in the mean run time
# The shortest poll wait for a run slot to free: a run past its mean is checked
# on every such turn, not spun on.
NEXT_FREE_MIN_S = 0.0005


class Inference:
    """Runs batches, inline or on the pool, and puts an answer into every slot."""

    def __init__(
        self,
        cache: SessionCache,
        pool: Executor,
        *,
        metrics: Metrics,
        answers: Answers,
        tracker: OffsetTracker[Any, Slot],
        responses: ResponseCache,
        failed: Callable[[Slot, WorkerError, str | None], None],
        sent: Callable[[], None],
        max_rows: int,
        slots: int,
        inline_below_ms: float,
        one_cpu_thread: bool,
        tracing: Tracing | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._cache, self._pool = cache, pool
        self.metrics, self._answers, self._tracker = metrics, answers, tracker
        self._responses = responses
        self._failed, self._sent = failed, sent
        self._max_rows = max_rows
        self._slots = slots  # pool threads: runs at once
        self._inline_below_ms = inline_below_ms
        # ONNX Runtime runs on the calling thread alone (CPU, one intra-op thread).
        self._one_cpu_thread = one_cpu_thread
        self._clock, self._cpu_clock = clock, cpu_clock
        self.run_s: dict[tuple[str, int], float] = {}  # mean run time per model version
        self.running: set[Future[None]] = set()
        self._tracing = tracing or Tracing()
        # run() inside the batch's process span (run itself when tracing is off)
        self._run = self._tracing.around_batch(
            self.run, lambda batch: [job.token.trace for job in batch.jobs]
        )
        # (model, version, start) of each run on the pool; pool threads remove theirs.
        self._started: dict[Future[None], tuple[str, int, float]] = {}

    def dispatch(self, batcher: Batcher, *, force: bool = False) -> None:
        """3. Due batches (all of them, forced), then waiting ones while a slot is free."""
        for batch in batcher.due(self._clock(), force=force):
            self.submit(batch)
        while (waiting := batcher.take(self.free)) is not None:
            self.submit(waiting)

    def inline(self, model: str, version: int) -> bool:
        """Whether runs of this model version are short enough for the loop's thread."""
        mean_s = self.run_s.get((model, version))
        return mean_s is not None and mean_s * 1000 < self._inline_below_ms

    def free(self, model: str, version: int, instances: int | None = None) -> bool:
        """Whether a run of ``model`` could start now (``instances``: its own limit)."""
        if self.inline(model, version):
            return True
        runs = list(self._started.values())
        if len(runs) >= self._slots:
            return False
        return instances is None or sum(1 for m, _v, _s in runs if m == model) < instances

    def next_free(self) -> float | None:
        """When the earliest pool run under way should end (its mean run time), or
        ``None`` with none running; never sooner than a moment from now."""
        runs = list(self._started.values())
        if not runs:
            return None
        ends = (start + self.run_s.get((m, v), 0.0) for m, v, start in runs)
        return max(min(ends), self._clock() + NEXT_FREE_MIN_S)

    def submit(self, batch: Batch) -> None:
        """3. Run ``batch`` here when its model's runs are short (and it is not a careful
        record's), else on the pool."""
        if self.inline(batch.model, batch.version) and not batch.guarded:
            self.metrics.inline_batches.inc()
            try:
                self._run(batch)
            except Exception as exc:  # as from the pool: the main loop sends the rest
                log.warning("sending after an inline run failed: %s", exc)
            return
        start = self._clock()
        future = self._pool.submit(self._run, batch)
        self.running.add(future)
        self._started[future] = (batch.model, batch.version, start)
        future.add_done_callback(self._finished)

    def _finished(self, future: Future[None]) -> None:
        self._started.pop(future, None)
        self.running.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # answers stay unsent; the main loop sends them
            log.warning("sending from the inference pool failed: %s", future.exception())

    def run(self, batch: Batch) -> None:
        """4. Run one batch and put an answer into every slot; then send them."""
        model, tracing = batch.model, self._tracing
        series = self.metrics.series(model, batch.version)
        try:
            with self._cache.acquire(batch.model, batch.version) as session:
                series.queued(self._clock(), (job.token.polled for job in batch.jobs))

                def timed(feeds: dict[str, Any]) -> dict[str, Any]:
                    start, cpu = self._clock(), self._cpu_clock()
                    with tracing.running(model, batch.version):
                        out = session.run(feeds)
                    took = self._clock() - start
                    series.inference_seconds.observe(took)
                    run_s = self._cpu_clock() - cpu if self._one_cpu_thread else took
                    self._learn((model, batch.version), run_s)
                    return out

                results = run_batch(timed, batch, self._max_rows, on_run=series.batch_rows.observe)
        except WorkerError as exc:
            results = [exc] * len(batch.jobs)
        except Exception as exc:
            results = [InferenceError(f"{type(exc).__name__}: {exc}")] * len(batch.jobs)
        rows = 0
        for job, result in zip(batch.jobs, results, strict=True):
            slot: Slot = job.token
            try:
                if isinstance(result, WorkerError):
                    raise result
                slot.out = self._answers.response(slot, batch.model, batch.version, result)
                # Answers count against --max-inflight-bytes too, until committed.
                self._tracker.grow(slot, len(slot.out.value))
                rows += job.rows
                if slot.cache_key is not None:
                    self._responses.put(slot.cache_key, result, _nbytes(result))
            except WorkerError as exc:
                self._failed(slot, exc, model)
            except Exception as exc:
                self._failed(slot, InferenceError(f"{type(exc).__name__}: {exc}"), model)
            finally:
                slot.request = slot.bound = None  # let the input buffers go
        if rows:
            series.rows.inc(rows)  # once per batch
        self._sent()  # 5, from this thread: no wait for the next poll

    def _learn(self, key: tuple[str, int], run_s: float) -> None:
        mean = self.run_s.get(key)
        self.run_s[key] = (
            run_s if mean is None else (1 - RUN_TIME_WEIGHT) * mean + RUN_TIME_WEIGHT * run_s
        )


def session_cache(
    settings: Settings, device: str, repository: ModelRepository, load: Loader, metrics: Metrics
) -> SessionCache:
    """The sessions the runs use: ``load`` turns a model file of ``repository`` into one."""
    s = settings
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

    def evicted(_sessions: list[Any]) -> None:
        used, _how = device_memory(device)
        if used is not None:
            metrics.device_memory_bytes.set(used)

    return SessionCache(
        repository,
        lambda ref: load(ref, options),
        max_models=s.cache_max_models,
        max_bytes=s.cache_max_bytes,
        metrics=metrics,
        # A failed load is remembered no longer than the first retry's wait,
        # so a model file still being written loads on that retry.
        retry_after_s=min(MAX_BACKOFF_S, s.retry_backoff_ms / 1000),
        on_evict=evicted if device.startswith("cuda") else None,
    )


def _nbytes(outputs: dict[str, Any]) -> int:
    return sum(v.nbytes if hasattr(v, "nbytes") else 64 * len(v) for v in outputs.values())
