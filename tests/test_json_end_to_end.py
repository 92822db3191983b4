"""MLServer's Kafka mode, pointed at this worker: a stream produced exactly as MLServer's
documentation shows is answered, and the answers read as MLServer's consumers read them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kafka import KafkaProducer
from onnx import TensorProto, helper, numpy_helper

from tests.harness import consume, header, settings, worker_thread

pytestmark = pytest.mark.kafka

CE_HEADERS = ["Ce-Specversion", "Ce-Source", "Ce-Type", "Ce-Modelid",
              "Ce-Inferenceservicename", "Ce-Endpoint", "Ce-Id", "Ce-Requestid"]


def _write_digits_model(repo: Path, name: str = "mnist-svm") -> Path:
    """predict float32[?,64] -> probs float32[?,10]: the input MLServer's example names."""
    w = np.random.default_rng(64).normal(0, 0.1, (64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["predict", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "digits",
        [helper.make_tensor_value_info("predict", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    return path


def _digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data[:n].astype(np.float32)


def test_a_stream_written_as_mlservers_docs_show_is_answered(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    path = _write_digits_model(tmp_path)
    requests, outputs = new_topic(), new_topic()
    x = _digits(3)
    # From MLServer's "Serving models through Kafka" example, verbatim but for the topic.
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    headers = {
        "mlserver-model": b"mnist-svm",
        "mlserver-version": b"v0.1.0",
    }
    for i in range(3):
        x_0 = x[i : i + 1]
        inference_request = {
            "inputs": [
                {"name": "predict", "shape": x_0.shape, "datatype": "FP32", "data": x_0.tolist()}
            ]
        }
        producer.send(requests, json.dumps(inference_request).encode("utf-8"),
                      headers=list(headers.items()))
    producer.flush()
    producer.close()

    with worker_thread(settings(kafka_bootstrap, requests, outputs, tmp_path, group_id)):
        answers = consume(kafka_bootstrap, outputs, 3, timeout=90)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"predict": x})[0]
    assert len(answers) == 3
    by_offset = sorted(answers, key=lambda r: int(header(r, "source-offset") or -1))
    for i, record in enumerate(by_offset):
        assert header(record, "error-type") is None
        assert header(record, "content-type") == "application/json"
        response = json.loads(record.value)  # as MLServer's consumers read its answers
        assert response["model_name"] == "mnist-svm"
        assert response["model_version"] == "1"  # the newest: v0.1.0 is no integer version
        assert response["id"] == f"{requests}/0/{i}"
        [out] = response["outputs"]
        assert (out["name"], out["shape"], out["datatype"]) == ("probs", [1, 10], "FP32")
        np.testing.assert_allclose(out["data"], want[i], rtol=1e-5)
        names = [k for k, _ in record.headers]
        assert [n for n in names if n.startswith("Ce-")] == CE_HEADERS
        assert header(record, "Ce-Type") == "io.seldon.serving.inference.response"
        assert header(record, "Ce-Requestid") == response["id"]
        assert header(record, "Ce-Modelid") == "mnist-svm"
        assert header(record, "mlserver-model") == "mnist-svm"  # the request's, copied


def test_record_key_is_the_json_request_id(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    _write_digits_model(tmp_path)
    requests, outputs = new_topic(), new_topic()
    body = json.dumps({"id": "from-body", "inputs": [
        {"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": _digits(1).tolist()}
    ]}).encode()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(requests, body, key=b"from-key", headers=[("mlserver-model", b"mnist-svm")])
    producer.send(requests, body, key=None, headers=[("mlserver-model", b"mnist-svm")])
    producer.flush()
    producer.close()
    with worker_thread(settings(kafka_bootstrap, requests, outputs, tmp_path, group_id)):
        answers = consume(kafka_bootstrap, outputs, 2, timeout=90)
    ids = {json.loads(r.value)["id"]: r for r in answers}
    assert set(ids) == {"from-key", "from-body"}  # MLServer's rule: the key wins over the body
    assert ids["from-key"].key == b"from-key"
    assert header(ids["from-key"], "request-id") == "from-key"
