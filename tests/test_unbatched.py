"""Models whose inputs share no batch axis: requests run as sent, alone, outputs whole.

Real ONNX models (tests/modelzoo.py) run by ONNX Runtime; no broker.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from tests import modelzoo
from worker.batching import Batch, Batcher, Job, RunMode, run_batch, run_mode
from worker.errors import SchemaMismatch
from worker.protocol import (
    Bound,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from worker.signature import DYNAMIC, Signature, TensorSpec

FORMATS = ("msgpack", "json", "arrow")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ort.InferenceSession]:
    repo = tmp_path_factory.mktemp("unbatched")
    paths: dict[str, Path] = {name: build(repo) for name, build in modelzoo.UNBATCHED_ZOO.items()}
    paths["two-io"] = modelzoo.write_two_io(repo)
    return {
        name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for name, p in paths.items()
    }


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _as_cells(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Whole tensors as the cells of a one-row Arrow table (a scalar: a one-row column)."""
    return {n: a.reshape(1) if a.ndim == 0 else a[np.newaxis] for n, a in feeds.items()}


CASES: dict[str, dict[str, np.ndarray]] = {
    "reshape": {"x": np.arange(24, dtype=np.float32).reshape(4, 6),
                "shape": np.array([8, 3], np.int64)},
    "topk": {"x": np.random.default_rng(1).random((5, 10), dtype=np.float32),
             "k": np.array([3], np.int64)},
    "split": {"x": np.arange(7, dtype=np.float32), "split": np.array([2, 5], np.int64)},
    "scale-by-scalar": {"x": np.ones((2, 3), np.float32), "scale": np.array(2.5, np.float32)},
    "pairwise": {"queries": np.random.default_rng(2).random((2, 4), dtype=np.float32),
                 "corpus": np.random.default_rng(3).random((5, 4), dtype=np.float32)},
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_request_runs_as_sent_and_answers_whole(
    sessions: dict[str, ort.InferenceSession], name: str, fmt: str
) -> None:
    session, feeds = sessions[name], CASES[name]
    signature = Signature.from_session(session)
    assert signature.row_axis() is None
    sent = _as_cells(feeds) if fmt == "arrow" else feeds
    value, headers = encode_request(sent, format=fmt, model=name, request_id="r")
    request = decode_request(value, headers, default_id="t/0/0")
    bound = request.bind(signature)
    assert bound.alone and bound.rows == 1
    for n, arr in feeds.items():
        assert bound.feeds[n].shape == arr.shape and bound.feeds[n].dtype == arr.dtype
        np.testing.assert_array_equal(bound.feeds[n], arr)
    want = _run(session, feeds)
    got_outputs = _run(session, bound.feeds)
    body, ctype = encode_response(request, bound, got_outputs, model=name, model_version=1)
    answer = decode_response(body, [("content-type", ctype.encode())])
    assert list(answer.outputs) == list(want)
    for n, arr in want.items():
        got = answer.outputs[n]
        assert isinstance(got, np.ndarray) and got.shape == arr.shape and got.dtype == arr.dtype
        np.testing.assert_allclose(got, arr, rtol=1e-6)


def test_outputs_of_different_leading_sizes_come_back_whole(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    value, headers = encode_request(CASES["split"], format="msgpack")
    request = decode_request(value, headers, default_id="d")
    bound = request.bind(Signature.from_session(sessions["split"]))
    outputs = _run(sessions["split"], bound.feeds)
    assert [a.shape for a in outputs.values()] == [(2,), (5,)]
    body, _ = encode_response(request, bound, outputs, model="split", model_version=1,
                                  output_format="arrow")
    table = pa.ipc.open_stream(body).read_all()
    assert table.num_rows == 1  # one row holding each output whole
    assert table.column("head").to_pylist() == [[0.0, 1.0]]
    assert table.column("tail").to_pylist() == [[2.0, 3.0, 4.0, 5.0, 6.0]]
    assert table.schema.metadata[b"inference-worker.whole"] == b"true"


def test_arrow_cells_may_be_variable_lists_and_scalars(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    x = CASES["topk"]["x"]
    table = pa.table({
        "x": pa.array([x.tolist()], type=pa.list_(pa.list_(pa.float32()))),
        "k": pa.array([3], pa.int64()),  # a scalar cell feeds k int64[1]
        "row_id": pa.array(["only"]),
    })
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    request = decode_request(sink.getvalue().to_pybytes(), [], default_id="d")
    bound = request.bind(Signature.from_session(sessions["topk"]))
    assert bound.alone and bound.feeds["x"].shape == (5, 10)
    assert bound.feeds["k"].tolist() == [3]
    assert isinstance(bound.passthrough, pa.Table)
    assert bound.passthrough.column("row_id").to_pylist() == ["only"]


def test_arrow_ragged_list_cell_is_a_mismatch(sessions: dict[str, ort.InferenceSession]) -> None:
    table = pa.table({"x": pa.array([[[1.0] * 10, [2.0] * 9]],
                                    pa.list_(pa.list_(pa.float32()))),
                      "k": pa.array([1], pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    request = decode_request(sink.getvalue().to_pybytes(), [], default_id="d")
    with pytest.raises(SchemaMismatch, match="ragged list"):
        request.bind(Signature.from_session(sessions["topk"]))


def test_arrow_table_of_several_rows_for_an_unbatched_model_says_what_to_send(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    feeds: dict[str, np.ndarray] = {
        "x": np.zeros((2, 2, 10), np.float32), "k": np.array([[1], [1]], np.int64)
    }
    value, headers = encode_request(feeds, format="arrow")
    request = decode_request(value, headers, default_id="d")
    with pytest.raises(SchemaMismatch, match="one-row table whose cells are whole tensors"):
        request.bind(Signature.from_session(sessions["topk"]))


def test_fixed_axes_of_an_unbatched_model_are_checked_exactly(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    value, headers = encode_request(
        {"x": CASES["topk"]["x"], "k": np.array([3, 4], np.int64)}, format="msgpack"
    )
    with pytest.raises(SchemaMismatch, match=r"input 'k': expected int64\[1\], got int64\[2\]"):
        decode_request(value, headers, default_id="d").bind(
            Signature.from_session(sessions["topk"])
        )


def test_named_batch_axis_that_disagrees_is_a_mismatch(
    sessions: dict[str, ort.InferenceSession],
) -> None:
    signature = Signature.from_session(sessions["two-io"])  # a, b float32[batch,3]
    assert signature.row_axis() == (DYNAMIC, "batch")
    value, headers = encode_request(
        {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)}, format="msgpack"
    )
    with pytest.raises(SchemaMismatch, match="inputs disagree on the row count"):
        decode_request(value, headers, default_id="d").bind(signature)


def test_unnamed_dynamic_axes_that_disagree_run_alone() -> None:
    spec = TensorSpec("a", "tensor(float)", np.dtype("float32"), (None, 3))
    signature = Signature(inputs=(spec, dataclasses.replace(spec, name="b")), outputs=())
    value, headers = encode_request(
        {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)}, format="msgpack"
    )
    bound = decode_request(value, headers, default_id="d").bind(signature)
    assert bound.alone and bound.rows == 1
    assert run_mode(signature, alone=bound.alone) == RunMode.WHOLE
    # Agreeing lengths on the same signature: batched as usual.
    value, headers = encode_request(
        {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 3), np.float32)}, format="msgpack"
    )
    bound = decode_request(value, headers, default_id="d").bind(signature)
    assert not bound.alone and bound.rows == 2
    assert run_mode(signature) == RunMode.COALESCE


def test_scalar_input_from_json_and_msgpack(sessions: dict[str, ort.InferenceSession]) -> None:
    signature = Signature.from_session(sessions["scale-by-scalar"])
    body = (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},'
            b' {"name": "scale", "shape": [], "datatype": "FP32", "data": 2}]}')
    bound = decode_request(body, [], default_id="d").bind(signature)
    assert bound.alone and bound.feeds["scale"].shape == ()
    out = _run(sessions["scale-by-scalar"], bound.feeds)
    assert out["y"].tolist() == [[2.0, 4.0, 6.0]] and float(out["total"]) == 12.0


# -- batching honours it ---------------------------------------------------------------


def _alone_job(token: object, rows_in_x: int = 5) -> Job:
    bound = Bound(feeds={"x": np.ones((rows_in_x, 10), np.float32),
                         "k": np.array([2], np.int64)}, rows=1, alone=True)
    spec_x = TensorSpec("x", "tensor(float)", np.dtype("float32"), (None, 10), "batch")
    spec_k = TensorSpec("k", "tensor(int64)", np.dtype("int64"), (1,))
    return Job.for_request(token, "topk", 1, Signature(inputs=(spec_x, spec_k), outputs=()),
                           bound)


def test_an_alone_job_is_never_coalesced_nor_sliced() -> None:
    batcher = Batcher(max_rows=2, max_delay_s=10.0, alone_rows=64)
    first, second = _alone_job("a"), _alone_job("b")
    assert first.mode == RunMode.WHOLE
    assert [[j.token for j in b.jobs] for b in batcher.add(first)] == [["a"]]
    assert [[j.token for j in b.jobs] for b in batcher.add(second)] == [["b"]]
    assert len(batcher) == 0
    seen: list[tuple[int, ...]] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, object]:
        seen.append(feeds["x"].shape)
        return {"values": feeds["x"][:, :2]}

    [result] = run_batch(run, Batch("topk", 1, [first]), max_rows=2)
    assert seen == [(5, 10)]  # five rows of x in one run, although max_rows is 2
    assert isinstance(result, dict) and result["values"].shape == (5, 2)


def test_a_job_whose_feeds_disagree_on_axis_0_runs_whole_whatever_its_mode() -> None:
    job = Job("t", "m", 1, RunMode.COALESCE,
              {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)}, 1)
    assert job.mode == RunMode.WHOLE
    scalar = Job("t", "m", 1, RunMode.COALESCE, {"s": np.array(1.0, np.float32)}, 1)
    assert scalar.mode == RunMode.WHOLE


def test_run_batch_counts_a_scalar_feed_as_one_sample() -> None:
    job = Job("t", "m", 1, RunMode.WHOLE, {"s": np.array(3.0, np.float32)}, 1)
    sizes: list[int] = []
    [result] = run_batch(lambda feeds: {"y": feeds["s"] * 2}, Batch("m", 1, [job]), 8,
                         on_run=sizes.append)
    assert sizes == [1] and isinstance(result, dict) and float(result["y"]) == 6.0
