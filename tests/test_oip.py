"""The Open Inference Protocol's health and metadata endpoints, asked by Triton's own client."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from tritonclient.http import InferenceServerClient
from tritonclient.utils import InferenceServerException

from tests.modelzoo import write_corrupt, write_iris_logreg, write_mlp, write_two_io
from worker.health import Health
from worker.observability import HealthServer, Metrics
from worker.oip import SignatureReader, oip_app
from worker.repository import ModelRepository

_DATATYPES = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.STRING: "BYTES",
}


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    write_mlp(tmp_path, "mlp", version=1)
    write_mlp(tmp_path, "mlp", version=2, seed=3)
    write_two_io(tmp_path, "two-io")
    write_iris_logreg(tmp_path, "iris")
    write_corrupt(tmp_path, "broken")
    return tmp_path


class Served:
    def __init__(self, port: int, health: Health, reader: SignatureReader) -> None:
        self.port = port
        self.health = health
        self.reader = reader
        self.client = InferenceServerClient(f"127.0.0.1:{port}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@pytest.fixture()
def served(repo: Path) -> Iterator[Served]:
    health = Health()
    reader = SignatureReader()
    app = oip_app(ModelRepository(repo, rescan_s=0), health, reader=reader)
    with HealthServer(0, Metrics(), health, bind="127.0.0.1", v2=app) as server:
        s = Served(server.port, health, reader)
        try:
            yield s
        finally:
            s.client.close()


def _onnx_io(path: Path) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """What the ONNX file says, read independently of the worker's reader."""
    graph = onnx.load(str(path)).graph
    weights = {i.name for i in graph.initializer}

    def describe(v: onnx.ValueInfoProto) -> dict[str, object]:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {"name": v.name, "datatype": _DATATYPES[t.elem_type], "shape": shape}

    inputs = [describe(v) for v in graph.input if v.name not in weights]
    outputs = [describe(v) for v in graph.output if v.type.HasField("tensor_type")]
    return inputs, outputs


def test_server_live_and_ready_follow_health(served: Served) -> None:
    assert served.client.is_server_live()
    assert not served.client.is_server_ready()  # the broker has not answered yet
    status, body = served.get("/v2/health/ready")
    assert status == 503 and "broker" in json.loads(body)["error"]
    served.health.broker_ok = served.health.preloaded = True
    assert served.client.is_server_ready()
    meta = served.client.get_server_metadata()
    assert meta["name"] == "inference-worker" and isinstance(meta["extensions"], list)
    assert meta["version"]


def test_model_metadata_matches_the_onnx_file(served: Served, repo: Path) -> None:
    for name, path in (
        ("mlp", repo / "mlp" / "2" / "model.onnx"),
        ("two-io", repo / "two-io" / "1" / "model.onnx"),
    ):
        meta = served.client.get_model_metadata(name)
        inputs, outputs = _onnx_io(path)
        assert meta["name"] == name
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == inputs
        assert meta["outputs"] == outputs
        assert all(-1 in t["shape"] for t in meta["inputs"])  # the dynamic batch axis
    assert served.client.get_model_metadata("mlp")["versions"] == ["1", "2"]
    assert served.client.get_model_metadata("mlp", "1")["name"] == "mlp"


def test_sklearn_classifier_metadata(served: Served) -> None:
    meta = served.client.get_model_metadata("iris")
    assert meta["inputs"] == [{"name": "float_input", "datatype": "FP32", "shape": [-1, 4]}]
    by_name = {o["name"]: o for o in meta["outputs"]}
    assert by_name["output_label"]["datatype"] == "INT64"
    assert by_name["output_probability"]["datatype"] == "BYTES"  # a ZipMap: not a tensor


def test_model_ready(served: Served, repo: Path) -> None:
    assert served.client.is_model_ready("mlp")
    assert served.client.is_model_ready("mlp", "1")
    assert not served.client.is_model_ready("mlp", "3")
    assert not served.client.is_model_ready("nope")
    assert not served.client.is_model_ready("broken")  # not an ONNX file
    (repo / "mlp" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nversion_policy: { specific: { versions: [1] } }\n'
    )
    assert not served.client.is_model_ready("mlp", "2")  # outside the policy now
    assert served.client.is_model_ready("mlp", "1")
    assert served.client.get_model_metadata("mlp")["versions"] == ["1"]
    (repo / "mlp" / "config.pbtxt").write_text('platform: "tensorflow_graphdef"\n')
    assert not served.client.is_model_ready("mlp", "1")
    status, body = served.get("/v2/models/mlp")
    assert status == 503 and "ONNX models only" in json.loads(body)["error"]


def test_unknown_model_is_a_404_with_a_json_error(served: Served) -> None:
    with pytest.raises(InferenceServerException, match="not found"):
        served.client.get_model_metadata("nope")
    status, body = served.get("/v2/models/nope")
    assert status == 404 and "'nope' not found" in json.loads(body)["error"]
    status, body = served.get("/v2/models/mlp/versions/9")
    assert status == 404 and "no version 9" in json.loads(body)["error"]
    status, body = served.get("/v2/models/mlp/versions/x1")
    assert status == 400 and "positive integer" in json.loads(body)["error"]
    status, body = served.get("/v2/nothing-here")
    assert status == 404 and "error" in json.loads(body)


def test_bad_names_never_leave_the_repository(served: Served, tmp_path: Path) -> None:
    outside = tmp_path.parent / "outside-model"
    write_mlp(outside, "secret")
    for path in (
        "/v2/models/..",
        "/v2/models/%2e%2e",
        "/v2/models/..%2Foutside-model%2Fsecret",
        "/v2/models/.hidden",
        "/v2/models/" + "a" * 200,
    ):
        status, body = served.get(path)
        assert status == 404, path
        assert "secret" not in body.decode()


def test_metadata_loads_no_session_and_is_cached_by_mtime(
    served: Served, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    def no_session(*_: object, **__: object) -> None:
        raise AssertionError("metadata must not create an ONNX Runtime session")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    assert served.client.get_model_metadata("mlp")["inputs"]
    assert served.client.is_model_ready("mlp")
    path = repo / "mlp" / "2" / "model.onnx"
    first = served.reader._cache[path.resolve()]
    served.client.get_model_metadata("mlp")
    assert served.reader._cache[path.resolve()] is first  # not read again
    write_two_io(repo, "mlp", version=2)  # another graph in the same file
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    meta = served.client.get_model_metadata("mlp")
    assert [t["name"] for t in meta["inputs"]] == [
        i["name"] for i in _onnx_io(path)[0]
    ]  # the new graph's inputs


def test_model_not_ready_when_its_declarations_disagree(served: Served, repo: Path) -> None:
    (repo / "two-io" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'input [{ name: "a" data_type: TYPE_INT64 dims: [ -1 ] }]\n'
    )
    assert not served.client.is_model_ready("two-io")
    status, body = served.get("/v2/models/two-io")
    assert status == 503 and "data types differ" in json.loads(body)["error"]


def test_initializers_listed_as_graph_inputs_are_not_inputs(served: Served, repo: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "old-style",
        # IR < 4 exporters list every initializer among the graph's inputs too
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        initializer=[w],
    )  # fmt: skip
    (repo / "old" / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph), str(repo / "old" / "1" / "model.onnx"))
    meta = served.client.get_model_metadata("old")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
