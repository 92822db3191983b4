"""Read responses from an output topic into a collection file.

A collection has one row per *sample* (a response message of n rows gives n
rows), so two collections of the same requests line up by
``(request_id, row)``. Columns::

    request_id   string   the response's request-id header
    row          int32    the sample's index within its request message
    model        string
    model_version int64
    key          binary
    partition    int32    where the response was read
    offset       int64
    timestamp    int64    response record timestamp, ms since the epoch
    latency_ms   float64  null when unknown (see below)
    <output>...           one column per model output: primitive for per-row
                          shape (), else a fixed-size list of the flattened
                          values with the shape in the field's metadata; a
                          non-tensor output (list of maps) is map<string, double>

Latency is the response record's timestamp minus the request's time, taken
from the ``--requests`` recording when given (the request record's timestamp,
joined by request id), else from the ``produced-at`` header that ``publish``
and ``replay`` set and the worker copies back. Without either it is unknown,
and collect says so instead of guessing.

Responses that carry a W3C ``traceparent`` (``publish --trace`` and a worker
with tracing on) are reported by trace id: how many distinct, and the first
few, to look up in the tracing backend.

``.npy`` output keeps only the stacked first (or ``--output``) tensor output,
in the order the responses were read.

``expect`` counts rows (samples), not messages: publish decides how rows are
split into messages, so rows are the number a user knows. ``match_headers``
keeps only responses carrying every given header value (e.g. the
``model-version`` that really ran), so answers of two model versions can share
one output topic and still be collected apart.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from producers.clients import KafkaSettings, Record
from producers.errors import ProducerError, UsageError
from producers.publish import PRODUCED_AT
from producers.record import read_recording, request_id_of

__all__ = [
    "COLLECTION_TYPES",
    "META_COLUMNS",
    "OUTPUTS_METADATA",
    "CollectResult",
    "Collection",
    "collect",
    "latency_summary",
]

COLLECTION_TYPES = (".arrow", ".parquet", ".npy")
META_COLUMNS = ("request_id", "row", "model", "model_version", "key", "partition", "offset",
                "timestamp", "latency_ms")
# Schema metadata key listing the output columns, so readers need not guess.
OUTPUTS_METADATA = b"inference-producer.outputs"


@dataclass
class Collection:
    """Decoded responses, accumulated per sample; turns into a table or an array."""

    meta: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in META_COLUMNS})
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    messages: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.meta["row"])

    def add(self, response: Any, record: Any, latency_ms: float | None) -> None:
        rows = _rows_of(response.outputs)
        for name in response.outputs:
            if name not in self.outputs:
                # A new output name mid-stream (another model): pad earlier rows.
                self.outputs[name] = [None] * len(self.meta["row"])
        for name, column in self.outputs.items():
            value = response.outputs.get(name)
            if value is None:
                column.extend([None] * rows)
            elif isinstance(value, np.ndarray):
                column.extend(value[i] for i in range(rows))
            else:
                column.extend(_row_value(v) for v in list(value)[:rows])
        meta = self.meta
        for i in range(rows):
            meta["request_id"].append(response.request_id)
            meta["row"].append(i)
            meta["model"].append(response.model)
            meta["model_version"].append(response.model_version)
            meta["key"].append(record.key)
            meta["partition"].append(record.partition)
            meta["offset"].append(record.offset)
            meta["timestamp"].append(record.timestamp_ms)
            meta["latency_ms"].append(latency_ms)
        self.messages += 1
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)

    def table(self) -> pa.Table:
        arrays: list[pa.Array] = [
            pa.array(self.meta["request_id"], pa.string()),
            pa.array(self.meta["row"], pa.int32()),
            pa.array(self.meta["model"], pa.string()),
            pa.array(self.meta["model_version"], pa.int64()),
            pa.array(self.meta["key"], pa.binary()),
            pa.array(self.meta["partition"], pa.int32()),
            pa.array(self.meta["offset"], pa.int64()),
            pa.array(self.meta["timestamp"], pa.int64()),
            pa.array(self.meta["latency_ms"], pa.float64()),
        ]
        fields = [pa.field(n, a.type) for n, a in zip(META_COLUMNS, arrays, strict=True)]
        for name, values in self.outputs.items():
            array, fld = _output_column(name, values)
            arrays.append(array)
            fields.append(fld)
        schema = pa.schema(fields, metadata={OUTPUTS_METADATA: json.dumps(list(self.outputs))})
        return pa.Table.from_arrays(arrays, schema=schema)

    def stacked(self, output: str | None) -> np.ndarray:
        tensors = [n for n, v in self.outputs.items()
                   if any(isinstance(x, np.ndarray) for x in v)]
        if not self.outputs:
            return np.empty((0,), np.float32)  # nothing arrived: an empty, valid file
        name = output if output is not None else (tensors[0] if tensors else None)
        if name is None or name not in tensors:
            have = ", ".join(tensors) or "none"
            raise ProducerError(f"no tensor output {name!r} to write as .npy "
                                f"(tensor outputs: {have})")
        rows = [v for v in self.outputs[name] if v is not None]
        return np.stack(rows) if rows else np.empty((0,))


def _row_value(value: Any) -> Any:
    # Maps (ZipMap-style label -> score) keep their labels as strings.
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return None if value is None else np.asarray(value)


def _rows_of(outputs: dict[str, Any]) -> int:
    for value in outputs.values():
        return int(value.shape[0]) if isinstance(value, np.ndarray) and value.ndim else len(value)
    return 0


def _output_column(name: str, values: list[Any]) -> tuple[pa.Array, pa.Field]:
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, dict):
        items = [None if v is None else list(v.items()) for v in values]
        array = pa.array(items, pa.map_(pa.string(), pa.float64()))
        return array, pa.field(name, array.type)
    if sample is None:
        array = pa.nulls(len(values))
        return array, pa.field(name, array.type)
    sample = np.asarray(sample)
    dtype = pa.from_numpy_dtype(sample.dtype)
    if sample.ndim == 0:
        array = pa.array([None if v is None else v.item() for v in values], dtype)
        return array, pa.field(name, dtype)
    size = int(sample.size)
    flat = np.concatenate([np.zeros(size, sample.dtype) if v is None else np.ravel(v)
                           for v in values])
    mask = np.array([v is None for v in values])
    array = pa.FixedSizeListArray.from_arrays(pa.array(flat), size,
                                              mask=pa.array(mask) if mask.any() else None)
    fld = pa.field(name, array.type, metadata={b"shape": json.dumps(list(sample.shape))})
    return array, fld


def latency_summary(latencies_ms: list[float]) -> dict[str, float] | None:
    if not latencies_ms:
        return None
    p50, p95, p99 = np.percentile(np.asarray(latencies_ms), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


@dataclass(frozen=True)
class CollectResult:
    messages: int
    rows: int
    skipped: int
    undecodable: int
    expected: int | None
    latency: dict[str, float] | None
    latency_source: str
    trace_ids: tuple[str, ...] = ()  # distinct W3C trace ids seen, in order of arrival

    @property
    def complete(self) -> bool:
        return self.expected is None or self.rows >= self.expected


def _request_times(path: Path) -> dict[str, int]:
    table = read_recording(path)
    topics = table.column("topic").to_pylist() if "topic" in table.column_names else None
    parts = table.column("partition").to_pylist() if "partition" in table.column_names else None
    offsets = table.column("offset").to_pylist() if "offset" in table.column_names else None
    times: dict[str, int] = {}
    for i, (hdrs, ts) in enumerate(zip(table.column("headers").to_pylist(),
                                       table.column("timestamp").to_pylist(), strict=True)):
        pairs = [(h["key"], h["value"]) for h in hdrs or []]
        rid = request_id_of(pairs, topics[i] if topics else "?", parts[i] if parts else -1,
                            offsets[i] if offsets else -1)
        times.setdefault(rid, ts)
    return times


def collect(settings: KafkaSettings, topic: str, out: Path, *, expect: int | None = None,
            timeout_s: float = 60.0, idle_s: float = 5.0, requests: Path | None = None,
            output: str | None = None, from_beginning: bool = True,
            match_headers: list[tuple[str, bytes]] | None = None) -> CollectResult:
    """Read responses until ``expect`` rows arrived, ``timeout_s`` passed, or (without
    ``expect``) nothing new came for ``idle_s`` after the first response."""
    from worker.protocol import decode_response

    suffix = out.suffix.lower()
    if suffix not in COLLECTION_TYPES:
        raise UsageError(f"--out {str(out)!r}: expected one of {', '.join(COLLECTION_TYPES)}")
    if not out.parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: no such directory {str(out.parent)!r}")
    if expect is not None and expect <= 0:
        raise UsageError(f"--expect must be positive, got {expect}")
    if timeout_s <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout_s}")
    request_times = _request_times(requests) if requests is not None else None
    collection = Collection()
    undecodable = skipped = 0
    wanted = list(match_headers or [])
    sources: set[str] = set()
    traces: dict[str, None] = {}  # an ordered set
    with settings.consumer() as consumer:
        parts = consumer.assign_all(topic, from_beginning=from_beginning)
        print(f"collecting from {topic} ({len(parts)} partition(s))", file=sys.stderr)
        deadline = time.monotonic() + timeout_s
        last = None
        try:
            while expect is None or collection.rows < expect:
                now = time.monotonic()
                if now >= deadline or (expect is None and last is not None
                                       and now - last >= idle_s):
                    break
                for r in consumer.poll(min(deadline - now, 0.5)):
                    last = time.monotonic()
                    if any((k, v) not in r.headers for k, v in wanted):
                        skipped += 1
                        continue
                    try:
                        response = decode_response(r.value or b"", r.headers)
                    except Exception as exc:  # a bad record is counted, not fatal
                        undecodable += 1
                        print(f"skipping {r.topic}[{r.partition}]@{r.offset}: "
                              f"{type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    latency, source = _latency(r, response.request_id, r.headers,
                                               request_times)
                    if source:
                        sources.add(source)
                    collection.add(response, r, latency)
                    trace_id = _trace_id(r.headers)
                    if trace_id is not None:
                        traces.setdefault(trace_id)
        except KeyboardInterrupt:
            pass
    _write(collection, out, output)
    rows = collection.rows
    summary = latency_summary(collection.latencies_ms)
    result = CollectResult(collection.messages, rows, skipped, undecodable, expect, summary,
                           " and ".join(sorted(sources)) or "none", tuple(traces))
    line = f"collected {result.messages} response(s) ({rows} rows) from {topic} into {out}"
    if skipped:
        line += f"; {skipped} not matching --match-header skipped"
    if undecodable:
        line += f"; {undecodable} undecodable record(s) skipped"
    print(line)
    if summary is None:
        print("latency: unknown (no --requests recording matched and no produced-at header)")
    else:
        print(f"latency ms: p50 {summary['p50']:.1f}  p95 {summary['p95']:.1f}  "
              f"p99 {summary['p99']:.1f}  (n={len(collection.latencies_ms)}, "
              f"from {result.latency_source})")
    if traces:
        shown = ", ".join(list(traces)[:_TRACES_SHOWN])
        more = f" and {len(traces) - _TRACES_SHOWN} more" if len(traces) > _TRACES_SHOWN else ""
        print(f"trace ids: {len(traces)} distinct in {result.messages} response(s): {shown}{more}")
    if not result.complete and expect is not None:
        print(f"timed out after {timeout_s:g} s: {expect - result.rows} of {expect} "
              "expected rows missing", file=sys.stderr)
    return result


_TRACES_SHOWN = 10


def _trace_id(headers: list[tuple[str, bytes | None]]) -> str | None:
    """The trace id of a W3C ``traceparent`` header (version 00), if one is there."""
    for key, value in headers:
        if key == "traceparent" and value is not None:
            parts = value.split(b"-")
            if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != b"0" * 32:
                try:
                    return parts[1].decode("ascii") if int(parts[1], 16) else None
                except ValueError:
                    return None
    return None


def _latency(record: Record, request_id: str | None,
             headers: list[tuple[str, bytes | None]],
             request_times: dict[str, int] | None) -> tuple[float | None, str]:
    if request_times is not None and request_id is not None and request_id in request_times:
        if record.timestamp_ms is None:
            return None, ""
        return float(record.timestamp_ms - request_times[request_id]), "the request recording"
    for key, value in headers:
        if key == PRODUCED_AT and value is not None and record.timestamp_ms is not None:
            try:
                return float(record.timestamp_ms - int(value)), "produced-at headers"
            except ValueError:
                break
    return None, ""


def _write(collection: Collection, out: Path, output: str | None) -> None:
    suffix = out.suffix.lower()
    try:
        if suffix == ".npy":
            np.save(out, collection.stacked(output))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(collection.table(), out)
        else:
            import pyarrow.ipc as ipc

            table = collection.table()
            with ipc.new_file(str(out), table.schema) as writer:
                writer.write_table(table)
    except OSError as exc:
        raise UsageError(f"--out {str(out)!r}: cannot write it: {exc.strerror or exc}") from exc
