"""Dispatch and the run (worker.inference) with a fake session cache and pool."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fakes import Clock
from worker.answers import Outgoing, Slot
from worker.batching import Batch, Batcher, Job, RunMode
from worker.cache import ResponseCache
from worker.demo import write_demo_model
from worker.errors import InferenceError, ModelLoadError, WorkerError
from worker.inference import NEXT_FREE_MIN_S, Inference, session_cache
from worker.kafka import Record
from worker.model_config import ModelSettings
from worker.observability import Metrics
from worker.offsets import OffsetTracker
from worker.repository import ModelRef, ModelRepository
from worker.runtime import RuntimeOptions
from worker.settings import Settings
from worker.tracing import Tracing


class FakeSession:
    def __init__(
        self,
        clock: Clock,
        took_s: float,
        fail: BaseException | None = None,
        labels: bool = False,
        cpu: Clock | None = None,
        cpu_s: float = 0.0,
    ) -> None:
        self.clock, self.took_s, self.fail, self.labels = clock, took_s, fail, labels
        self.cpu, self.cpu_s = cpu, cpu_s  # the CPU time a run takes of its thread

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self.clock.sleep(self.took_s)
        if self.cpu is not None:
            self.cpu.sleep(self.cpu_s)
        if self.fail is not None:
            raise self.fail
        out: dict[str, Any] = {"y": feeds["x"] * 2}
        if self.labels:  # a string output, as ONNX Runtime hands one back: a list
            out["label"] = ["cat"] * len(feeds["x"])
        return out


class FakeCache:
    def __init__(self, session: FakeSession | None, error: Exception | None = None) -> None:
        self.session, self.error = session, error

    @contextmanager
    def acquire(self, model: str, version: int | None) -> Iterator[FakeSession]:
        if self.error is not None:
            raise self.error
        assert self.session is not None
        yield self.session


class FakePool:
    """Runs each submitted call at once; with ``hold``, only when ``finish`` says (a
    busy run slot)."""

    def __init__(self, hold: bool = False) -> None:
        self.submitted: list[Future[None]] = []
        self.batches: list[Batch] = []
        self.hold = hold
        self._held: list[tuple[Future[None], Callable[..., None], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        future: Future[None] = Future()
        self.submitted.append(future)
        self.batches.extend(a for a in args if isinstance(a, Batch))
        if self.hold:
            self._held.append((future, fn, args))
            return future
        fn(*args)
        future.set_result(None)
        return future

    def finish(self) -> None:
        """The oldest held run ends (its done callback frees its slot)."""
        future, fn, args = self._held.pop(0)
        fn(*args)
        future.set_result(None)


class FakeAnswers:
    def response(self, slot: Slot, model: str, version: int, outputs: dict[str, Any]) -> Outgoing:
        body = np.asarray(outputs["y"]).tobytes()
        return Outgoing("out", None, body, [], ok=True)


class Rig:
    def __init__(
        self,
        took_s: float = 0.01,
        fail: BaseException | None = None,
        error: Exception | None = None,
        inline_below_ms: float = 5.0,
        slots: int = 1,
        hold: bool = False,
        responses: int = 0,
        labels: bool = False,
        one_cpu_thread: bool = False,
        cpu_s: float = 0.0,
        max_rows: int = 1024,
        cache: Any = None,
        answers: Any = None,
        tracing: Tracing | None = None,
        pool: Any = None,
    ) -> None:
        self.clock = Clock()
        self.cpu = Clock(50.0)
        session = FakeSession(self.clock, took_s, fail, labels, self.cpu, cpu_s)
        self.pool = pool or FakePool(hold)
        self.tracker: OffsetTracker[Any] = OffsetTracker()
        self.failed: list[tuple[Slot, WorkerError, str | None]] = []
        self.sends = 0
        self.metrics = Metrics()
        self.responses = ResponseCache(responses, metrics=self.metrics)
        self.inference = Inference(
            cache or FakeCache(session, error),  # type: ignore[arg-type]
            self.pool,
            metrics=self.metrics,
            answers=answers or FakeAnswers(),  # type: ignore[arg-type]
            tracker=self.tracker,
            responses=self.responses,
            failed=lambda slot, exc, model: self.failed.append((slot, exc, model)),
            sent=self._sent,
            max_rows=max_rows,
            slots=slots,
            inline_below_ms=inline_below_ms,
            one_cpu_thread=one_cpu_thread,
            tracing=tracing,
            clock=self.clock.monotonic,
            cpu_clock=self.cpu.monotonic,
        )

    def _sent(self) -> None:
        self.sends += 1

    def batch(self, n: int = 2) -> tuple[Batch, list[Slot]]:
        slots, jobs = [], []
        for i in range(n):
            slot = Slot(Record("in", 0, i, None, b"v", [], None), polled=self.clock.monotonic())
            self.tracker.add("in-0", slot)
            x = np.full((1, 3), i, np.float32)
            jobs.append(Job(slot, "m", 1, RunMode.WHOLE, {"x": x}, 1))
            slots.append(slot)
        return Batch("m", 1, jobs), slots

    def job(self, i: int = 0, model: str = "m") -> Job:
        """A one-row coalescible request arriving now on the rig's clock."""
        slot = Slot(Record("in", 0, i, None, b"v", [], None))
        self.tracker.add("in-0", slot)
        x = np.full((1, 3), i, np.float32)
        return Job(slot, model, 1, RunMode.COALESCE, {"x": x}, 1, arrived=self.clock.now)

    def inline_batches(self) -> float:
        v = self.metrics.registry.get_sample_value("inference_worker_inline_batches_total")
        return v or 0.0


def test_a_run_answers_every_slot_counts_the_answer_in_flight_and_sends() -> None:
    rig = Rig()
    batch, slots = rig.batch(2)
    before = rig.tracker.inflight_bytes
    rig.inference.run(batch)
    assert [s.out.value for s in slots] == [
        np.full((1, 3), 2.0 * i, np.float32).tobytes() for i in range(2)
    ]
    assert rig.tracker.inflight_bytes == before + 2 * 12
    assert rig.sends == 1 and rig.failed == []
    assert all(s.request is None and s.bound is None for s in slots)


def test_a_run_observes_queue_time_run_time_and_rows_under_its_model_version() -> None:
    rig = Rig(took_s=0.01)
    batch, _ = rig.batch(2)  # both polled now
    rig.clock.sleep(0.5)  # waiting for their run
    rig.inference.run(batch)

    def sample(name: str) -> float | None:
        labels = {"model": "m", "version": "1"}
        return rig.metrics.registry.get_sample_value(f"inference_worker_{name}", labels)

    assert sample("queue_seconds_count") == 2
    assert sample("queue_seconds_sum") == pytest.approx(2 * 0.5)
    assert sample("inference_seconds_sum") == pytest.approx(0.01)
    assert (sample("batch_rows_count"), sample("batch_rows_sum")) == (1, 2)
    assert sample("rows_total") == 2


def test_the_first_batch_of_a_model_goes_to_the_pool_and_its_run_time_is_learnt() -> None:
    rig = Rig(took_s=0.002)
    batch, _ = rig.batch(1)
    rig.inference.submit(batch)
    assert len(rig.pool.submitted) == 1 and rig.inline_batches() == 0
    assert rig.inference.run_s[("m", 1)] == pytest.approx(0.002)
    assert rig.inference.running == set()  # done: no longer counted as running


def test_a_model_whose_runs_are_short_runs_inline_and_a_slow_one_on_the_pool() -> None:
    rig = Rig(took_s=0.002, inline_below_ms=5.0)
    rig.inference.run_s[("m", 1)] = 0.004
    rig.inference.submit(rig.batch(1)[0])
    assert rig.pool.submitted == [] and rig.inline_batches() == 1
    rig.inference.run_s[("m", 1)] = 0.005  # not shorter than the limit
    rig.inference.submit(rig.batch(1)[0])
    assert len(rig.pool.submitted) == 1


def test_a_careful_records_run_never_takes_the_polling_thread() -> None:
    # A record that may hang the process (careful mode, after an unclean stop) runs on
    # the pool however short its model's runs: the loop must stay free for a stop.
    rig = Rig(took_s=0.002, inline_below_ms=5.0)
    rig.inference.run_s[("m", 1)] = 0.001
    batch, _ = rig.batch(2)
    batch.jobs[1].guarded = True
    rig.inference.submit(batch)
    assert len(rig.pool.submitted) == 1 and rig.inline_batches() == 0


def test_the_mean_run_time_moves_a_fifth_of_the_way_to_each_new_run() -> None:
    rig = Rig(took_s=0.010)
    rig.inference.run_s[("m", 1)] = 0.020
    rig.inference.run(rig.batch(1)[0])
    assert rig.inference.run_s[("m", 1)] == pytest.approx(0.8 * 0.020 + 0.2 * 0.010)


def test_a_load_error_fails_every_job_with_it() -> None:
    error = ModelLoadError("half written")
    rig = Rig(error=error)
    batch, slots = rig.batch(2)
    rig.inference.run(batch)
    assert [(s, e, m) for s, e, m in rig.failed] == [(slots[0], error, "m"), (slots[1], error, "m")]
    assert all(s.out is None for s in slots) and rig.sends == 1


def test_a_crash_in_the_runtime_becomes_an_inference_error_of_each_job() -> None:
    rig = Rig(fail=RuntimeError("segfault-ish"))
    batch, _ = rig.batch(1)
    rig.inference.run(batch)
    ((_, exc, _),) = rig.failed
    assert exc.error_type == "inference-error" and "RuntimeError: segfault-ish" in exc.message


# -- dispatch: run at once when a slot is free, coalesce while all are busy ----------------------

DELAY_S = 0.005


def _batcher(settings: ModelSettings | None = None) -> Batcher:
    return Batcher(1024, DELAY_S, settings_for=None if settings is None else lambda _m: settings)


def _sizes(rig: Rig) -> list[int]:
    return [len(b.jobs) for b in rig.pool.batches]


def test_a_lone_request_with_a_run_slot_free_runs_at_once_without_the_delay() -> None:
    rig, batcher = Rig(hold=True), _batcher()
    for batch in batcher.add(rig.job()):
        rig.inference.submit(batch)
    rig.inference.dispatch(batcher)  # no time has passed: the delay is not over
    assert _sizes(rig) == [1] and len(batcher) == 0


def test_what_one_poll_brought_runs_together_when_a_slot_is_free() -> None:
    rig, batcher = Rig(hold=True), _batcher()
    for i in range(3):
        assert batcher.add(rig.job(i)) == []
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [3]


def test_requests_arriving_while_every_slot_is_busy_coalesce_until_one_frees() -> None:
    # Runs take no time on the rig's clock: the delay cannot be what lets them go.
    rig, batcher = Rig(hold=True, took_s=0.0, inline_below_ms=0.0), _batcher()
    batcher.add(rig.job(0))
    rig.inference.dispatch(batcher)  # the one slot is busy from here on
    for i in (1, 2):
        batcher.add(rig.job(i))
        rig.clock.sleep(0.001)
        rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1] and len(batcher) == 2  # waiting for company: there is some
    rig.pool.finish()  # the slot frees before the delay is over
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1, 2] and len(batcher) == 0


def test_requests_waiting_for_a_busy_slot_go_when_the_delay_passes() -> None:
    rig, batcher = Rig(hold=True), _batcher()
    batcher.add(rig.job(0))
    rig.inference.dispatch(batcher)
    batcher.add(rig.job(1))
    rig.clock.sleep(DELAY_S / 2)
    batcher.add(rig.job(2))
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1]
    rig.clock.sleep(DELAY_S / 2)  # the older one has waited the whole delay
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1, 2]  # queued behind the busy run, both together


def test_a_models_own_delay_bounds_the_wait_for_a_busy_slot() -> None:
    rig, batcher = Rig(hold=True), _batcher(ModelSettings(max_batch_delay_s=0.050))
    batcher.add(rig.job(0))
    rig.inference.dispatch(batcher)
    batcher.add(rig.job(1))
    rig.clock.sleep(DELAY_S * 2)  # past the flag's delay, not the model's
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1]
    rig.clock.sleep(0.050)
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1, 1]


def test_a_model_at_its_instances_waits_though_a_pool_thread_is_free() -> None:
    rig = Rig(hold=True, slots=2, took_s=0.0, inline_below_ms=0.0)
    batcher = _batcher(ModelSettings(instances=1))
    batcher.add(rig.job(0))
    rig.inference.dispatch(batcher)
    batcher.add(rig.job(1))
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1] and len(batcher) == 1
    rig.pool.finish()
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1, 1]


def test_two_pool_threads_take_two_runs_at_once() -> None:
    rig, batcher = Rig(hold=True, slots=2), _batcher()
    batcher.add(rig.job(0))
    rig.inference.dispatch(batcher)
    batcher.add(rig.job(1))
    rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1, 1]


def test_an_inline_model_never_waits_for_the_busy_pool() -> None:
    rig, batcher = Rig(hold=True, took_s=0.001, inline_below_ms=5.0), _batcher()
    batcher.add(rig.job(0, model="slow"))
    rig.inference.dispatch(batcher)  # the pool's one slot is busy with "slow"
    rig.inference.run_s[("m", 1)] = 0.001
    job = rig.job(1)
    batcher.add(job)
    rig.inference.dispatch(batcher)
    assert rig.inline_batches() == 1 and job.token.out is not None and len(batcher) == 0


def test_next_free_is_when_the_run_under_way_should_end_never_sooner_than_a_moment() -> None:
    rig, batcher = Rig(hold=True, inline_below_ms=0.0), _batcher()
    assert rig.inference.next_free() is None
    rig.inference.run_s[("m", 1)] = 0.003
    batcher.add(rig.job(0))
    start = rig.clock.now
    rig.inference.dispatch(batcher)
    assert rig.inference.next_free() == pytest.approx(start + 0.003, abs=1e-9)
    rig.clock.sleep(0.010)  # the run is late: look again in a moment, do not spin
    assert rig.inference.next_free() == pytest.approx(rig.clock.now + NEXT_FREE_MIN_S, abs=1e-9)
    rig.pool.finish()
    assert rig.inference.next_free() is None


def test_a_forced_dispatch_sends_every_waiting_batch_though_the_slots_are_busy() -> None:
    rig, batcher = Rig(hold=True), _batcher()
    batcher.add(rig.job(0))
    rig.inference.dispatch(batcher)
    batcher.add(rig.job(1, model="other"))
    rig.inference.dispatch(batcher, force=True)
    assert _sizes(rig) == [1, 1] and len(batcher) == 0


def test_a_cached_answer_is_kept_at_the_size_of_its_outputs() -> None:
    # The response cache is bounded in bytes: each answer counts its arrays' bytes,
    # and a list output (strings) 64 bytes an item.
    rig = Rig(responses=10, labels=True)
    batch, slots = rig.batch(2)
    for i, slot in enumerate(slots):
        slot.cache_key = b"key-%d" % i
    rig.inference.submit(batch)
    assert all(s.out is not None for s in slots)
    assert len(rig.responses) == 2
    assert rig.responses.nbytes == 2 * (3 * 4 + 64)  # y: 1x3 float32; label: one string
    cached = rig.responses.get(b"key-1")
    assert isinstance(cached, dict) and cached["label"] == ["cat"]


# -- what an operator sees: answers, errors, the learnt run time, spans ---------------------------


class _SendFails(Rig):
    """Handing the answers to the producer fails (a broken producer)."""

    def _sent(self) -> None:
        raise ConnectionError("producer closed")


def test_an_inline_run_that_fails_to_send_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = _SendFails(took_s=0.001, inline_below_ms=5.0)
    rig.inference.run_s[("m", 1)] = 0.001
    batch, slots = rig.batch(1)
    with caplog.at_level(logging.WARNING, logger="worker.inference"):
        rig.inference.submit(batch)  # does not raise: the main loop sends the rest
    assert rig.inline_batches() == 1 and slots[0].out is not None
    assert caplog.messages == ["sending after an inline run failed: producer closed"]


class _Tripling(FakeSession):
    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return {"y": feeds["x"] * 3}


class _Versions:
    """Version 1 doubles, version 2 (the newest: what no version asks for) triples."""

    def __init__(self) -> None:
        self.sessions = {1: FakeSession(Clock(), 0.001), 2: _Tripling(Clock(), 0.001)}

    @contextmanager
    def acquire(self, model: str, version: int | None) -> Iterator[FakeSession]:
        yield self.sessions[2 if version is None else version]


class _NamingAnswers(FakeAnswers):
    """Answers that name the model version they came from, as the real ones do."""

    def response(self, slot: Slot, model: str, version: int, outputs: dict[str, Any]) -> Outgoing:
        out = super().response(slot, model, version, outputs)
        return Outgoing(out.topic, out.key, out.value, [("model-version", b"%d" % version)], True)


def test_a_batch_of_an_older_version_runs_on_that_version_and_its_answers_name_it() -> None:
    rig = Rig(cache=_Versions(), answers=_NamingAnswers())
    batch, slots = rig.batch(2)  # version 1 of "m"
    rig.inference.run(batch)
    assert rig.failed == []
    assert [s.out.value for s in slots] == [
        np.full((1, 3), 2.0 * i, np.float32).tobytes() for i in range(2)
    ]
    assert all(s.out.headers == [("model-version", b"1")] for s in slots)


def test_each_run_has_its_own_span_naming_the_model_version() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rig = Rig(tracing=Tracing(provider))
    rig.inference.run(rig.batch(2)[0])
    runs = [s for s in exporter.get_finished_spans() if s.name == "run"]
    assert [dict(s.attributes or {}) for s in runs] == [{"model": "m", "version": 1}]


def test_on_one_cpu_thread_the_run_time_learnt_is_the_runs_own_cpu_time() -> None:
    # A pool thread's wall time includes its wait for the GIL: not the model's cost.
    rig = Rig(took_s=0.010, one_cpu_thread=True, cpu_s=0.004)
    rig.inference.run(rig.batch(1)[0])
    assert rig.inference.run_s[("m", 1)] == pytest.approx(0.004)


def test_a_request_larger_than_max_rows_runs_in_slices_of_max_rows() -> None:
    rig = Rig(max_rows=2)
    slot = Slot(Record("in", 0, 0, None, b"v", [], None))
    rig.tracker.add("in-0", slot)
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    rig.inference.run(Batch("m", 1, [Job(slot, "m", 1, RunMode.COALESCE, {"x": x}, 5)]))
    assert rig.failed == [] and slot.out is not None and slot.out.value == (x * 2).tobytes()
    labels = {"model": "m", "version": "1"}
    count = rig.metrics.registry.get_sample_value("inference_worker_batch_rows_count", labels)
    total = rig.metrics.registry.get_sample_value("inference_worker_batch_rows_sum", labels)
    assert (count, total) == (3, 5)  # 2 + 2 + 1 rows


def test_a_session_that_cannot_be_had_fails_every_job_as_an_inference_error() -> None:
    rig = Rig(error=OSError("disk gone"))
    batch, slots = rig.batch(2)
    rig.inference.run(batch)
    assert [(s, e.error_type, e.message, m) for s, e, m in rig.failed] == [
        (slot, "inference-error", "OSError: disk gone", "m") for slot in slots
    ]
    assert rig.sends == 1


class _FailsFor(FakeAnswers):
    """Cannot build the answer of the record at ``offset``."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def response(self, slot: Slot, model: str, version: int, outputs: dict[str, Any]) -> Outgoing:
        if slot.record.offset == self.offset:
            raise TypeError("cannot pack object")
        return super().response(slot, model, version, outputs)


def test_an_answer_that_cannot_be_built_fails_its_own_job_only() -> None:
    rig = Rig(answers=_FailsFor(1))
    batch, slots = rig.batch(2)
    rig.inference.run(batch)
    assert [(s, type(e), e.message, m) for s, e, m in rig.failed] == [
        (slots[1], InferenceError, "TypeError: cannot pack object", "m")
    ]
    assert slots[0].out is not None and slots[1].out is None and rig.sends == 1
    assert slots[1].request is None and slots[1].bound is None


def test_a_cached_answer_counts_64_bytes_for_each_item_of_a_list_output() -> None:
    rig = Rig(responses=10, labels=True)
    slot = Slot(Record("in", 0, 0, None, b"v", [], None))
    rig.tracker.add("in-0", slot)
    slot.cache_key = b"key"
    x = np.ones((2, 3), np.float32)
    rig.inference.run(Batch("m", 1, [Job(slot, "m", 1, RunMode.WHOLE, {"x": x}, 2)]))
    assert rig.responses.nbytes == 2 * 3 * 4 + 2 * 64  # y: 2x3 float32; label: two strings


def test_a_model_with_two_instances_takes_two_runs_at_once_and_no_third() -> None:
    rig = Rig(hold=True, slots=3, took_s=0.0, inline_below_ms=0.0)
    batcher = _batcher(ModelSettings(instances=2))
    for i in range(3):
        batcher.add(rig.job(i))
        rig.inference.dispatch(batcher)
    assert _sizes(rig) == [1, 1] and len(batcher) == 1


def test_next_free_of_a_run_whose_mean_is_not_known_yet_is_in_a_moment() -> None:
    rig, batcher = Rig(hold=True, inline_below_ms=0.0), _batcher()
    batcher.add(rig.job(0))  # the model's first run: no mean run time yet
    rig.inference.dispatch(batcher)
    assert rig.inference.next_free() == pytest.approx(rig.clock.now + NEXT_FREE_MIN_S, abs=1e-9)


# -- a run on the pool that fails, the process span, the session cache's wiring -------------------


class _CatchingPool(FakePool):
    """Runs each call at once and keeps what it raised in its future, as a thread pool does."""

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        future: Future[None] = Future()
        self.submitted.append(future)
        try:
            fn(*args)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)
        return future


def test_a_pool_run_that_fails_to_send_is_logged_and_a_good_one_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.inference"):
        good = Rig(pool=_CatchingPool())
        good.inference.submit(good.batch(1)[0])
        assert len(good.pool.submitted) == 1 and caplog.records == []
        rig = _SendFails(pool=_CatchingPool())
        batch, slots = rig.batch(1)
        rig.inference.submit(batch)  # on the pool: its first run
    assert len(rig.pool.submitted) == 1 and slots[0].out is not None
    assert caplog.messages == ["sending from the inference pool failed: producer closed"]
    assert rig.inference.running == set() and rig.inference.next_free() is None


def test_with_tracing_a_submitted_batch_runs_inside_its_process_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rig = Rig(tracing=Tracing(provider))
    batch, slots = rig.batch(2)
    rig.inference.submit(batch)
    assert all(s.out is not None for s in slots) and rig.failed == []
    spans = {s.name: s for s in exporter.get_finished_spans()}
    process = spans["process"]
    assert (process.attributes or {})["messaging.batch.message_count"] == 2
    assert spans["run"].parent is not None
    assert spans["run"].parent.span_id == process.context.span_id


class _Loaded:
    """What the loader hands back: a session of ``ref`` loaded with ``options``."""

    def __init__(self, ref: ModelRef, options: RuntimeOptions) -> None:
        self.ref, self.options, self.device = ref, options, options.device
        self.nbytes = 1000
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _settings(repo: Path, **overrides: Any) -> Settings:
    return Settings(
        input_topics=("in",), output_topic="out", model_repository=repo, metrics_port=0, **overrides
    )


def test_the_session_cache_loads_with_the_settings_runtime_options_and_limits(
    tmp_path: Path,
) -> None:
    write_demo_model(tmp_path)
    s = _settings(
        tmp_path,
        intra_op_threads=3,
        optimized_dir=tmp_path / "optimized",
        cuda_mem_limit=2**30,
        max_batch_rows=64,
        cudnn_conv_algo_search="EXHAUSTIVE",
        cache_max_models=2,
        cache_max_bytes=10**6,
        retry_backoff_ms=500,
    )
    loaded: list[_Loaded] = []

    def load(ref: ModelRef, options: RuntimeOptions) -> Any:
        loaded.append(_Loaded(ref, options))
        return loaded[-1]

    metrics = Metrics()
    cache = session_cache(s, "cpu", ModelRepository(tmp_path), load, metrics)
    with cache.acquire("mnist-mlp", 1):
        pass
    [session] = loaded
    assert session.options == RuntimeOptions(
        device="cpu",
        intra_op_threads=3,
        optimized_dir=tmp_path / "optimized",
        cuda_mem_limit=2**30,
        warmup_max_rows=64,
        cudnn_conv_algo_search="EXHAUSTIVE",
    )
    assert (cache.max_models, cache.max_bytes, cache.retry_after_s) == (2, 10**6, 0.5)
    misses = metrics.registry.get_sample_value("inference_worker_model_cache_misses_total")
    assert misses == 1


def test_on_cuda_an_eviction_reads_the_device_memory_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_demo_model(tmp_path, version=1)
    write_demo_model(tmp_path, version=2)

    def device_memory(device: str) -> tuple[int | None, str]:
        return (123_456, "process") if device == "cuda:0" else (None, "cpu")

    monkeypatch.setattr("worker.inference.device_memory", device_memory)
    metrics = Metrics()
    cache = session_cache(
        _settings(tmp_path, cache_max_models=1),
        "cuda:0",
        ModelRepository(tmp_path),
        lambda ref, options: _Loaded(ref, options),  # type: ignore[arg-type,return-value]
        metrics,
    )
    with cache.acquire("mnist-mlp", 1):
        pass
    assert metrics.registry.get_sample_value("inference_worker_device_memory_bytes") == 0
    with cache.acquire("mnist-mlp", 2):  # the one model there is room for: 1 goes
        pass
    assert metrics.registry.get_sample_value("inference_worker_device_memory_bytes") == 123_456
