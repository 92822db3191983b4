"""The whole path once: msgpack requests in, one response each, offsets committed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.harness import committed, consume, header, produce, settings, worker_thread
from worker.demo import DEMO_INPUT, DEMO_MODEL, DEMO_OUTPUT
from worker.protocol import decode_response, encode_request

pytestmark = pytest.mark.kafka


def test_broker_accepts_produce_and_consume(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    produce(kafka_bootstrap, topic, [(b"k", b"hello", [("h", b"v")])])
    [record] = consume(kafka_bootstrap, topic, 1, timeout=30)
    assert (record.key, record.value, record.headers) == (b"k", b"hello", [("h", b"v")])


# Both clients here, in `make test`: the rest of the kafka-python half is in `make test-slow`.
@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_msgpack_requests_answered_once_each(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    client: str,
) -> None:
    requests, outputs = new_topic(partitions=2), new_topic(partitions=2)
    rng = np.random.default_rng(0)
    n = 40
    batches = [rng.random((int(rng.integers(1, 9)), 784), dtype=np.float32) for _ in range(n)]
    records = []
    for i, x in enumerate(batches):
        value, headers = encode_request(
            {DEMO_INPUT: x}, format="msgpack", model=DEMO_MODEL, request_id=f"req-{i}"
        )
        records.append((f"key-{i}".encode(), value, headers))
    produce(kafka_bootstrap, requests, records)

    s = settings(kafka_bootstrap, requests, outputs, model_repo, group_id, kafka_client=client)
    with worker_thread(s):
        answers = consume(kafka_bootstrap, outputs, n, timeout=90, settle=1.0)

    assert len(answers) == n
    session = ort.InferenceSession(str(model_repo / DEMO_MODEL / "1" / "model.onnx"))
    seen = set()
    for record in answers:
        rid = header(record, "request-id")
        assert rid is not None and rid.startswith("req-")
        i = int(rid.split("-")[1])
        seen.add(i)
        assert record.key == f"key-{i}".encode()
        assert header(record, "model") == DEMO_MODEL
        assert header(record, "model-version") == "1"
        assert header(record, "source-topic") == requests
        response = decode_response(record.value, record.headers)
        expected = session.run(None, {DEMO_INPUT: batches[i]})[0]
        np.testing.assert_allclose(response.outputs[DEMO_OUTPUT], expected, atol=1e-6)
    assert seen == set(range(n))
    # every input offset committed: the committed offset equals the partition's end
    ends = committed(kafka_bootstrap, group_id, requests)
    per_partition = consume(kafka_bootstrap, requests, n, timeout=30)
    expected_ends = {p: 0 for p in ends}
    for r in per_partition:
        expected_ends[r.partition] = max(expected_ends[r.partition], r.offset + 1)
    assert ends == expected_ends


def test_demo_model_softmax_rows_sum_to_one(model_repo: Path) -> None:
    session = ort.InferenceSession(str(model_repo / DEMO_MODEL / "1" / "model.onnx"))
    [inp] = session.get_inputs()
    assert inp.name == DEMO_INPUT and inp.shape[1] == 784 and not isinstance(inp.shape[0], int)
    x = np.random.default_rng(1).random((16, 784), dtype=np.float32)
    probs = session.run([DEMO_OUTPUT], {DEMO_INPUT: x})[0]
    assert probs.shape == (16, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs > 0).all()
