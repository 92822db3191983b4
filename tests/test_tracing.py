"""OpenTelemetry through the worker (the ``otel`` extra), on the real broker.

The SDK's in-memory exporter behind a provider handed to the worker (no
process-wide provider is installed, so other tests keep their plain header
copies): answers and dead letters continue their request's trace with the
worker's own span, a batch has one ``process`` span linking every record, and
JSON log lines written while a record or batch is handled carry the trace id.
The dev install carries the ``otel`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tests import modelzoo
from tests.harness import ROOT, consume, consume_ids, demo_requests, header, produce, settings
from worker.loop import Worker
from worker.observability import configure_logging
from worker.protocol import encode_request
from worker.tracing import Tracing

N = 4  # records of the one coalesced batch


def _traceparent() -> tuple[str, str, bytes]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01".encode()


def _parse(value: str | None) -> tuple[str, str]:
    assert value is not None, "no traceparent"
    version, trace_id, span_id, _flags = value.split("-")
    assert version == "00"
    return trace_id, span_id


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def json_logs() -> Iterator[None]:
    """JSON logs to stderr (configured in the test body, where capsys captures)."""
    try:
        yield
    finally:
        logging.getLogger().handlers.clear()


def _serve(worker: Worker, count: int) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run(count=count, timeout=90)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=target, name="worker", daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "worker did not finish"
    if errors:
        raise errors[0]


@pytest.mark.kafka
def test_answers_dead_letters_and_batches_are_traced(
    kafka_bootstrap: str,
    new_topic: Any,
    group_id: str,
    model_repo: Path,
    exporter: InMemorySpanExporter,
    json_logs: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    modelzoo.write_reshape(model_repo)
    requests, outputs = new_topic(), new_topic()
    dlq = new_topic()
    sent: dict[str, tuple[str, str]] = {}  # request id -> (trace id, span id)
    records = []
    for i, (key, value, headers) in enumerate(demo_requests(N, "ok", rows=2)):
        trace_id, span_id, parent = _traceparent()
        sent[f"ok-{i}"] = (trace_id, span_id)
        records.append((key, value, [*headers, ("traceparent", parent)]))
    junk_trace, junk_span, junk_parent = _traceparent()
    records.append((b"junk", b"not a request", [("traceparent", junk_parent)]))
    # Runs alone (its inputs share no batch axis) and fails in session.run: 6 values
    # do not reshape to 4x4.
    bad_trace, bad_span, bad_parent = _traceparent()
    value, headers = encode_request(
        {"x": np.ones((1, 6), np.float32), "shape": np.array([4, 4], np.int64)},
        format="msgpack",
        model="reshape",
        request_id="bad",
    )
    records.append((b"bad", value, [*headers, ("traceparent", bad_parent)]))
    produce(kafka_bootstrap, requests, records)  # all there before the first poll

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = settings(
        kafka_bootstrap,
        requests,
        outputs,
        model_repo,
        group_id,
        dlq_topic=dlq,
        max_batch_delay_ms=500.0,  # the four mnist-mlp requests coalesce
        preload=(("mnist-mlp", None), ("reshape", None)),
    )
    _serve(Worker(s, tracing=Tracing(provider)), count=len(records))
    answers = consume_ids(kafka_bootstrap, outputs, {f"ok-{i}" for i in range(N)})
    dead = consume(kafka_bootstrap, dlq, 2)
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}

    # One process span for the batch, with a link to each of its records.
    processes = [s for s in spans if s.name == "process" and s.attributes["model"] == "mnist-mlp"]
    assert len(processes) == 1, [(s.name, s.attributes) for s in spans]
    (process,) = processes
    linked = {(_hex(link.context.trace_id, 32), _hex(link.context.span_id, 16))
              for link in process.links}  # fmt: skip
    assert linked == set(sent.values())
    assert process.attributes["messaging.batch.message_count"] == N
    runs = [s for s in spans if s.name == "run" and s.parent == process.context]
    assert runs and runs[0].attributes["model"] == "mnist-mlp"

    # Each answer: the request's trace, the worker's produce span.
    for record in answers:
        trace_id, span_id = _parse(header(record, "traceparent"))
        want_trace, request_span = sent[header(record, "request-id") or ""]
        assert trace_id == want_trace
        produce_span = by_id[int(span_id, 16)]
        assert produce_span.name == "produce"
        assert produce_span.parent is not None and produce_span.parent.span_id == int(
            request_span, 16
        )
        assert produce_span.attributes["model"] == "mnist-mlp"
        assert produce_span.attributes["topic"] == requests
        assert {link.context.span_id for link in produce_span.links} == {process.context.span_id}
        assert [v for k, v in record.headers if k == "traceparent"] == [
            f"00-{trace_id}-{span_id}-01".encode()
        ]  # replaced, not appended

    # Each dead letter carries its own span in its request's trace.
    by_trace = {_parse(header(r, "traceparent"))[0]: r for r in dead}
    assert set(by_trace) == {junk_trace, bad_trace}
    for trace_id, request_span in ((junk_trace, junk_span), (bad_trace, bad_span)):
        _, span_id = _parse(header(by_trace[trace_id], "traceparent"))
        assert span_id != request_span
        own = by_id[int(span_id, 16)]
        assert own.name == "produce" and _hex(own.context.trace_id, 32) == trace_id
    decodes = [s for s in spans if s.name == "decode"]
    assert len(decodes) == len(records)
    assert {s.attributes["offset"] for s in decodes} == set(range(len(records)))

    # JSON logs written while a record or a batch is handled carry its trace.
    logs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    dead_logs = {doc.get("offset"): doc for doc in logs if "dead letter" in doc["msg"]}
    assert dead_logs[N]["trace_id"] == junk_trace  # decode failed: the decode span's trace
    assert dead_logs[N + 1]["trace_id"] == bad_trace  # failed in its batch
    tries = [s for s in spans if s.name == "process" and s.attributes["model"] == "reshape"]
    assert len(tries) == 4  # the first run and three retries, each its own batch
    assert dead_logs[N + 1]["span_id"] == _hex(tries[-1].context.span_id, 16)
    assert all("trace_id" not in doc for doc in logs if doc["msg"].startswith("serving"))


@pytest.mark.kafka
def test_without_tracing_traceparent_is_copied(
    kafka_bootstrap: str, new_topic: Any, group_id: str, model_repo: Path
) -> None:
    requests, outputs = new_topic(), new_topic()
    _, _, parent = _traceparent()
    ((key, value, headers),) = demo_requests(1, "plain")
    produce(kafka_bootstrap, requests, [(key, value, [*headers, ("traceparent", parent)])])
    s = settings(kafka_bootstrap, requests, outputs, model_repo, group_id)
    worker = Worker(s, tracing=Tracing())
    assert not worker.tracing.enabled
    _serve(worker, count=1)
    (answer,) = consume(kafka_bootstrap, outputs, 1)
    assert [v for k, v in answer.headers if k == "traceparent"] == [parent]


def test_configured_only_by_otel_variables() -> None:
    """OTEL_TRACES_EXPORTER turns it on (the SDK builds the exporter); nothing else does."""
    code = "from worker.tracing import Tracing\nt = Tracing.from_environment()\nprint(t.enabled)\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}

    def enabled(**extra: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **extra},
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return (run.stdout + run.stderr).strip()

    assert enabled() == "False"
    assert enabled(OTEL_TRACES_EXPORTER="none") == "False"
    assert enabled(OTEL_TRACES_EXPORTER="console").endswith("True")
    assert enabled(OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true") == "False"
    refused = enabled(OTEL_TRACES_EXPORTER="no-such-exporter")
    assert "OTEL_TRACES_EXPORTER" in refused and "no-such-exporter" in refused
    # Without the extra (its modules unimportable): off, whatever the variables say.
    code = "import sys; sys.modules['opentelemetry'] = None\n" + code
    assert enabled(OTEL_TRACES_EXPORTER="console") == "False"


@pytest.mark.kafka
def test_publish_trace_and_collect_report_the_trace_ids(
    kafka_bootstrap: str,
    new_topic: Any,
    group_id: str,
    model_repo: Path,
    exporter: InMemorySpanExporter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """publish --trace starts a trace per message; the worker continues each; collect
    reports the ids it saw, one per message."""
    from producers.cli import main

    requests, outputs = new_topic(), new_topic()
    boot = ["--bootstrap-servers", kafka_bootstrap]
    assert main(["publish", *boot, "--topic", requests, "--format", "msgpack", "--model",
                 "mnist-mlp", "--synthetic", "784", "--rows", "12", "--batch-rows", "3",
                 "--trace"]) == 0  # fmt: skip
    sent = [_parse(header(r, "traceparent")) for r in consume(kafka_bootstrap, requests, 4)]
    assert len({trace_id for trace_id, _ in sent}) == 4

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = settings(kafka_bootstrap, requests, outputs, model_repo, group_id)
    _serve(Worker(s, tracing=Tracing(provider)), count=4)
    capsys.readouterr()
    assert main(["collect", *boot, "--topic", outputs, "--out", str(tmp_path / "a.arrow"),
                 "--expect", "12", "--timeout", "60"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("trace ids:"))
    assert line.startswith("trace ids: 4 distinct in 4 response(s): ")
    assert set(line.split(": ", 2)[2].split(", ")) == {trace_id for trace_id, _ in sent}
    # Without --trace: no traceparent, and collect reports none.
    plain = new_topic()
    assert main(["publish", *boot, "--topic", plain, "--format", "msgpack", "--model",
                 "mnist-mlp", "--synthetic", "784", "--rows", "3"]) == 0  # fmt: skip
    (record,) = consume(kafka_bootstrap, plain, 1)
    assert header(record, "traceparent") is None


@pytest.mark.kafka
def test_inference_worker_run_exports_spans_configured_by_otel_variables(
    kafka_bootstrap: str, new_topic: Any, group_id: str, model_repo: Path, tmp_path: Path
) -> None:
    """The real command, configured only by OTEL_* variables (the SDK's console
    exporter): the answer's traceparent names a span the worker exported."""
    import signal

    from tests.harness import worker_process

    requests, outputs = new_topic(), new_topic()
    trace_id, span_id, parent = _traceparent()
    ((key, value, headers),) = demo_requests(1, "env")
    produce(kafka_bootstrap, requests, [(key, value, [*headers, ("traceparent", parent)])])
    args = ["--bootstrap-servers", kafka_bootstrap, "--input-topic", requests,
            "--output-topic", outputs, "--model-repository", str(model_repo),
            "--group-id", group_id, "--metrics-port", "0", "--device", "cpu"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    log = tmp_path / "worker.log"
    proc = worker_process(
        args,
        env={**env, "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "iw-test"},
        log_path=log,
    )
    try:
        (answer,) = consume(kafka_bootstrap, outputs, 1, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    got_trace, got_span = _parse(header(answer, "traceparent"))
    assert got_trace == trace_id and got_span != span_id
    text = log.read_text()
    assert f'"span_id": "0x{got_span}"' in text, text[-3000:]
    assert f'"trace_id": "0x{trace_id}"' in text
    assert '"service.name": "iw-test"' in text
