"""The loops the worker is compared with, each over the same request messages.

- :func:`raw_ort`: ONNX Runtime alone on the messages' batches, from memory;
- :func:`drain` (kafka-python) and :func:`rdkafka_drain` (confluent-kafka, i.e.
  librdkafka): the worker's own clients of that backend, built by
  :mod:`worker.kafka` with the worker's settings, one response-sized record out
  per record in, no decoding or inference (the ceiling that the client sets);
- :func:`per_message_app`: what a Quix Streams application does (librdkafka
  underneath): one message at a time, decode Arrow with pyarrow, one
  ``session.run``, encode Arrow, produce; every 5 s (Quix's ``commit_interval``)
  flush the producer and commit;
- :func:`naive`: what a user writes first: rows through Python objects, one
  ``session.run`` per message, one JSON record sent per row;
- :func:`per_row`: the binary codec, but one batch-1 run and one send per row.

The kafka-python loops share :func:`_pump`, which commits like the worker does (only
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

import confluent_kafka as ck
import numpy as np
import onnxruntime as ort
import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.kafka import ClientConfig
from worker.kafka import confluent as confluent_backend
from worker.kafka import kafka_python as kafka_python_backend
from worker.protocol import decode_request
from worker.signature import Signature

__all__ = [
    "drain",
    "naive",
    "ort_session",
    "per_message_app",
    "per_row",
    "raw_ort",
    "rdkafka_drain",
]

COMMIT_INTERVAL_S = 0.2
"""The worker's default commit interval (``--commit-interval-ms 200``)."""
QUIX_COMMIT_INTERVAL_S = 5.0
"""Quix Streams' default ``commit_interval``."""

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


def _config(bootstrap: str, group: str, backend: str) -> ClientConfig:
    return ClientConfig(
        bootstrap_servers=bootstrap, backend=backend, client_id=f"{group}-bench", group_id=group
    )


def _kafka_python_clients(bootstrap: str, group: str) -> tuple[KafkaConsumer, KafkaProducer]:
    """The worker's kafka-python consumer and producer, built by its own backend."""
    config = _config(bootstrap, group, "kafka-python")
    consumer = kafka_python_backend.open_consumer(config, {})._c
    producer = kafka_python_backend.open_producer(config, {})._p
    return consumer, producer


def _rdkafka_clients(bootstrap: str, group: str) -> tuple[ck.Consumer, ck.Producer]:
    """The worker's librdkafka consumer and producer, built by its own backend (same
    configuration), without the seam's per-record wrapping."""
    config = _config(bootstrap, group, "confluent")
    consumer = confluent_backend.open_consumer(config, {})._c
    producer = confluent_backend.open_producer(config, {})._p
    return consumer, producer


def _produce(producer: ck.Producer, topic: str, value: bytes, key: bytes | None,
             headers: Any, on_delivery: Callable[..., None]) -> None:  # fmt: skip
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:  # the local queue is full: serve deliveries, retry
            producer.poll(0.01)


def _check(seen: int, count: int, timeout: float) -> None:
    if seen < count:
        raise RuntimeError(f"consumed {seen} of {count} records within {timeout:.0f} s")


def _commit(consumer: ck.Consumer, offsets: dict[tuple[str, int], int]) -> None:
    """Commit ``offsets`` (last done offset per partition) synchronously, as the worker does."""
    if offsets:
        consumer.commit(
            offsets=[ck.TopicPartition(t, p, o + 1) for (t, p), o in offsets.items()],
            asynchronous=False,
        )
        offsets.clear()


def rdkafka_drain(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    group: str,
    count: int,
    response: Out,
    timeout: float = 300.0,
    *,
    copy_headers: bool = False,
) -> None:
    """The librdkafka ceiling: the worker's confluent clients moving records untouched.

    Polls like ``worker.kafka.confluent``: take what is buffered without waiting,
    else wait for the first record only (``consume(n, t)`` would wait for all
    ``n`` or the whole ``t``), then take the rest. One record of the worker's
    response size out per record in (``copy_headers``: with the request's headers,
    as the worker copies them, for the latency comparison); acknowledged offsets are committed every
    200 ms. Output topics have one partition, so acknowledgements arrive in send
    order and the highest acknowledged offset of each input partition is safe.
    """
    consumer, producer = _rdkafka_clients(bootstrap, group)
    consumer.subscribe([in_topic])
    acked: dict[tuple[str, int], int] = {}
    failed: list[Any] = []
    seen, last_commit = 0, time.monotonic()
    deadline = time.monotonic() + timeout
    blob = response[0]

    def ack(err: Any, _msg: Any, tp: tuple[str, int], offset: int) -> None:
        if err is not None:
            failed.append(err)
        elif offset > acked.get(tp, -1):
            acked[tp] = offset

    try:
        while seen < count and time.monotonic() < deadline:
            want = min(500, count - seen)
            msgs = consumer.consume(want, 0)
            if not msgs:
                first = consumer.poll(0.1)
                if first is None:
                    continue
                msgs = [first, *consumer.consume(want - 1, 0)] if want > 1 else [first]
            for m in msgs:
                if m.error() is not None:
                    continue
                tp, offset = (m.topic(), m.partition()), m.offset()
                headers = m.headers() if copy_headers else response[1]
                _produce(producer, out_topic, blob, m.key(), headers,
                         lambda e, msg, tp=tp, o=offset: ack(e, msg, tp, o))  # fmt: skip
                seen += 1
            producer.poll(0)
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                _commit(consumer, acked)
                last_commit = time.monotonic()
        producer.flush(30)
        if failed:
            raise RuntimeError(f"rdkafka drain: {len(failed)} sends failed: {failed[0]}")
        _commit(consumer, acked)
        _check(seen, count, timeout)
    finally:
        producer.flush(5)
        consumer.close()


def _arrow_in(value: bytes, name: str) -> np.ndarray:
    table = pa.ipc.open_stream(value).read_all()
    return np.asarray(table.column(name).combine_chunks().to_numpy_ndarray())


def _arrow_out(name: str, y: np.ndarray) -> bytes:
    batch = pa.record_batch([pa.FixedShapeTensorArray.from_numpy_ndarray(y)], names=[name])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def per_message_app(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    group: str,
    count: int,
    session: ort.InferenceSession,
    timeout: float = 300.0,
) -> None:
    """A Quix Streams application, as its docs show it, written out on confluent-kafka.

    ``Application(...).dataframe(topic).apply(infer).to_topic(out)``: the consumer
    polls one message at a time, the function decodes the Arrow stream with
    pyarrow, runs the session on it, encodes the answer as Arrow, and the
    producer sends it with the request's headers; every ``commit_interval`` (5 s)
    a checkpoint flushes the producer, checks the deliveries and commits
    synchronously. The worker's librdkafka settings, so only the loop differs.
    """
    consumer, producer = _rdkafka_clients(bootstrap, group)
    consumer.subscribe([in_topic])
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    processed: dict[tuple[str, int], int] = {}
    failed: list[Any] = []
    seen, last_commit = 0, time.monotonic()
    deadline = time.monotonic() + timeout

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(err)

    def checkpoint() -> None:
        producer.flush(30)
        if failed:
            raise RuntimeError(f"per-message app: {len(failed)} sends failed: {failed[0]}")
        _commit(consumer, processed)

    try:
        while seen < count and time.monotonic() < deadline:
            m: Any = consumer.poll(0.1)
            if m is None or m.error() is not None:
                continue
            x = _arrow_in(m.value(), in_name)
            (y,) = session.run([out_name], {in_name: x})
            _produce(producer, out_topic, _arrow_out(out_name, y), m.key(), m.headers(),
                     delivered)  # fmt: skip
            producer.poll(0)
            processed[(m.topic(), m.partition())] = m.offset()
            seen += 1
            if time.monotonic() - last_commit >= QUIX_COMMIT_INTERVAL_S:
                checkpoint()
                last_commit = time.monotonic()
        checkpoint()
        _check(seen, count, timeout)
    finally:
        producer.flush(5)
        consumer.close()


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
    consumer, producer = _kafka_python_clients(bootstrap, group)
    # As worker.kafka.kafka_python does: know the partitions before joining, or the
    # first JoinGroup assigns nothing and the rejoin can take very long.
    known = time.monotonic() + 10
    while not consumer.partitions_for_topic(in_topic) and time.monotonic() < known:
        time.sleep(0.1)
    consumer.subscribe([in_topic])
    pending: deque[tuple[TopicPartition, int, Any]] = deque()
    seen, last_commit = 0, time.monotonic()
    deadline = time.monotonic() + timeout

    offsets: dict[TopicPartition, OffsetAndMetadata] = {}

    def commit(force: bool = False) -> None:
        while pending and (force or pending[0][2] is None or pending[0][2].is_done):
            tp, offset, _ = pending.popleft()
            offsets[tp] = OffsetAndMetadata(offset + 1, "", -1)
        if not offsets:
            return
        try:
            consumer.commit(dict(offsets))
            offsets.clear()
        except KafkaError:  # a rebalance under way: keep the offsets, the next commit sends them
            if force:
                raise

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
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                commit()
                last_commit = time.monotonic()
        producer.flush()
        for attempt in range(50):  # let a rebalance under way finish (poll drives it)
            try:
                commit(force=True)
                break
            except KafkaError:
                if attempt == 49:
                    raise
                consumer.poll(timeout_ms=100)
        _check(seen, count, timeout)
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
    """``baselines.py drain|per-message ...``: the drain, or the per-message app, as its own
    process (the latency comparisons)."""
    import argparse

    parser = argparse.ArgumentParser(description="run a baseline loop in its own process")
    parser.add_argument("loop", choices=["drain", "per-message"])
    parser.add_argument("--client", choices=["confluent", "kafka-python"], default="confluent")
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--input-topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--response-bytes", type=int, default=0, help="drain: record size")
    parser.add_argument("--model", type=Path, default=None, help="per-message: the ONNX file")
    args = parser.parse_args(argv)
    if args.loop == "per-message":
        if args.model is None:
            parser.error("per-message needs --model PATH (an ONNX file)")
        per_message_app(args.bootstrap_servers, args.input_topic, args.output_topic,
                        args.group_id, args.count, ort_session(args.model))  # fmt: skip
        return
    blob = bytes(args.response_bytes)
    # Request headers ride along, as the worker copies them (the bench joins on them).
    if args.client == "confluent":
        rdkafka_drain(args.bootstrap_servers, args.input_topic, args.output_topic,
                      args.group_id, args.count, (blob, []), copy_headers=True)  # fmt: skip
        return
    _pump(args.bootstrap_servers, args.input_topic, args.output_topic, args.group_id,
          args.count, lambda r: ((blob, list(r.headers or [])),))  # fmt: skip


if __name__ == "__main__":
    _main()
