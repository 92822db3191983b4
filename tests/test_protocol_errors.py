"""Malformed and mismatched requests: each fails with its own type and says what went wrong."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from worker.demo import build_mlp
from worker.errors import DecodeError, SchemaMismatch, TooLarge, WorkerError
from worker.protocol import DEFAULT_LIMITS, MSGPACK, Limits, decode_request, encode_request
from worker.signature import Signature, TensorSpec

X = TensorSpec(name="x", onnx_type="tensor(float)", dtype=np.dtype("float32"), shape=(None, 784))
MLP_LIKE = Signature(inputs=(X,), outputs=())
TWO = Signature(inputs=(
    TensorSpec(name="a", onnx_type="tensor(float)", dtype=np.dtype("float32"), shape=(None, 2)),
    TensorSpec(name="b", onnx_type="tensor(int64)", dtype=np.dtype("int64"), shape=(None,)),
), outputs=())
# The same inputs, with axis 0 named alike: the model promises equal lengths.
TWO_NAMED = Signature(inputs=tuple(
    TensorSpec(s.name, s.onnx_type, s.dtype, s.shape, axis0_symbol="batch") for s in TWO.inputs
), outputs=())
MP = [("content-type", MSGPACK.encode())]


def mp(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def tensor(dtype: str = "float32", shape: list[int] | None = None, data: object = None) -> dict:
    shape = [1, 784] if shape is None else shape
    if data is None:
        data = b"\0" * (4 * int(np.prod(shape)))
    return {"dtype": dtype, "shape": shape, "data": data}


def arrow_value(rows: int = 4) -> bytes:
    value, _ = encode_request({"x": np.zeros((rows, 784), np.float32)}, format="arrow")
    return value


def decode(value: bytes, headers: list | None = None, limits: Limits = DEFAULT_LIMITS) -> object:
    return decode_request(value, headers or [], default_id="t/0/0", limits=limits)


# (id, value, headers, error type, message fragment): decode-time failures.
DECODE_CASES: list[tuple[str, bytes, list, type[WorkerError], str]] = [
    ("truncated arrow stream", arrow_value()[:200], [], DecodeError, "not a valid Arrow IPC"),
    ("truncated arrow body", arrow_value()[:-100], [], DecodeError, "not a valid Arrow IPC"),
    ("arrow header wrong magic", b"\xff\xff\xff\xfe" + arrow_value()[4:], [], DecodeError,
     "msgpack"),
    ("arrow content-type on msgpack", mp({"inputs": {}}),
     [("content-type", b"application/vnd.apache.arrow.stream")], DecodeError,
     "not a valid Arrow IPC"),
    ("garbage as msgpack", b"\xc1\xc1\xc1", [], DecodeError, "not a valid msgpack body"),
    ("trailing bytes", mp({"inputs": {}}) + b"\x00", [], DecodeError, "ExtraData"),
    ("empty value", b"", [], DecodeError, "not a valid msgpack body"),
    ("non-map top level", mp([1, 2, 3]), [], DecodeError, "expected a map with 'inputs', got list"),
    ("no inputs", mp({"id": "a"}), [], DecodeError, "expected 'inputs' to be a map"),
    ("unknown dtype", mp({"inputs": {"x": tensor("float128")}}), [], DecodeError,
     "input 'x': unknown dtype 'float128'; expected one of bool, int8"),
    ("tensor not a map", mp({"inputs": {"x": [1, 2]}}), [], DecodeError,
     "input 'x': expected a tensor map"),
    ("shape/data mismatch", mp({"inputs": {"x": tensor(data=b"\0" * 20)}}), [], DecodeError,
     "input 'x': shape [1, 784] of float32 needs 3136 bytes, data has 20"),
    ("list length mismatch", mp({"inputs": {"x": tensor(shape=[2, 2], data=[1, 2, 3])}}), [],
     DecodeError, "shape [2, 2] needs 4 values, data has 3"),
    ("ragged nested list", mp({"inputs": {"x": tensor(shape=[2, 2], data=[[1, 2], [3]])}}), [],
     DecodeError, "ragged nested list: at depth 1 expected a list of length 2"),
    ("over-nested list", mp({"inputs": {"x": tensor(shape=[2], data=[[1], [2]])}}), [],
     DecodeError, "ragged or over-nested"),
    ("text in a numeric list", mp({"inputs": {"x": tensor(shape=[1], data=["1.5"])}}), [],
     DecodeError, "holds text"),
    ("overflowing list value", mp({"inputs": {"x": tensor("uint8", [1], [300])}}), [],
     DecodeError, "does not fit uint8"),
    ("string with bin data", mp({"inputs": {"x": tensor("string", [1], b"ab")}}), [],
     DecodeError, "dtype 'string' needs a list of str"),
    ("negative dimension", mp({"inputs": {"x": tensor(shape=[-1, 784], data=b"")}}), [],
     DecodeError, "negative dimension"),
    ("non-integer dimension", mp({"inputs": {"x": tensor(shape=[1.5], data=b"")}}), [],
     DecodeError, "non-integer"),
    ("huge shape, tiny data", mp({"inputs": {"x": tensor(shape=[2**31, 2**31], data=b"")}}),
     [], TooLarge, "4611686018427387904 elements, over the limit"),
    ("huge rows, tiny data", mp({"inputs": {"x": tensor(shape=[2_000_000], data=b"")}}), [],
     TooLarge, "2000000 rows, over the limit"),
    ("rank over 32", mp({"inputs": {"x": tensor(shape=[1] * 40, data=b"")}}), [], DecodeError,
     "rank 40 is over the limit"),
    ("deep nesting", b"\x91" * 100_000 + b"\x00", [], DecodeError, "not a valid msgpack body"),
    ("bad model_version in body", mp({"inputs": {}, "model_version": "two"}), [], DecodeError,
     "expected a positive integer model version, got 'two'"),
    ("bad model-version header", mp({"inputs": {}}), [("model-version", b"1.5")], DecodeError,
     "header 'model-version': expected a positive integer model version, got '1.5'"),
    ("zero model-version header", mp({"inputs": {}}), [("model-version", b"0")], DecodeError,
     "positive integer"),
    ("non-UTF-8 header", mp({"inputs": {}}), [("model", b"\xff")], DecodeError,
     "header 'model' is not UTF-8"),
    ("unknown content-type", mp({"inputs": {}}), [("content-type", b"text/csv")],
     DecodeError, "unsupported content-type 'text/csv'"),
]


@pytest.mark.parametrize(("value", "headers", "error", "fragment"),
                         [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_malformed_request(value: bytes, headers: list, error: type[WorkerError],
                           fragment: str) -> None:
    with pytest.raises(error) as info:
        decode(value, headers)
    assert fragment in str(info.value)
    assert type(info.value) is error


def test_deep_passthrough_is_refused_at_decode() -> None:
    deep: object = 0
    for _ in range(200):
        deep = [deep]
    with pytest.raises(DecodeError, match="'passthrough' nests deeper than 64"):
        decode(mp({"inputs": {}, "passthrough": deep}))


def test_value_over_max_bytes_is_refused_before_parsing() -> None:
    with pytest.raises(TooLarge, match="the record value: 1001 bytes, over the limit of 1000"):
        decode(b"\xff" * 1001, limits=Limits(max_bytes=1000))


def test_arrow_rows_over_limit() -> None:
    with pytest.raises(TooLarge, match="4 rows, over the limit of 3"):
        decode(arrow_value(4), limits=Limits(max_rows=3))


def test_arrow_elements_over_limit_at_bind() -> None:
    request = decode(arrow_value(4), limits=Limits(max_elements=1000))
    with pytest.raises(TooLarge, match=r"input 'x' of shape \[4, 784\]: 3136 elements"):
        request.bind(MLP_LIKE)


def test_tombstone() -> None:
    with pytest.raises(DecodeError, match="tombstone"):
        decode(None)  # type: ignore[arg-type]


# Schema mismatches: valid bytes, wrong for this model.
def bind_mp(inputs: dict, signature: Signature = MLP_LIKE) -> object:
    return decode(mp({"inputs": inputs})).bind(signature)


def bind_arrow(columns: dict, signature: Signature = MLP_LIKE) -> object:
    sink = pa.BufferOutputStream()
    batch = pa.record_batch(columns)
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return decode(sink.getvalue().to_pybytes()).bind(signature)


def fsl(arr: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])


MISMATCH_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("msgpack dtype and shape", lambda: bind_mp({"x": tensor("float64", [32, 780],
                                                             b"\0" * 8 * 32 * 780)}),
     "input 'x': expected float32[?,784], got float64[32,780]"),
    ("msgpack int not cast to float", lambda: bind_mp({"x": tensor("int32", [1, 784])}),
     "input 'x': expected float32[?,784], got int32[1,784]"),
    ("msgpack strings for a float input", lambda: bind_mp({"x": tensor("string", [1, 2],
                                                                    ["a", "b"])}),
     "input 'x': expected float32[?,784], got string[1,2]"),
    ("msgpack rank", lambda: bind_mp({"x": tensor(shape=[784])}),
     "input 'x': expected float32[?,784], got float32[784]"),
    ("msgpack unknown input", lambda: bind_mp({"y": tensor()}),
     "unknown input 'y'; the model's inputs are: x float32[?,784]"),
    ("msgpack missing input", lambda: bind_mp({"a": tensor(shape=[1, 2], data=[1, 2])}, TWO),
     "missing input 'b'; the model's inputs are: a float32[?,2], b int64[?]"),
    ("msgpack rows disagree on a named axis", lambda: bind_mp({
        "a": tensor(shape=[2, 2], data=[1, 2, 3, 4]), "b": tensor("int64", [3], [1, 2, 3])},
        TWO_NAMED),
     "inputs disagree on the row count (axis 0): 'b' has 3, 'a' has 2"),
    ("arrow dtype", lambda: bind_arrow({"x": fsl(np.zeros((2, 784), np.float64))}),
     "input 'x': expected float32[?,784], got float64[2,784]"),
    ("arrow per-row shape", lambda: bind_arrow({"x": fsl(np.zeros((2, 780), np.float32))}),
     "input 'x': expected float32[?,784], got float32[2,780]"),
    ("arrow missing input", lambda: bind_arrow({"a": fsl(np.zeros((2, 2), np.float32))}, TWO),
     "missing input 'b': no column of that name; the model's inputs are: a float32[?,2], "
     "b int64[?]; the message has columns: a: fixed_size_list<item: float>[2]"),
    ("arrow unsupported column type", lambda: bind_arrow({"x": pa.array([{"a": 1.0}])}),
     "input 'x': a column of type struct<a: double> cannot feed a tensor"),
    ("arrow list of the wrong dtype", lambda: bind_arrow({"x": pa.array([[1.0]])}),
     "input 'x': expected float32[?,784], got float64[1,1]"),
    ("arrow ragged list column", lambda: bind_arrow({"x": pa.array([[1.0], [1.0, 2.0]])}),
     "input 'x': a ragged list (lengths [1, 2] at depth 1)"),
    ("arrow tabular with nothing numeric", lambda: bind_arrow({"s": pa.array(["a"])}),
     "missing input 'x': no column of that name and no numeric columns"),
    ("arrow tabular width", lambda: bind_arrow({"a": np.zeros(2, np.float32)}),
     "input 'x': expected float32[?,784], got float32[2,1]"),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in MISMATCH_CASES],
                         ids=[c[0] for c in MISMATCH_CASES])
def test_schema_mismatch(make: Callable[[], object], fragment: str) -> None:
    with pytest.raises(SchemaMismatch) as info:
        make()
    assert fragment in str(info.value)


def test_schema_mismatch_against_a_real_session() -> None:
    session = ort.InferenceSession(build_mlp().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    signature = Signature.from_session(session)
    value, headers = encode_request({"x": np.zeros((32, 780))}, format="msgpack")
    with pytest.raises(SchemaMismatch, match=r"^input 'x': expected float32\[\?,784\], "
                                             r"got float64\[32,780\]$"):
        decode(value, headers).bind(signature)


def test_too_large_carries_its_numbers() -> None:
    err = TooLarge("the response", 2_000_000, 1_048_588, where="topic 'out'")
    assert (err.actual, err.limit, err.unit, err.error_type) == (
        2_000_000, 1_048_588, "bytes", "too-large"
    )
    assert str(err) == "the response: 2000000 bytes, over the limit of 1048588 of topic 'out'"
