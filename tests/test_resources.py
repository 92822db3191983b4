"""What :meth:`~worker.resources.Resources.open` wires, on fake clients (tests/fakes.py).

Each test opens one worker's resources as ``Worker.run()`` does (no loop, no
broker, the real demo model) and drives a collaborator the way the loop would:
a record admitted, its batch run, its answer sent; a partition checked at
assignment; a careful record run. What it asserts is what each wired setting
does: the thread pools' sizes, names and shutdown, the delays and limits
handed on, which collaborator a run reports to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fakes import FakeKafka
from worker.answers import Slot
from worker.demo import write_demo_model
from worker.health import Health
from worker.inference import Loader, session_cache
from worker.kafka import Record, TopicPartition
from worker.observability import Metrics
from worker.offsets import OffsetTracker
from worker.protocol import encode_request
from worker.recovery import Careful
from worker.repository import ModelRef, ModelRepository
from worker.resources import Resources
from worker.runtime import RuntimeOptions, Session, load_session
from worker.settings import Settings
from worker.tracing import Tracing

IN0 = TopicPartition("in", 0)
IN1 = TopicPartition("in", 1)
MODEL = "mnist-mlp"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    write_demo_model(path)
    return path


@dataclass
class Opened:
    r: Resources
    kafka: FakeKafka
    settings: Settings
    metrics: Metrics
    repository: ModelRepository
    tracker: OffsetTracker[TopicPartition, Slot]
    stack: ExitStack


@contextmanager
def opened(
    repo: Path,
    *,
    loader: Loader = load_session,
    device: str = "cpu",
    health: Health | None = None,
    tracing: Tracing | None = None,
    settle_round: Callable[[Opened], None] | None = None,
    **overrides: Any,
) -> Iterator[Opened]:
    """One worker's resources, opened as ``Worker.run()`` opens them (the session
    cache loads on the CPU whatever ``device`` the resources are told)."""
    kafka = FakeKafka()
    s = Settings(
        input_topics=("in",),
        output_topic="out",
        model_repository=repo,
        metrics_port=0,
        device="cpu",
        **overrides,
    )
    metrics, repository = Metrics(), ModelRepository(s.model_repository)
    cache = session_cache(s, "cpu", repository, loader, metrics)
    tracker: OffsetTracker[TopicPartition, Slot] = OffsetTracker()
    holder: list[Opened] = []
    with ExitStack() as stack:
        stack.callback(cache.close)
        r = Resources.open(
            stack,
            s,
            device=device,
            cache=cache,
            repository=repository,
            clients=kafka.clients,
            metrics=metrics,
            health=health or Health(),
            tracing=tracing or Tracing(),
            tracker=tracker,
            stopping=threading.Event(),
            settle_round=lambda: settle_round(holder[0]) if settle_round else None,
        )
        holder.append(Opened(r, kafka, s, metrics, repository, tracker, stack))
        yield holder[0]


def _record(kafka: FakeKafka, tp: TopicPartition, x: float) -> Record:
    value, headers = encode_request(
        {"x": np.full((1, 784), x, np.float32)}, format="msgpack", model=MODEL
    )
    return kafka.consumer.append(tp, value, b"k", headers)


def _admit(o: Opened, record: Record) -> Slot:
    """Step 2 of the loop for one polled record: its slot in line, decoded, batched."""
    slot = Slot(record)
    o.tracker.add(record.tp, slot)
    o.r.intake.admit_first(slot)
    return slot


def _run(o: Opened) -> None:
    """Step 3: every waiting batch to its run; then wait for the runs to end."""
    o.r.inference.dispatch(o.r.batcher, force=True)
    _done, running = wait_for(list(o.r.inference.running), timeout=10)
    assert not running, "a run did not end within 10 s"


def _answered(o: Opened, x: float, tp: TopicPartition = IN0) -> Slot:
    slot = _admit(o, _record(o.kafka, tp, x))
    _run(o)
    return slot


def _sample(o: Opened, name: str) -> float | None:
    return o.metrics.registry.get_sample_value(f"inference_worker_{name}")


class SlowRuns:
    """The real model; a run whose input is ``slow_x`` also sleeps ``seconds`` (wall
    time, no CPU) and whose input is ``bad_x`` raises."""

    def __init__(self, slow_x: float = -1.0, seconds: float = 0.0, bad_x: float = -1.0) -> None:
        self.slow_x, self.seconds, self.bad_x = slow_x, seconds, bad_x

    def __call__(self, ref: ModelRef, options: RuntimeOptions) -> Session:
        session = load_session(ref, options)
        run = session.run

        def slow_run(feeds: dict[str, np.ndarray]) -> dict[str, object]:
            first = next(iter(feeds.values())).flat[0]
            if np.isclose(first, self.bad_x):
                raise RuntimeError("the run broke")
            if np.isclose(first, self.slow_x):
                time.sleep(self.seconds)
            return run(feeds)

        session.run = slow_run  # type: ignore[method-assign]
        return session


# -- the thread pools ----------------------------------------------------------------------


def _pool(r: Resources, which: str) -> ThreadPoolExecutor:
    return r.pool if which == "pool" else r.loader


@pytest.mark.parametrize(("which", "prefix"), [("pool", "infer_"), ("loader", "load_")])
def test_the_pools_threads_are_named_for_what_they_run(repo: Path, which: str, prefix: str) -> None:
    # What an operator reads in py-spy dumps and the JSON log's thread field.
    with opened(repo, inference_threads=2) as o:
        name = _pool(o.r, which).submit(lambda: threading.current_thread().name).result(5)
    assert name.startswith(prefix), name


@pytest.mark.parametrize("which", ["pool", "loader"])
def test_runs_take_inference_threads_at_most_and_loads_one_at_a_time(
    repo: Path, which: str
) -> None:
    # A batch handed to the pool while every slot is busy waits for a thread (a due or
    # full batch is submitted whatever the free slots): --inference-threads bounds the
    # runs at once; the loader loads one model at a time.
    release, second = threading.Event(), threading.Event()
    with opened(repo, inference_threads=1) as o:
        pool = _pool(o.r, which)
        first = pool.submit(release.wait, 5)
        pool.submit(second.set)
        try:
            assert not second.wait(0.2), "a second task ran while the first one held the pool"
        finally:
            release.set()
        assert first.result(5) and second.wait(5)


@pytest.mark.parametrize("which", ["pool", "loader"])
def test_closing_cancels_what_waits_and_does_not_wait_for_what_runs(repo: Path, which: str) -> None:
    release = threading.Event()
    started = threading.Event()

    def stuck() -> bool:
        started.set()
        return release.wait(2)

    try:
        with opened(repo, inference_threads=1) as o:
            pool = _pool(o.r, which)
            running = pool.submit(stuck)
            assert started.wait(5)
            waiting: Future[None] = pool.submit(lambda: None)
        # Out of the run at once: a stuck run or load does not hold the exit, and what
        # waited behind it never starts.
        assert not running.done()
        assert waiting.cancelled()
    finally:
        release.set()


# -- the settings handed on ------------------------------------------------------------------


def test_the_retry_and_batching_settings_reach_their_collaborators(repo: Path) -> None:
    with opened(
        repo,
        retry_attempts=4,
        retry_backoff_ms=250,
        max_batch_rows=16,
        max_batch_delay_ms=25,
        coalesce_below_rows=8,
    ) as o:
        assert (o.r.retries.attempts, o.r.retries.first_backoff_s) == (4, 0.25)
        b = o.r.batcher
        assert (b.max_rows, b.max_delay_s, b.alone_rows) == (16, 0.025, 8)
        # Each model's own batching settings, as the repository reads them.
        assert b.settings_for is not None
        assert b.settings_for(MODEL) == o.repository.settings(MODEL)


@pytest.mark.parametrize(
    ("reset", "start"), [(None, 0), ("earliest", 0), ("latest", 3), ("largest", 3)]
)
def test_a_partition_without_a_committed_offset_starts_where_auto_offset_reset_says(
    repo: Path, reset: str | None, start: int
) -> None:
    properties = {} if reset is None else {"auto.offset.reset": reset}
    with opened(repo, kafka_properties=properties) as o:
        for i in range(3):
            _record(o.kafka, IN0, i)
        o.kafka.consumer.assign({IN0: 0})
        o.r.partitions.assigned([IN0])
        o.r.careful.check_assigned()
        # The start commit: a crash before the first real commit is recognised as one.
        assert [offsets for offsets, _ in o.kafka.consumer.commits] == [{IN0: start}]


# -- a record through the wired collaborators ------------------------------------------------


def test_an_answer_goes_to_the_producer_as_soon_as_its_run_ends(repo: Path) -> None:
    # The model loads on the loader (not preloaded), the run on the pool, and the pool
    # thread hands the answer to the producer: the loop's next send is not waited for.
    with opened(repo) as o:
        slot = _answered(o, 0.5)
        assert slot.out is not None and slot.out.ok and slot.out.topic == "out"
        assert [s.value for s in o.kafka.producer.records] == [slot.out.value]


def test_a_run_that_fails_for_the_last_time_is_dead_lettered(repo: Path) -> None:
    with opened(repo, loader=SlowRuns(bad_x=0.25), retry_attempts=0) as o:
        slot = _answered(o, 0.25)
        assert slot.out is not None and not slot.out.ok
        assert slot.out.topic == o.settings.dead_letter_topic
        assert [s.topic for s in o.kafka.producer.records] == ["in.dlq"]


def test_a_repeated_request_is_answered_from_the_response_cache_and_counted(
    repo: Path,
) -> None:
    with opened(repo, response_cache_size=8) as o:
        first = _answered(o, 0.5)
        again = _admit(o, _record(o.kafka, IN0, 0.5))  # the same bytes: no run
        assert not o.r.inference.running and len(o.r.batcher) == 0
        assert first.out is not None and again.out is not None
        assert first.out.ok and again.out.ok
        assert _sample(o, "response_cache_misses_total") == 1
        assert _sample(o, "response_cache_hits_total") == 1


def test_with_tracing_on_a_batch_and_its_answer_get_their_spans(repo: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with opened(repo, tracing=Tracing(provider)) as o:
        slot = _answered(o, 0.5)
        assert slot.out is not None and slot.out.ok
        o.r.committer.producer.flush(1.0)
        assert o.r.committer.commit(force=True) == 1
    names = sorted(span.name for span in exporter.get_finished_spans())
    assert names == ["decode", "process", "produce", "run"]


@pytest.mark.parametrize(
    ("device", "intra_op_threads", "cpu_time"),
    [("cpu", 1, True), ("cpu", 2, False), ("cuda:0", 1, False)],
)
def test_runs_on_one_cpu_thread_are_timed_by_their_cpu_time(
    repo: Path, device: str, intra_op_threads: int, cpu_time: bool
) -> None:
    # On one CPU thread a pool run's wall time includes waiting for the GIL: its mean
    # run time (what decides to run a model inline) is the run's CPU time instead.
    with opened(
        repo, loader=SlowRuns(0.5, 0.1), device=device, intra_op_threads=intra_op_threads
    ) as o:
        slot = _answered(o, 0.5)
        assert slot.out is not None and slot.out.ok
        [run_s] = o.r.inference.run_s.values()
    assert (run_s < 0.05) == cpu_time, run_s


class WaitedLoads:
    """The real model, loaded only once the loop's thread has polled ``polls`` times
    meanwhile (within 2 s): a load longer than the intake waits for."""

    def __init__(self, kafka: FakeKafka, polls: int) -> None:
        self.kafka, self.polls = kafka, polls

    def __call__(self, ref: ModelRef, options: RuntimeOptions) -> Session:
        deadline = time.monotonic() + 2.0
        while self.kafka.consumer.polls < self.polls and time.monotonic() < deadline:
            time.sleep(0.005)
        return load_session(ref, options)


def test_a_long_load_pauses_the_partitions_keeps_polling_and_stays_live(repo: Path) -> None:
    now = [0.0]
    health = Health(stall_after_s=60.0, clock=lambda: now[0])
    loads: list[WaitedLoads] = []
    with opened(repo, health=health, loader=lambda ref, opts: loads[0](ref, opts)) as o:
        loads.append(WaitedLoads(o.kafka, polls=2))
        o.kafka.consumer.assign({IN0: 0, IN1: 0})
        now[0] = 100.0  # the loop's last pass was long ago
        assert health.liveness() is not None
        record = _record(o.kafka, IN0, 0.5)
        slot = _admit(o, record)
        assert o.kafka.consumer.polls >= 2
        assert health.liveness() is None  # the wait beat the health check
        assert o.kafka.consumer.pauses == [{IN0, IN1}]
        assert o.kafka.consumer.resumes == [{IN0, IN1}]
        assert not o.r.partitions.paused(IN0) and not o.r.partitions.paused(IN1)
        assert o.r.deferred.take() is None  # paused: nothing polled meanwhile
        _run(o)
        assert slot.out is not None and slot.out.ok


def _settling(seen: list[int]) -> Callable[[Opened], None]:
    """The loop's forced round (``Worker._round``), noting how many requests still
    waited in the batcher when it began."""

    def settle(o: Opened) -> None:
        seen.append(len(o.r.batcher))
        o.r.inference.dispatch(o.r.batcher, force=True)
        o.r.committer.send()
        o.r.committer.producer.flush(0.5)
        o.r.committer.commit(force=True)

    return settle


def test_a_careful_record_runs_with_everything_that_waited_for_a_run(repo: Path) -> None:
    # One pool thread, a long batching delay: the request of IN1 waits to coalesce.
    # The careful record of IN0 takes the thread; every waiting batch is then sent to
    # run at once, not kept until the careful record's first settling round.
    seen: list[int] = []
    with opened(
        repo,
        loader=SlowRuns(0.5, 0.2),
        inference_threads=1,
        inline_below_ms=0,  # every run on the pool
        max_batch_delay_ms=10_000,
        settle_round=_settling(seen),
    ) as o:
        o.kafka.consumer.assign({IN0: 0, IN1: 0})
        warm = _answered(o, 0.1, IN1)  # loads the model
        assert warm.out is not None
        _settling([])(o)
        waiting = _admit(o, _record(o.kafka, IN1, 0.2))
        assert len(o.r.batcher) == 1
        o.r.partitions.set_careful(IN0, Careful(start=0, until=1, crashes=0))
        careful = Slot(_record(o.kafka, IN0, 0.5))
        o.tracker.add(IN0, careful)
        o.r.careful.run(careful, Careful(start=0, until=1, crashes=0), 0)
        assert seen and seen[0] == 0, seen
        _run(o)
        assert careful.out is not None and careful.out.ok
        assert waiting.out is not None and waiting.out.ok
