"""Arrow specifics: column forms, zero copy, the tabular rule, passthrough, fixed axis 0."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from worker.demo import build_mlp
from worker.errors import SchemaMismatch
from worker.protocol import (
    ARROW,
    Request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from worker.protocol.arrow import write_stream
from worker.signature import Signature, TensorSpec


def f32(name: str, *shape: int | None) -> TensorSpec:
    return TensorSpec(name=name, onnx_type="tensor(float)", dtype=np.dtype("float32"),
                      shape=tuple(shape))


def stream(*batches: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode(value: bytes) -> Request:
    return decode_request(value, [], default_id="t/0/0")


def owns_nothing(arr: np.ndarray, value: bytes) -> bool:
    """The array is a view into the record value itself."""
    return np.shares_memory(arr, np.frombuffer(value, dtype=np.uint8)) and not arr.flags.owndata


@pytest.fixture(scope="module")
def mlp() -> ort.InferenceSession:
    return ort.InferenceSession(build_mlp().SerializeToString(),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("form", ["auto", "tensor", "fixed_size_list"])
def test_demo_model_end_to_end_zero_copy(mlp: ort.InferenceSession, form: str) -> None:
    signature = Signature.from_session(mlp)
    x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
    value, headers = encode_request({"x": x}, format="arrow", arrow_form=form, model="mnist-mlp")
    request = decode_request(value, headers, default_id="t/0/0")
    bound = request.bind(signature)
    assert owns_nothing(bound.feeds["x"], value), "the tensor payload was copied"
    (probs,) = mlp.run(None, bound.feeds)
    body, ctype = encode_response(request, bound, {"probs": probs}, model="mnist-mlp",
                                  model_version=1)
    assert ctype == ARROW
    table = pa.ipc.open_stream(body).read_all()
    assert table.schema.field("probs").type == pa.fixed_shape_tensor(pa.float32(), [10])
    np.testing.assert_array_equal(decode_response(body, []).outputs["probs"], probs)


def test_primitive_column_zero_copy_and_per_row_shape_1() -> None:
    x = np.arange(5, dtype=np.float64)
    value = stream(pa.record_batch({"x": x}))
    bound = decode(value).bind(Signature(inputs=(
        TensorSpec(name="x", onnx_type="tensor(double)", dtype=np.dtype("float64"),
                   shape=(None, 1)),
    ), outputs=()))
    assert bound.feeds["x"].shape == (5, 1)
    assert owns_nothing(bound.feeds["x"], value)


def test_nested_fixed_size_list_rank_4() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    value, _ = encode_request({"img": x}, format="arrow", arrow_form="fixed_size_list")
    bound = decode(value).bind(Signature(inputs=(f32("img", None, 3, 4, 5),), outputs=()))
    np.testing.assert_array_equal(bound.feeds["img"], x)
    assert owns_nothing(bound.feeds["img"], value)


def test_sliced_batch_is_still_correct() -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4).slice(3, 4)
    value = stream(pa.record_batch([arr], names=["x"]))
    bound = decode(value).bind(Signature(inputs=(f32("x", None, 4),), outputs=()))
    np.testing.assert_array_equal(bound.feeds["x"], x[3:7])


def test_multi_batch_stream_is_concatenated() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    batches = [
        pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(x[i:i + 3].ravel()), 2),
                         pa.array(["a", "b", "c"])], names=["x", "k"])
        for i in (0, 3)
    ]
    request = decode(stream(*batches))
    bound = request.bind(Signature(inputs=(f32("x", None, 2),), outputs=()))
    np.testing.assert_array_equal(bound.feeds["x"], x)
    assert bound.rows == 6
    body, _ = encode_response(request, bound, {"y": x[:, 0]}, model="m", model_version=1)
    response = decode_response(body, [])
    assert response.passthrough.column("k").to_pylist() == list("abcabc")


def test_tabular_rule_stacks_numeric_columns_in_schema_order() -> None:
    table = pa.record_batch({
        "b": np.array([1, 2, 3], np.float32),
        "id": pa.array(["r1", "r2", "r3"]),
        "a": np.array([4, 5, 6], np.float32),
    })
    request = decode(stream(table))
    bound = request.bind(Signature(inputs=(f32("features", None, 2),), outputs=()))
    np.testing.assert_array_equal(bound.feeds["features"], [[1, 4], [2, 5], [3, 6]])
    assert bound.passthrough.column_names == ["id"]
    body, _ = encode_response(request, bound, {"score": np.array([0.1, 0.2, 0.3])},
                              model="m", model_version=1)
    out = pa.ipc.open_stream(body).read_all()
    assert out.column_names == ["score", "id"]
    assert out.column("id").to_pylist() == ["r1", "r2", "r3"]


def test_tabular_rule_refuses_mixed_types() -> None:
    table = pa.record_batch({"a": np.array([1.0], np.float32), "b": np.array([2], np.int64)})
    with pytest.raises(SchemaMismatch, match=r"input 'x': expected float32\[\?,2\], got "
                                             r"columns of mixed types \(a: float, b: int64\)"):
        decode(stream(table)).bind(Signature(inputs=(f32("x", None, 2),), outputs=()))


def test_tabular_primitive_form_from_producer() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    value, _ = encode_request({"x": x}, format="arrow", arrow_form="primitive")
    bound = decode(value).bind(Signature(inputs=(f32("x", None, 4),), outputs=()))
    np.testing.assert_array_equal(bound.feeds["x"], x)


def test_passthrough_columns_row_aligned_and_name_collision() -> None:
    x = np.ones((3, 2), np.float32)
    value, headers = encode_request(
        {"x": x}, format="arrow",
        passthrough={"key": ["a", "b", "c"], "y": [7, 8, 9], "ts": pa.array([1, 2, 3],
                                                                             pa.timestamp("ms"))},
    )
    request = decode_request(value, headers, default_id="d")
    bound = request.bind(Signature(inputs=(f32("x", None, 2),), outputs=()))
    body, _ = encode_response(request, bound, {"y": np.zeros(3, np.float32)}, model="m",
                              model_version=1)
    out = pa.ipc.open_stream(body).read_all()
    assert out.column_names == ["y", "key", "passthrough.y", "ts"]
    assert out.column("passthrough.y").to_pylist() == [7, 8, 9]
    response = decode_response(body, [])
    assert list(response.outputs) == ["y"]
    assert response.passthrough.column_names == ["key", "passthrough.y", "ts"]


def test_fixed_axis_0() -> None:
    x = np.ones((3, 2), np.float32)
    value, _ = encode_request({"x": x}, format="arrow")
    bound = decode(value).bind(Signature(inputs=(f32("x", 1, 2),), outputs=()))
    assert bound.rows == 3 and bound.run_rows == 1
    assert [c["x"].shape for c in bound.chunks()] == [(1, 2)] * 3
    assert decode(value).bind(Signature(inputs=(f32("x", 3, 2),), outputs=())).rows == 3
    with pytest.raises(SchemaMismatch, match=r"input 'x': expected float32\[4,2\], got "
                                             r"float32\[3,2\]"):
        decode(value).bind(Signature(inputs=(f32("x", 4, 2),), outputs=()))


def test_permuted_fixed_shape_tensor_is_read_logically() -> None:
    logical = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    physical = np.ascontiguousarray(logical.transpose(0, 2, 1))  # rows, 3, 2 in memory
    # shape is the physical one; permutation orders it into the logical [2, 3]
    typ = pa.fixed_shape_tensor(pa.float32(), [3, 2], permutation=[1, 0])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(physical.ravel()), 6)
    value = stream(pa.record_batch([pa.ExtensionArray.from_storage(typ, storage)], names=["x"]))
    bound = decode(value).bind(Signature(inputs=(f32("x", None, 2, 3),), outputs=()))
    np.testing.assert_array_equal(bound.feeds["x"], logical)


def test_null_values_are_a_schema_mismatch() -> None:
    value = stream(pa.record_batch({"x": pa.array([1.0, None], pa.float32())}))
    with pytest.raises(SchemaMismatch, match=r"input 'x': the column holds 1 null value"):
        decode(value).bind(Signature(inputs=(f32("x", None),), outputs=()))


def test_map_output_column() -> None:
    x = np.ones((2, 2), np.float32)
    value, headers = encode_request({"x": x}, format="arrow")
    request = decode_request(value, headers, default_id="d")
    bound = request.bind(Signature(inputs=(f32("x", None, 2),), outputs=()))
    outputs: dict[str, object] = {
        "label": np.array([1, 0], np.int64),
        "probabilities": [{0: 0.25, 1: 0.75}, {0: 0.5, 1: 0.5}],
    }
    body, _ = encode_response(request, bound, outputs, model="m", model_version=1)
    table = pa.ipc.open_stream(body).read_all()
    assert table.schema.field("probabilities").type == pa.map_(pa.int64(), pa.float64())
    assert decode_response(body, []).outputs["probabilities"] == outputs["probabilities"]


def test_write_stream_round_trip_of_strings() -> None:
    batch = pa.record_batch({"text": pa.array(["a", "bc"])})
    bound = decode(write_stream(batch)).bind(Signature(inputs=(
        TensorSpec(name="text", onnx_type="tensor(string)", dtype=np.dtype(np.str_),
                   shape=(None,)),
    ), outputs=()))
    assert bound.feeds["text"].dtype == object
    assert bound.feeds["text"].tolist() == ["a", "bc"]
