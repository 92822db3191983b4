"""Backpressure against a real broker. While ``--max-inflight-bytes`` is spent the
loop stops polling and waits for acknowledgements (librdkafka keeps its prefetch);
only when it stays spent for a second do the fullest partitions pause, and they
resume as the pipeline drains. Bytes in flight stay bounded by the limit plus one
poll per partition, and every record is answered."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests import modelzoo
from tests.harness import consume_ids, produce, settings, worker_thread
from worker.flow import PAUSE_AFTER_S, POLL_RECORDS
from worker.observability import Metrics
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka


def test_a_budget_spent_for_a_second_pauses_partitions_then_they_resume_bounded(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    modelzoo.write_slow(repo, ms_per_run=1500)  # a run outlasts PAUSE_AFTER_S
    requests, outputs = new_topic(partitions=2), new_topic(partitions=2)
    n = 48
    records = []
    for i in range(n):
        value, headers = encode_request(
            {"x": np.full((1, 16), i / n, np.float32)},
            format="msgpack",
            model="slow",
            request_id=f"b-{i}",
        )
        records.append((f"k{i}".encode(), value, headers))
    record_bytes = max(len(v) for _, v, _ in records)
    produce(kafka_bootstrap, requests, records)
    limit = 16 * record_bytes
    metrics = Metrics()
    s = settings(
        kafka_bootstrap,
        requests,
        outputs,
        repo,
        group_id,
        max_inflight_bytes=limit,
        max_batch_rows=16,
        preload=(("slow", None),),  # no first load: it would poll (paused) meanwhile
    )

    samples: list[tuple[float, float, float]] = []  # (time, paused partitions, bytes)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            get = metrics.registry.get_sample_value
            samples.append(
                (
                    time.monotonic(),
                    get("inference_worker_paused_partitions") or 0.0,
                    get("inference_worker_inflight_bytes") or 0.0,
                )
            )
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with worker_thread(s, metrics):
            answers = consume_ids(
                kafka_bootstrap, outputs, {f"b-{i}" for i in range(n)}, timeout=120
            )
    finally:
        done.set()
        watcher.join(5)
    assert len({dict(a.headers)["request-id"] for a in answers}) == n
    first_pause = next((i for i, (_, p, _) in enumerate(samples) if p > 0), None)
    assert first_pause is not None, "no partition was ever paused"
    assert any(p == 0 for _, p, _ in samples[first_pause:]), "paused partitions never resumed"
    # Not at once: the loop first waits for acknowledgements without polling, so the
    # budget has been spent without a break for a second before the first pause.
    below = [i for i, (_, _, b) in enumerate(samples[:first_pause]) if b < limit]
    spent_at = samples[below[-1] + 1 if below else 0][0]
    assert samples[first_pause][0] - spent_at >= PAUSE_AFTER_S - 0.1, (
        "paused before the budget had been spent for a second"
    )
    # A poll per partition can land on top of a full pipeline (answers count too, a few
    # hundred bytes each).
    peak = max(b for _, _, b in samples)
    assert peak >= limit, "the limit was never reached: the test tests nothing"
    assert peak <= limit + 2 * POLL_RECORDS * (record_bytes + 512), (peak, limit)
