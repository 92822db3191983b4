"""/metrics, /healthz, /readyz, the spec's metric names, backpressure, JSON logs."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests import modelzoo
from tests.harness import consume_ids, header, produce, settings, worker_thread
from worker.observability import Metrics, configure_logging
from worker.protocol import decode_response, encode_request

SPEC_METRICS = [
    "inference_worker_messages_total",
    "inference_worker_rows_total",
    "inference_worker_batch_rows",
    "inference_worker_inference_seconds",
    "inference_worker_end_to_end_seconds",
    "inference_worker_dlq_total",
    "inference_worker_model_cache_hits_total",
    "inference_worker_model_cache_misses_total",
    "inference_worker_model_cache_evictions_total",
    "inference_worker_model_cache_models",
    "inference_worker_model_cache_bytes",
    "inference_worker_model_load_seconds",
    "inference_worker_consumer_lag",
    "inference_worker_last_commit_age_seconds",
    "inference_worker_build_info",
]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@pytest.mark.kafka
def test_endpoints_and_every_spec_metric(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    requests, outputs = new_topic(), new_topic()
    s = settings(
        kafka_bootstrap, requests, outputs, model_repo, group_id, preload=(("mnist-mlp", None),)
    )
    with worker_thread(s) as worker:
        deadline = time.monotonic() + 30
        while worker.metrics_port is None or _get(worker.metrics_port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        value, headers = encode_request(
            {"x": np.ones((3, 784), np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id="m1",
        )
        produce(kafka_bootstrap, requests, [(None, value, headers), (None, b"junk", [])])
        consume_ids(kafka_bootstrap, outputs, {"m1"}, timeout=60)
        assert _get(worker.metrics_port, "/healthz")[0] == 200
        lag = f'inference_worker_consumer_lag{{partition="0",topic="{requests}"}}'
        deadline = time.monotonic() + 15  # lag is sampled once a second
        status, body = _get(worker.metrics_port, "/metrics")
        while lag not in body and time.monotonic() < deadline:
            time.sleep(0.2)
            status, body = _get(worker.metrics_port, "/metrics")
    assert status == 200
    for name in SPEC_METRICS:
        assert f"# TYPE {name.removesuffix('_total')}" in body, name
    assert 'inference_worker_rows_total{model="mnist-mlp",version="1"} 3.0' in body
    assert lag in body
    assert 'inference_worker_dlq_total{error_type="decode-error"} 1.0' in body


@pytest.mark.kafka
def test_slow_model_pauses_partitions_and_still_answers_everything(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    # A run that outlasts the second a spent budget waits before partitions pause, with
    # room to spare: a "1,500 ms" run took 1.0 s on one thread here, and on a faster CI
    # machine every run ended inside the second, so no partition ever paused.
    path = modelzoo.write_slow(repo, ms_per_run=3000)
    requests, outputs = new_topic(partitions=2), new_topic()
    records, inputs = [], {}
    for i in range(3):
        x = np.random.default_rng(i).random((1, 16), dtype=np.float32)
        value, headers = encode_request(
            {"x": x}, format="msgpack", model="slow", request_id=f"p{i}"
        )
        records.append((None, value, headers))
        inputs[f"p{i}"] = x
    produce(kafka_bootstrap, requests, records)
    metrics = Metrics()
    # A budget under one request's bytes: any record in flight spends it, however
    # many records a poll happens to bring (the pause does not hang on fetch timing).
    s = settings(
        kafka_bootstrap, requests, outputs, repo, group_id, max_batch_rows=1, max_inflight_bytes=64
    )
    paused_seen = 0.0
    with worker_thread(s, metrics):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not paused_seen:
            paused_seen = (
                metrics.registry.get_sample_value("inference_worker_paused_partitions") or 0.0
            )
            time.sleep(0.02)
        answers = consume_ids(kafka_bootstrap, outputs, set(inputs), timeout=90, settle=1.0)
        resumed = metrics.registry.get_sample_value("inference_worker_paused_partitions")
    assert paused_seen > 0
    assert resumed == 0, f"{resumed} partitions still paused after everything was answered"
    ids = [header(r, "request-id") for r in answers]
    assert sorted(ids) == sorted(inputs), f"each request answered once: {ids}"
    session = ort.InferenceSession(str(path))
    for record in answers:
        assert header(record, "error-type") is None, header(record, "error-message")
        x = inputs[header(record, "request-id") or ""]
        got = decode_response(record.value, record.headers).outputs["y"]
        np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_json_logs_carry_partition_and_offset(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    try:
        logging.getLogger("worker.loop").warning(
            "t[0]@5 -> dead letter",
            extra={"topic": "t", "partition": 0, "offset": 5, "error_type": "decode-error"},
        )
        line = capsys.readouterr().err.strip().splitlines()[-1]
        doc = json.loads(line)
        assert doc["topic"] == "t" and doc["partition"] == 0 and doc["offset"] == 5
        assert doc["error_type"] == "decode-error"
        assert doc["level"] == "WARNING"
        assert doc["logger"] == "worker.loop"
        assert doc["msg"] == "t[0]@5 -> dead letter"
    finally:
        logging.getLogger().handlers.clear()


def test_json_log_timestamps_are_iso8601_utc_with_milliseconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    try:
        record = logging.LogRecord("worker.loop", logging.INFO, __file__, 1, "at", None, None)
        record.created, record.msecs = 1_796_138_403.123456, 123.456  # 2026-12-01T15:20:03.123Z
        logging.getLogger().handlers[0].handle(record)
        before = time.time()
        logging.getLogger("worker.loop").info("now")
        after = time.time()
        fixed, now = (json.loads(x)["ts"] for x in capsys.readouterr().err.splitlines()[-2:])
        assert fixed == "2026-12-01T15:20:03.123Z"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)
        stamp = datetime.strptime(now, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        assert before - 0.001 <= stamp <= after  # UTC: no hidden local-time offset
    finally:
        logging.getLogger().handlers.clear()
