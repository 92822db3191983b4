"""The Open Inference Protocol (V2) JSON codec: requests, answers, headers, errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import worker.protocol.json as json_codec
from worker.demo import build_mlp
from worker.errors import DecodeError, InferenceError, SchemaMismatch, WorkerError
from worker.protocol import (
    JSON,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    response_headers,
)
from worker.signature import Signature, TensorSpec

V2_TYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}


def _spec(name: str, dtype: str, shape: tuple[int | None, ...]) -> TensorSpec:
    np_dtype = np.dtype(np.str_) if dtype == "string" else np.dtype(dtype)
    return TensorSpec(name, f"tensor({dtype})", np_dtype, shape)


def _body(**inputs: Any) -> bytes:
    return orjson.dumps({"inputs": [{"name": n, **v} for n, v in inputs.items()]})


# -- the examples of the KServe / MLServer documentation --------------------------------------

# KServe's V2 REST example (with input1's data as long as its shape says).
KSERVE_EXAMPLE = b"""{
  "id" : "42",
  "inputs" : [
    { "name" : "input0", "shape" : [ 2, 2 ], "datatype" : "UINT32", "data" : [ 1, 2, 3, 4 ] },
    { "name" : "input1", "shape" : [ 3 ], "datatype" : "BOOL", "data" : [ true, false, true ] }
  ],
  "outputs" : [ { "name" : "output0" } ]
}"""
# KServe's "tensor data" example: nested row-major data.
KSERVE_NESTED = (b'{"inputs": [{"name": "input0", "shape": [2, 2], "datatype": "UINT32",'
                 b' "data": [[1, 2], [4, 5]]}]}')
# MLServer's string example: a BYTES tensor.
MLSERVER_BYTES = (b'{"inputs": [{"name": "word", "shape": [2, 1], "datatype": "BYTES",'
                  b' "data": ["cat", "bird"], "parameters": {"content_type": "str"}}]}')


def test_kserve_example_decodes_to_the_msgpack_form() -> None:
    signature = Signature(inputs=(_spec("input0", "uint32", (2, 2)),
                                  _spec("input1", "bool", (3,))),
                          outputs=(_spec("output0", "float32", (None,)),
                                   _spec("output1", "float32", (None,))))
    request = decode_request(KSERVE_EXAMPLE, [], default_id="d")
    assert request.format == "json" and request.request_id == "42"
    assert request.outputs == ("output0",)
    bound = request.bind(signature)
    want = {"input0": np.array([[1, 2], [3, 4]], np.uint32),
            "input1": np.array([True, False, True])}
    value, headers = encode_request(want, format="msgpack")
    via_msgpack = decode_request(value, headers, default_id="d").bind(signature)
    for name, arr in want.items():
        for got in (bound.feeds[name], via_msgpack.feeds[name]):
            assert got.dtype == arr.dtype and got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)
    # The requested outputs filter the answer.
    outputs = {"output0": np.array([1.0, 1.1], np.float32),
               "output1": np.array([2.0], np.float32)}
    body, ctype = encode_response(request, bound, outputs, model="m", model_version=1)
    assert ctype == JSON
    answer = json.loads(body)
    assert [o["name"] for o in answer["outputs"]] == ["output0"]


def test_nested_and_bytes_examples() -> None:
    bound = decode_request(KSERVE_NESTED, [], default_id="d").bind(
        Signature(inputs=(_spec("input0", "uint32", (None, 2)),), outputs=()))
    assert bound.feeds["input0"].tolist() == [[1, 2], [4, 5]] and bound.rows == 2
    bound = decode_request(MLSERVER_BYTES, [], default_id="d").bind(
        Signature(inputs=(_spec("word", "string", (None, 1)),), outputs=()))
    assert bound.feeds["word"].dtype == object
    assert bound.feeds["word"].tolist() == [["cat"], ["bird"]]


def test_demo_mlp_answers_equal_from_json_and_msgpack() -> None:
    session = ort.InferenceSession(build_mlp().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    signature = Signature.from_session(session)
    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    # As a curl user writes it: nested lists of Python floats.
    text = json.dumps({"inputs": [{"name": "x", "shape": [3, 784], "datatype": "FP32",
                                   "data": x.tolist()}]}).encode()
    outs = []
    for value, headers in ((text, []), encode_request({"x": x}, format="msgpack")):
        request = decode_request(value, headers, default_id="d")
        bound = request.bind(signature)
        (probs,) = session.run(None, bound.feeds)
        body, ctype = encode_response(request, bound, {"probs": probs}, model="mnist-mlp",
                                      model_version=1, output_format="json")
        outs.append(decode_response(body, [("content-type", ctype.encode())]).outputs["probs"])
    np.testing.assert_array_equal(outs[0], outs[1])


# -- every datatype, flat and nested ------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(sorted(V2_TYPES.values())),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
    nested=st.booleans(),
    data=st.data(),
)
def test_every_datatype_round_trips(dtype: str, shape: tuple[int, ...], nested: bool,
                                    data: Any) -> None:
    arr = data.draw(hnp.arrays(np.dtype(dtype), shape,
                               elements={"allow_nan": False, "allow_infinity": False}
                               if np.dtype(dtype).kind == "f" else None))
    value, headers = encode_request({"t": arr}, format="json",
                                    form="nested" if nested else "flat")
    signature = Signature(inputs=(_spec("t", dtype, (None, *arr.shape[1:])),), outputs=())
    got = decode_request(value, headers, default_id="d").bind(signature).feeds["t"]
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


def test_strings_round_trip_as_bytes_datatype() -> None:
    arr = np.array([["a", "é"], ["", "z z"]], dtype=object)
    value, headers = encode_request({"s": arr}, format="json", form="nested")
    assert json.loads(value)["inputs"][0]["datatype"] == "BYTES"
    signature = Signature(inputs=(_spec("s", "string", (None, 2)),), outputs=())
    got = decode_request(value, headers, default_id="d").bind(signature).feeds["s"]
    assert got.tolist() == arr.tolist()


# -- errors ---------------------------------------------------------------------------------------

ERRORS: list[tuple[str, bytes, str]] = [
    ("not json", b"{nope", "not a valid JSON body"),
    ("not an object", b'{"inputs": 3}', "expected an object with 'inputs'"),
    ("nameless input", b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}',
     "every input needs a string 'name'"),
    ("unknown datatype", _body(x={"shape": [1], "datatype": "FP8", "data": [1]}),
     "unknown datatype 'FP8'"),
    ("text in numbers", _body(x={"shape": [2], "datatype": "FP32", "data": [1, "2"]}),
     "FP32 data holds str values"),
    ("null in numbers", _body(x={"shape": [2], "datatype": "FP32", "data": [1, None]}),
     "FP32 data holds NoneType values"),
    ("count", _body(x={"shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}),
     "shape [2, 2] needs 4 values, data has 3"),
    ("ragged", _body(x={"shape": [2, 2], "datatype": "FP32", "data": [[1, 2, 3], [4]]}),
     "ragged nested data"),
    ("too deep", _body(x={"shape": [2], "datatype": "FP32", "data": [[[1]], [[2]]]}),
     "nests deeper than its shape"),
    ("uint8 overflow", _body(x={"shape": [1], "datatype": "UINT8", "data": [300]}),
     "does not fit UINT8"),
    ("fp32 overflow", _body(x={"shape": [1], "datatype": "FP32", "data": [1e300]}),
     "does not fit FP32"),
    ("fractional int", _body(x={"shape": [2], "datatype": "INT64", "data": [1.0, 1.5]}),
     "INT64 data holds non-integer numbers"),
    ("bool as number", _body(x={"shape": [1], "datatype": "BOOL", "data": [1]}),
     "BOOL data must be true or false"),
    ("bytes as number", _body(x={"shape": [1], "datatype": "BYTES", "data": [1]}),
     "BYTES data must be strings"),
    ("negative dim", _body(x={"shape": [-1], "datatype": "FP32", "data": []}),
     "negative dimension"),
    ("duplicate", b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},'
                  b' {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
     "given twice"),
    ("id not a string", b'{"id": 7, "inputs": []}', "'id' must be a string"),
    ("bad outputs", b'{"inputs": [], "outputs": ["y"]}', "'outputs' must be a list"),
]


@pytest.mark.parametrize(("body", "fragment"), [c[1:] for c in ERRORS],
                         ids=[c[0] for c in ERRORS])
def test_malformed_json_is_a_decode_error(body: bytes, fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_request(body, [], default_id="d")
    assert fragment in str(info.value)


def test_integral_floats_are_accepted_for_ints() -> None:
    body = _body(x={"shape": [2], "datatype": "INT64", "data": [1.0, 2]})
    bound = decode_request(body, [], default_id="d").bind(
        Signature(inputs=(_spec("x", "int64", (None,)),), outputs=()))
    assert bound.feeds["x"].tolist() == [1, 2] and bound.feeds["x"].dtype == np.int64


def test_unknown_requested_output_is_a_mismatch() -> None:
    body = (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],'
            b' "outputs": [{"name": "nope"}]}')
    signature = Signature(inputs=(_spec("x", "float32", (None,)),),
                          outputs=(_spec("y", "float32", (None,)),))
    with pytest.raises(SchemaMismatch, match="requested output 'nope' is not an output"):
        decode_request(body, [], default_id="d").bind(signature)


def test_an_answer_that_cannot_be_written_is_a_worker_error() -> None:
    request = decode_request(b'{"inputs": []}', [], default_id="d")
    with pytest.raises(WorkerError) as info:
        encode_response(request, None, {"z": np.zeros(2, np.complex64)}, model="m",
                        model_version=1)
    assert isinstance(info.value, InferenceError)


# -- sniffing, ids, MLServer's headers ------------------------------------------------------


@pytest.mark.parametrize("headers", [[], [("content-type", b"application/json; charset=utf-8")],
                                     [("Content-Type", b"Application/JSON")]])
def test_json_is_recognised(headers: list) -> None:
    assert decode_request(b' \n\t{"inputs": []}', headers, default_id="d").format == "json"


@pytest.mark.parametrize(("headers", "key", "want"), [
    ([("request-id", b"hdr")], b"key", "hdr"),  # the header wins
    ([], b"key", "key"),  # then the key (MLServer's rule)
    ([], b"\xff\xfe", "body"),  # a key that is not UTF-8 is no id
    ([], b"", "body"),
    ([], None, "body"),
])
def test_request_id_rule(headers: list, key: bytes | None, want: str) -> None:
    request = decode_request(b'{"id": "body", "inputs": []}', headers, default_id="t/0/1",
                             key=key)
    assert request.request_id == want
    no_id = decode_request(b'{"inputs": []}', [], default_id="t/0/1", key=None)
    assert no_id.request_id == "t/0/1"


def test_the_key_is_not_the_id_for_other_formats() -> None:
    value, headers = encode_request({"x": np.zeros(1, np.float32)}, format="msgpack",
                                    request_id="body")
    headers = [h for h in headers if h[0] != "request-id"]
    assert decode_request(value, headers, default_id="d", key=b"key").request_id == "body"


@pytest.mark.parametrize("fmt", ["json", "msgpack", "arrow"])
@pytest.mark.parametrize(("headers", "model", "version"), [
    ([("mlserver-model", b"mnist-svm"), ("mlserver-version", b"v0.1.0")], "mnist-svm", None),
    ([("mlserver-model", b"m"), ("mlserver-version", b"v2")], "m", 2),
    ([("mlserver-model", b"m"), ("mlserver-version", b"3")], "m", 3),
    ([("mlserver-model", b"theirs"), ("model", b"ours"), ("mlserver-version", b"3"),
      ("model-version", b"4")], "ours", 4),
])
def test_mlserver_headers_are_synonyms(fmt: str, headers: list, model: str,
                                       version: int | None) -> None:
    value, _ = encode_request({"x": np.zeros(1, np.float32)}, format=fmt)
    request = decode_request(value, headers, default_id="d")
    assert (request.model, request.model_version) == (model, version)


def test_response_body_and_cloudevents_headers() -> None:
    incoming = [("mlserver-model", b"iris"), ("Ce-Type", b"io.seldon.serving.inference.request"),
                ("trace", None)]
    request = decode_request(b'{"inputs": []}', incoming, default_id="d", key=b"k-1")
    outputs = {"label": np.array([2, 0], np.int64), "probs": np.array([[0.5, 0.5]], np.float16)}
    body, ctype = encode_response(request, None, outputs, model="iris", model_version=3)
    assert json.loads(body) == {
        "model_name": "iris",
        "model_version": "3",
        "id": "k-1",
        "outputs": [
            {"name": "label", "shape": [2], "datatype": "INT64", "data": [2, 0]},
            {"name": "probs", "shape": [1, 2], "datatype": "FP16", "data": [0.5, 0.5]},
        ],
    }
    headers = response_headers(request, content_type=ctype, model="iris", model_version=3,
                               topic="in", partition=0, offset=9)
    assert headers == [
        ("mlserver-model", b"iris"),
        ("trace", None),  # NULL values are copied too
        ("content-type", b"application/json"),
        ("request-id", b"k-1"),
        ("model", b"iris"),
        ("model-version", b"3"),
        ("source-topic", b"in"),
        ("source-partition", b"0"),
        ("source-offset", b"9"),
        ("Ce-Specversion", b"0.3"),
        ("Ce-Source", b"io.seldon.serving.deployment.inference-worker"),
        ("Ce-Type", b"io.seldon.serving.inference.response"),  # the request's Ce-Type replaced
        ("Ce-Modelid", b"iris"),
        ("Ce-Inferenceservicename", b"inference-worker"),
        ("Ce-Endpoint", b"iris"),
        ("Ce-Id", b"k-1"),
        ("Ce-Requestid", b"k-1"),
    ]


def test_map_outputs_become_objects_with_string_keys() -> None:
    request = decode_request(b'{"inputs": []}', [], default_id="d")
    zipmap = [{0: 0.9, 1: 0.1}, {0: 0.2, 1: 0.8}]
    body, _ = encode_response(request, None, {"p": zipmap}, model="m", model_version=1)
    assert json.loads(body)["outputs"][0] == {
        "name": "p", "shape": [2], "datatype": "BYTES",
        "data": [{"0": 0.9, "1": 0.1}, {"0": 0.2, "1": 0.8}],
    }


def test_passthrough_travels_in_parameters() -> None:
    value, headers = encode_request({"x": np.ones((1, 2), np.float32)}, format="json",
                                    passthrough={"order": 7})
    request = decode_request(value, headers, default_id="d")
    bound = request.bind(Signature(inputs=(_spec("x", "float32", (None, 2)),), outputs=()))
    body, ctype = encode_response(request, bound, {"y": np.ones(1, np.float32)}, model="m",
                                  model_version=1)
    assert json.loads(body)["parameters"] == {"passthrough": {"order": 7}}
    assert decode_response(body, [("content-type", ctype.encode())]).passthrough == {"order": 7}


# -- the simdjson fast path gives what the general path gives ----------------------------------


def _both_paths(value: bytes, signature: Signature,
                monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, np.ndarray], ...]:
    fast = decode_request(value, [], default_id="d").bind(signature).feeds
    with monkeypatch.context() as m:
        m.setattr(json_codec, "_fast_body", lambda _value: None)
        general = decode_request(value, [], default_id="d").bind(signature).feeds
    return fast, general


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(sorted(set(V2_TYPES.values()) - {"bool"})),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
    data=st.data(),
)
def test_flat_numeric_requests_take_the_fast_path_and_decode_alike(
    dtype: str, shape: tuple[int, ...], data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    arr = data.draw(hnp.arrays(np.dtype(dtype), shape,
                               elements={"allow_nan": False, "allow_infinity": False}
                               if np.dtype(dtype).kind == "f" else None))
    value, _ = encode_request({"t": arr, "k": np.arange(3, dtype=np.int64)}, format="json",
                              request_id="r-1")
    assert json_codec._fast_body(value) is not None
    signature = Signature(inputs=(_spec("t", dtype, arr.shape), _spec("k", "int64", (3,))),
                          outputs=())
    fast, general = _both_paths(value, signature, monkeypatch)
    for name in ("t", "k"):
        assert fast[name].dtype == general[name].dtype
        np.testing.assert_array_equal(fast[name], general[name])
    np.testing.assert_array_equal(fast["t"], arr)


def test_the_demo_request_takes_the_fast_path() -> None:
    x = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    value, _ = encode_request({"input": x}, format="json", model="m")
    body = json_codec._fast_body(value)
    assert body is not None and body["inputs"][0]["data"].dtype == np.float32


@pytest.mark.parametrize(("body", "fragment"), [
    # as many numbers as the shape holds, but in sub-lists of 2 and 0: ragged
    (_body(x={"shape": [2], "datatype": "FP32", "data": [[1, 2], []]}), "ragged nested data"),
    (_body(x={"shape": [3], "datatype": "FP32", "data": [[1, 2], [], 3]}), "lists and scalars"),
    (_body(x={"shape": [1], "datatype": "INT8", "data": [-129]}), "does not fit INT8"),
    (_body(x={"shape": [1], "datatype": "UINT64", "data": [-1]}), "does not fit UINT64"),
    (_body(x={"shape": [1], "datatype": "FP16", "data": [1e6]}), "does not fit FP16"),
    (_body(x={"shape": [2], "datatype": "FP32", "data": [1, True]}), "holds bool"),
])
def test_what_the_fast_path_must_not_accept_gets_the_general_paths_error(
    body: bytes, fragment: str
) -> None:
    if "holds bool" in fragment:  # bools are numbers to the general path, as in Python
        bound = decode_request(body, [], default_id="d").bind(
            Signature(inputs=(_spec("x", "float32", (2,)),), outputs=()))
        assert bound.feeds["x"].tolist() == [1.0, 1.0]
        return
    with pytest.raises(DecodeError) as info:
        decode_request(body, [], default_id="d")
    assert fragment in str(info.value)


def test_a_key_given_twice_and_a_bracket_in_a_string_decode_as_orjson_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    twice = (b'{"id": "a[b", "inputs": [{"name": "x", "shape": [2], "datatype": "FP32",'
             b' "data": [9, 9], "data": [1, 2]}]}')
    signature = Signature(inputs=(_spec("x", "float32", (2,)),), outputs=())
    fast, general = _both_paths(twice, signature, monkeypatch)
    assert fast["x"].tolist() == general["x"].tolist() == [1.0, 2.0]
    assert decode_request(twice, [], default_id="d").request_id == "a[b"
