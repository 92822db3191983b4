"""inference-producer parts that need no broker: splitting, sources, compare, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from producers.cli import main
from producers.clients import kafka_properties
from producers.collect import Collection
from producers.errors import UsageError
from producers.publish import record_bytes, split_messages
from producers.sources import model_input, read_file, synthetic
from worker.protocol import Response, encode_request

ROOT = Path(__file__).resolve().parents[1]


def _encoder(fmt: str) -> Callable[[np.ndarray, str], tuple[bytes, list[tuple[str, bytes]]]]:
    def encode(rows: np.ndarray, request_id: str) -> tuple[bytes, list[tuple[str, bytes]]]:
        return encode_request({"x": rows}, format=fmt, request_id=request_id)
    return encode


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
@pytest.mark.parametrize("limit", [4_000, 9_000, 50_000])
def test_split_never_exceeds_the_limit_and_keeps_every_row(fmt: str, limit: int) -> None:
    data = np.random.default_rng(0).random((97, 200), dtype=np.float32)  # 800 bytes a row
    ids = (str(i) for i in range(10_000))
    messages = list(split_messages(data, None, _encoder(fmt), batch_rows=1000, limit=limit,
                                   request_ids=ids))
    assert sum(m.rows for m in messages) == 97
    # the produced-at header publish adds is 13 digits, like the placeholder sized in
    assert all(record_bytes(m.key, m.value, [*m.headers, ("produced-at", b"1" * 13)]) <= limit
               for m in messages)
    assert max(m.rows for m in messages) >= (limit // 800) // 2  # shrunk, not collapsed to 1


def test_split_keeps_one_key_per_message_and_refuses_a_huge_row() -> None:
    data = np.zeros((10, 4), np.float32)
    keys: list[bytes | None] = [b"a"] * 3 + [b"b"] * 5 + [None] * 2
    ids = (str(i) for i in range(100))
    messages = list(split_messages(data, keys, _encoder("msgpack"), batch_rows=4,
                                   limit=100_000, request_ids=ids))
    assert [(m.key, m.rows) for m in messages] == [(b"a", 3), (b"b", 4), (b"b", 1), (None, 2)]
    with pytest.raises(UsageError, match="one row encodes to"):
        list(split_messages(np.zeros((2, 1000), np.float32), None, _encoder("arrow"),
                            batch_rows=2, limit=1000, request_ids=ids))


def test_model_repository_gives_input_name_dtype_and_shape(model_repo: Path,
                                                           tmp_path: Path) -> None:
    spec = model_input(model_repo, "mnist-mlp", None, None)
    assert (spec.name, spec.dtype, spec.row_shape) == ("x", np.dtype(np.float32), (784,))
    assert synthetic("auto", 3, 0, spec).data.shape == (3, 784)
    images = tmp_path / "images.npy"
    np.save(images, np.ones((4, 28, 28), np.float64))
    src = read_file(images, spec)  # same element count: reshaped, cast to the model's dtype
    assert src.data.shape == (4, 784) and src.data.dtype == np.float32
    np.save(images, np.ones((4, 10), np.float32))
    with pytest.raises(UsageError, match=r"expects rows of float32\[784\]"):
        read_file(images, spec)


def test_kafka_properties_file_then_env_then_flags(tmp_path: Path) -> None:
    conf = tmp_path / "client.properties"
    conf.write_text("# Java style\nsecurity.protocol=SASL_PLAINTEXT\nsasl.mechanism: PLAIN\n"
                    "client.rack=a\n")
    env = {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p",
           "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}
    for backend in ("confluent", "kafka-python"):
        got = kafka_properties(["client.rack=b", "request.timeout.ms=5000"], conf, env,
                               backend)
        assert got == {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
                       "sasl.username": "u", "sasl.password": "p", "client.rack": "b",
                       "request.timeout.ms": "5000"}, backend
    with pytest.raises(UsageError, match="refused by librdkafka"):
        kafka_properties(["no.such.property=1"], None, {}, "confluent")
    with pytest.raises(UsageError, match=r"unknown Kafka property 'no\.such\.property'"):
        kafka_properties(["no.such.property=1"], None, {}, "kafka-python")
    with pytest.raises(UsageError, match="--kafka-config"):
        kafka_properties([], tmp_path / "missing.properties", {}, "confluent")


# --- compare ------------------------------------------------------------------


def _collection(path: Path, probs: np.ndarray, version: int, per_request: int = 2) -> Path:
    collection = Collection()
    for i in range(0, len(probs), per_request):
        response = Response(outputs={"probs": probs[i:i + per_request],
                                     "label": np.argmax(probs[i:i + per_request], axis=1)},
                            request_id=f"req-{i // per_request}", model="m",
                            model_version=version)
        record = SimpleNamespace(key=b"k", partition=0, offset=i, timestamp_ms=1000 + i)
        collection.add(response, record, latency_ms=float(i))
    table = collection.table()
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


def test_compare_itself_is_zero_and_finds_a_planted_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    probs = np.random.default_rng(3).dirichlet(np.ones(10), size=20).astype(np.float32)
    a = _collection(tmp_path / "a.arrow", probs, 1)
    changed = probs.copy()
    row = 7  # request req-3, row 1
    top = int(np.argmax(changed[row]))
    changed[row, (top + 1) % 10] += 0.5  # now the argmax moves
    b = _collection(tmp_path / "b.arrow", changed, 2)

    assert main(["compare", str(a), str(a), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["joined_rows"] == 20 and same["worst_requests"] == []
    assert same["outputs"]["probs"]["max_abs_diff"] == 0.0
    assert same["outputs"]["probs"]["argmax_agreement"] == 1.0

    png = tmp_path / "diff.png"
    assert main(["compare", str(a), str(b), "--json", "--top", "3", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    probs_entry = report["outputs"]["probs"]
    assert probs_entry["max_abs_diff"] == pytest.approx(0.5)
    assert probs_entry["mean_diff"] == pytest.approx(0.5 / 200)
    assert probs_entry["argmax_agreement"] == pytest.approx(19 / 20)
    assert report["worst_requests"][0]["request_id"] == "req-3"
    assert report["worst_requests"][0]["argmax_disagreements"] == 1
    assert len(report["worst_requests"]) == 1  # only one request differs at all
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert "req-3" in table and "95.00%" in table


# --- bad input: exit 2 with one line ------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_bad_inputs_exit_2_with_one_line(
    tmp_path: Path, model_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = ["publish", "--bootstrap-servers", "127.0.0.1:1", "--topic", "t", "--format", "arrow"]
    err = _one_line_error(capsys, *pub, "--from", str(tmp_path / "missing.npy"))
    assert "no such file" in err
    (tmp_path / "data.txt").write_text("1,2\n")
    err = _one_line_error(capsys, *pub, "--from", str(tmp_path / "data.txt"))
    assert "unsupported file type '.txt'" in err
    csv = tmp_path / "mixed.csv"
    pcsv.write_csv(pa.table({"a": [1.0, 2.0], "colour": ["red", "blue"]}), csv)
    err = _one_line_error(capsys, *pub, "--from", str(csv))
    assert "'colour'" in err and "not numeric" in err
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert "cannot read it" in _one_line_error(capsys, *pub, "--from", str(bad))
    err = _one_line_error(capsys, *pub, "--model", "no-such-model", "--model-repository",
                          str(model_repo), "--synthetic", "784", "--rows", "1")
    assert "no such model" in err
    assert "valid model name" in _one_line_error(
        capsys, *pub, "--model", "../etc", "--model-repository", str(model_repo),
        "--synthetic", "784", "--rows", "1")
    assert "--rows" in _one_line_error(capsys, *pub, "--synthetic", "784")
    assert "dimension" in _one_line_error(capsys, *pub, "--synthetic", "0,3", "--rows", "1")
    _one_line_error(capsys, *pub, "--synthetic", "784", "--rows", "1", "--kafka-option", "x")
    _one_line_error(capsys, "publish", "--topic", "t")  # argparse: missing arguments
    assert ".arrow" in _one_line_error(capsys, "record", "--topic", "t", "--out", "r.csv")
    assert "no such file" in _one_line_error(capsys, "replay", "--in",
                                             str(tmp_path / "none.arrow"), "--topic", "t")
    assert "--set-header" in _one_line_error(capsys, "replay", "--in", str(csv), "--topic", "t",
                                             "--set-header", "novalue")
    assert "no such file" in _one_line_error(capsys, "compare", str(tmp_path / "a.arrow"),
                                             str(tmp_path / "b.arrow"))
    assert ".npy" in _one_line_error(capsys, "collect", "--topic", "t", "--out", "c.json")
    red = ["redrive", "--bootstrap-servers", "127.0.0.1:1", "--dlq-topic", "t.dlq"]
    assert "--max must be positive" in _one_line_error(capsys, *red, "--max", "0")
    assert "expected ISO-8601" in _one_line_error(capsys, *red, "--since", "last tuesday")
    assert "--until must be later than --since" in _one_line_error(
        capsys, *red, "--since", "2026-12-01T10:00:00Z", "--until", "2026-12-01T09:00:00Z")
    assert "--kafka-config" in _one_line_error(capsys, *red, "--kafka-config",
                                               str(tmp_path / "none.properties"))
    assert "invalid choice" in _one_line_error(capsys, *red, "--kafka-client", "java")


def test_console_script_exits_2_with_one_line() -> None:
    script = ROOT / ".venv" / "bin" / "inference-producer"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    out = subprocess.run(
        [str(script), "publish", "--topic", "t", "--format", "msgpack", "--from", "nope.csv"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 2
    expected = "inference-producer publish: error: --from 'nope.csv': no such file"
    assert out.stderr.strip() == expected


# --- CLI conventions ------------------------------------------------------------


@pytest.mark.parametrize("command", ["publish", "record", "replay", "collect", "compare",
                                     "redrive"])
def test_every_command_has_version_and_the_kafka_flags(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from importlib import metadata

    assert main([command, "--version"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"inference-producer {metadata.version('inference-worker')}")
    assert main([command, "--help"]) == 0
    usage = capsys.readouterr().out
    assert "--bootstrap-server HOST:PORT" in usage and "--kafka-option KEY=VALUE" in usage
    assert "VALUE\n" not in usage.replace("KEY=VALUE", "")  # real metavars only


def test_publish_offers_every_request_format_of_the_protocol() -> None:
    from producers.cli import REQUEST_FORMATS
    from worker.protocol import CONTENT_TYPES

    assert sorted(REQUEST_FORMATS) == sorted(CONTENT_TYPES)


def test_bootstrap_server_is_an_alias_and_old_flags_still_parse() -> None:
    from producers.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["record", "--bootstrap-server", "h:1", "--topic", "t",
                              "--out", "r.arrow"])
    assert args.bootstrap_servers == "h:1" and args.from_beginning is False
    args = parser.parse_args(["record", "--topic", "t", "--out", "r.arrow", "--from-beginning"])
    assert args.from_beginning is True
    args = parser.parse_args(["record", "--topic", "t", "--out", "r.arrow", "--from-latest"])
    assert args.from_beginning is False
    args = parser.parse_args(["collect", "--topic", "t", "--out", "c.npy", "--output", "probs"])
    assert args.output_name == "probs"


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    probs = np.random.default_rng(1).dirichlet(np.ones(3), size=4).astype(np.float32)
    a = _collection(tmp_path / "a.arrow", probs, 1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    err = _one_line_error(capsys, "compare", str(a), str(a), "--plot", str(tmp_path / "p.png"))
    assert err == ("inference-producer compare: error: --plot needs matplotlib: "
                   "pip install 'inference-worker[plot]'")
    assert not (tmp_path / "p.png").exists()
