"""Short runs on the polling thread: a model whose runs average under
``--inline-below-ms`` is run where its records were polled (handing a 40 µs run to
another thread costs more than it overlaps); a slower one, or any with 0, on the
inference threads. Every record is answered either way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests import modelzoo
from tests.harness import consume_ids, produce, settings, worker_thread
from worker.demo import write_demo_model
from worker.observability import Metrics
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize(
    ("model", "inline_below_ms", "inline"),
    # Between runs of a round the caches go cold: the MLP's runs take 0.1-0.3 ms here,
    # against 0.04 ms in a stream; the slow model's 20 ms.
    [("mnist-mlp", 2.0, True), ("mnist-mlp", 0.0, False), ("slow", 2.0, False)],
    ids=["short-runs", "turned-off", "long-runs"],
)
def test_short_runs_go_inline_and_long_ones_to_the_pool(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path,
    model: str, inline_below_ms: float, inline: bool,
) -> None:
    repo = tmp_path / "models"
    write_demo_model(repo)
    modelzoo.write_slow(repo, ms_per_run=20)
    width = 784 if model == "mnist-mlp" else 16
    requests, outputs = new_topic(partitions=2), new_topic(partitions=2)
    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, repo, group_id,
                 inline_below_ms=inline_below_ms)
    with worker_thread(s, metrics):
        # In rounds, so that there are several batches: the first ones are timed on
        # an inference thread, the later ones go where their mean run time says.
        for round_ in range(6):
            ids = [f"i-{round_}-{i}" for i in range(5)]
            produce(kafka_bootstrap, requests, [
                (r.encode(), *encode_request({"x": np.ones((8, width), np.float32)},
                                             format="msgpack", model=model, request_id=r))
                for r in ids
            ])
            answers = consume_ids(kafka_bootstrap, outputs, set(ids), timeout=60)
            assert {dict(a.headers)["request-id"].decode() for a in answers} >= set(ids)
    ran_inline = metrics.registry.get_sample_value("inference_worker_inline_batches_total") or 0
    assert (ran_inline > 0) is inline, ran_inline
