"""Poison pills through a real worker process: each is answered or dead-lettered, exactly
once, the process never dies, and the records after it on the same partition go on.

Headers: a NULL value (Java producers send them), values and names that are not
UTF-8, an empty name, hundreds of headers, a 100 kB value. Sizes: an answer
over the output topic's own ``max.message.bytes`` becomes a ``too-large`` dead
letter, and a dead letter over the dead-letter topic's limit keeps its headers
and drops its value, saying so in a header.

The records are sent with confluent-kafka's producer, except the non-UTF-8
header *name*: confluent-kafka turns a ``bytes`` name into its ``repr``, so
that one goes through kafka-python's record builder with a name whose UTF-8
encoding is replaced by raw bytes (what a Java producer can send).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import confluent_kafka as ck
import numpy as np
import pytest
from kafka import KafkaProducer

from tests.brokers import Got, committed_offsets, reading
from tests.harness import worker_process
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka


class _RawName(str):
    """A header name kafka-python writes as raw (non-UTF-8) bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawName:
        self = super().__new__(cls, raw.decode("latin-1"))
        self.raw = raw
        return self

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def _request(i: int, rows: int = 1) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    x = np.random.default_rng(i).random((rows, 784), dtype=np.float32)
    value, headers = encode_request({"x": x}, format="msgpack", model="mnist-mlp")
    return value, list(headers)


def _args(
    bootstrap: str, requests: str, outputs: str, repo: Path, group: str, client: str, *extra: str
) -> list[str]:
    args = ["--bootstrap-servers", bootstrap, "--input-topic", requests]
    args += ["--output-topic", outputs, "--model-repository", str(repo)]
    args += ["--group-id", group, "--metrics-port", "0", "--device", "cpu"]
    args += ["--kafka-client", client, "--commit-interval-ms", "50", "--log-level", "WARNING"]
    args += ["--kafka-option", "session.timeout.ms=6000"]
    return [*args, *extra]


# (name, headers added to a valid request, expected outcome: "ok" or a dead-letter type)
_HEADER_POISON: list[tuple[str, list[tuple[str, bytes | None]], str]] = [
    ("null-value", [("x-null", None)], "ok"),
    ("binary-value", [("x-bin", b"\xff\xfe\x00\x80")], "ok"),
    ("empty-name", [("", b"empty name")], "ok"),
    ("many-headers", [(f"h{i}", str(i).encode()) for i in range(500)], "ok"),
    ("100kB-value", [("x-big", bytes(range(256)) * 400)], "ok"),
    ("model-not-utf8", [("model", b"\xff\xfe")], "decode-error"),
    ("version-not-utf8", [("model-version", b"\xc3\x28")], "decode-error"),
    ("content-type-not-utf8", [("content-type", b"\xa0\xa1")], "decode-error"),
    ("request-id-not-utf8", [("request-id", b"\xe2\x82")], "decode-error"),
]


def _send_poison(bootstrap: str, requests: str) -> dict[bytes, tuple[str, list]]:
    """Each poison record, then a plain one that must be answered after it."""
    expected: dict[bytes, tuple[str, list]] = {}
    p = ck.Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 16 << 20})
    for n, (name, extra, outcome) in enumerate(_HEADER_POISON):
        for key, headers, want in (
            (name.encode(), extra, outcome),
            (f"after-{name}".encode(), [], "ok"),
        ):
            value, base = _request(n)
            # a read header replaces the request's own (the poison must be the one read)
            names = {h for h, _ in headers}
            sent = [*(h for h in base if h[0] not in names), *headers]
            p.produce(requests, value, key, headers=sent)
            expected[key] = (want, headers)
    p.flush(30)
    return expected


def _send_bad_name(bootstrap: str, requests: str) -> dict[bytes, tuple[str, list]]:
    kp = KafkaProducer(bootstrap_servers=bootstrap)
    value, base = _request(100)
    bad = [*base, ("x-kept", b"1"), (_RawName(b"\xff\xfe-name"), b"v")]
    kp.send(requests, value=value, key=b"name-not-utf8", headers=bad).get(30)
    value, base = _request(101)
    kp.send(requests, value=value, key=b"after-name-not-utf8", headers=base).get(30)
    kp.close()
    return {b"name-not-utf8": ("decode-error", []), b"after-name-not-utf8": ("ok", [])}


def _outcomes(
    bootstrap: str,
    requests: str,
    outputs: str,
    repo: Path,
    group: str,
    client: str,
    expected: dict[bytes, tuple[str, list]],
    log: Path,
) -> dict[bytes | None, list[tuple[str, Got]]]:
    """Run a worker process until every key in ``expected`` has an outcome; SIGTERM, rc 0."""
    dlq = f"{requests}.dlq"
    proc = worker_process(_args(bootstrap, requests, outputs, repo, group, client), log_path=log)
    try:
        with reading(bootstrap, outputs) as out, reading(bootstrap, dlq) as dead:

            def keys() -> set[bytes | None]:
                return {r.key for r in out.records} | {r.key for r in dead.records}

            def done(_: list[Got]) -> bool:
                dead.read(0.05)
                return keys() >= set(expected) or proc.poll() is not None

            out.until(done, 60)
            assert proc.poll() is None, "the worker died:\n" + log.read_text()[-3000:]
            assert keys() >= set(expected), (
                f"no outcome for {sorted(k for k in set(expected) - keys() if k)}:\n"
                + log.read_text()[-3000:]
            )
            out.settle(1.0)
            dead.settle(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]
    outcomes: dict[bytes | None, list[tuple[str, Got]]] = {}
    for r in out.records:
        outcomes.setdefault(r.key, []).append(("ok", r))
    for r in dead.records:
        outcomes.setdefault(r.key, []).append((r.header("error-type") or "?", r))
    assert committed_offsets(bootstrap, group, requests) == {0: len(expected)}
    return outcomes


@pytest.mark.parametrize(
    "kafka_client",
    [
        "confluent",
        pytest.param(
            "kafka-python",
            marks=[
                pytest.mark.slow,
                pytest.mark.xfail(
                    strict=True,
                    reason="kafka-python cannot send a NULL header value: the answer carries b''",
                ),
            ],
        ),
    ],
)
def test_poison_headers_each_answered_or_dead_lettered_and_the_partition_goes_on(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    requests, outputs = new_topic(), new_topic()
    expected = _send_poison(kafka_bootstrap, requests)
    outcomes = _outcomes(
        kafka_bootstrap,
        requests,
        outputs,
        model_repo,
        group_id,
        kafka_client,
        expected,
        tmp_path / "worker.log",
    )
    wrong = []
    for key, (want, sent) in expected.items():
        got = outcomes.get(key, [])
        if [kind for kind, _ in got] != [want]:
            wrong.append(f"{key!r}: {[kind for kind, _ in got]}, expected [{want!r}]")
            continue
        (_, record) = got[0]
        # every header the request carried comes back byte for byte (NULL included),
        # on the answer and on the dead letter alike
        for name, value in sent:
            if want == "ok" and (name, value) not in record.headers:
                wrong.append(f"{key!r}: header {name!r} not copied as sent")
                break
            if want != "ok" and (name, value) not in record.headers:
                wrong.append(f"{key!r}: dead letter lost header {name!r}")
                break
    assert not wrong, "\n".join(wrong)


def test_header_name_not_utf8_is_a_decode_error_and_the_partition_goes_on(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    requests, outputs = new_topic(), new_topic()
    expected = _send_bad_name(kafka_bootstrap, requests)
    outcomes = _outcomes(
        kafka_bootstrap,
        requests,
        outputs,
        model_repo,
        group_id,
        kafka_client,
        expected,
        tmp_path / "worker.log",
    )
    assert [k for k, _ in outcomes[b"name-not-utf8"]] == ["decode-error"]
    assert [k for k, _ in outcomes[b"after-name-not-utf8"]] == ["ok"]
    (_, letter) = outcomes[b"name-not-utf8"][0]
    assert letter.value == _request(100)[0], "the dead letter must keep the record's value"
    assert letter.header("source-offset") == "0"


def _too_large_run(
    bootstrap: str,
    new_topic: Callable[..., str],
    group: str,
    repo: Path,
    client: str,
    tmp_path: Path,
    *,
    output_limit: int,
    dlq_limit: int | None,
    rows: int,
) -> tuple[list[Got], list[Got]]:
    requests = new_topic()
    outputs = new_topic(**{"max.message.bytes": str(output_limit)})
    dlq_configs = {} if dlq_limit is None else {"max.message.bytes": str(dlq_limit)}
    dlq = new_topic(**dlq_configs)
    p = ck.Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 16 << 20})
    big, big_headers = _request(0, rows=rows)
    small, small_headers = _request(1)
    p.produce(requests, big, b"big", headers=[*big_headers, ("x-trace", b"t-1")])
    p.produce(requests, small, b"small", headers=small_headers)
    p.flush(30)
    log = tmp_path / "worker.log"
    proc = worker_process(
        _args(bootstrap, requests, outputs, repo, group, client, "--dlq-topic", dlq),
        log_path=log,
    )
    try:
        with reading(bootstrap, outputs) as out, reading(bootstrap, dlq) as dead:
            ok = dead.until(lambda rs: len(rs) >= 1, 60) and out.until(lambda rs: len(rs) >= 1, 30)
            assert ok, log.read_text()[-3000:]
            out.settle(1.0)
            dead.settle(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]
    assert [r.key for r in out.records] == [b"small"], "the small answer is missing or repeated"
    assert committed_offsets(bootstrap, group, requests) == {0: 2}
    return out.records, dead.records


def test_answer_over_the_output_topics_limit_is_a_too_large_dead_letter(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    # 600 rows answer with 600 x 10 float32 (24 kB) over a 20 kB output topic; the
    # request (1.9 MB) fits the dead-letter topic (the broker's 16 MiB), so it is kept.
    rows = 600
    _, dead = _too_large_run(
        kafka_bootstrap,
        new_topic,
        group_id,
        model_repo,
        kafka_client,
        tmp_path,
        output_limit=20_000,
        dlq_limit=None,
        rows=rows,
    )
    (letter,) = dead
    assert letter.key == b"big"
    assert letter.header("error-type") == "too-large"
    assert "max.message.bytes" in (letter.header("error-message") or "")
    assert letter.header("source-offset") == "0"
    assert ("x-trace", b"t-1") in letter.headers
    assert letter.value == _request(0, rows=rows)[0], "the dead letter lost the request"
    assert letter.header("value-omitted") is None


def test_dead_letter_over_the_dead_letter_topics_limit_keeps_headers_drops_value(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    rows = 600
    request = _request(0, rows=rows)[0]
    _, dead = _too_large_run(
        kafka_bootstrap,
        new_topic,
        group_id,
        model_repo,
        kafka_client,
        tmp_path,
        output_limit=20_000,
        dlq_limit=100_000,
        rows=rows,
    )
    (letter,) = dead
    assert letter.key == b"big"
    assert letter.header("error-type") == "too-large"
    assert ("x-trace", b"t-1") in letter.headers
    assert letter.value in (b"", None)
    assert letter.header("value-omitted") == str(len(request))
