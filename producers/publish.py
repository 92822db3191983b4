"""Publish rows as request messages that always fit the topic.

The message size limit is the topic's ``max.message.bytes`` (asked from the
broker) unless ``--max-message-bytes`` says otherwise. ``--batch-rows`` is an
upper bound: when a message of that many rows would not fit, rows per message
shrink (and stay shrunk), and a single row that does not fit is an error
before anything is sent for it.

Each message carries ``request-id: <run>-<n>`` (so responses join to requests
even across replays) and ``produced-at`` (send time, ms since the epoch), which
the worker copies to the response and ``collect`` reads as a latency source.
With ``--trace`` each message also starts a trace of its own (a W3C
``traceparent``), which a worker with tracing on continues on its answer.
"""

from __future__ import annotations

import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from producers.clients import KafkaSettings, record_size, topic_message_limit
from producers.errors import ProducerError, UsageError
from producers.sources import Source

__all__ = [
    "PRODUCED_AT",
    "TRACEPARENT",
    "Message",
    "PublishStats",
    "Sender",
    "make_encoder",
    "new_traceparent",
    "publish",
    "record_bytes",
    "split_messages",
]

PRODUCED_AT = "produced-at"
TRACEPARENT = "traceparent"
Headers = list[tuple[str, bytes | None]]
# (rows, request id) -> (value, headers): the codec, bound to format and model.
Encoder = Callable[[np.ndarray, str], tuple[bytes, Headers]]


def record_bytes(key: bytes | None, value: bytes, headers: Headers) -> int:
    """Upper bound of the record batch holding just this record: what the broker checks."""
    return record_size(key, value, headers)


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    headers: Headers
    rows: int

    @property
    def size(self) -> int:
        return record_bytes(self.key, self.value, self.headers)


def _key_runs(rows: int, keys: list[bytes | None] | None
              ) -> Iterator[tuple[int, int, bytes | None]]:
    """``(start, stop, key)`` spans of consecutive rows that share a key."""
    if keys is None:
        yield 0, rows, None
        return
    start = 0
    for i in range(1, rows + 1):
        if i == rows or keys[i] != keys[start]:
            yield start, i, keys[start]
            start = i


def split_messages(data: np.ndarray, keys: list[bytes | None] | None, encode: Encoder, *,
                   batch_rows: int, limit: int, request_ids: Iterator[str]) -> Iterator[Message]:
    """Cut ``data`` into encoded messages of at most ``batch_rows`` rows and ``limit`` bytes.

    A message holds rows of one key only, so keyed rows land on their key's partition.
    """
    if batch_rows <= 0:
        raise UsageError(f"--batch-rows must be positive, got {batch_rows}")
    per_message = batch_rows
    for start, stop, key in _key_runs(int(data.shape[0]), keys):
        pos = start
        while pos < stop:
            n = min(per_message, stop - pos)
            request_id = next(request_ids)
            while True:
                value, headers = encode(data[pos:pos + n], request_id)
                headers = [*headers, (PRODUCED_AT, b"0000000000000")]  # sized like the real one
                size = record_bytes(key, value, headers)
                if size <= limit:
                    break
                if n == 1:
                    raise UsageError(f"one row encodes to a {size}-byte message, over the "
                                     f"{limit}-byte limit; raise --max-message-bytes or the "
                                     "topic's max.message.bytes")
                # Scale by the overshoot, with 10% slack for per-message overhead.
                n = max(1, min(n - 1, int(n * limit / size * 0.9)))
                per_message = n
            yield Message(key, value, headers[:-1], n)
            pos += n


@dataclass(frozen=True)
class PublishStats:
    rows: int
    messages: int
    bytes: int
    largest: int
    limit: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


class Sender:
    """A producer bound to one topic and its size limit; flush raises the first send error.

    ``batch.size`` is capped at the limit because the broker checks whole
    record batches, and the clients pack several records into one.
    """

    def __init__(self, settings: KafkaSettings, topic: str, *,
                 max_message_bytes: int | None = None, compression: str | None = None) -> None:
        if max_message_bytes is not None and max_message_bytes <= 0:
            raise UsageError(f"--max-message-bytes must be positive, got {max_message_bytes}")
        self.topic = topic
        if max_message_bytes is None:
            self.limit, self.limit_source = topic_message_limit(settings, topic)
        else:
            self.limit, self.limit_source = max_message_bytes, "--max-message-bytes"
        # kafka-python's batches stay at its default size; librdkafka's default is 1 MB
        batch = 16384 if settings.backend == "kafka-python" else 1_000_000
        self._producer = settings.producer(batch_bytes=min(batch, self.limit),
                                           compression=compression)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._producer.close()

    def send(self, key: bytes | None, value: bytes, headers: Headers) -> None:
        self._producer.send(self.topic, value, key, headers)

    def flush(self) -> None:
        try:
            self._producer.flush(timeout_s=60)
        except ProducerError as exc:
            raise ProducerError(f"sending to {self.topic} failed: {exc}") from exc


def publish(settings: KafkaSettings, source: Source, topic: str, *, encode: Encoder,
            batch_rows: int = 256, rate: float | None = None,
            max_message_bytes: int | None = None, compression: str | None = None,
            progress: bool | None = None, trace: bool = False) -> PublishStats:
    """Send ``source`` to ``topic``; pace to ``rate`` rows/s when given.

    ``progress=None`` shows a bar only when stderr is a terminal. ``trace``
    starts a trace per message: a fresh W3C ``traceparent`` header, sampled.
    """
    from tqdm import tqdm

    if rate is not None and rate <= 0:
        raise UsageError(f"--rate must be positive, got {rate}")
    run = uuid.uuid4().hex[:12]
    ids = (f"{run}-{n}" for n in range(sys.maxsize))
    show = sys.stderr.isatty() if progress is None else progress
    messages = bytes_sent = largest = rows_sent = 0
    with Sender(settings, topic, max_message_bytes=max_message_bytes,
                compression=compression) as sender, \
            tqdm(total=source.rows, unit="row", disable=not show, file=sys.stderr) as bar:
        start = time.monotonic()
        for message in split_messages(source.data, source.keys, encode, batch_rows=batch_rows,
                                      limit=sender.limit, request_ids=ids):
            if rate is not None:
                pause = start + rows_sent / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            stamp = str(time.time_ns() // 1_000_000).encode()
            headers = [*message.headers, (PRODUCED_AT, stamp)]
            if trace:
                headers.append((TRACEPARENT, new_traceparent()))
            sender.send(message.key, message.value, headers)
            messages += 1
            rows_sent += message.rows
            bytes_sent += len(message.value)
            largest = max(largest, message.size)
            bar.update(message.rows)
        sender.flush()
        seconds = time.monotonic() - start
        stats = PublishStats(rows_sent, messages, bytes_sent, largest, sender.limit, seconds)
        limit_source = sender.limit_source
    print(f"published {stats.rows} rows in {stats.messages} messages ({stats.bytes} bytes; "
          f"largest {stats.largest} of {stats.limit} allowed by {limit_source}) to {topic} "
          f"in {stats.seconds:.2f} s: {stats.rows_per_s:.0f} rows/s")
    return stats


def new_traceparent() -> bytes:
    """A W3C ``traceparent`` that starts a new, sampled trace (random ids, never zero)."""
    trace_id = secrets.randbits(128) or 1
    span_id = secrets.randbits(64) or 1
    return f"00-{trace_id:032x}-{span_id:016x}-01".encode()


def make_encoder(*, fmt: str, input_name: str, model: str | None,
                 model_version: int | None) -> Encoder:
    """Bind the worker's codec to one format, input and model."""
    from worker.protocol import encode_request

    def encode(rows: np.ndarray, request_id: str) -> tuple[bytes, Headers]:
        value, headers = encode_request({input_name: rows}, format=fmt, model=model,
                                        model_version=model_version, request_id=request_id)
        return value, list(headers)

    return encode
