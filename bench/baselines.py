"""The loops the worker is compared with, each over the same request messages.

- :func:`raw_ort`: ONNX Runtime alone on the messages' batches, from memory;
- :func:`drain`: the worker's own kafka-python consumer and producer settings,
  one response-sized record out per record in, no decoding or inference (the
  ceiling that the client sets);
- :func:`naive`: what a user writes first: rows through Python objects, one
  ``session.run`` per message, one JSON record sent per row;
- :func:`per_row`: the binary codec, but one batch-1 run and one send per row.

The Kafka loops share :func:`_pump`, which commits like the worker does (only
what the broker acknowledged), so they differ from the worker only in what
happens between ``poll()`` and ``send()``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.config import Settings, consumer_config, producer_config
from worker.protocol import decode_request
from worker.signature import Signature

__all__ = ["drain", "naive", "ort_session", "per_row", "raw_ort"]

Out = tuple[bytes, list[tuple[str, bytes]]]


def ort_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with the options :mod:`worker.runtime` uses (same threads, no spinning)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def raw_ort(session: ort.InferenceSession, batches: Sequence[dict[str, np.ndarray]]) -> float:
    """Rows/s of ``session.run`` over ``batches`` (one run each, as they came)."""
    session.run(None, batches[0])  # first-run allocations are not the steady state
    rows = sum(len(next(iter(b.values()))) for b in batches)
    start = time.perf_counter()
    for feeds in batches:
        session.run(None, feeds)
    return rows / (time.perf_counter() - start)


def _pump(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    group: str,
    count: int,
    handle: Callable[[Any], Iterable[Out]],
    timeout: float = 300.0,
) -> None:
    """Consume ``count`` records, send what ``handle`` makes of each, commit acknowledged ones."""
    s = Settings(
        input_topics=(in_topic,),
        output_topic=out_topic,
        model_repository=Path("."),
        bootstrap_servers=bootstrap,
        group_id=group,
    )
    consumer = KafkaConsumer(**consumer_config(s))
    consumer.subscribe([in_topic])
    producer = KafkaProducer(**producer_config(s))
    pending: deque[tuple[TopicPartition, int, Any]] = deque()
    seen, last_commit = 0, time.monotonic()
    deadline = time.monotonic() + timeout

    def commit(force: bool = False) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        while pending and (force or pending[0][2] is None or pending[0][2].is_done):
            tp, offset, _ = pending.popleft()
            offsets[tp] = OffsetAndMetadata(offset + 1, "", -1)
        if offsets:
            consumer.commit(offsets)

    try:
        while seen < count and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=100).items():
                for r in records:
                    if seen >= count:
                        break
                    future = None
                    for value, headers in handle(r):
                        future = producer.send(out_topic, value=value, key=r.key, headers=headers)
                    pending.append((tp, r.offset, future))
                    seen += 1
            if time.monotonic() - last_commit >= 0.2:  # the worker's commit interval
                commit()
                last_commit = time.monotonic()
        producer.flush()
        commit(force=True)
    finally:
        producer.close()
        consumer.close()


def drain(
    bootstrap: str, in_topic: str, out_topic: str, group: str, count: int, response: Out
) -> None:
    """Move records through untouched, writing a record of the worker's response size."""
    _pump(bootstrap, in_topic, out_topic, group, count, lambda r: (response,))


def naive(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    group: str,
    count: int,
    session: ort.InferenceSession,
    input_name: str,
) -> None:
    """Rows as Python lists, one run per message, one JSON record per row."""
    out_name = session.get_outputs()[0].name

    def handle(r: Any) -> Iterable[Out]:
        table = pa.ipc.open_stream(r.value).read_all()
        rows = table.to_pylist()  # one dict of Python floats per row
        x = np.array([row[input_name] for row in rows], dtype=np.float32)
        (probs,) = session.run([out_name], {input_name: x})
        for i, p in enumerate(probs):
            body = {"id": f"{r.topic}/{r.partition}/{r.offset}/{i}", out_name: p.tolist()}
            yield json.dumps(body).encode(), []

    _pump(bootstrap, in_topic, out_topic, group, count, handle)


def per_row(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    group: str,
    count: int,
    session: ort.InferenceSession,
) -> None:
    """The worker's binary decode, then one batch-1 run and one raw-bytes record per row."""
    signature = Signature.from_session(session)
    out_name = session.get_outputs()[0].name

    def handle(r: Any) -> Iterable[Out]:
        default_id = f"{r.topic}/{r.partition}/{r.offset}"
        bound = decode_request(r.value, list(r.headers or []), default_id=default_id).bind(
            signature
        )
        for i in range(bound.rows):
            feeds = {n: a[i : i + 1] for n, a in bound.feeds.items()}
            (y,) = session.run([out_name], feeds)
            yield y.tobytes(), [("request-id", f"{default_id}/{i}".encode())]

    _pump(bootstrap, in_topic, out_topic, group, count, handle)


def _main(argv: list[str] | None = None) -> None:
    """``baselines.py drain ...``: the drain as its own process (the latency comparison)."""
    import argparse

    parser = argparse.ArgumentParser(description="run the drain loop in its own process")
    parser.add_argument("loop", choices=["drain"])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--response-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    blob = bytes(args.response_bytes)
    # Request headers ride along, as the worker copies them (the bench joins on them).
    _pump(args.bootstrap_servers, args.input_topic, args.output_topic, args.group_id,
          args.count, lambda r: ((blob, list(r.headers or [])),))  # fmt: skip


if __name__ == "__main__":
    _main()
