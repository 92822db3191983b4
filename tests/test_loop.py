"""The production loop against the real broker: batching, order, dead letters, shutdown, crashes."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import modelzoo
from tests.harness import (
    FAST_GROUP,
    assert_same_outputs,
    committed,
    consume,
    consume_ids,
    header,
    produce,
    settings,
    worker_process,
    worker_thread,
)
from worker.demo import write_demo_model
from worker.observability import Metrics
from worker.protocol import decode_response, encode_request
from worker.signature import Signature

pytestmark = pytest.mark.kafka


def _direct(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, object]:
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _stream(
    n: int, model: str = "mnist-mlp", rows: int = 2, seed: int = 0, prefix: str = "r"
) -> list[tuple[bytes, bytes, list]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.random((rows, 784), dtype=np.float32)
        value, headers = encode_request(
            {"x": x}, format="msgpack", model=model, request_id=f"{prefix}-{i}"
        )
        out.append((f"k{i % 7}".encode(), value, headers))
    return out


def test_mixed_models_coalesced_equal_one_run_per_message(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    names = ["mnist-mlp", "two-io", "int64-affine", "iris-logreg", "fixed-batch1", "fixed-batch4"]
    paths = {name: modelzoo.ZOO[name](repo) for name in names}
    sigs = {n: Signature.from_session(ort.InferenceSession(str(p))) for n, p in paths.items()}
    requests, outputs = new_topic(), new_topic()
    rng = np.random.default_rng(3)
    sent: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    records = []
    for i in range(90):
        name = names[i % len(names)]
        feeds = modelzoo.sample_feeds(sigs[name], rows=int(rng.integers(1, 6)), seed=i)
        fmt = "arrow" if i % 2 else "msgpack"
        value, headers = encode_request(feeds, format=fmt, model=name, request_id=f"m-{i}")
        sent[f"m-{i}"] = (name, feeds)
        records.append((None, value, headers))
    produce(kafka_bootstrap, requests, records)

    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, repo, group_id, max_batch_delay_ms=50.0)
    with worker_thread(s, metrics):
        answers = consume(kafka_bootstrap, outputs, len(records), timeout=90)
    assert len(answers) == len(records)
    for record in answers:
        assert header(record, "error-type") is None
        name, feeds = sent[header(record, "request-id") or ""]
        response = decode_response(record.value, record.headers)
        want = _direct(paths[name], feeds)
        assert set(response.outputs) == set(want)
        for key in want:
            assert_same_outputs(response.outputs[key], want[key])
    # messages carry at most 5 rows: a run over 8 rows proves coalescing happened
    # Over every model version (batch_rows has one series each).
    samples = [s for f in metrics.registry.collect() for s in f.samples]
    runs = sum(s.value for s in samples if s.name == "inference_worker_batch_rows_count")
    small = sum(
        s.value
        for s in samples
        if s.name == "inference_worker_batch_rows_bucket" and s.labels["le"] == "8.0"
    )
    assert runs > small


def test_responses_in_offset_order_per_partition(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    requests, outputs = new_topic(partitions=3), new_topic(partitions=1)
    records = _stream(150, rows=1)
    produce(kafka_bootstrap, requests, records)
    s = settings(
        kafka_bootstrap,
        requests,
        outputs,
        model_repo,
        group_id,
        max_batch_rows=4,
        inference_threads=2,
    )
    with worker_thread(s):
        answers = consume(kafka_bootstrap, outputs, len(records), timeout=90)
    assert len(answers) == len(records)
    by_partition: dict[str, list[int]] = {}
    for r in answers:
        by_partition.setdefault(header(r, "source-partition") or "", []).append(
            int(header(r, "source-offset") or -1)
        )
    assert len(by_partition) == 3
    for offsets in by_partition.values():
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def _runtime_failing_model(repo: Path) -> None:
    """x float32[?,?] times a 784x10 weight: any other width fails at run time."""
    w = numpy_helper.from_array(np.ones((784, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = repo / "fragile" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def test_every_error_class_goes_to_the_dead_letter_topic(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    modelzoo.write_corrupt(model_repo)
    _runtime_failing_model(model_repo)
    requests, outputs = new_topic(), new_topic()
    dlq = f"{requests}.dlq"
    good = _stream(6, rows=1, prefix="good")
    x = np.zeros((1, 784), np.float32)
    bad_shape, _ = encode_request({"x": np.zeros((1, 780), np.float32)}, format="msgpack")
    corrupt, _ = encode_request({"x": x}, format="msgpack", model="corrupt")
    fragile, _ = encode_request(
        {"x": np.zeros((1, 5), np.float32)}, format="msgpack", model="fragile"
    )
    huge, _ = encode_request({"x": np.zeros((200, 784), np.float32)}, format="msgpack")
    bad = {
        "decode-error": (b"\x93not a request", []),
        "schema-mismatch": (bad_shape, [("model", b"mnist-mlp")]),
        "model-not-found": (msgpack.packb({"inputs": {}}), [("model", b"../../etc/passwd")]),
        "model-load-error": (corrupt, []),
        "inference-error": (fragile, []),
        "too-large": (huge, [("model", b"mnist-mlp")]),
    }
    records = []
    for i, (kind, (value, headers)) in enumerate(bad.items()):
        records.append(good[i])
        records.append((kind.encode(), value, [*headers, ("trace", kind.encode())]))
    produce(kafka_bootstrap, requests, records)
    s = settings(
        kafka_bootstrap, requests, outputs, model_repo, group_id, max_request_bytes=256 * 1024
    )
    with worker_thread(s):
        answers = consume(kafka_bootstrap, outputs, 6, timeout=60)
        dead = consume(kafka_bootstrap, dlq, len(bad), timeout=60)
    assert sorted(header(r, "request-id") or "" for r in answers) == sorted(
        f"good-{i}" for i in range(6)
    )
    assert len(dead) == len(bad)
    for r in dead:
        kind = r.key.decode()
        assert header(r, "error-type") == kind
        message = header(r, "error-message") or ""
        assert 0 < len(message.encode()) <= 1024
        assert r.value == bad[kind][0]  # value unchanged
        assert header(r, "trace") == kind  # headers kept
        assert header(r, "source-topic") == requests
        assert header(r, "source-offset") is not None
    kinds = {header(r, "error-type"): header(r, "error-message") for r in dead}
    assert "784" in (kinds["schema-mismatch"] or "")


def _worker_args(bootstrap: str, requests: str, outputs: str, repo: Path, group: str) -> list[str]:
    return [
        "--bootstrap-servers",
        bootstrap,
        "--input-topic",
        requests,
        "--output-topic",
        outputs,
        "--model-repository",
        str(repo),
        "--group-id",
        group,
        "--metrics-port",
        "0",
        "--device",
        "cpu",
        "--max-batch-rows",
        "8",
        *(f"--kafka-option={k}={v}" for k, v in FAST_GROUP.items()),
    ]


def _wait_for_answers(bootstrap: str, topic: str, at_least: int, timeout: float = 60) -> None:
    got = consume(bootstrap, topic, at_least, timeout=timeout)
    assert len(got) >= at_least, f"only {len(got)} answers arrived"


def _request_ids(records: list) -> Counter[str]:
    return Counter(header(r, "request-id") or "" for r in records)


def test_sigterm_mid_stream_drains_and_exits_zero(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    tmp_path: Path,
) -> None:
    requests, outputs = new_topic(partitions=2), new_topic()
    n = 400
    produce(kafka_bootstrap, requests, _stream(n, rows=4))
    proc = worker_process(
        _worker_args(kafka_bootstrap, requests, outputs, model_repo, group_id),
        log_path=tmp_path / "w1.log",
    )
    try:
        _wait_for_answers(kafka_bootstrap, outputs, 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(45) == 0, (tmp_path / "w1.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # What the first worker answered it also committed: a second one answers
    # the rest, and nothing is answered twice.
    s = settings(
        kafka_bootstrap, requests, outputs, model_repo, group_id, kafka_properties=FAST_GROUP
    )
    with worker_thread(s):
        answers = consume_ids(kafka_bootstrap, outputs, {f"r-{i}" for i in range(n)}, settle=1.0)
    ids = _request_ids(answers)
    assert len(ids) == n and max(ids.values()) == 1
    ends = committed(kafka_bootstrap, group_id, requests)
    assert sum(v or 0 for v in ends.values()) == n


def test_two_workers_share_partitions_and_survive_one_leaving(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    requests, outputs = new_topic(partitions=4), new_topic()
    n = 600
    s = settings(
        kafka_bootstrap, requests, outputs, model_repo, group_id, kafka_properties=FAST_GROUP
    )
    with worker_thread(s) as w1:
        with worker_thread(s) as w2:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                len(w1.assignment()) == 2 and len(w2.assignment()) == 2
            ):
                time.sleep(0.2)
            assert len(w1.assignment()) == len(w2.assignment()) == 2
            assert not w1.assignment() & w2.assignment()
            first = _stream(n // 2, rows=2)
            for p in range(4):  # every partition, so both workers have work
                produce(kafka_bootstrap, requests, first[p::4], partition=p)
            consume_ids(kafka_bootstrap, outputs, {f"r-{i}" for i in range(n // 2)}, timeout=60)
        # the second worker has left halfway; the first takes over its partitions
        late = _stream(n // 2, rows=2, seed=1, prefix="late")
        for p in range(4):
            produce(kafka_bootstrap, requests, late[p::4], partition=p)
        want = {f"r-{i}" for i in range(n // 2)} | {f"late-{i}" for i in range(n // 2)}
        ids = _request_ids(consume_ids(kafka_bootstrap, outputs, want, timeout=90))
        assert want <= set(ids)
        assert len(w1.assignment()) == 4
        assert w1.committed_records > 0 and w2.committed_records > 0


def test_slow_model_keeps_group_membership(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    modelzoo.write_slow(repo, ms_per_run=700)
    requests, outputs = new_topic(), new_topic()
    n = 12
    records = []
    for i in range(n):
        value, headers = encode_request(
            {"x": np.ones((1, 16), np.float32)}, format="msgpack", model="slow", request_id=f"s-{i}"
        )
        records.append((None, value, headers))
    produce(kafka_bootstrap, requests, records)
    # librdkafka wants max.poll.interval.ms >= session.timeout.ms (>= the
    # broker's 6 s minimum); 12 runs of 0.7 s take longer than that.
    group = {
        "max.poll.interval.ms": "6000",
        "session.timeout.ms": "6000",
        "heartbeat.interval.ms": "500",
    }
    s = settings(
        kafka_bootstrap,
        requests,
        outputs,
        repo,
        group_id,
        max_batch_rows=1,
        kafka_properties=group,
    )
    with worker_thread(s):
        answers = consume(kafka_bootstrap, outputs, n, timeout=120, settle=3.0)
    ids = _request_ids(answers)
    assert set(ids) == {f"s-{i}" for i in range(n)}
    assert max(ids.values()) == 1, "a record was answered twice: the worker lost its group"


def test_a_model_load_longer_than_max_poll_interval_keeps_group_membership(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The load runs off the poll thread, which keeps polling (paused) meanwhile."""
    import logging

    from worker import loop as loop_module

    repo = tmp_path / "models"
    write_demo_model(repo)
    real_load = loop_module.load_session

    def slow_load(ref: Any, options: Any) -> Any:
        time.sleep(8.0)  # longer than max.poll.interval.ms below: a big model on a slow disk
        return real_load(ref, options)

    monkeypatch.setattr(loop_module, "load_session", slow_load)
    requests, outputs = new_topic(), new_topic()
    records = []
    for i in range(6):
        value, headers = encode_request(
            {"x": np.ones((1, 784), np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id=f"l-{i}",
        )
        records.append((None, value, headers))
    produce(kafka_bootstrap, requests, records)
    group = {
        "max.poll.interval.ms": "6000",
        "session.timeout.ms": "6000",
        "heartbeat.interval.ms": "500",
    }
    s = settings(
        kafka_bootstrap, requests, outputs, tmp_path / "models", group_id, kafka_properties=group
    )
    caplog.set_level(logging.INFO, logger="worker")
    with worker_thread(s):
        answers = consume(kafka_bootstrap, outputs, 6, timeout=90, settle=2.0)
        # Before the worker stops (which revokes its partitions in order):
        moved = [m for m in caplog.messages if m.startswith(("lost", "revoked"))]
    ids = _request_ids(answers)
    assert set(ids) == {f"l-{i}" for i in range(6)}
    assert max(ids.values()) == 1, "answered twice: the worker lost its group during the load"
    assert not moved, moved
