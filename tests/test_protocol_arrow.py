"""Arrow specifics: column forms, zero copy, the tabular rule, passthrough, fixed axis 0."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from worker.demo import build_mlp
from worker.errors import SchemaMismatch, WorkerError
from worker.protocol import (
    ARROW,
    Request,
    arrow,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from worker.protocol.arrow import write_stream
from worker.protocol.base import Bound, Limits
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


# -- every Arrow type a pandas DataFrame can produce -------------------------------------------

X2 = np.arange(4, dtype=np.float32).reshape(2, 2)
# What pa.Table.from_pandas makes of each kind of pandas column (two rows).
PANDAS_COLUMNS: dict[str, pa.Array] = {
    "categorical": pa.array(["red", "blue"]).dictionary_encode(),
    "ordered_categorical": pa.DictionaryArray.from_arrays(
        pa.array([1, 0], pa.int8()), pa.array(["low", "high"]), ordered=True),
    "int_categorical": pa.array([10, 20], pa.int64()).dictionary_encode(),
    "nullable_int": pa.array([1, None], pa.int64()),
    "nullable_bool": pa.array([True, None], pa.bool_()),
    "float_nan": pa.array([1.5, float("nan")], pa.float64()),
    "timestamp": pa.array([0, 1_700_000_000_000_000_000], pa.timestamp("ns")),
    "timestamp_tz": pa.array([0, 1], pa.timestamp("ns", tz="Europe/Paris")),
    "duration": pa.array([1, 2], pa.duration("ns")),
    "date": pa.array([0, 19000], pa.date32()),
    "string": pa.array(["a", None]),
    "large_string": pa.array(["a", "b"], pa.large_string()),
    "string_view": pa.array(["a", "a much longer string than twelve"], pa.string_view()),
    "binary": pa.array([b"\x00", b"\xff"]),
    "large_list": pa.array([[1.0], [2.0, 3.0]], pa.large_list(pa.float64())),
    "list_of_str": pa.array([["a"], []], pa.list_(pa.string())),
    "struct": pa.array([{"a": 1, "b": "x"}, {"a": 2, "b": None}]),
    "decimal": pa.array([Decimal("1.25"), Decimal("-2.50")], pa.decimal128(10, 2)),
    "float16": pa.array(np.array([0.5, 1.0], np.float16)),
}


@pytest.mark.parametrize("out_fmt", ["arrow", "msgpack", "json"])
@pytest.mark.parametrize("column", sorted(PANDAS_COLUMNS))
def test_pandas_column_types_pass_through(column: str, out_fmt: str) -> None:
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(X2.ravel()), 2),
                      column: PANDAS_COLUMNS[column]})
    # Both a third party's stream and our own encoder's must decode.
    for value in (stream(*table.to_batches()),
                  encode_request({"x": X2}, format="arrow",
                                 passthrough={column: PANDAS_COLUMNS[column]})[0]):
        request = decode(value)
        bound = request.bind(Signature(inputs=(f32("x", None, 2),), outputs=()))
        body, ctype = encode_response(request, bound, {"y": X2.sum(axis=1)}, model="m",
                                      model_version=1, output_format=out_fmt)
        answer = decode_response(body, [("content-type", ctype.encode())])
        np.testing.assert_array_equal(answer.outputs["y"], X2.sum(axis=1))
        if out_fmt == "arrow":
            back = pa.ipc.open_stream(body).read_all()  # any reader can read it
            assert back.column(column).type == PANDAS_COLUMNS[column].type
            assert back.column(column).chunk(0).to_string() == PANDAS_COLUMNS[column].to_string()
        else:
            assert isinstance(answer.passthrough, dict)
            assert len(answer.passthrough[column]) == 2


def test_dictionary_columns_with_replaced_dictionaries_across_batches() -> None:
    first = pa.record_batch({"x": pa.array([1.0], pa.float32()),
                             "colour": pa.array(["red"]).dictionary_encode()})
    second = pa.record_batch({"x": pa.array([2.0], pa.float32()),
                              "colour": pa.array(["blue"]).dictionary_encode()})
    request = decode(stream(first, second))
    bound = request.bind(Signature(inputs=(f32("x", None),), outputs=()))
    body, _ = encode_response(request, bound, {"y": np.array([1.0, 2.0], np.float32)},
                              model="m", model_version=1)
    back = pa.ipc.open_stream(body).read_all()
    assert back.column("colour").to_pylist() == ["red", "blue"]


STRING_INPUT = Signature(inputs=(TensorSpec("word", "tensor(string)", np.dtype(np.str_),
                                             (None, 1)),), outputs=())


@pytest.mark.parametrize("words", [
    pa.array(["cat", "dog", "cat"]).dictionary_encode(),
    pa.array(["cat", "dog", "cat"], pa.large_string()),
    pa.array(["cat", "dog", "cat"], pa.string_view()),
    pa.array([["cat"], ["dog"], ["cat"]], pa.list_(pa.string())),
], ids=["dictionary", "large_string", "string_view", "list"])
def test_string_inputs_from_every_string_form(words: pa.Array) -> None:
    bound = decode(stream(pa.record_batch({"word": words}))).bind(STRING_INPUT)
    assert bound.feeds["word"].tolist() == [["cat"], ["dog"], ["cat"]]


@pytest.mark.parametrize("values", [
    pa.array([1, 2, 3], pa.int64()),  # a pandas Int64 column without nulls
    pa.array([1, 2, 3], pa.int64()).dictionary_encode(),
    pa.array([[1], [2], [3]], pa.large_list(pa.int64())),
], ids=["nullable_int", "int_dictionary", "large_list"])
def test_integer_inputs_from_pandas_forms(values: pa.Array) -> None:
    signature = Signature(inputs=(TensorSpec("n", "tensor(int64)", np.dtype(np.int64),
                                             (None, 1)),), outputs=())
    bound = decode(stream(pa.record_batch({"n": values}))).bind(signature)
    assert bound.feeds["n"].dtype == np.int64 and bound.feeds["n"].tolist() == [[1], [2], [3]]


def test_nullable_int_with_nulls_or_a_timestamp_cannot_feed_an_input() -> None:
    signature = Signature(inputs=(TensorSpec("n", "tensor(int64)", np.dtype(np.int64),
                                             (None,)),), outputs=())
    with pytest.raises(SchemaMismatch, match="null value"):
        decode(stream(pa.record_batch({"n": PANDAS_COLUMNS["nullable_int"]}))).bind(signature)
    with pytest.raises(SchemaMismatch, match="timestamp"):
        decode(stream(pa.record_batch({"n": PANDAS_COLUMNS["timestamp"]}))).bind(signature)


def test_an_answer_arrow_cannot_hold_is_a_worker_error_not_bad_bytes() -> None:
    value, headers = encode_request({"x": X2}, format="arrow")
    request = decode_request(value, headers, default_id="d")
    bound = request.bind(Signature(inputs=(f32("x", None, 2),), outputs=()))
    for outputs in ({"y": np.zeros((2, 0), np.float32)},  # a zero-sized per-row shape
                    {"y": [1, "mixed"]},  # no one Arrow type
                    {"y": np.zeros(3, np.float32)}):  # not row-aligned
        with pytest.raises(WorkerError):
            encode_response(request, bound, outputs, model="m", model_version=1)


@pytest.mark.parametrize("columns", [
    {"x": pa.array([1.0, 2.0], pa.float32()), "s": pa.array(["a", "b"])},
    {"t": pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.float32(), (2,)),
        pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0, 3.0, 4.0], pa.float32()), 2))},
    {"c": pa.array(["a", "b"]).dictionary_encode()},
    {"nested": pa.array([["a"], ["b"]]).cast(pa.list_(pa.dictionary(pa.int32(), pa.string())))},
], ids=["plain", "tensor", "dictionary", "nested-dictionary"])
def test_write_stream_is_what_pyarrows_writer_writes(columns: dict[str, pa.Array]) -> None:
    batch = pa.record_batch(columns, metadata={b"k": b"v"})
    assert write_stream(batch) == stream(batch)
    assert pa.ipc.open_stream(write_stream(batch)).read_all().equals(pa.Table.from_batches([batch]))


def _answer(outputs: dict[str, np.ndarray], rows: int, whole: bool = False) -> bytes:
    """What pyarrow's own stream writer makes of an answer: the general path's columns."""
    from worker.protocol import arrow

    arrays = [arrow._output_array(n, v, rows, whole) for n, v in outputs.items()]
    metadata = {arrow.OUTPUTS_METADATA_KEY: arrow._names_json(tuple(outputs))}
    if whole:
        metadata[arrow.WHOLE_METADATA_KEY] = b"true"
    return stream(pa.RecordBatch.from_arrays(arrays, names=list(outputs), metadata=metadata))


_RNG = np.random.default_rng(7)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int64, np.uint16])
def test_answers_of_a_seen_size_are_its_header_and_raw_values_in_pyarrows_bytes(
    dtype: type,
) -> None:
    """After the first answer of each row count, an answer is the kept record batch
    header and the raw values (padded to 8 bytes): still byte for byte pyarrow's
    stream, at every size, odd byte counts and interleaved sizes included."""
    from worker.protocol import arrow

    def outputs(rows: int) -> dict[str, np.ndarray]:
        return {"probs": (_RNG.random((rows, 3)) * 100).astype(dtype),
                "label": (_RNG.random(rows) * 100).astype(dtype)}  # fmt: skip

    for rows in [1, 5, 1, 7, 5, 64, 7, 0, 64]:
        out = outputs(rows)
        assert arrow._encode_response(out, rows, False, None) == _answer(out, rows)
    layout = arrow._layout((("probs", np.dtype(dtype), (3,)), ("label", np.dtype(dtype), ())),
                           False)  # fmt: skip
    assert layout is not None and all(layout.headers[r] for r in (1, 5, 7, 64))
    # A kept header is what later answers are written with: a wrong one shows.
    layout.headers[5] = b"not a header"
    assert arrow._encode_response(outputs(5), 5, False, None).count(b"not a header") == 1
    del layout.headers[5]


@pytest.mark.parametrize("outputs, rows, whole", [
    ({"probs": _RNG.random((16, 10), dtype=np.float32)}, 16, False),
    ({"probs": _RNG.random((16, 10)).astype(np.float64)}, 16, False),  # same name, new dtype
    ({"probs": _RNG.random((16, 5), dtype=np.float32)}, 16, False),  # same name, new shape
    ({"probs": _RNG.random((4, 3, 2), dtype=np.float32),
      "label": np.arange(4, dtype=np.int64)}, 4, False),
    ({"label": np.arange(4, dtype=np.int64),
      "probs": _RNG.random((4, 3, 2), dtype=np.float32)}, 4, False),  # same columns, new order
    ({"probs": np.asfortranarray(_RNG.random((3, 7), dtype=np.float32))}, 3, False),
    ({"probs": _RNG.random((6, 7), dtype=np.float32)[::2]}, 3, False),  # strided rows
    ({"probs": _RNG.random((0, 7), dtype=np.float32)}, 0, False),
    ({"score": np.array(0.5, np.float32)}, 1, False),
    ({"probs": _RNG.random(5, dtype=np.float32)}, 1, True),  # a whole answer: one row
    ({"probs": _RNG.random((5,), dtype=np.float32)}, 5, False),  # the same column, not whole
], ids=["f32", "f64", "narrower", "two", "reordered", "fortran", "strided", "empty", "scalar",
        "whole", "not-whole"])  # fmt: skip
def test_numeric_answers_reuse_their_schema_and_write_pyarrows_bytes(
    outputs: dict[str, np.ndarray], rows: int, whole: bool
) -> None:
    """The answer's schema message is written once per layout and reused: every answer
    is still byte for byte what pyarrow's stream writer writes, whatever came before."""
    from worker.protocol import arrow

    before = arrow._layout.cache_info()
    for _ in range(2):
        value = arrow._encode_response(outputs, rows, whole, None)
        assert value == _answer(outputs, rows, whole)
        table = pa.ipc.open_stream(value).read_all()
        assert table.num_rows == rows
    after = arrow._layout.cache_info()
    assert after.hits + after.misses - before.hits - before.misses == 2  # the fast path ran
    assert after.hits > before.hits  # the second answer reused the first one's schema


# -- the kept schema: record batches read against a schema parsed once ------------


def _full_reader(value: bytes | memoryview) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(value)).read_all()


def test_a_repeated_schema_is_read_once_and_each_schema_reads_its_own_values() -> None:
    floats = stream(pa.record_batch([pa.array([1.5, 2.5], pa.float32())], names=["x"]))
    ints = stream(pa.record_batch([pa.array([7, 8, 9], pa.int64())], names=["x"]))
    arrow._SCHEMAS.clear()
    for value in (floats, ints, floats, ints):  # alternating: each its own kept schema
        table = arrow.read_stream(value)
        assert table.equals(_full_reader(value))
        assert table.schema.equals(_full_reader(value).schema, check_metadata=True)
    assert len(arrow._SCHEMAS) == 2
    # the short path read them (and without a copy): a view into the value
    table = arrow._read_known(floats)
    assert table is not None
    assert owns_nothing(table.column(0).chunk(0).to_numpy(), floats)


def test_the_kept_schemas_are_bounded() -> None:
    arrow._SCHEMAS.clear()
    for i in range(arrow._SCHEMAS_KEPT + 5):
        value = stream(pa.record_batch([pa.array([i], pa.int32())], names=[f"c{i}"]))
        assert arrow.read_stream(value).column(0).to_pylist() == [i]
        assert len(arrow._SCHEMAS) <= arrow._SCHEMAS_KEPT


@pytest.mark.parametrize(
    "case",
    [
        "several batches",
        "no batch",
        "no end marker",
        "bytes after the end marker",
        "the end marker before format 1.0",
    ],
)
def test_the_short_path_reads_what_the_stream_reader_reads(case: str) -> None:
    a = pa.record_batch([pa.array([1.0, None, 3.0], pa.float64()), pa.array(["a", "b", None])],
                        names=["x", "s"])  # fmt: skip
    value = {
        "several batches": stream(a, a.slice(1), a.slice(0, 0)),
        "no batch": b"".join((a.schema.serialize(), arrow._END_OF_STREAM)),
        "no end marker": b"".join((a.schema.serialize(), a.serialize())),
        "bytes after the end marker": stream(a) + b"anything at all",
        "the end marker before format 1.0": b"".join(
            (a.schema.serialize(), a.serialize(), b"\0\0\0\0", b"anything at all")
        ),
    }[case]
    table = arrow._read_known(value)
    assert table is not None, "the short path gave up"
    assert table.equals(_full_reader(value))


def test_what_the_short_path_leaves_goes_to_the_stream_reader() -> None:
    # a dictionary batch: only the stream reader applies it
    cats = pa.array(["a", "b", "a"]).dictionary_encode()
    value = stream(pa.record_batch([cats], names=["c"]))
    assert arrow._read_known(value) is None
    assert arrow.read_stream(value).column(0).to_pylist() == ["a", "b", "a"]
    # a buffer one byte off 8-byte alignment: the stream reader's alignment option copies
    good = stream(pa.record_batch([pa.array(np.arange(6, dtype=np.float64))], names=["x"]))
    shifted = memoryview(b"\0" + good)[1:]
    assert arrow._read_known(shifted) is None  # type: ignore[arg-type]
    table = arrow.read_stream(shifted)  # type: ignore[arg-type]
    assert all(b is None or b.address % 8 == 0 for b in table.column(0).chunk(0).buffers())
    assert table.column(0).to_pylist() == list(range(6))
    # bad bytes: the stream reader's error, as before
    with pytest.raises(WorkerError, match="not a valid Arrow IPC stream"):
        arrow.read_stream(good[:-20])


# -- repeated layouts: a header seen before binds views at the kept offsets -----------


def _fsl(rows: int, seed: int, width: int = 4) -> pa.RecordBatch:
    values = np.random.default_rng(seed).random(rows * width, dtype=np.float32)
    return pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(values), width)],
                           names=["x"])  # fmt: skip


def _bound(value: bytes, signature: Signature, limits: Limits | None = None) -> Bound:
    kw = {} if limits is None else {"limits": limits}
    return decode_request(value, [], default_id="t/0/0", **kw).bind(signature)


def _never(*_args: object) -> None:
    raise AssertionError("the stream was read the whole way")


def test_a_repeated_layout_is_bound_at_the_kept_offsets_without_reading_the_stream(
    mlp: ort.InferenceSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    signature = Signature.from_session(mlp)
    rng = np.random.default_rng(3)
    xs = [rng.random((16, 784), dtype=np.float32) for _ in range(3)]
    values = [encode_request({"x": x}, format="arrow", model="mnist-mlp")[0] for x in xs]
    arrow._PLANS.clear()
    first = _bound(values[0], signature)
    monkeypatch.setattr(arrow, "read_stream", _never)  # the plan's path must not need it
    for x, value in zip(xs[1:], values[1:], strict=True):
        bound = _bound(value, signature)
        np.testing.assert_array_equal(bound.feeds["x"], x)
        assert owns_nothing(bound.feeds["x"], value)
        assert (bound.rows, bound.run_rows, bound.alone, bound.passthrough) == (
            first.rows, first.run_rows, first.alone, None)  # fmt: skip
        (y,) = mlp.run(None, bound.feeds)
        np.testing.assert_array_equal(y, mlp.run(None, {"x": x})[0])


@pytest.mark.parametrize(
    "case",
    [
        "several batches",
        "no end marker",
        "bytes after the end marker",
        "the end marker before format 1.0",
    ],
)
def test_a_known_header_with_another_tail_reads_what_the_stream_reader_reads(case: str) -> None:
    signature = Signature(inputs=(f32("x", None, 4),), outputs=())
    a, b = _fsl(3, 1), _fsl(3, 2)
    arrow._PLANS.clear()
    _bound(stream(a), signature)  # the layout of one 3-row batch, kept
    assert len(arrow._PLANS) == 1
    value = {
        "several batches": stream(a, b),  # the same first header, then a second batch
        "no end marker": b"".join((a.schema.serialize(), b.serialize())),
        "bytes after the end marker": stream(b) + b"anything at all",
        "the end marker before format 1.0": b"".join(
            (b.schema.serialize(), b.serialize(), b"\0\0\0\0", b"anything at all")
        ),
    }[case]
    assert arrow._head(value) in arrow._PLANS
    want = np.stack(_full_reader(value).column("x").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(_bound(value, signature).feeds["x"], want)


def test_a_known_header_on_a_cut_body_is_bad_bytes() -> None:
    signature = Signature(inputs=(f32("x", None, 4),), outputs=())
    arrow._PLANS.clear()
    _bound(stream(_fsl(8, 1)), signature)
    cut = stream(_fsl(8, 2))[:-20]  # the header kept, the body short
    with pytest.raises(WorkerError, match="not a valid Arrow IPC stream"):
        _bound(cut, signature)


def test_a_kept_layout_binds_each_model_its_own_way() -> None:
    """One header, two models: each model's feeds (or its error) every time, and a
    layout whose feeds are a copy (the tabular rule) reads each message's own values."""
    by_name = Signature(inputs=(f32("x", None, 2),), outputs=())
    stacked = Signature(inputs=(f32("z", None, 2),), outputs=())  # no column "z": stacks a, b
    other = Signature(inputs=(f32("y", None, 4),), outputs=())
    arrow._PLANS.clear()
    for seed in range(3):
        a = np.random.default_rng(seed).random(5, dtype=np.float32)
        b = np.random.default_rng(seed + 10).random(5, dtype=np.float32)
        fsl = pa.FixedSizeListArray.from_arrays(pa.array(np.stack([a, b], 1).reshape(-1)), 2)
        value = stream(pa.record_batch([fsl], names=["x"]))
        np.testing.assert_array_equal(_bound(value, by_name).feeds["x"], np.stack([a, b], 1))
        with pytest.raises(SchemaMismatch, match="missing input 'y'"):
            _bound(value, other)
        flat = stream(pa.record_batch([pa.array(a), pa.array(b)], names=["a", "b"]))
        np.testing.assert_array_equal(_bound(flat, stacked).feeds["z"], np.stack([a, b], 1))
    assert len(arrow._PLANS) == 2


def test_a_kept_layout_keeps_each_messages_passthrough() -> None:
    signature = Signature(inputs=(f32("x", None, 4),), outputs=())
    arrow._PLANS.clear()
    for seed in range(3):
        batch = _fsl(2, seed)
        ids = pa.array([seed, seed + 100], pa.int64())
        value = stream(pa.record_batch([batch.column(0), ids], names=["x", "n"]))
        bound = _bound(value, signature)
        assert isinstance(bound.passthrough, pa.Table)
        assert bound.passthrough.column("n").to_pylist() == [seed, seed + 100]


def test_a_kept_layout_still_checks_the_row_limit_and_nulls() -> None:
    signature = Signature(inputs=(f32("x", None, 4),), outputs=())
    arrow._PLANS.clear()
    _bound(stream(_fsl(8, 1)), signature)
    with pytest.raises(WorkerError, match="rows"):
        _bound(stream(_fsl(8, 2)), signature, Limits(max_rows=4))
    holes = pa.array([1.0, None, 3.0, 4.0], pa.float32())
    value = stream(pa.record_batch([pa.FixedSizeListArray.from_arrays(holes, 4)], names=["x"]))
    for _ in range(2):
        with pytest.raises(SchemaMismatch, match="null"):
            _bound(value, signature)


def test_the_kept_layouts_are_bounded() -> None:
    signature = Signature(inputs=(f32("x", None, 4),), outputs=())
    arrow._PLANS.clear()
    for rows in range(1, arrow._PLANS_KEPT + 6):
        batch = _fsl(rows, rows)
        bound = _bound(stream(batch), signature)
        np.testing.assert_array_equal(bound.feeds["x"].reshape(-1), batch.column(0).values)
        assert len(arrow._PLANS) <= arrow._PLANS_KEPT


def test_a_layout_whose_values_decide_the_shape_is_read_every_time() -> None:
    """pandas' list column: the same header bytes hold equal lists or ragged ones (the
    offsets are values), so each message is checked, never bound by a kept layout."""
    signature = Signature(inputs=(f32("x", None, 2),), outputs=())
    arrow._PLANS.clear()
    even = stream(pa.record_batch([pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))],
                                  names=["x"]))  # fmt: skip
    ragged = stream(pa.record_batch([pa.array([[1.0, 2.0, 3.0], [4.0]],
                                              pa.list_(pa.float32()))], names=["x"]))  # fmt: skip
    assert arrow._head(even) == arrow._head(ragged)
    np.testing.assert_array_equal(_bound(even, signature).feeds["x"], [[1, 2], [3, 4]])
    with pytest.raises(SchemaMismatch, match="ragged"):
        _bound(ragged, signature)
