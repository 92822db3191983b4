"""Arrow requests through a real worker: every column form, the tabular rule, passthrough."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from tests import modelzoo
from tests.harness import consume, header, produce, settings, worker_thread
from worker.protocol import ARROW, decode_response, encode_request
from worker.protocol.arrow import read_stream

pytestmark = pytest.mark.kafka


def _stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        # two record batches: the decoder must accept multi-batch streams
        for batch in table.to_batches(max_chunksize=max(1, table.num_rows // 2)):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_arrow_column_forms_and_passthrough(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    modelzoo.write_two_io(model_repo)
    modelzoo.write_iris_logreg(model_repo)
    requests, outputs = new_topic(), new_topic()
    rng = np.random.default_rng(5)
    x = rng.random((6, 784), dtype=np.float32)
    cases: dict[str, tuple[bytes, list, str, dict[str, np.ndarray]]] = {}
    for form in ("fixed_size_list", "tensor"):
        value, headers = encode_request(
            {"x": x},
            format="arrow",
            model="mnist-mlp",
            request_id=form,
            arrow_form=form,
            passthrough={"row_id": np.arange(6, dtype=np.int64)},
        )
        cases[form] = (value, headers, "mnist-mlp", {"x": x})
    # primitive columns, one per input (per-row shape (1,) accepted as scalar columns is
    # exercised by the two-input model with [?,3] inputs via fixed_size_list)
    a, b = rng.random((4, 3), dtype=np.float32), rng.random((4, 3), dtype=np.float32)
    value, headers = encode_request(
        {"a": a, "b": b}, format="arrow", model="two-io", request_id="two-inputs"
    )
    cases["two-inputs"] = (value, headers, "two-io", {"a": a, "b": b})
    # the tabular rule: one input, no column named like it, numeric columns stacked
    iris = rng.random((5, 4), dtype=np.float32)
    table = pa.table({f"f{i}": iris[:, i] for i in range(4)} | {"label": ["a", "b", "c", "d", "e"]})
    cases["tabular"] = (
        _stream(table),
        [("content-type", ARROW.encode()), ("model", b"iris-logreg"), ("request-id", b"tabular")],
        "iris-logreg",
        {"float_input": iris},
    )
    produce(kafka_bootstrap, requests, [(None, v, h) for v, h, _, _ in cases.values()])

    s = settings(kafka_bootstrap, requests, outputs, model_repo, group_id)
    with worker_thread(s):
        answers = consume(kafka_bootstrap, outputs, len(cases), timeout=60)
    assert len(answers) == len(cases)
    for record in answers:
        rid = header(record, "request-id") or ""
        assert header(record, "error-type") is None, rid
        assert header(record, "content-type") == ARROW
        _, _, model, feeds = cases[rid]
        path = next((model_repo / model).glob("*/model.onnx"))
        session = ort.InferenceSession(str(path))
        want = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
        )
        response = decode_response(record.value, record.headers)
        for name, expected in want.items():
            got = response.outputs[name]
            if isinstance(expected, list):  # ZipMap: a map column, one map per row
                assert isinstance(got, list) and len(got) == len(expected)
                for g, w in zip(got, expected, strict=True):
                    assert dict(g).keys() == w.keys()
                    assert list(dict(g).values()) == pytest.approx(list(w.values()), abs=1e-6)
            else:
                np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
        table = read_stream(record.value)
        if rid in ("fixed_size_list", "tensor"):
            # passthrough copied row-aligned after the outputs
            assert table.column_names[-1] == "row_id"
            assert table.column("row_id").to_pylist() == list(range(6))
            assert str(table.schema.field("probs").type).startswith("extension<arrow.fixed_shape")
        if rid == "tabular":
            assert table.column("label").to_pylist() == ["a", "b", "c", "d", "e"]
