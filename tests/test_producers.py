"""inference-producer against the real broker (and, for the round trip, a real worker)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from producers.cli import main
from producers.compare import compare
from producers.publish import record_bytes
from tests.conftest import BOTH_CLIENTS
from tests.harness import ROOT, consume, header, produce, settings, worker_thread
from worker.demo import DEMO_MODEL, DEMO_OUTPUT, write_demo_model
from worker.protocol import decode_request
from worker.signature import Signature, TensorSpec

pytestmark = pytest.mark.kafka

@pytest.fixture(params=BOTH_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Each broker test runs on both Kafka clients the tools can use."""
    return str(request.param)



def _rows(record: Any, name: str, row_shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Decode a published request the way the worker does and return its input rows."""
    request = decode_request(record.value, record.headers, default_id="x")
    spec = TensorSpec(name, "tensor(float)", np.dtype(dtype), (None, *row_shape))
    bound = request.bind(Signature(inputs=(spec,), outputs=()))
    return bound.feeds[name]


def _read_all(bootstrap: str, topic: str, rows: int, name: str, row_shape: tuple[int, ...],
              dtype: Any = np.float32) -> tuple[np.ndarray, list[Any]]:
    records: list[Any] = []
    got = 0
    deadline = time.monotonic() + 30
    while got < rows and time.monotonic() < deadline:
        records = consume(bootstrap, topic, 1, timeout=5, settle=0.3)
        got = sum(len(_rows(r, name, row_shape, dtype)) for r in records)
    records.sort(key=lambda r: (r.partition, r.offset))
    data = np.concatenate([_rows(r, name, row_shape, dtype) for r in records])
    return data, records


def _table(rows: int = 30, features: int = 5) -> tuple[pa.Table, np.ndarray]:
    # Quarter steps survive a trip through CSV text exactly.
    values = (np.arange(rows * features, dtype=np.float32).reshape(rows, features) / 4)
    cols = {f"f{i}": pa.array(values[:, i]) for i in range(features)}
    cols["sensor"] = pa.array([f"s{i // 7}" for i in range(rows)])  # runs of one key
    return pa.table(cols), values


@pytest.mark.parametrize(("kind", "fmt"), [
    ("npy", "arrow"), ("parquet", "msgpack"), ("arrow", "arrow"), ("feather", "msgpack"),
    ("csv", "arrow"), ("synthetic", "msgpack"), ("synthetic", "arrow"), ("parquet", "json"),
    ("synthetic", "json"),
])
def test_publish_reads_back_equal_to_source(
    kind: str, fmt: str, kafka_bootstrap: str, kafka_client: str,
    new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic()
    table, values = _table()
    keyed = kind not in ("npy", "synthetic")
    args = ["publish", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--topic", topic,
            "--format", fmt, "--batch-rows", "4", "--input", "feats"]
    if kind == "synthetic":
        args += ["--synthetic", "2,3", "--rows", "30", "--seed", "5"]
        values = np.random.default_rng(5).random((30, 2, 3)).astype(np.float32)
    else:
        path = tmp_path / f"data.{kind}"
        if kind == "npy":
            np.save(path, values)
        elif kind == "parquet":
            pq.write_table(table, path)
        elif kind == "arrow":
            with ipc.new_file(str(path), table.schema) as writer:
                writer.write_table(table)
        elif kind == "feather":
            feather.write_feather(table, path)
        else:
            pcsv.write_csv(table, path)
        args += ["--from", str(path)]
        if keyed:
            args += ["--key-column", "sensor"]
    assert main(args) == 0

    data, records = _read_all(kafka_bootstrap, topic, 30, "feats", values.shape[1:])
    np.testing.assert_array_equal(data, values)
    assert all(len(_rows(r, "feats", values.shape[1:], np.float32)) <= 4 for r in records)
    assert len({header(r, "request-id") for r in records}) == len(records)
    if keyed:
        # a message holds rows of one key only, and carries that key
        start = 0
        for r in records:
            n = len(_rows(r, "feats", values.shape[1:], np.float32))
            assert {f"s{i // 7}".encode() for i in range(start, start + n)} == {r.key}
            start += n


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_messages_never_exceed_the_topic_limit(
    fmt: str, kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str]
) -> None:
    limit = 20_000
    topic = new_topic(**{"max.message.bytes": str(limit)})
    # 1000 rows per message asked; one row is 3136 bytes, so ~5 fit.
    assert main(["publish", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
                 "--topic", topic,
                 "--format", fmt, "--synthetic", "784", "--rows", "120",
                 "--batch-rows", "1000"]) == 0
    data, records = _read_all(kafka_bootstrap, topic, 120, "x", (784,))
    assert len(data) == 120
    assert len(records) >= 120 // 6
    for r in records:
        assert record_bytes(r.key, r.value, list(r.headers)) <= limit


def test_a_row_over_the_limit_is_refused(
    kafka_bootstrap: str, kafka_client: str,
    new_topic: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    topic = new_topic()
    code = main(["publish", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
                 "--topic", topic,
                 "--format", "arrow", "--synthetic", "784", "--rows", "3",
                 "--max-message-bytes", "2000"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "over the 2000-byte limit" in err


def test_record_replay_collect_compare_with_a_worker(
    kafka_bootstrap: str, kafka_client: str,
    new_topic: Callable[..., str], group_id: str, model_repo: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The docs walkthrough: record traffic, replay it at version 2, compare with version 1."""
    write_demo_model(model_repo, version=2, seed=8)
    live, shadow, answers = new_topic(), new_topic(), new_topic()
    boot = ["--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client]
    rec, rec2 = tmp_path / "live.arrow", tmp_path / "replayed.arrow"
    v1, v2 = tmp_path / "v1.arrow", tmp_path / "v2.parquet"

    # 1. "live" traffic: 10 messages of 3 rows, paced over ~1.35 s, pinned to version 1
    assert main(["publish", *boot, "--topic", live, "--format", "arrow", "--model", DEMO_MODEL,
                 "--model-version", "1", "--synthetic", "784", "--rows", "30",
                 "--batch-rows", "3", "--rate", "20"]) == 0
    assert main(["record", *boot, "--topic", live, "--out", str(rec), "--max-messages", "10",
                 "--timeout", "30", "--from-beginning"]) == 0
    recorded = ipc.open_file(str(rec)).read_all()
    assert recorded.num_rows == 10
    span = (max(recorded.column("timestamp").to_pylist())
            - min(recorded.column("timestamp").to_pylist())) / 1000
    assert span > 1.0

    # 2. replay at twice the speed, as version 2: about half the recorded span
    started = time.monotonic()
    assert main(["replay", *boot, "--in", str(rec), "--topic", shadow, "--speed", "2",
                 "--set-header", "model-version=2"]) == 0
    took = time.monotonic() - started
    assert span / 2 * 0.6 < took < span / 2 * 1.5 + 1.0, (span, took)
    assert main(["record", *boot, "--topic", shadow, "--out", str(rec2),
                 "--max-messages", "10", "--timeout", "30", "--from-beginning"]) == 0
    replayed = ipc.open_file(str(rec2)).read_all()

    def plain(headers: list[dict[str, Any]], drop: set[str]) -> list[tuple[str, bytes]]:
        return [(h["key"], h["value"]) for h in headers if h["key"] not in drop]

    assert replayed.column("key").to_pylist() == recorded.column("key").to_pylist()
    assert replayed.column("value").to_pylist() == recorded.column("value").to_pylist()
    skip = {"produced-at", "model-version"}
    for before, after in zip(recorded.column("headers").to_pylist(),
                             replayed.column("headers").to_pylist(), strict=True):
        assert plain(after, skip) == plain(before, skip)
        assert ("model-version", b"2") in plain(after, set())

    # 3. one worker answers both topics; collect each version apart
    s = settings(kafka_bootstrap, live, answers, model_repo, group_id,
                 input_topics=(live, shadow))
    with worker_thread(s):
        assert main(["collect", *boot, "--topic", answers, "--out", str(v1), "--expect", "30",
                     "--match-header", "model-version=1", "--requests", str(rec),
                     "--timeout", "60"]) == 0
        assert main(["collect", *boot, "--topic", answers, "--out", str(v2), "--expect", "30",
                     "--match-header", "model-version=2", "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert "collected 10 response(s) (30 rows)" in out and "p50" in out
    a = ipc.open_file(str(v1)).read_all()
    b = pq.read_table(v2)
    assert set(a.column("model_version").to_pylist()) == {1}
    assert set(b.column("model_version").to_pylist()) == {2}
    assert all(x is not None and x >= 0 for x in a.column("latency_ms").to_pylist())
    assert all(x is not None for x in b.column("latency_ms").to_pylist())  # produced-at
    # keys and request ids survive request -> replay -> worker -> collect
    assert set(a.column("key").to_pylist()) == set(b.column("key").to_pylist())
    assert set(a.column("request_id").to_pylist()) == set(b.column("request_id").to_pylist())

    report = compare(v1, v2)
    assert report["joined_rows"] == 30 and report["only_in_a"] == report["only_in_b"] == 0
    assert report["outputs"][DEMO_OUTPUT]["max_abs_diff"] > 0
    assert compare(v1, v1)["outputs"][DEMO_OUTPUT]["max_abs_diff"] == 0.0


def test_collect_expect_times_out_saying_how_many_are_missing(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = new_topic()
    code = main(["collect", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
                 "--topic", topic,
                 "--out", str(tmp_path / "c.npy"), "--expect", "5", "--timeout", "1.5"])
    assert code == 1
    captured = capsys.readouterr()
    assert "5 of 5 expected rows missing" in captured.err
    assert "collected 0 response(s)" in captured.out


def test_record_stops_at_its_timeout(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = new_topic()
    out = tmp_path / "empty.arrow"
    started = time.monotonic()
    assert main(["record", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
                 "--topic", topic,
                 "--out", str(out), "--timeout", "1"]) == 0
    assert time.monotonic() - started < 10
    assert ipc.open_file(str(out)).read_all().num_rows == 0


def test_record_starts_at_the_end_unless_from_beginning(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Like kafka-console-consumer: only what arrives after start, or all with --from-beginning."""
    topic = new_topic(partitions=2)
    produce(kafka_bootstrap, topic, [(b"old", b"before-%d" % i, []) for i in range(3)])
    late, everything = tmp_path / "late.arrow", tmp_path / "all.arrow"
    proc = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "record", "--bootstrap-server", kafka_bootstrap,
         "--kafka-client", kafka_client, "--topic", topic, "--out", str(late),
         "--max-messages", "2", "--timeout", "60"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stderr is not None
        # printed once the end positions are resolved: what comes next is recorded
        assert "from the end" in proc.stderr.readline()
        produce(kafka_bootstrap, topic, [(b"new", b"after-%d" % i, []) for i in range(2)])
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert sorted(ipc.open_file(str(late)).read_all().column("value").to_pylist()) == [
        b"after-0", b"after-1"]
    assert main(["record", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
                 "--topic", topic,
                 "--out", str(everything), "--from-beginning", "--max-messages", "5",
                 "--timeout", "30"]) == 0
    assert ipc.open_file(str(everything)).read_all().num_rows == 5


def test_json_requests_answered_and_collected(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """publish --format json (Open Inference Protocol V2); the worker answers in JSON."""
    requests, answers = new_topic(), new_topic()
    boot = ["--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client]
    out = tmp_path / "answers.arrow"
    assert main(["publish", *boot, "--topic", requests, "--format", "json", "--model",
                 DEMO_MODEL, "--synthetic", "784", "--rows", "12", "--batch-rows", "5"]) == 0
    [first] = consume(kafka_bootstrap, requests, 1, timeout=30)[:1]
    assert header(first, "content-type") == "application/json"
    with worker_thread(settings(kafka_bootstrap, requests, answers, model_repo, group_id)):
        assert main(["collect", *boot, "--topic", answers, "--out", str(out), "--expect", "12",
                     "--timeout", "60"]) == 0
    assert "collected 3 response(s) (12 rows)" in capsys.readouterr().out
    table = ipc.open_file(str(out)).read_all()
    assert set(table.column("model").to_pylist()) == {DEMO_MODEL}
    probs = np.stack(table.column(DEMO_OUTPUT).to_numpy(zero_copy_only=False))
    assert probs.shape == (12, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
