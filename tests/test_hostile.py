"""A seeded corpus of hostile records, interleaved with valid ones, through a real worker process.

Every record carries a unique key, so its one outcome (an answer on the output
topic or a dead letter) can be found again: valid records must be answered
correctly, bad ones dead-lettered with the right ``error-type``, mutants that
happen to stay valid may go either way, and nothing may be answered twice or
not at all. The worker's RSS is sampled throughout and must stay under
``RSS_BOUND``.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from tests.harness import consume, header, produce, worker_process
from worker.protocol import decode_response, encode_request

pytestmark = pytest.mark.kafka

SEED = 20240909
N_VALID = 300
MAX_REQUEST_BYTES = 256 * 1024
# The worker's resident set peaks at ~205 MiB on CPU with this corpus (Python,
# numpy, pyarrow, ONNX Runtime, kafka-python); the corpus may add its in-flight
# buffers (--max-inflight-bytes 16 MiB here) and nothing that grows per record.
RSS_BOUND = 384 * 1024 * 1024

OK = "ok"
ANY = "either"  # a mutant that may still be valid: answer or dead letter, exactly once

Expect = tuple[str, frozenset[str], np.ndarray | None]  # kind, DLQ types, expected output
Record = tuple[bytes, bytes, list]


def _mlp(model_repo: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(next(model_repo.rglob("*.onnx"))))


def _valid(
    rng: np.random.Generator, fmt: str, session: ort.InferenceSession
) -> tuple[bytes, list, np.ndarray]:
    x = rng.random((int(rng.integers(1, 5)), 784), dtype=np.float32)
    value, headers = encode_request({"x": x}, format=fmt, model="mnist-mlp")
    (want,) = session.run(None, {"x": x})
    return value, headers, want


def _flip(rng: np.random.Generator, value: bytes) -> bytes:
    buf = bytearray(value)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, len(buf)))
        buf[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def _tensor_map(dtype: str, shape: list[int], data: object) -> bytes:
    return msgpack.packb({"inputs": {"x": {"dtype": dtype, "shape": shape, "data": data}}})


def _nested(depth: int, leaf: bytes = b"\x01") -> bytes:
    return b"\x91" * depth + leaf  # fixarray(1) inside fixarray(1) ...


def _hostile(
    rng: np.random.Generator, session: ort.InferenceSession
) -> Iterator[tuple[Record, Expect]]:
    """Yields ((value, headers), expectation) without keys; ~1,300 bad records."""
    none: frozenset[str] = frozenset()
    dec, big, schema = (
        frozenset({"decode-error"}),
        frozenset({"too-large"}),
        frozenset({"schema-mismatch"}),
    )
    notfound = frozenset({"model-not-found"})
    mh = [("model", b"mnist-mlp")]
    x = np.zeros((1, 784), np.float32)
    # random bytes (never starting with the Arrow marker, which would still be a decode error)
    for _ in range(300):
        n = int(rng.integers(0, 2048))
        yield (rng.bytes(n), list(mh)), ("dlq", dec, None)
    # bit flips of valid messages, both formats
    for fmt in ("msgpack", "arrow") * 200:
        value, headers, _ = _valid(rng, fmt, session)
        yield (_flip(rng, value), headers), (ANY, none, None)
    # declared shapes of 10^9 elements (and more) with tiny data
    for shape in ([1, 10**9], [10**9, 784], [31623, 31623], [1, 1, 10**9], [2**31, 2**31]) * 10:
        data = b"\0" * 16 if rng.random() < 0.5 else [1.0, 2.0]
        yield (_tensor_map("float32", shape, data), list(mh)), ("dlq", big, None)
    # deeply nested msgpack: as the body, inside `data`, inside passthrough
    head = b"\x81\xa6inputs\x81\xa1x\x83\xa5dtype\xa7float32\xa5shape\x92\x01\xcd\x03\x10\xa4data"
    for depth in (1_000, 10_000, 100_000) * 10:
        for body in (_nested(depth), head + _nested(depth), b"\x81\xa1a" * depth + b"\x01"):
            yield (body, list(mh)), ("dlq", big if len(body) > MAX_REQUEST_BYTES else dec, None)
    # wrong dtypes: known but wrong for the model, and unknown
    for dtype in ("int64", "float64", "int8", "uint8", "bool", "float16") * 8:
        value, _ = encode_request(
            {"x": x.astype(dtype)}, format=str(rng.choice(["msgpack", "arrow"]))
        )
        yield (value, list(mh)), ("dlq", schema, None)
    for dtype in ("complex64", "object", "<f4", "", "float", "V8", "datetime64") * 6:
        yield (_tensor_map(dtype, [1, 784], b"\0" * 784 * 4), list(mh)), ("dlq", dec, None)
    for _ in range(20):
        yield (_tensor_map("float32", [1, 2], ["a", "b"]), list(mh)), ("dlq", dec, None)
        yield (_tensor_map("float32", [1, 784], b"\0" * 7), list(mh)), ("dlq", dec | schema, None)
    # huge header counts: a valid request still answered, its headers copied
    for count in (1_000, 5_000, 10_000) * 4:
        value, headers, want = _valid(rng, "msgpack", session)
        extra = [(f"h{i}", b"v") for i in range(count)]
        yield (value, headers + extra), (OK, none, want)
    # model names that try to leave the repository (and other impossible names)
    names = [
        b"../x",
        b"../../etc/passwd",
        b"/etc/passwd",
        b"a\x00b",
        b"..",
        b".",
        b"mnist-mlp/../mnist-mlp",
    ]
    names += [
        b"mnist-mlp\x00",
        b"x" * 200,
        b"C:\\x",
        b"~root",
        b"mnist-mlp\n",
        b"%2e%2e%2fx",
        b"-x",
        b"",
    ]
    for name in names * 6:
        value, _ = encode_request({"x": x}, format="msgpack")
        yield (value, [("model", name)]), ("dlq", notfound, None)
        body = msgpack.packb(
            {
                "inputs": {"x": {"dtype": "float32", "shape": [1, 784], "data": x.tobytes()}},
                "model": name.decode("latin-1"),
            }
        )
        yield (body, []), ("dlq", notfound, None)
    for version in (b"0", b"-1", b"abc", b"1.5", b"99999999999999999999999") * 4:
        value, _ = encode_request({"x": x}, format="msgpack")
        kinds = notfound if version == b"99999999999999999999999" else dec
        yield (value, [*mh, ("model-version", version)]), ("dlq", kinds, None)
    # not UTF-8 where text is expected, a content type that lies
    for _ in range(10):
        value, _ = encode_request({"x": x}, format="msgpack")
        yield (value, [("model", b"\xff\xfe")]), ("dlq", dec, None)
        yield (
            (value, [*mh, ("content-type", b"application/vnd.apache.arrow.stream")]),
            ("dlq", dec, None),
        )
        yield (value, [*mh, ("content-type", b"text/html")]), ("dlq", dec, None)
    # oversize: over --max-request-bytes, and rows over --max-request-rows
    for rows in (90, 200, 400) * 5:
        value, _ = encode_request({"x": np.zeros((rows, 784), np.float32)}, format="msgpack")
        yield (value, list(mh)), ("dlq", big, None)
    for _ in range(10):
        value, _ = encode_request({"x": np.zeros((70, 1), np.float32)}, format="arrow")
        yield (value, list(mh)), ("dlq", big | schema, None)


def _corpus(model_repo: Path) -> tuple[list[Record], dict[bytes, Expect]]:
    rng = np.random.default_rng(SEED)
    session = _mlp(model_repo)
    bad = list(_hostile(rng, session))
    good = []
    for i in range(N_VALID):
        value, headers, want = _valid(rng, ("msgpack", "arrow")[i % 2], session)
        good.append(((value, headers), (OK, frozenset(), want)))
    mixed = bad + good
    order = rng.permutation(len(mixed))
    records: list[Record] = []
    expect: dict[bytes, Expect] = {}
    for n, i in enumerate(order):
        (value, headers), outcome = mixed[i]
        key = f"h-{n:05d}".encode()
        records.append((key, value, headers))
        expect[key] = outcome
    return records, expect


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.Error:
                return


def test_hostile_corpus_every_record_one_right_outcome(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    tmp_path: Path,
) -> None:
    records, expect = _corpus(model_repo)
    bad = sum(1 for kind, _, _ in expect.values() if kind != OK)
    assert bad >= 1000 and len(records) - bad >= N_VALID
    requests, outputs = new_topic(partitions=3), new_topic()
    dlq = f"{requests}.dlq"
    produce(kafka_bootstrap, requests, records)
    args = ["--bootstrap-servers", kafka_bootstrap, "--input-topic", requests]
    args += [
        "--output-topic",
        outputs,
        "--model-repository",
        str(model_repo),
        "--group-id",
        group_id,
    ]
    args += [
        "--metrics-port",
        "0",
        "--device",
        "cpu",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
    ]
    args += ["--max-request-rows", "64", "--max-inflight-bytes", "16M", "--log-level", "ERROR"]
    log = tmp_path / "worker.log"
    proc = worker_process(args, log_path=log)
    sampler = _RssSampler(proc.pid)
    sampler.start()
    try:
        deadline = time.monotonic() + 90
        answers, dead = [], []
        while time.monotonic() < deadline and len(answers) + len(dead) < len(records):
            assert proc.poll() is None, log.read_text()[-3000:]
            answers = consume(kafka_bootstrap, outputs, len(records), timeout=2)
            dead = consume(kafka_bootstrap, dlq, len(records) - len(answers), timeout=2)
        time.sleep(1.0)  # anything extra (a second outcome) would show up now
        answers = consume(kafka_bootstrap, outputs, len(records), timeout=3)
        dead = consume(kafka_bootstrap, dlq, len(records), timeout=3)
        assert proc.poll() is None, "the worker crashed:\n" + log.read_text()[-3000:]
    finally:
        sampler.halt.set()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]

    outcomes = Counter(r.key for r in answers) + Counter(r.key for r in dead)
    missing = [k for k in expect if outcomes[k] == 0]
    twice = [k for k, n in outcomes.items() if n > 1]
    assert not missing, f"{len(missing)} records without an outcome, e.g. {missing[:5]}"
    assert not twice, f"{len(twice)} records with two outcomes, e.g. {twice[:5]}"
    assert set(outcomes) == set(expect)

    wrong: list[str] = []
    for r in answers:
        kind, _, want = expect[r.key]
        if kind == OK:
            got = decode_response(r.value, list(r.headers or [])).outputs
            output = np.asarray(next(iter(got.values())))
            if want is None or not np.allclose(output, want, rtol=1e-5, atol=1e-6):
                wrong.append(f"{r.key!r}: wrong answer")
        elif kind != ANY:
            wrong.append(f"{r.key!r}: answered, expected a dead letter {sorted(expect[r.key][1])}")
    for r in dead:
        kind, types, _ = expect[r.key]
        got_type = header(r, "error-type")
        if kind == OK:
            wrong.append(f"{r.key!r}: dead-lettered ({got_type}: {header(r, 'error-message')})")
        elif kind != ANY and got_type not in types:
            wrong.append(
                f"{r.key!r}: {got_type} ({header(r, 'error-message')}), expected {sorted(types)}"
            )
        assert 0 < len((header(r, "error-message") or "").encode()) <= 1024
    assert not wrong, f"{len(wrong)} wrong outcomes:\n" + "\n".join(wrong[:20])

    assert sampler.samples, "no RSS samples"
    peak = max(sampler.samples)
    print(f"worker RSS: peak {peak / 2**20:.0f} MiB over {len(sampler.samples)} samples")
    assert peak < RSS_BOUND, f"peak RSS {peak / 2**20:.0f} MiB over {RSS_BOUND / 2**20:.0f} MiB"
