"""Per-model settings through a real worker and broker: batching per model, a model
without a batch axis, a version policy, a changed file without a restart, and a
Triton-format repository served as it is."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tritonclient.http import InferenceServerClient

from tests import modelzoo
from tests.harness import consume_ids, header, produce, settings, worker_thread
from worker.observability import Metrics
from worker.protocol import decode_response, encode_request

pytestmark = pytest.mark.kafka

_DYNAMIC = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {rows}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 784 ] }} ]
output [ {{ name: "probs" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 300000 }}
"""


def _per_model(metrics: Metrics, name: str, model: str) -> float:
    """Sample ``name`` of ``model``, summed over its versions."""
    return sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and sample.labels.get("model") == model
    )


def _runs(metrics: Metrics, model: str) -> float:
    """Calls of session.run for ``model`` (the count of its run-time histogram)."""
    return _per_model(metrics, "inference_worker_inference_seconds_count", model)


def _rows(metrics: Metrics, model: str) -> float:
    return _per_model(metrics, "inference_worker_rows_total", model)


def _requests(model: str, n: int, prefix: str, version: int | None = None) -> list:
    rng = np.random.default_rng(len(prefix) + n)
    out = []
    for i in range(n):
        value, headers = encode_request(
            {"x": rng.random((1, 784), dtype=np.float32)},
            format="msgpack",
            model=model,
            model_version=version,
            request_id=f"{prefix}-{i}",
        )
        out.append((f"k{i}".encode(), value, headers))
    return out


def _interleave(*streams: list) -> list:
    out = []
    for i in range(max(len(s) for s in streams)):
        out.extend(s[i] for s in streams if i < len(s))
    return out


def _ids(records: list) -> set[str]:
    return {h.decode() for _, _, hs in records for k, h in hs if k == "request-id"}


def test_each_model_batches_as_its_config_pbtxt_says(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    for name, rows in (("wide", 64), ("narrow", 4)):
        modelzoo.write_mlp(tmp_path, name)
        (tmp_path / name / "config.pbtxt").write_text(_DYNAMIC.format(name=name, rows=rows))
    modelzoo.write_mlp(tmp_path, "alone")
    (tmp_path / "alone" / "config.pbtxt").write_text(
        'name: "alone"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 784 ] } ]\n'
    )
    wide, narrow, alone = (
        _requests("wide", 40, "w"),
        _requests("narrow", 40, "n"),
        _requests("alone", 12, "a"),
    )
    records = _interleave(wide, narrow, alone)
    requests, outputs = new_topic(), new_topic()
    produce(kafka_bootstrap, requests, records)  # all there before the worker polls
    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, tmp_path, group_id, max_batch_rows=1024)
    with worker_thread(s, metrics):
        answers = consume_ids(kafka_bootstrap, outputs, _ids(records), timeout=120)
    assert len(answers) == len(records)
    assert all(header(r, "error-type") is None for r in answers)
    assert _rows(metrics, "wide") == _rows(metrics, "narrow") == 40
    # max_batch_size 4: at least 40 / 4 runs; 64 with a 300 ms window: a few large runs
    assert _runs(metrics, "narrow") >= 10
    assert _runs(metrics, "wide") <= 6
    assert _rows(metrics, "wide") / _runs(metrics, "wide") > 4
    # max_batch_size 0: every request in a run of its own
    assert _runs(metrics, "alone") == _rows(metrics, "alone") == 12


def test_version_policy_serves_version_1_and_refuses_2(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    modelzoo.write_mlp(tmp_path, "vm", version=1, seed=1)
    modelzoo.write_mlp(tmp_path, "vm", version=2, seed=2)
    (tmp_path / "vm" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        "version_policy: { specific: { versions: [ 1 ] } }\n"
    )
    records = [
        *_requests("vm", 1, "v1", version=1),
        *_requests("vm", 1, "v2", version=2),
        *_requests("vm", 1, "newest"),
    ]
    requests, outputs = new_topic(), new_topic()
    dlq = f"{requests}.dlq"
    produce(kafka_bootstrap, requests, records)
    s = settings(kafka_bootstrap, requests, outputs, tmp_path, group_id)
    with worker_thread(s) as worker:
        answers = consume_ids(kafka_bootstrap, outputs, {"v1-0", "newest-0"}, timeout=90)
        dead = consume_ids(kafka_bootstrap, dlq, {"v2-0"}, timeout=60)
        # the same policy on the worker's metrics port, asked by Triton's client
        client = InferenceServerClient(f"127.0.0.1:{worker.metrics_port}")
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("vm", "1") and not client.is_model_ready("vm", "2")
            assert client.get_model_metadata("vm")["versions"] == ["1"]
        finally:
            client.close()
    by_id = {header(r, "request-id"): r for r in answers}
    assert set(by_id) == {"v1-0", "newest-0"}
    assert header(by_id["v1-0"], "model-version") == "1"
    assert header(by_id["newest-0"], "model-version") == "1"  # newest within the policy
    (letter,) = dead
    assert header(letter, "error-type") == "model-not-found"
    assert "version 2 is not served" in (header(letter, "error-message") or "")


def test_editing_config_pbtxt_changes_batching_without_a_restart(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    modelzoo.write_mlp(tmp_path, "live")
    config = tmp_path / "live" / "config.pbtxt"
    config.write_text(_DYNAMIC.format(name="live", rows=2))
    requests, outputs = new_topic(), new_topic()
    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, tmp_path, group_id)
    with worker_thread(s, metrics):
        first = _requests("live", 20, "before")
        produce(kafka_bootstrap, requests, first)
        consume_ids(kafka_bootstrap, outputs, _ids(first), timeout=90)
        runs_before = _runs(metrics, "live")
        assert runs_before >= 10  # two rows per run at most
        config.write_text(_DYNAMIC.format(name="live", rows=64))
        time.sleep(5.5)  # the repository's rescan
        second = _requests("live", 20, "after")
        produce(kafka_bootstrap, requests, second)
        consume_ids(kafka_bootstrap, outputs, _ids(first) | _ids(second), timeout=90)
        runs_after = _runs(metrics, "live") - runs_before
    assert _rows(metrics, "live") == 40
    assert runs_after <= 5  # the same 20 requests, now in one 300 ms window of up to 64


# -- a Triton-format repository --------------------------------------------------------

# Written as Triton's model configuration docs show them (reshape for a batch of scalars).
_IRIS = """
name: "iris"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "float_input"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
output [
  {
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
    reshape: { shape: [ ] }
  },
  {
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 3 ]
  }
]
instance_group [
  {
    count: 2
    kind: KIND_CPU
  }
]
dynamic_batching { }
"""

_DIABETES = """
name: "diabetes"
backend: "onnxruntime"
max_batch_size: 16
input [
  {
    name: "float_input"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
output [
  {
    name: "variable"
    data_type: TYPE_FP32
    dims: [ 1 ]
  }
]
dynamic_batching {
  max_queue_delay_microseconds: 100
}
"""

_MLP = """
name: "mnist"
platform: "onnxruntime_onnx"
max_batch_size: 32
version_policy: { latest: { num_versions: 1 } }
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 784 ]
  }
]
output [
  {
    name: "probs"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 1000
}
"""


def _sklearn(estimator: object, features: int, options: dict | None = None) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_sklearn(
            estimator,
            initial_types=[("float_input", FloatTensorType([None, features]))],
            target_opset={"": 17, "ai.onnx.ml": 3},
            options=options,
        )


def _triton_repository(root: Path) -> dict[str, tuple[int, Path]]:
    """name -> (features, model file), each model with its config.pbtxt."""
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    iris = LogisticRegression(max_iter=500).fit(x, y)
    x, y = load_diabetes(return_X_y=True)
    forest = RandomForestRegressor(n_estimators=5, max_depth=4, random_state=0).fit(x, y)
    models = {
        "iris": (4, _sklearn(iris, 4, {id(iris): {"zipmap": False}}), _IRIS),
        "diabetes": (10, _sklearn(forest, 10), _DIABETES),
    }
    out: dict[str, tuple[int, Path]] = {}
    for name, (features, model, config) in models.items():
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))
        (root / name / "config.pbtxt").write_text(config)
        out[name] = (features, root / name / "1" / "model.onnx")
    modelzoo.write_mlp(root, "mnist", version=1, seed=1)
    path = modelzoo.write_mlp(root, "mnist", version=2, seed=2)  # built with onnx.helper
    (root / "mnist" / "config.pbtxt").write_text(_MLP)
    out["mnist"] = (784, path)
    return out


def test_a_triton_repository_is_served_as_it_is(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    repo = tmp_path / "triton"
    models = _triton_repository(repo)
    rng = np.random.default_rng(5)
    sent: dict[str, tuple[str, np.ndarray]] = {}
    records = []
    for i in range(18):
        name = ("iris", "diabetes", "mnist")[i % 3]
        features, _ = models[name]
        x = rng.random((1 + i % 5, features), dtype=np.float32)
        fmt = ("msgpack", "json")[i % 2]
        value, headers = encode_request({"x" if name == "mnist" else "float_input": x},
                                        format=fmt, model=name, request_id=f"t{i}")  # fmt: skip
        sent[f"t{i}"] = (name, x)
        records.append((None, value, headers))
    requests, outputs = new_topic(), new_topic()
    produce(kafka_bootstrap, requests, records)
    s = settings(kafka_bootstrap, requests, outputs, repo, group_id)
    with worker_thread(s):
        answers = consume_ids(kafka_bootstrap, outputs, set(sent), timeout=120)
    assert len(answers) == len(sent)
    sessions = {
        n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for n, (_, p) in models.items()
    }
    for record in answers:
        rid = header(record, "request-id") or ""
        assert header(record, "error-type") is None, header(record, "error-message")
        name, x = sent[rid]
        assert header(record, "model-version") == ("2" if name == "mnist" else "1")
        session = sessions[name]
        feeds = {session.get_inputs()[0].name: x}
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds),
                        strict=True))  # fmt: skip
        got = decode_response(record.value, record.headers).outputs
        assert set(got) == set(want)
        for out_name, value in want.items():
            np.testing.assert_allclose(np.asarray(got[out_name]), value, rtol=1e-4, atol=1e-5)
