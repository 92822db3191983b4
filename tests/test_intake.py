"""Step 2 (worker.intake) on fakes: decode, load, bind, batch; failures; deferred records."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fakes import FakeConsumer, RealClock
from worker.answers import Answers, Slot
from worker.batching import Batch, Batcher
from worker.cache import ResponseCache
from worker.errors import DecodeError, InferenceError, ModelLoadError, WorkerError
from worker.flow import POLL_RECORDS
from worker.intake import Deferred, Failures, Intake
from worker.kafka import Record, TopicPartition
from worker.observability import Metrics
from worker.partitions import LOADING, RETRY, Partitions
from worker.protocol import encode_request
from worker.retries import Retries
from worker.settings import Settings
from worker.signature import Signature, TensorSpec
from worker.tracing import Tracing

A, B = TopicPartition("in", 0), TopicPartition("in", 1)
SIGNATURE = Signature(
    inputs=(TensorSpec("x", "tensor(float)", np.dtype("float32"), (None, 3)),), outputs=()
)


def _record(tp: TopicPartition, offset: int, value: bytes = b"", headers: Any = None) -> Record:
    return Record(tp.topic, tp.partition, offset, None, value, list(headers or []), 1)


def _request(
    tp: TopicPartition, offset: int, model: str = "m", version: int | None = None, x: float = 1.0
) -> Record:
    value, headers = encode_request(
        {"x": np.full((1, 3), x, np.float32)}, format="msgpack", model=model, model_version=version
    )
    return _record(tp, offset, value, headers)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        input_topics=("in",), output_topic="out", model_repository=tmp_path, device="cpu"
    )


# -- deferred records -----------------------------------------------------------------------------


def test_deferred_records_come_back_in_order_with_their_epoch_then() -> None:
    committer = SimpleNamespace(epochs={B: 2}, saw=lambda records: None)
    deferred = Deferred(committer)  # type: ignore[arg-type]
    first, second = _record(A, 0), _record(B, 7)
    deferred.defer([first, second])
    committer.epochs[A] = 1  # A rewound after its record was polled
    assert deferred.take() == (first, 0) and deferred.take() == (second, 2)
    assert deferred.take() is None
    assert deferred.stale(first, 0) and not deferred.stale(second, 2)


# -- failures -------------------------------------------------------------------------------------


def _failures(settings: Settings, attempts: int) -> tuple[Failures, Retries, Metrics]:
    metrics = Metrics()
    retries = Retries(attempts, 0.1)
    return Failures(retries, Answers(settings, metrics), metrics), retries, metrics


def test_a_transient_failure_with_tries_left_waits_for_its_retry(settings: Settings) -> None:
    failed, retries, metrics = _failures(settings, 1)
    slot = Slot(_record(A, 0))
    failed(slot, ModelLoadError("still being written"), "m")
    assert slot.out is None and retries.waiting(slot) and slot.attempts == 2
    labels = {"error_type": ModelLoadError.error_type}
    assert metrics.registry.get_sample_value("inference_worker_retries_total", labels) == 1
    failed(slot, ModelLoadError("still being written"), "m")  # its last try failed too
    assert slot.out is not None and not slot.out.ok and slot.out.topic == settings.dead_letter_topic
    assert ("error-attempts", b"2") in slot.out.headers


def test_a_retry_is_logged_with_the_record_its_error_and_which_try_comes_when(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    failed, _, _ = _failures(settings, 2)
    slot = Slot(_record(A, 7))
    with caplog.at_level(logging.WARNING, logger="worker.loop"):
        failed(slot, ModelLoadError("still being written"), "m")
        failed(slot, ModelLoadError("still being written"), "m")
    assert caplog.messages == [
        "in[0]@7: model-load-error (still being written); retry 1 of 2 in 0.10 s",
        "in[0]@7: model-load-error (still being written); retry 2 of 2 in 0.20 s",
    ]
    # the JSON log names the record in its own fields
    first = caplog.records[0]
    assert (first.topic, first.partition, first.offset) == ("in", 0, 7)  # type: ignore[attr-defined]


def test_a_permanent_failure_is_dead_lettered_at_once(settings: Settings) -> None:
    failed, retries, _ = _failures(settings, 3)
    slot = Slot(_record(A, 0))
    failed(slot, DecodeError("not msgpack"), None)
    assert slot.out is not None and not slot.out.ok and not retries.waiting(slot)
    assert "model" not in dict(slot.out.headers)
    # a request whose model was known names it in its dead letter
    named = Slot(_record(A, 1))
    failed(named, DecodeError("bad tensor"), "mnist-mlp")
    assert named.out is not None and dict(named.out.headers)["model"] == b"mnist-mlp"


# -- intake ---------------------------------------------------------------------------------------


class _Cache:
    """A session cache whose loads wait for ``release`` (set at once unless a test holds it);
    a model's latest version is ``latest``."""

    def __init__(self) -> None:
        self.loaded_models: list[tuple[str, int]] = []
        self.release = threading.Event()
        self.release.set()
        self.loads = 0
        self.latest = 1

    def loaded(self) -> list[tuple[str, int]]:
        return list(self.loaded_models)

    def peek(self, model: str, version: int | None) -> Any:
        version = self.latest if version is None else version
        if (model, version) not in self.loaded_models:
            return None
        return SimpleNamespace(signature=SIGNATURE, ref=SimpleNamespace(version=version))

    @contextmanager
    def acquire(self, model: str, version: int | None) -> Iterator[Any]:
        version = self.latest if version is None else version
        if (model, version) not in self.loaded_models:
            self.loads += 1
            self.release.wait(10)
            self.loaded_models.append((model, version))
        yield SimpleNamespace(signature=SIGNATURE, ref=SimpleNamespace(version=version))


class _Consumer(FakeConsumer):
    """Its next poll also returns ``prefetched``, paused or not (as librdkafka's may)."""

    def __init__(self) -> None:
        super().__init__({}, [A, B], clock=RealClock())
        self.prefetched: list[Record] = []
        self.max_records: list[int] = []  # what each poll asked for at most

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self.max_records.append(max_records)
        got, self.prefetched = self.prefetched, []
        return got + super().poll(max_records, timeout_s)


class _Rig:
    def __init__(
        self, settings: Settings, *, cached: int = 0, tracing: Tracing | None = None
    ) -> None:
        self.consumer = _Consumer()
        self.partitions = Partitions()
        self.committer = SimpleNamespace(epochs={}, saw=lambda records: None)
        self.deferred = Deferred(self.committer)  # type: ignore[arg-type]
        self.cache = _Cache()
        self.batcher = Batcher(max_rows=1, max_delay_s=1.0)
        self.submitted: list[Batch] = []
        self.covered: list[tuple[TopicPartition, int]] = []
        self.failures: list[tuple[Slot, WorkerError, str | None]] = []
        self.beats = 0
        self.loader = ThreadPoolExecutor(1)
        self.responses = ResponseCache(cached)
        self.answers = Answers(settings, Metrics())
        self.intake = Intake(
            answers=self.answers,
            metrics=Metrics(),
            responses=self.responses,
            batcher=self.batcher,
            submit=self.submitted.append,
            cover=lambda tp, offset: self.covered.append((tp, offset)),
            failed=lambda slot, exc, model: self.failures.append((slot, exc, model)),
            cache=self.cache,  # type: ignore[arg-type]
            loader=self.loader,
            consumer=self.consumer,
            partitions=self.partitions,
            deferred=self.deferred,
            beat=self._beat,
            tracing=tracing or Tracing(),
        )

    def _beat(self) -> None:
        self.beats += 1


@pytest.fixture
def rig(settings: Settings) -> Iterator[_Rig]:
    r = _Rig(settings)
    yield r
    r.cache.release.set()
    r.loader.shutdown(wait=True)


def test_a_request_is_decoded_bound_and_batched(rig: _Rig) -> None:
    slot = Slot(_request(A, 0))
    rig.intake.admit(slot)
    assert rig.failures == [] and slot.bound is not None and slot.series is not None
    [batch] = rig.submitted  # max_rows=1: due at once
    assert batch.model == "m" and batch.version == 1 and batch.jobs[0].token is slot


def test_a_record_that_does_not_decode_fails_with_no_model(rig: _Rig) -> None:
    slot = Slot(_record(A, 0, b"\xc1 not msgpack", [("content-type", b"application/msgpack")]))
    rig.intake.admit(slot)
    [(failed, exc, model)] = rig.failures
    assert failed is slot and isinstance(exc, WorkerError) and model is None
    assert rig.submitted == [] and len(rig.batcher) == 0


def test_an_unexpected_error_fails_the_slot_as_an_inference_error(rig: _Rig) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("boom")

    rig.intake.signature = broken  # type: ignore[method-assign]
    slot = Slot(_request(A, 0))
    rig.intake.admit(slot)
    [(failed, exc, model)] = rig.failures
    assert failed is slot and isinstance(exc, InferenceError)
    assert "RuntimeError: boom" in exc.message
    assert model == "m"


def test_before_run_is_called_once_the_model_is_loaded_right_before_batching(rig: _Rig) -> None:
    seen: list[tuple[int, int]] = []
    slot = Slot(_request(A, 0))
    rig.intake.admit(slot, lambda: seen.append((rig.cache.loads, len(rig.submitted))))
    assert seen == [(1, 0)] and len(rig.submitted) == 1
    bad = Slot(_record(A, 1, b"\xc1", [("content-type", b"application/msgpack")]))
    rig.intake.admit(bad, lambda: seen.append((-1, -1)))
    assert seen == [(1, 0)]  # a request that fails never gets its marker


def test_a_slow_load_pauses_every_partition_keeps_polling_and_defers_what_comes(
    rig: _Rig,
) -> None:
    rig.consumer.pause(rig.partitions.hold([B], RETRY))  # B waits for a retry already
    prefetched = _record(A, 5, b"fetched before the pause")
    rig.consumer.prefetched.append(prefetched)
    rig.cache.release.clear()
    threading.Timer(0.3, rig.cache.release.set).start()
    rig.intake.admit(Slot(_request(A, 0)))
    assert rig.consumer.pauses[-1] == {A}  # B was paused already
    assert rig.consumer.resumes == [{A}]  # and stays paused for its retry
    assert rig.partitions.held(LOADING) == set() and rig.partitions.paused(B)
    assert rig.beats > 0 and len(rig.submitted) == 1
    assert rig.deferred.take() == (prefetched, 0) and rig.deferred.take() is None
    assert set(rig.consumer.max_records) == {POLL_RECORDS}  # polled as the loop does


def test_a_quick_load_pauses_nothing(rig: _Rig) -> None:
    rig.intake.admit(Slot(_request(A, 0)))
    assert rig.consumer.pauses == [] and rig.consumer.resumes == [] and rig.beats == 0


def test_a_cached_response_answers_without_a_run(settings: Settings) -> None:
    rig = _Rig(settings, cached=8)
    try:
        first = Slot(_request(A, 0))
        rig.intake.admit(first)
        assert first.cache_key is not None and first.out is None
        rig.responses.put(first.cache_key, {"y": np.zeros((1, 2), np.float32)}, 8)
        again = Slot(_request(A, 1))
        rig.intake.admit(again)
        assert again.out is not None and again.out.ok and again.bound is None
        assert dict(again.out.headers)["model-version"] == b"1"
        assert len(rig.submitted) == 1  # the duplicate never ran
        other = Slot(_request(A, 2, x=2.0))  # another request to the same model runs
        rig.intake.admit(other)
        assert other.out is None and len(rig.submitted) == 2
    finally:
        rig.loader.shutdown(wait=True)


def test_a_request_for_a_version_gets_that_version_loaded_or_not(rig: _Rig) -> None:
    rig.cache.latest = 2
    rig.cache.loaded_models.append(("m", 2))
    rig.intake.admit(Slot(_request(A, 0, version=1)))  # not loaded yet: loads it
    rig.intake.admit(Slot(_request(A, 1, version=1)))  # loaded now, beside the latest
    rig.intake.admit(Slot(_request(A, 2)))  # no version named: the latest
    assert [b.version for b in rig.submitted] == [1, 1, 2]
    assert rig.failures == [] and rig.cache.loads == 1


@pytest.mark.parametrize(
    ("loaded", "version"),
    [(("other", 1), None), (("m", 2), 1)],
    ids=["another-model-loaded", "another-version-loaded"],
)
def test_a_slow_load_pauses_even_while_another_model_or_version_is_loaded(
    rig: _Rig, loaded: tuple[str, int], version: int | None
) -> None:
    rig.cache.loaded_models.append(loaded)
    rig.cache.release.clear()
    threading.Timer(0.2, rig.cache.release.set).start()
    rig.intake.admit(Slot(_request(A, 0, version=version)))
    assert rig.consumer.pauses == [{A, B}] and rig.consumer.resumes == [{A, B}]
    assert rig.beats > 0 and [b.version for b in rig.submitted] == [1]


def test_a_newer_version_than_the_one_loaded_loads_off_the_polling_thread(rig: _Rig) -> None:
    rig.cache.loaded_models.append(("m", 1))
    rig.cache.latest = 2  # dropped into the repository while version 1 serves
    rig.cache.release.clear()
    threading.Timer(0.2, rig.cache.release.set).start()
    rig.intake.admit(Slot(_request(A, 0)))  # no version named: the newest, not loaded
    assert rig.consumer.pauses == [{A, B}] and rig.consumer.resumes == [{A, B}]
    assert [b.version for b in rig.submitted] == [2]


def test_a_traced_record_that_does_not_decode_fails_its_decode_span_names_no_model(
    settings: Settings,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rig = _Rig(settings, tracing=Tracing(provider))
    try:
        bad = Slot(_record(A, 0, b"\xc1", [("content-type", b"application/msgpack")]))
        rig.intake.admit_first(bad)
        rig.intake.admit_first(Slot(_request(A, 1)))
    finally:
        rig.loader.shutdown(wait=True)
    [(failed, _, _)] = rig.failures
    assert failed is bad and len(rig.submitted) == 1
    spans = [dict(s.attributes or {}) for s in exporter.get_finished_spans()]
    assert [(a["offset"], a.get("model"), a.get("version")) for a in spans] == [
        (0, None, None),
        (1, "m", "1"),
    ]
