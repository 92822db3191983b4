"""``optimize --sample``: recordings of real traffic and publish sources, not only arrays.

A recording (``inference-producer record``'s Arrow file) is decoded with the
worker's own codecs, so the gate judges on what the worker would run; a
publish source (``.parquet``, ``.csv``, ...) is read as ``publish --from``
reads it. No broker: recordings are written with the recorder's own writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from producers.record import RecordingWriter
from tests.modelzoo import write_mlp, write_two_io
from worker.demo import load_digits_28x28, train_mlp, write_held_out, write_trained_model
from worker.optimize import cli
from worker.optimize.errors import RequestError
from worker.optimize.sources import read_sample
from worker.protocol import encode_request
from worker.signature import Signature


def _signature(model_file: Path) -> Signature:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return Signature.from_session(session)


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def _record(path: Path, records: list[tuple[bytes, list[tuple[str, bytes | None]]]]) -> Path:
    with RecordingWriter(path) as writer:
        for offset, (value, headers) in enumerate(records):
            writer.add(key=None, value=value, headers=headers, topic="requests", partition=0,
                       offset=offset, timestamp=0)
    return path


def _request(rows: np.ndarray, fmt: str, model: str | None = "mnist-mlp"
             ) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    value, headers = encode_request({"x": rows}, format=fmt, model=model)
    return value, list(headers)


def test_a_recording_is_decoded_as_the_worker_decodes_it(tmp_path: Path) -> None:
    signature = _signature(write_mlp(tmp_path))
    arrow, msgpack, json_rows, unnamed, other = (_rows(n, n) for n in (4, 5, 6, 7, 3))
    recording = _record(tmp_path / "traffic.arrow", [
        _request(arrow, "arrow"),
        _request(other, "msgpack", model="another-model"),
        _request(msgpack, "msgpack"),
        (b"\x00 not a request", []),
        _request(json_rows, "json"),
        _request(unnamed, "arrow", model=None),  # the worker's --default-model traffic
    ])
    sample = read_sample(recording, signature, "mnist-mlp")
    assert list(sample.arrays) == ["x"]
    np.testing.assert_array_equal(
        sample.arrays["x"], np.concatenate([arrow, msgpack, json_rows, unnamed]))
    assert sample.description == (
        f"{recording} (4 recorded requests; left out 1 for other models, "
        "1 that would be dead letters)")


def test_a_recording_with_no_usable_request_is_a_sample_error(tmp_path: Path) -> None:
    signature = _signature(write_mlp(tmp_path))
    recording = _record(tmp_path / "bad.arrow", [
        (b"\x00 not a request", []),
        _request(np.ones((2, 3), np.float32), "msgpack"),  # 3 features for a 784-input model
    ])
    with pytest.raises(RequestError) as caught:
        read_sample(recording, signature, "mnist-mlp")
    assert caught.value.field == "sample"
    message = str(caught.value)
    assert "none of its 2 recorded records is a request for mnist-mlp" in message
    assert "2 that would be dead letters (first: requests/0/0: decode-error:" in message


def test_publish_sources(tmp_path: Path) -> None:
    signature = _signature(write_mlp(tmp_path))
    rows = np.round(_rows(12, 1) * 256) / 256  # exact in CSV's decimal text
    x = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 784)
    pq.write_table(pa.table({"x": x, "id": list(range(12))}), tmp_path / "rows.parquet")
    columns = pa.table({f"f{i}": rows[:, i] for i in range(784)})
    pcsv.write_csv(columns, tmp_path / "rows.csv")
    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, columns.schema) as writer:
        writer.write_table(columns)
    np.save(tmp_path / "rows.npy", rows)
    for name in ("rows.parquet", "rows.csv", "rows.arrow", "rows.npy"):
        sample = read_sample(tmp_path / name, signature, "mnist-mlp")
        np.testing.assert_array_equal(sample.arrays["x"], rows, err_msg=name)


def test_a_table_for_a_model_with_two_inputs_says_to_use_npz(tmp_path: Path) -> None:
    signature = _signature(write_two_io(tmp_path))
    pq.write_table(pa.table({"a": [1.0, 2.0]}), tmp_path / "t.parquet")
    with pytest.raises(RequestError, match=r"the model has inputs \['a', 'b'\]: use .npz"):
        read_sample(tmp_path / "t.parquet", signature, "two-io")


def test_bad_sample_files_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mlp(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "words.parquet")
    base = ["--model-repository", str(tmp_path), "--model", "mnist-mlp", "--target", "cpu"]
    assert cli.main([*base, "--sample", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inference-worker optimize: --sample: ")
    assert "an inference-producer record file (.arrow)" in err and err.count("\n") == 1
    assert cli.main([*base, "--sample", str(tmp_path / "words.parquet")]) == 2
    err = capsys.readouterr().err
    assert "column 'text' is string, not numeric" in err and err.count("\n") == 1


def test_the_gate_judges_int8_on_real_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's example: on random inputs the int8 demo model looks wrong (refused);
    on the held-out digits, recorded as traffic, it gives the same answers (accepted)."""
    digits = load_digits_28x28()
    write_trained_model(tmp_path, train_mlp(digits.x_train, digits.y_train))
    recording = _record(tmp_path / "digits.arrow", [
        _request(digits.x_test[i : i + 40], fmt)
        for i, fmt in zip(range(0, len(digits.x_test), 40), ["arrow", "msgpack", "json"] * 3,
                          strict=False)
    ])
    base = ["--model-repository", str(tmp_path), "--model", "mnist-mlp", "--target", "cpu",
            "--int8", "--min-speedup", "0"]
    assert cli.main(base) == 1
    assert "refused: output probs: max abs diff" in capsys.readouterr().out
    assert cli.main([*base, "--sample", str(recording)]) == 0
    out = capsys.readouterr().out
    assert "ACCEPTED, written as version 2" in out
    assert f"{recording} (9 recorded requests), {len(digits.x_test)} rows" in out
    held_out = write_held_out(tmp_path / "digits.parquet", digits)
    np.testing.assert_array_equal(
        read_sample(held_out, _signature(tmp_path / "mnist-mlp" / "1" / "model.onnx")).arrays["x"],
        digits.x_test)
