"""Unbatched requests through a real worker: every format, never coalesced, answers whole."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests import modelzoo
from tests.harness import consume_ids, header, produce, settings, worker_thread
from worker.protocol import decode_response, encode_request

pytestmark = pytest.mark.kafka


def test_unbatched_models_answer_every_format_whole(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    paths = {name: modelzoo.UNBATCHED_ZOO[name](tmp_path) for name in ("topk", "pairwise",
                                                                          "split")}
    sessions = {n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for n, p in paths.items()}
    rng = np.random.default_rng(9)
    requests, outputs = new_topic(), new_topic()
    sent: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    records = []
    for i in range(12):
        fmt = ("msgpack", "json", "arrow")[i % 3]
        name = ("topk", "pairwise", "split")[(i // 3) % 3]
        if name == "topk":
            feeds = {"x": rng.random((2 + i, 10), dtype=np.float32),
                     "k": np.array([1 + i % 4], np.int64)}
        elif name == "pairwise":  # corpora of different sizes: coalescing would mix them
            feeds = {"queries": rng.random((3, 4), dtype=np.float32),
                     "corpus": rng.random((1 + i, 4), dtype=np.float32)}
        else:
            feeds = {"x": rng.random(5 + i, dtype=np.float32),
                     "split": np.array([2, 3 + i], np.int64)}
        # Arrow: a one-row table whose cells are the whole tensors.
        wire = {n: a[np.newaxis] for n, a in feeds.items()} if fmt == "arrow" else feeds
        value, headers = encode_request(wire, format=fmt, model=name, request_id=f"r{i}")
        sent[f"r{i}"] = (name, feeds)
        records.append((None, value, headers))
    produce(kafka_bootstrap, requests, records)
    s = settings(kafka_bootstrap, requests, outputs, tmp_path, group_id, max_batch_rows=2)
    with worker_thread(s):
        answers = consume_ids(kafka_bootstrap, outputs, set(sent), timeout=120)
    assert len(answers) == len(sent)
    for record in answers:
        rid = header(record, "request-id") or ""
        assert header(record, "error-type") is None, header(record, "error-message")
        name, feeds = sent[rid]
        session = sessions[name]
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds),
                        strict=True))
        got = decode_response(record.value, record.headers).outputs
        assert list(got) == list(want)
        for key, arr in want.items():
            value = got[key]
            assert isinstance(value, np.ndarray) and value.shape == arr.shape, (rid, key)
            np.testing.assert_allclose(value, arr, rtol=1e-5)
