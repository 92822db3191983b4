"""Answers read by code that shares nothing with the worker, and docs/protocol.md's bytes.

The worker's own decode_response would agree with a bug in its own encoder
(rename a key in both and everything still round-trips); these readers would
not: plain ``msgpack.unpackb``, ``pyarrow.ipc.open_stream``, ``json.loads``,
and the byte dumps a producer in another language copies from the docs.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from tests import modelzoo
from worker.protocol import decode_request, encode_request, encode_response
from worker.signature import Signature, TensorSpec

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
X = np.array([[0.5, 1.0], [2.0, -1.0]], np.float32)
Y = {"y": np.array([1, 0], np.int64)}


def _doc_blocks(kind: str) -> dict[str, str]:
    """``<!-- kind: name -->`` followed by a fenced block -> {name: block text}."""
    text = DOC.read_text(encoding="utf-8")
    pattern = rf"<!-- {kind}: ([\w-]+) -->\s*```\w*\n(.*?)```"
    return dict(re.findall(pattern, text, flags=re.DOTALL))


def _hexdump_bytes(block: str) -> bytes:
    """``00000000  83 a6 69 ...  |..i|  comment`` lines -> the bytes they show."""
    out = bytearray()
    for line in block.splitlines():
        match = re.match(r"^([0-9a-f]{8})  ((?:[0-9a-f]{2} {1,2})+)\s*\|", line)
        assert match, f"not a hexdump line: {line!r}"
        assert int(match.group(1), 16) == len(out), f"offset mismatch at {line!r}"
        out += bytes.fromhex(match.group(2))
    return bytes(out)


def _msgpack_request() -> tuple[bytes, list]:
    return encode_request({"x": X}, format="msgpack", model="demo", request_id="req-1")


def _answer(fmt: str) -> bytes:
    value, headers = encode_request({"x": X}, format=fmt, model="demo", request_id="req-1")
    request = decode_request(value, headers, default_id="d")
    body, _ = encode_response(request, None, Y, model="demo", model_version=1)
    return body


# -- the docs' bytes are the code's bytes -------------------------------------------------------


def test_every_dump_in_the_docs_is_checked() -> None:
    assert set(_doc_blocks("bytes")) == {"msgpack-request", "msgpack-response", "arrow-request"}
    assert set(_doc_blocks("text")) == {"json-request", "json-response"}


def test_doc_msgpack_request_bytes() -> None:
    assert _hexdump_bytes(_doc_blocks("bytes")["msgpack-request"]) == _msgpack_request()[0]


def test_doc_msgpack_response_bytes() -> None:
    assert _hexdump_bytes(_doc_blocks("bytes")["msgpack-response"]) == _answer("msgpack")


def test_doc_arrow_request_bytes() -> None:
    value, _ = encode_request({"x": X}, format="arrow", arrow_form="fixed_size_list")
    assert _hexdump_bytes(_doc_blocks("bytes")["arrow-request"]) == value


def test_doc_json_bytes() -> None:
    blocks = _doc_blocks("text")
    value, _ = encode_request({"x": X}, format="json", model="demo", request_id="req-1")
    assert blocks["json-request"].strip().encode() == value
    assert blocks["json-response"].strip().encode() == _answer("json")


# -- plain readers ------------------------------------------------------------------------------


def test_msgpack_answer_read_by_plain_unpackb() -> None:
    answer = msgpack.unpackb(_answer("msgpack"))
    assert answer == {
        "outputs": {"y": {"dtype": "int64", "shape": [2], "data": b"\x01" + b"\x00" * 15}},
        "id": "req-1",
        "model": "demo",
        "model_version": 1,
    }


def test_arrow_answer_read_by_plain_open_stream() -> None:
    probs = np.arange(6, dtype=np.float32).reshape(2, 3)
    value, headers = encode_request({"x": X}, format="arrow",
                                    passthrough={"row_id": pa.array(["a", "b"])})
    request = decode_request(value, headers, default_id="d")
    bound = request.bind(_sig())
    body, _ = encode_response(request, bound, {"probs": probs, **Y}, model="demo",
                              model_version=1)
    table = pa.ipc.open_stream(pa.BufferReader(body)).read_all()
    assert table.column_names == ["probs", "y", "row_id"]
    assert table.schema.field("probs").type.extension_name == "arrow.fixed_shape_tensor"
    np.testing.assert_array_equal(table.column("probs").chunk(0).to_numpy_ndarray(), probs)
    assert table.column("y").to_pylist() == [1, 0]
    assert table.column("row_id").to_pylist() == ["a", "b"]
    assert json.loads(table.schema.metadata[b"inference-worker.outputs"]) == ["probs", "y"]


def test_json_answer_read_by_plain_json_loads() -> None:
    assert json.loads(_answer("json")) == {
        "model_name": "demo",
        "model_version": "1",
        "id": "req-1",
        "outputs": [{"name": "y", "shape": [2], "datatype": "INT64", "data": [1, 0]}],
    }


def _sig() -> Signature:
    return Signature(inputs=(TensorSpec("x", "tensor(float)", np.dtype("float32"), (None, 2)),),
                     outputs=())


# -- the documented msgpack reading code, for ZipMap's integer keys -----------------------------


@pytest.fixture(scope="module")
def zipmap_answer(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = modelzoo.write_iris_logreg(tmp_path_factory.mktemp("iris"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], np.float32)
    value, headers = encode_request({"float_input": x}, format="msgpack")
    request = decode_request(value, headers, default_id="d")
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"float_input": x}), strict=True))
    body, _ = encode_response(request, None, outputs, model="iris", model_version=1)
    return body


def test_documented_msgpack_reader_reads_integer_class_labels(zipmap_answer: bytes) -> None:
    code = textwrap.dedent(_doc_blocks("reader")["msgpack-python"])  # it sits in a list item
    scope: dict[str, object] = {"record": SimpleNamespace(value=zipmap_answer)}
    exec(compile(code, str(DOC), "exec"), scope)  # the page's code, exactly as written
    probabilities = scope["probabilities"]
    assert isinstance(probabilities, list) and len(probabilities) == 2
    assert set(probabilities[0]) == {0, 1, 2}  # int64 labels stay integers
    assert probabilities[0][0] > 0.5 and probabilities[1][2] > 0.5


def test_default_unpackb_refuses_those_keys_which_is_why_the_docs_say_so(
    zipmap_answer: bytes,
) -> None:
    with pytest.raises(ValueError, match="is not allowed for map key"):
        msgpack.unpackb(zipmap_answer)
