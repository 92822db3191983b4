"""Dispatch and the run (worker.inference) with a fake session cache and pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from tests.fakes import Clock
from worker.answers import Outgoing, Slot
from worker.batching import Batch, Job, RunMode
from worker.cache import ResponseCache
from worker.errors import ModelLoadError, WorkerError
from worker.inference import Inference
from worker.kafka import Record
from worker.observability import Metrics
from worker.offsets import OffsetTracker


class FakeSession:
    def __init__(self, clock: Clock, took_s: float, fail: BaseException | None = None) -> None:
        self.clock, self.took_s, self.fail = clock, took_s, fail

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self.clock.sleep(self.took_s)
        if self.fail is not None:
            raise self.fail
        return {"y": feeds["x"] * 2}


class FakeCache:
    def __init__(self, session: FakeSession | None, error: WorkerError | None = None) -> None:
        self.session, self.error = session, error

    @contextmanager
    def acquire(self, model: str, version: int | None) -> Iterator[FakeSession]:
        if self.error is not None:
            raise self.error
        assert self.session is not None
        yield self.session


class FakePool:
    def __init__(self) -> None:
        self.submitted: list[Future[None]] = []

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        future: Future[None] = Future()
        self.submitted.append(future)
        fn(*args)
        future.set_result(None)
        return future


class FakeAnswers:
    def response(self, slot: Slot, model: str, version: int, outputs: dict[str, Any]) -> Outgoing:
        body = np.asarray(outputs["y"]).tobytes()
        return Outgoing("out", None, body, [], ok=True)


class Rig:
    def __init__(
        self,
        took_s: float = 0.01,
        fail: BaseException | None = None,
        error: WorkerError | None = None,
        inline_below_ms: float = 5.0,
    ) -> None:
        self.clock = Clock()
        self.cpu = Clock(0.0)
        self.pool = FakePool()
        self.tracker: OffsetTracker[Any] = OffsetTracker()
        self.failed: list[tuple[Slot, WorkerError, str | None]] = []
        self.sends = 0
        self.metrics = Metrics()
        self.inference = Inference(
            FakeCache(FakeSession(self.clock, took_s, fail), error),  # type: ignore[arg-type]
            self.pool,
            metrics=self.metrics,
            answers=FakeAnswers(),  # type: ignore[arg-type]
            tracker=self.tracker,
            responses=ResponseCache(0, metrics=self.metrics),
            failed=lambda slot, exc, model: self.failed.append((slot, exc, model)),
            sent=self._sent,
            max_rows=1024,
            inline_below_ms=inline_below_ms,
            one_cpu_thread=False,
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
