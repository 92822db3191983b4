"""The msgpack codec's edges the mutation run (``make mutation``) found untested.

Round trips read back with plain ``msgpack.unpackb`` (no worker code), the
limits at their exact boundary, which of header and body wins, and the
messages a dead letter carries.
"""

from __future__ import annotations

import decimal
from typing import Any

import msgpack
import numpy as np
import pytest

from worker.errors import DecodeError, InferenceError, TooLarge
from worker.protocol import MSGPACK
from worker.protocol.base import Bound, Envelope, Limits, Request
from worker.protocol.msgpack import MAX_RANK, MsgpackCodec, tensor_from_wire, tensor_to_wire

CODEC = MsgpackCodec()
LIMITS = Limits()
HEADERS: list[tuple[str, bytes | None]] = [("content-type", MSGPACK.encode())]


def mp(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def f32(shape: list[int], data: object = None) -> dict[str, Any]:
    """A float32 tensor map; zeros as bin data unless ``data`` is given."""
    if data is None:
        data = np.zeros(shape, np.float32).tobytes()
    return {"dtype": "float32", "shape": shape, "data": data}


def decode(body: object, envelope: Envelope | None = None) -> Request:
    return CODEC.decode_request(mp(body), envelope or Envelope(HEADERS, default_id="t/0/7"), LIMITS)


def refused(body: object, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(body)


def wire(name: str, obj: object, limits: Limits = LIMITS) -> np.ndarray:
    return tensor_from_wire(name, obj, limits)


# -- tensors in ------------------------------------------------------------------------------


def test_bin_data_is_a_read_only_view_of_the_body() -> None:
    raw = np.arange(6, dtype="<f4").tobytes()
    arr = wire("x", f32([2, 3], raw))
    assert arr.dtype == np.float32 and arr.shape == (2, 3)
    assert arr.flags.writeable is False  # a view on the unpacked bytes, not a copy
    np.testing.assert_array_equal(arr.ravel(), np.arange(6, dtype=np.float32))


def test_rank_up_to_the_limit_is_taken_and_one_more_is_refused() -> None:
    assert wire("x", f32([1] * MAX_RANK)).ndim == MAX_RANK
    with pytest.raises(DecodeError, match=f"input 'x': rank {MAX_RANK + 1} is over the limit"):
        wire("x", f32([1] * (MAX_RANK + 1)))


def test_a_scalar_takes_exactly_one_value() -> None:
    assert wire("k", {"dtype": "int64", "shape": [], "data": [5]}).tolist() == 5
    with pytest.raises(DecodeError, match=r"input 'k': shape \[\] needs 1 value, data has 2"):
        wire("k", {"dtype": "int64", "shape": [], "data": [5, 6]})


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (7, "input 'x': expected a tensor map {dtype, shape, data}, got int"),
        (f32([1]) | {"shape": "2x3"}, "input 'x': 'shape' must be a list of integers, got '2x3'"),
        (
            f32([2, 2], [[1.0, 2.0], [3.0]]),
            r"input 'x': ragged nested list: at depth 1 expected a list of length 2 "
            r"\(shape \[2, 2\]\), got length 1",
        ),
        (
            f32([2, 2], [[1.0, 2.0], 3.0]),
            r"input 'x': ragged nested list: at depth 1 expected a list of length 2 "
            r"\(shape \[2, 2\]\), got a scalar",
        ),
        (
            {"dtype": "string", "shape": [2], "data": ["a", 1]},
            "input 'x': dtype 'string' needs every value to be a str",
        ),
        (f32([1]) | {"data": None}, "input 'x': 'data' must be bin or a list, got NoneType"),
        (f32([1]) | {"data": 5}, "input 'x': 'data' must be bin or a list, got int"),
        (f32([1], [1e300]), "input 'x': data list does not fit float32"),
    ],
)
def test_a_bad_tensor_is_refused_naming_the_input(obj: object, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        wire("x", obj)


def test_the_element_limit_names_the_input() -> None:
    with pytest.raises(TooLarge, match="'x'"):
        wire("x", f32([10, 10]), Limits(max_elements=99))


# -- tensors out -----------------------------------------------------------------------------


def test_text_tensors_go_out_as_lists_of_str() -> None:
    assert tensor_to_wire(np.array([b"ab", b"c\xff"])) == {
        "dtype": "string",
        "shape": [2],
        "data": ["ab", "c\ufffd"],
    }
    mixed = np.array([1, "a", b"b"], dtype=object)
    assert tensor_to_wire(mixed)["data"] == ["1", "a", "b"]


def test_big_endian_and_strided_arrays_go_out_little_endian_and_contiguous() -> None:
    be = np.array([1, 2], dtype=">i4")
    assert bytes(tensor_to_wire(be)["data"]) == b"\x01\0\0\0\x02\0\0\0"
    strided = np.arange(6, dtype="<i2").reshape(2, 3).T  # not C-contiguous
    out = tensor_to_wire(strided)
    assert out["shape"] == [3, 2]
    assert bytes(out["data"]) == np.ascontiguousarray(strided).tobytes()


def test_a_scalar_and_a_bool_round_trip() -> None:
    for arr in (np.array(3.5, dtype=np.float32), np.array([True, False])):
        back = wire("y", msgpack.unpackb(mp(tensor_to_wire(arr))))
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)


def test_a_dtype_without_a_wire_name_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="dtype complex64 has no msgpack wire name"):
        tensor_to_wire(np.zeros(2, np.complex64))


# -- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": []}, "msgpack body: expected 'inputs' to be a map of name -> tensor, got list"),
        ({"inputs": {1: f32([1])}}, "msgpack body: input names must be strings, got 1"),
        ({"inputs": {}, "id": True}, "msgpack body: 'id' must be a string, got bool"),
        ({"inputs": {}, "model": 1.5}, "msgpack body: 'model' must be a string, got float"),
        (
            {"inputs": {}, "model_version": "v2"},
            "msgpack body 'model_version': expected a positive integer model version",
        ),
    ],
)
def test_a_bad_body_is_refused_saying_what_is_wrong(body: object, message: str) -> None:
    refused(body, message)


def test_the_body_names_model_version_and_id_when_no_header_does() -> None:
    r = decode({"inputs": {}, "model": "mlp", "model_version": 3, "id": 42})
    assert (r.model, r.model_version, r.request_id, r.format) == ("mlp", 3, "42", "msgpack")
    assert r.headers == HEADERS


def test_headers_win_over_the_body_and_the_default_id_comes_last() -> None:
    env = Envelope(HEADERS, model="hdr", model_version=5, request_id="rid", default_id="t/0/7")
    r = decode({"inputs": {}, "model": "body", "model_version": 3, "id": "bid"}, env)
    assert (r.model, r.model_version, r.request_id) == ("hdr", 5, "rid")
    r = decode({"inputs": {}})
    assert (r.model, r.model_version, r.request_id) == (None, None, "t/0/7")


def _nest(depth: int, as_map: bool) -> object:
    value: object = 0
    for _ in range(depth):
        value = {"k": value} if as_map else [value]
    return value


@pytest.mark.parametrize("as_map", [False, True])
def test_passthrough_nesting_is_taken_up_to_64_levels(as_map: bool) -> None:
    decode({"inputs": {}, "passthrough": _nest(64, as_map)})
    refused({"inputs": {}, "passthrough": _nest(65, as_map)}, "'passthrough' nests deeper than 64")


def test_passthrough_nesting_counts_maps_and_lists_alike() -> None:
    mixed: object = 0
    for i in range(65):
        mixed = {"k": mixed} if i % 2 else [mixed]
    refused({"inputs": {}, "passthrough": mixed}, "nests deeper than 64")


def test_encode_request_is_read_back_by_a_plain_msgpack_reader() -> None:
    value = CODEC.encode_request(
        {"x": np.arange(2, dtype=np.float32)},
        model="mlp",
        model_version=3,
        request_id="r1",
        passthrough=None,
        form="",
    )
    body = msgpack.unpackb(value, raw=False)
    assert body == {
        "inputs": {"x": {"dtype": "float32", "shape": [2], "data": b"\0\0\0\0\0\0\x80?"}},
        "id": "r1",
        "model": "mlp",
        "model_version": 3,
    }


def test_numpy_values_in_a_request_passthrough_go_out_as_plain_values() -> None:
    value = CODEC.encode_request(
        {},
        model=None,
        model_version=None,
        request_id=None,
        passthrough={"n": np.int64(3), "a": np.arange(2)},
        form="",
    )
    assert msgpack.unpackb(value, raw=False) == {"inputs": {}, "passthrough": {"n": 3, "a": [0, 1]}}


# -- responses --------------------------------------------------------------------------------


def _request() -> Request:
    return decode({"inputs": {}, "id": "r9"})


def test_a_response_is_read_back_by_a_plain_msgpack_reader() -> None:
    outputs = {
        "y": np.array([[1.5]], dtype=np.float32),
        "probs": [{"a": np.float32(0.25), "b": np.int64(3)}],
        "arr": {"v": np.array([1, 2])},
        "odd": {"d": decimal.Decimal("1.5")},
    }
    value = CODEC.encode_response(_request(), None, outputs, model="mlp", model_version=2)
    body = msgpack.unpackb(value, raw=False)
    assert body["outputs"]["y"] == {"dtype": "float32", "shape": [1, 1], "data": b"\0\0\xc0?"}
    assert body["outputs"]["probs"] == [{"a": 0.25, "b": 3}]
    assert body["outputs"]["arr"] == {"v": [1, 2]}
    assert body["outputs"]["odd"] == {"d": "1.5"}
    assert (body["id"], body["model"], body["model_version"]) == ("r9", "mlp", 2)
    assert "passthrough" not in body


def test_a_response_carries_the_passthrough_back() -> None:
    bound = Bound(feeds={}, rows=1, passthrough={"trace": [1, "a"]})
    value = CODEC.encode_response(_request(), bound, {}, model="m", model_version=1)
    assert msgpack.unpackb(value, raw=False)["passthrough"] == {"trace": [1, "a"]}


def test_an_answer_msgpack_cannot_hold_is_an_inference_error() -> None:
    deep: object = 0
    for _ in range(5000):  # past the packer's own recursion limit
        deep = [deep]
    with pytest.raises(
        InferenceError, match="the answer cannot be written as msgpack: ValueError: recursion"
    ):
        CODEC.encode_response(_request(), None, {"n": deep}, model="m", model_version=1)
    # An integer over 64 bits is not one of them: it goes out as its decimal text.
    value = CODEC.encode_response(
        _request(), None, {"n": {"big": 2**70}}, model="m", model_version=1
    )
    assert msgpack.unpackb(value)["outputs"]["n"] == {"big": str(2**70)}


def test_decode_response_reads_tensors_maps_and_scalars() -> None:
    value = mp(
        {
            "outputs": {
                "y": {"dtype": "int32", "shape": [2], "data": b"\x01\0\0\0\x02\0\0\0"},
                "probs": {"a": 0.5},
                "n": 5,
            },
            "id": "r1",
            "model": "m",
            "model_version": 4,
            "passthrough": [1],
        }
    )
    r = CODEC.decode_response(value)
    assert isinstance(r.outputs["y"], np.ndarray) and r.outputs["y"].tolist() == [1, 2]
    assert r.outputs["probs"] == {"a": 0.5} and r.outputs["n"] == 5
    assert (r.request_id, r.model, r.model_version, r.passthrough) == ("r1", "m", 4, [1])
    assert CODEC.decode_response(mp({"outputs": {}, "model_version": "4"})).model_version is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (mp([1]), "^msgpack response: expected a map with 'outputs'$"),
        (mp({"outputs": [1]}), "^msgpack response: expected a map with 'outputs'$"),
        (b"\xc1", "^not a valid msgpack body: FormatError"),
        (mp({"outputs": {"y": {"dtype": "float32", "shape": [2], "data": b""}}}), "input 'y'"),
    ],
)
def test_a_bad_response_is_refused(value: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        CODEC.decode_response(value)


def test_a_string_tensor_comes_in_as_its_str_values() -> None:
    arr = wire("s", {"dtype": "string", "shape": [2, 1], "data": [["a"], ["b"]]})
    assert arr.dtype == object and arr.tolist() == [["a"], ["b"]]


def test_a_big_endian_host_gets_bin_data_in_its_native_byte_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.protocol.msgpack._NATIVE_LE", False)
    arr = wire("x", f32([2], np.array([1.5, -2.0], "<f4").tobytes()))
    assert arr.dtype == np.dtype("=f4") and arr.tolist() == [1.5, -2.0]
