"""Transient failures are retried with backoff before they are dead-lettered (real broker)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.harness import consume, consume_ids, header, produce, settings, worker_thread
from worker import runtime
from worker.demo import build_mlp, write_demo_model
from worker.observability import Metrics
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka


def _requests(n: int, version: int | None = None, prefix: str = "r") -> list[tuple[Any, ...]]:
    out = []
    for i in range(n):
        value, headers = encode_request(
            {"x": np.full((2, 784), i / n, np.float32)},
            format="msgpack",
            model="mnist-mlp",
            model_version=version,
            request_id=f"{prefix}-{i}",
        )
        out.append((None, value, headers))
    return out


def _retries(metrics: Metrics, error_type: str) -> float:
    value = metrics.registry.get_sample_value(
        "inference_worker_retries_total", {"error_type": error_type}
    )
    return value or 0.0


def test_out_of_memory_on_the_first_runs_is_retried_then_answered(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()
    # Fault hook: the first two runs fail as a CUDA/host out-of-memory would.
    real_run = runtime.Session.run
    failures = {"left": 2}
    lock = threading.Lock()

    def flaky(self: runtime.Session, feeds: dict[str, np.ndarray]) -> dict[str, object]:
        on_pool = threading.current_thread().name.startswith("infer")  # not the load's warm-up
        with lock:
            if on_pool and failures["left"] > 0:
                failures["left"] -= 1
                raise RuntimeError("Failed to allocate memory for requested buffer of size 3136")
        return real_run(self, feeds)

    monkeypatch.setattr(runtime.Session, "run", flaky)
    produce(kafka_bootstrap, requests, _requests(4))
    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, repo, group_id, max_batch_rows=1024)
    with worker_thread(s, metrics=metrics):
        answers = consume_ids(kafka_bootstrap, outputs, {f"r-{i}" for i in range(4)}, timeout=60)
    assert {header(r, "request-id") for r in answers} == {f"r-{i}" for i in range(4)}
    assert _retries(metrics, "inference-error") >= 1
    dlq = consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=2)
    assert dlq == [], "a transient failure that went away must not reach the dead-letter topic"


def test_a_failure_that_stays_is_dead_lettered_with_its_attempts(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()

    real_run = runtime.Session.run

    def broken(self: runtime.Session, feeds: dict[str, np.ndarray]) -> dict[str, object]:
        if threading.current_thread().name.startswith("infer"):  # not the load's warm-up
            raise RuntimeError("CUDA failure 2: out of memory")
        return real_run(self, feeds)

    monkeypatch.setattr(runtime.Session, "run", broken)
    produce(kafka_bootstrap, requests, _requests(1))
    metrics = Metrics()
    s = settings(
        kafka_bootstrap, requests, outputs, repo, group_id, retry_attempts=2, retry_backoff_ms=50.0
    )
    started = time.monotonic()
    with worker_thread(s, metrics=metrics):
        dlq = consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=60)
    assert len(dlq) == 1
    assert header(dlq[0], "error-type") == "inference-error"
    assert header(dlq[0], "error-attempts") == "3"  # the first run and two retries
    assert "out of memory" in (header(dlq[0], "error-message") or "")
    assert _retries(metrics, "inference-error") == 2
    # waited 50 ms, then 100 ms (doubling) before giving up
    assert time.monotonic() - started >= 0.15


def test_deterministic_errors_are_not_retried(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()
    produce(kafka_bootstrap, requests, [(None, b"\x00not a request", [("model", b"mnist-mlp")])])
    metrics = Metrics()
    caplog.set_level(logging.WARNING, logger="worker.loop")
    with worker_thread(settings(kafka_bootstrap, requests, outputs, repo, group_id), metrics):
        dlq = consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=60)
    assert header(dlq[0], "error-type") == "decode-error"
    assert header(dlq[0], "error-attempts") is None
    assert header(dlq[0], "source-offset") == "0"
    assert _retries(metrics, "decode-error") == 0
    # The loop's own log line names the record: topic[partition]@offset, and as fields.
    (line,) = [r for r in caplog.records if "dead letter" in r.getMessage()]
    assert f"{requests}[0]@0" in line.getMessage()
    fields = vars(line)
    assert (fields["topic"], fields["partition"], fields["offset"]) == (requests, 0, 0)
    assert fields["error_type"] == "decode-error"


def test_a_model_version_written_while_it_loads_is_served_on_a_retry(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    import onnx

    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()
    # Version 2 is being copied in: half of its bytes are there when the request arrives.
    whole = build_mlp(seed=11).SerializeToString()
    target = repo / "mnist-mlp" / "2" / "model.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(whole[: len(whole) // 2])
    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, repo, group_id, retry_backoff_ms=300.0)
    with worker_thread(s, metrics=metrics):
        produce(kafka_bootstrap, requests, _requests(1, version=2))
        deadline = time.monotonic() + 30
        while _retries(metrics, "model-load-error") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _retries(metrics, "model-load-error") >= 1, "the half-written model did not fail"
        target.write_bytes(whole)  # the copy finishes
        answers = consume_ids(kafka_bootstrap, outputs, {"r-0"}, timeout=60)
    assert header(answers[0], "model-version") == "2"
    onnx.checker.check_model(onnx.load(str(target)))
    assert consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=2) == []
