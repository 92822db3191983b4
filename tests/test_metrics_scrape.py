"""/metrics after real traffic through a worker on the real broker.

Answers, dead letters of a known and of an unknown model, and librdkafka's
statistics: every per-model family carries ``model`` and ``version``, a model
the repository does not have never becomes a label value, no ``_created``
series is served, and Prometheus' own ``promtool check metrics`` finds nothing
to say about the page.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.harness import (
    consume,
    consume_ids,
    demo_requests,
    go_tool,
    produce,
    settings,
    worker_thread,
)
from worker.protocol import encode_request

NS = "inference_worker"
MV = {"model": "mnist-mlp", "version": "1"}
UNKNOWN = {"model": "", "version": ""}
PER_MODEL = ("rows", "batch_rows", "inference_seconds", "queue_seconds", "end_to_end_seconds")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _samples(text: str) -> dict[str, list[Sample]]:
    """Samples by family name (counters without ``_total``)."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    return found[0] if found else None


def _traffic(bootstrap: str, topic: str) -> set[str]:
    """Three answers (two rows each) and three dead letters; the ids of the answers."""
    ok = demo_requests(3, "ok", rows=2)
    wrong_shape, h1 = encode_request(
        {"x": np.ones((1, 5), np.float32)}, format="msgpack", model="mnist-mlp", request_id="bad"
    )
    no_model, h2 = encode_request(
        {"x": np.ones((1, 784), np.float32)},
        format="msgpack",
        model="no-such-model",
        request_id="nm",
    )
    produce(bootstrap, topic, [*ok, (None, wrong_shape, h1), (None, no_model, h2),
                               (None, b"junk", [])])  # fmt: skip
    return {f"ok-{i}" for i in range(3)}


def _scrape_when(port: int, ready: Callable[[dict[str, list[Sample]]], bool]) -> str:
    deadline = time.monotonic() + 30
    while True:
        text = _scrape(port)
        if ready(_samples(text)) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def _settled(families: dict[str, list[Sample]]) -> bool:
    """Six records counted, and librdkafka's statistics in for both clients."""
    counted = sum(s.value for s in families.get(f"{NS}_messages", []) if s.name.endswith("_total"))
    rtt = families.get(f"{NS}_kafka_broker_rtt_seconds", [])
    clients = {s.labels["client"] for s in rtt}
    return counted >= 6 and {"consumer", "producer"} <= clients


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, kafka_admin: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One worker's /metrics page after the traffic above (shared by this module's tests)."""
    from worker.demo import write_demo_model

    repo = tmp_path_factory.mktemp("models")
    write_demo_model(repo)
    suffix = f"{os.getpid()}-{time.monotonic_ns()}"
    requests, outputs = f"scrape-in-{suffix}", f"scrape-out-{suffix}"
    topics = [requests, outputs, f"{requests}.dlq"]
    kafka_admin.create_topics([_new_topic(t, 2) for t in topics])  # type: ignore[attr-defined]
    s = settings(
        kafka_bootstrap,
        requests,
        outputs,
        repo,
        f"scrape-{suffix}",
        kafka_properties={"statistics.interval.ms": "200"},
    )
    try:
        with worker_thread(s) as worker:
            want = _traffic(kafka_bootstrap, requests)
            consume_ids(kafka_bootstrap, outputs, want, timeout=60)
            consume(kafka_bootstrap, f"{requests}.dlq", 3, timeout=60)
            assert worker.metrics_port is not None
            page = _scrape_when(worker.metrics_port, _settled)
        yield page
    finally:
        with contextlib.suppress(Exception):  # teardown must not mask a failure
            kafka_admin.delete_topics(topics)  # type: ignore[attr-defined]


def _new_topic(name: str, partitions: int) -> object:
    from kafka.admin import NewTopic

    return NewTopic(name, num_partitions=partitions, replication_factor=1)


@pytest.mark.kafka
def test_per_model_families_carry_model_and_version(served: str) -> None:
    families = _samples(served)
    messages = families[f"{NS}_messages"]
    total = f"{NS}_messages_total"
    assert _value(messages, total, status="ok", error_type="", **MV) == 3
    assert _value(messages, total, status="dlq", error_type="schema-mismatch", **MV) == 1
    assert _value(messages, total, status="dlq", error_type="model-not-found", **UNKNOWN) == 1
    assert _value(messages, total, status="dlq", error_type="decode-error", **UNKNOWN) == 1
    assert _value(families[f"{NS}_rows"], f"{NS}_rows_total", **MV) == 6
    for family in PER_MODEL:
        for sample in families[f"{NS}_{family}"]:
            if sample.name.endswith("_created"):
                continue
            assert {"model", "version"} <= sample.labels.keys(), sample
    for family in ("batch_rows", "inference_seconds", "queue_seconds", "end_to_end_seconds"):
        count = _value(families[f"{NS}_{family}"], f"{NS}_{family}_count", **MV)
        assert count is not None and count >= 1, family
    # Every answered record waited between poll and run: one queue time each.
    assert _value(families[f"{NS}_queue_seconds"], f"{NS}_queue_seconds_count", **MV) == 3
    assert _value(families[f"{NS}_end_to_end_seconds"], f"{NS}_end_to_end_seconds_count", **MV) == 4


@pytest.mark.kafka
def test_an_unknown_model_name_is_never_a_label_value(served: str) -> None:
    assert "no-such-model" not in served
    values = {
        (key, value)
        for samples in _samples(served).values()
        for s in samples
        for key, value in s.labels.items()
        if key == "model"
    }
    assert values == {("model", "mnist-mlp"), ("model", "")}


@pytest.mark.kafka
def test_group_and_client_series(served: str) -> None:
    families = _samples(served)
    rebalances = _value(families[f"{NS}_rebalances"], f"{NS}_rebalances_total")
    assert rebalances is not None and rebalances >= 1
    assigned = families[f"{NS}_assigned_partitions"]
    assert _value(assigned, f"{NS}_assigned_partitions") == 2
    aborted = families[f"{NS}_transactions_aborted"]
    assert _value(aborted, f"{NS}_transactions_aborted_total") == 0
    rtt = [
        s for s in families[f"{NS}_kafka_broker_rtt_seconds"] if s.labels["client"] == "consumer"
    ]
    assert rtt and all(0 < s.value < 5 for s in rtt), rtt
    assert not any(s.labels["broker"].endswith("/bootstrap") for s in rtt)
    fetchq = families[f"{NS}_kafka_fetch_queue_messages"]
    assert _value(fetchq, f"{NS}_kafka_fetch_queue_messages", client="consumer") is not None
    producer_q = families[f"{NS}_kafka_producer_queue_messages"]
    # Sampled every 200 ms, maybe while answers were in flight: present, not necessarily 0.
    queued = _value(producer_q, f"{NS}_kafka_producer_queue_messages", client="producer")
    assert queued is not None and queued >= 0


@pytest.mark.kafka
def test_no_created_series(served: str) -> None:
    assert "_created" not in served


def _promtool() -> Path:
    return Path(go_tool("promtool"))


@pytest.mark.kafka
def test_promtool_check_metrics_reports_nothing(served: str) -> None:
    checked = subprocess.run(
        [str(_promtool()), "check", "metrics"], input=served, capture_output=True, text=True
    )
    assert checked.returncode == 0 and not checked.stdout and not checked.stderr, (
        checked.stdout + checked.stderr
    )
