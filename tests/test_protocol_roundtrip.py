"""Property-based round trips: request encode -> decode -> bind, response encode -> decode."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from worker.protocol import (
    Bound,
    Request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from worker.signature import Signature, TensorSpec

NUMERIC = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
]
ONNX_NAMES = {
    "bool": "bool", "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "float16": "float16", "float32": "float", "float64": "double", "string": "string",
}
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def tensors(draw: Any, min_dim: int = 0) -> np.ndarray:
    """A numeric, bool or string tensor of rank 1–4 with at least one row.

    Arrow cannot express a zero-sized per-row dimension (FixedSizeList needs
    list_size >= 1), so the Arrow tests pass ``min_dim=1``.
    """
    dtype = draw(st.sampled_from([*NUMERIC, "string"]))
    rank = draw(st.integers(1, 4))
    dims = draw(st.lists(st.integers(min_dim, 3), min_size=rank - 1, max_size=rank - 1))
    shape = (draw(st.integers(1, 5)), *dims)
    if dtype == "string":
        count = int(np.prod(shape))
        words = draw(st.lists(st.text(max_size=6), min_size=count, max_size=count))
        arr = np.empty(count, dtype=object)
        arr[:] = words
        return arr.reshape(shape)
    return draw(hnp.arrays(np.dtype(dtype), shape))


def spec_for(name: str, arr: np.ndarray) -> TensorSpec:
    dtype = np.dtype(np.str_) if arr.dtype == object else arr.dtype
    wire = "string" if arr.dtype == object else arr.dtype.name
    return TensorSpec(
        name=name, onnx_type=f"tensor({ONNX_NAMES[wire]})", dtype=dtype,
        shape=(None, *arr.shape[1:]),
    )


def assert_same(got: object, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)  # NaN == NaN here


def arrow_forms(arr: np.ndarray) -> list[str]:
    if arr.ndim == 1:
        return ["auto", "primitive", "tensor", "fixed_size_list"]
    if arr.dtype == object:
        return ["auto", "fixed_size_list"]
    # bool tensors are legal in the extension type, though only we can read them back.
    return ["auto", "tensor", "fixed_size_list"]


@SETTINGS
@given(a=tensors(min_dim=1), b=tensors(min_dim=1))
def test_request_round_trip_arrow(a: np.ndarray, b: np.ndarray) -> None:
    b = b[: a.shape[0]] if b.shape[0] >= a.shape[0] else np.resize(b, (a.shape[0], *b.shape[1:]))
    signature = Signature(inputs=(spec_for("a", a), spec_for("b", b)), outputs=())
    for form in sorted(set(arrow_forms(a)) & set(arrow_forms(b))):
        value, headers = encode_request({"a": a, "b": b}, format="arrow", arrow_form=form,
                                        model="m", request_id="rid")
        request = decode_request(value, headers, default_id="t/0/0")
        assert (request.format, request.model, request.request_id) == ("arrow", "m", "rid")
        bound = request.bind(signature)
        assert bound.rows == a.shape[0]
        assert_same(bound.feeds["a"], a)
        assert_same(bound.feeds["b"], b)
        assert bound.passthrough is None


@SETTINGS
@given(a=tensors(), as_list=st.booleans(), nested=st.booleans())
def test_request_round_trip_msgpack(a: np.ndarray, as_list: bool, nested: bool) -> None:
    signature = Signature(inputs=(spec_for("a", a),), outputs=())
    value, headers = encode_request({"a": a}, format="msgpack", model_version=3,
                                    passthrough={"tag": [1, "x"]})
    if as_list and a.dtype != object:
        import msgpack

        body = msgpack.unpackb(value)
        body["inputs"]["a"]["data"] = a.tolist() if nested else a.ravel().tolist()
        value = msgpack.packb(body)
    request = decode_request(value, headers, default_id="t/0/7")
    assert (request.format, request.model_version, request.request_id) == ("msgpack", 3, "t/0/7")
    bound = request.bind(signature)
    assert_same(bound.feeds["a"], a)
    assert bound.passthrough == {"tag": [1, "x"]}


def _request(fmt: str, rows: int) -> tuple[Request, Bound]:
    x = np.zeros((rows, 2), np.float32)
    value, headers = encode_request({"x": x}, format=fmt, request_id="r")
    request = decode_request(value, headers, default_id="d")
    spec = TensorSpec(name="x", onnx_type="tensor(float)", dtype=np.dtype("float32"),
                      shape=(None, 2))
    return request, request.bind(Signature(inputs=(spec,), outputs=()))


@SETTINGS
@given(outs=st.lists(tensors(min_dim=1), min_size=1, max_size=3), with_map=st.booleans(),
       fmt=st.sampled_from(["arrow", "msgpack"]))
def test_response_round_trip(outs: list[np.ndarray], with_map: bool, fmt: str) -> None:
    rows = outs[0].shape[0]
    outputs: dict[str, object] = {
        f"o{i}": (o if o.shape[0] == rows else np.resize(o, (rows, *o.shape[1:])))
        for i, o in enumerate(outs)
    }
    if with_map:
        outputs["label_probs"] = [{0: 0.25, 1: 0.75} for _ in range(rows)]
    request, bound = _request(fmt, rows)
    body, content_type = encode_response(request, bound, outputs, model="m", model_version=2)
    response = decode_response(body, [("content-type", content_type.encode())])
    assert list(response.outputs) == list(outputs)
    for name, want in outputs.items():
        if isinstance(want, np.ndarray):
            assert_same(response.outputs[name], want)
        else:
            assert response.outputs[name] == want
    if fmt == "msgpack":
        assert (response.request_id, response.model, response.model_version) == ("r", "m", 2)


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
@pytest.mark.parametrize("out_fmt", ["same", "arrow", "msgpack"])
def test_passthrough_crosses_formats(fmt: str, out_fmt: str) -> None:
    import pyarrow as pa

    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    passthrough: object = (
        pa.table({"key": ["a", "b", "c"], "n": [1, 2, 3]}) if fmt == "arrow"
        else {"key": ["a", "b", "c"], "n": [1, 2, 3]}
    )
    value, headers = encode_request({"x": x}, format=fmt, passthrough=passthrough)
    request = decode_request(value, headers, default_id="d")
    spec = TensorSpec(name="x", onnx_type="tensor(float)", dtype=np.dtype("float32"),
                      shape=(None, 2))
    bound = request.bind(Signature(inputs=(spec,), outputs=()))
    body, ctype = encode_response(request, bound, {"y": x[:, 0]}, model="m", model_version=1,
                                  output_format=out_fmt)
    response = decode_response(body, [("content-type", ctype.encode())])
    got = response.passthrough
    columns = got.to_pydict() if isinstance(got, pa.Table) else got
    assert columns == {"key": ["a", "b", "c"], "n": [1, 2, 3]}
    np.testing.assert_array_equal(response.outputs["y"], x[:, 0])
