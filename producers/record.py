"""Capture a topic into an Arrow IPC file, one row per Kafka record.

The file keeps everything needed to re-publish the traffic faithfully (key,
value, headers, timestamps) and to find where it came from (topic,
partition, offset). Schema::

    key        binary (null when the record had none)
    value      binary
    headers    list<struct<key: string, value: binary>>   (order and repeats kept)
    topic      string
    partition  int32
    offset     int64
    timestamp  int64   record timestamp, ms since the epoch (-1: none)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from producers.clients import KafkaSettings
from producers.errors import UsageError

__all__ = [
    "RECORDING_SCHEMA",
    "RecordingWriter",
    "read_recording",
    "record",
    "request_id_of",
]

HEADER_TYPE = pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))
RECORDING_SCHEMA = pa.schema([
    ("key", pa.binary()),
    ("value", pa.binary()),
    ("headers", HEADER_TYPE),
    ("topic", pa.string()),
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("timestamp", pa.int64()),
])
_FLUSH_ROWS = 1000


def request_id_of(headers: list[tuple[str, bytes | None]] | None, topic: str, partition: int,
                  offset: int) -> str:
    """The id the worker answers a request with (docs/protocol.md).

    Its ``request-id`` header, else ``<topic>/<partition>/<offset>``.
    """
    for key, value in headers or []:
        if key == "request-id" and value is not None:
            return value.decode("utf-8", "replace")
    return f"{topic}/{partition}/{offset}"


@dataclass
class RecordingWriter:
    """Appends records to an Arrow IPC file in batches; usable as a context manager.

    Batches are flushed every 1000 records so an interrupted recording still
    leaves a valid file with everything up to the interrupt.
    """

    path: Path
    count: int = 0
    _rows: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in
                                                                 RECORDING_SCHEMA.names})
    _writer: Any = None

    def __enter__(self) -> RecordingWriter:
        try:
            self._writer = ipc.new_file(str(self.path), RECORDING_SCHEMA)
        except OSError as exc:
            raise UsageError(f"--out {str(self.path)!r}: cannot write it: {exc.strerror}"
                             ) from exc
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def add(self, *, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes | None]] | None, topic: str, partition: int, offset: int,
            timestamp: int) -> None:
        rows = self._rows
        rows["key"].append(key)
        rows["value"].append(value)
        rows["headers"].append([{"key": k, "value": v} for k, v in headers or []])
        rows["topic"].append(topic)
        rows["partition"].append(partition)
        rows["offset"].append(offset)
        rows["timestamp"].append(timestamp)
        self.count += 1
        if len(rows["key"]) >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._rows["key"] and self._writer is not None:
            batch = pa.RecordBatch.from_pydict(self._rows, schema=RECORDING_SCHEMA)
            self._writer.write_batch(batch)
            self._rows = {n: [] for n in RECORDING_SCHEMA.names}

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            self._writer.close()
            self._writer = None


def _text_names(headers: list[tuple[Any, bytes | None]]) -> list[tuple[str, bytes | None]]:
    # a name that is not UTF-8 (legal on the wire) is kept readable, escaped
    return [(k if isinstance(k, str) else bytes(k).decode("utf-8", "backslashreplace"), v)
            for k, v in headers]


def read_recording(path: Path) -> pa.Table:
    """Load a recording; a file that is missing or not a recording is a usage error."""
    if path.suffix.lower() != ".arrow":
        raise UsageError(f"{str(path)!r}: a recording is an .arrow file")
    if not path.is_file():
        raise UsageError(f"{str(path)!r}: no such file")
    try:
        with ipc.open_file(str(path)) as reader:
            table = reader.read_all()
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{str(path)!r}: not an Arrow IPC file ({exc})") from exc
    missing = [n for n in ("key", "value", "headers", "timestamp") if n not in table.column_names]
    if missing:
        raise UsageError(f"{str(path)!r}: not a recording, no column(s) {', '.join(missing)}")
    return table


def record(settings: KafkaSettings, topic: str, out: Path, *, max_messages: int | None = None,
           timeout_s: float | None = None, from_beginning: bool = False) -> int:
    """Copy records of ``topic`` into ``out`` until ``max_messages`` or ``timeout_s``.

    Starts at the end of the topic (what arrives from now on) unless
    ``from_beginning``, like kafka-console-consumer. With neither bound it runs
    until interrupted (Ctrl-C), then closes the file. Reads with manual
    assignment and no group, so recording moves no offsets.
    """
    if max_messages is not None and max_messages <= 0:
        raise UsageError(f"--max-messages must be positive, got {max_messages}")
    if timeout_s is not None and timeout_s <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout_s}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with settings.consumer() as consumer, RecordingWriter(out) as writer:
        parts = consumer.assign_all(topic, from_beginning=from_beginning)
        start = "the beginning" if from_beginning else "the end"
        print(f"recording {topic} ({len(parts)} partition(s)) from {start} to {out}",
              file=sys.stderr)
        try:
            while max_messages is None or writer.count < max_messages:
                wait_s = 0.5
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait_s = min(wait_s, left)
                want = None if max_messages is None else max_messages - writer.count
                for r in consumer.poll(wait_s, max_records=want):
                    writer.add(key=r.key, value=r.value, headers=_text_names(r.headers),
                               topic=r.topic, partition=r.partition, offset=r.offset,
                               timestamp=-1 if r.timestamp_ms is None else r.timestamp_ms)
        except KeyboardInterrupt:
            pass  # Ctrl-C ends an open-ended recording; the file is still closed
    print(f"recorded {writer.count} record(s) from {topic} to {out}")
    return writer.count
