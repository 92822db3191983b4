"""Many models through one worker: a small LRU, new versions at run time, the response cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests import modelzoo
from tests.harness import (
    assert_same_outputs,
    consume,
    consume_ids,
    header,
    produce,
    settings,
    worker_thread,
)
from worker.demo import write_demo_model
from worker.observability import Metrics
from worker.protocol import decode_response, encode_request
from worker.signature import Signature

pytestmark = pytest.mark.kafka


def test_twelve_models_through_a_cache_of_three(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    paths = {name: build(repo) for name, build in modelzoo.ZOO.items()}
    assert len(paths) == 12
    sessions = {n: ort.InferenceSession(str(p)) for n, p in paths.items()}
    requests, outputs = new_topic(), new_topic()
    sent, records = {}, []
    for i in range(36):
        name = list(paths)[i % 12] if i < 24 else list(paths)[(i * 5) % 12]
        feeds = modelzoo.sample_feeds(Signature.from_session(sessions[name]), rows=2, seed=i)
        value, headers = encode_request(feeds, format="msgpack", model=name, request_id=f"q{i}")
        sent[f"q{i}"] = (name, feeds)
        records.append((None, value, headers))
    produce(kafka_bootstrap, requests, records)
    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, repo, group_id, cache_max_models=3)
    with worker_thread(s, metrics):
        answers = consume_ids(kafka_bootstrap, outputs, set(sent), timeout=120)
    assert len(answers) == len(sent)
    for record in answers:
        assert header(record, "error-type") is None
        name, feeds = sent[header(record, "request-id") or ""]
        session = sessions[name]
        want = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
        )
        got = decode_response(record.value, record.headers).outputs
        for key, value in want.items():
            assert_same_outputs(got[key], value)
    evictions = metrics.registry.get_sample_value("inference_worker_model_cache_evictions_total")
    assert evictions is not None and evictions >= 9
    assert (metrics.registry.get_sample_value("inference_worker_model_cache_models") or 0) <= 3


def test_new_version_served_without_restart_and_old_still_reachable(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    requests, outputs = new_topic(), new_topic()
    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)

    def ask(rid: str, version: int | None = None) -> None:
        value, headers = encode_request(
            {"x": x}, format="msgpack", model="mnist-mlp", model_version=version, request_id=rid
        )
        produce(kafka_bootstrap, requests, [(None, value, headers)])

    s = settings(kafka_bootstrap, requests, outputs, model_repo, group_id)
    with worker_thread(s):
        ask("before")
        consume_ids(kafka_bootstrap, outputs, {"before"}, timeout=60)
        v2 = write_demo_model(model_repo, version=2, seed=99)
        # The newest version is rescanned within 5 s: ask until an answer says so.
        deadline, probe = time.monotonic() + 30, 0
        while True:
            rid = f"probe-{probe}"
            ask(rid)
            got = consume_ids(kafka_bootstrap, outputs, {rid}, timeout=60)
            if [header(r, "model-version") for r in got if header(r, "request-id") == rid] == ["2"]:
                break
            assert time.monotonic() < deadline, "version 2 not served within 30 s"
            probe += 1
        ask("after")
        ask("pinned-v1", version=1)
        answers = consume_ids(
            kafka_bootstrap, outputs, {"before", "after", "pinned-v1"}, timeout=60
        )
    by_id = {header(r, "request-id"): r for r in answers}
    assert header(by_id["before"], "model-version") == "1"
    assert header(by_id["after"], "model-version") == "2"
    assert header(by_id["pinned-v1"], "model-version") == "1"
    want_v2 = ort.InferenceSession(str(v2)).run(None, {"x": x})[0]
    got_v2 = decode_response(by_id["after"].value, by_id["after"].headers).outputs["probs"]
    np.testing.assert_allclose(got_v2, want_v2, atol=1e-6)


def test_response_cache_answers_a_redelivered_duplicate_without_running(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    requests, outputs = new_topic(), new_topic()
    x = np.random.default_rng(1).random((2, 784), dtype=np.float32)
    value, headers = encode_request(
        {"x": x}, format="msgpack", model="mnist-mlp", request_id="same"
    )
    metrics = Metrics()
    s = settings(kafka_bootstrap, requests, outputs, model_repo, group_id, response_cache_size=16)
    with worker_thread(s, metrics):
        produce(kafka_bootstrap, requests, [(None, value, headers)])
        assert len(consume(kafka_bootstrap, outputs, 1, timeout=60)) == 1
        produce(kafka_bootstrap, requests, [(None, value, headers)])
        answers = consume(kafka_bootstrap, outputs, 2, timeout=60)
    assert len(answers) == 2
    assert answers[0].value == answers[1].value
    hits = metrics.registry.get_sample_value("inference_worker_response_cache_hits_total")
    mv = {"model": "mnist-mlp", "version": "1"}
    runs = metrics.registry.get_sample_value("inference_worker_batch_rows_count", mv)
    assert hits == 1 and runs == 1
