"""Answers that each fit their topic are never dead-lettered as too large, on a real broker.

The broker checks a topic's ``max.message.bytes`` against a whole record batch,
and librdkafka fills batches up to 1 MB by default: an output topic with a
64 KiB limit refused batches of ~2.6 kB answers, and every answer of a refused
batch was dead-lettered ``too-large``. The worker cuts its producer's batches
below the smallest limit of its topics, and sends an answer refused with its
batch again alone before calling it too large.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.harness import consume, consume_ids, header, produce, settings, worker_thread
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka

ROWS = 64  # 64 x 10 float32 outputs: an answer of ~2.6 kB
COUNT = 120


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_every_small_answer_lands_on_a_64_kib_output_topic(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    exactly_once: bool,
) -> None:
    requests = new_topic()
    outputs = new_topic(**{"max.message.bytes": "65536"})
    x = np.random.default_rng(0).random((ROWS, 784), dtype=np.float32)
    records = []
    for i in range(COUNT):
        value, headers = encode_request(
            {"x": x}, format="msgpack", model="mnist-mlp", request_id=f"r-{i}"
        )
        records.append((f"k{i}".encode(), value, list(headers)))
    produce(kafka_bootstrap, requests, records)
    s = settings(
        kafka_bootstrap,
        requests,
        outputs,
        model_repo,
        group_id,
        kafka_client=kafka_client,
        exactly_once=exactly_once,
        commit_interval_ms=50,
    )
    want = {f"r-{i}" for i in range(COUNT)}
    with worker_thread(s):
        got = consume_ids(kafka_bootstrap, outputs, want, timeout=120, isolation="read_committed")
    ids = [header(r, "request-id") for r in got]
    assert set(ids) == want
    assert all(len(r.value) < 4000 for r in got)
    dead = consume(kafka_bootstrap, s.dead_letter_topic, 1, timeout=3)
    assert dead == [], [header(r, "error-type") for r in dead]
