"""Re-publish a recording with its original pacing (or faster).

Record i is sent ``(timestamp_i - timestamp_0) / speed`` seconds after the
first, in timestamp order. Keys, values and headers are sent as recorded,
with two deliberate exceptions:

- ``--set-header KEY=VALUE`` replaces every ``KEY`` header (e.g.
  ``model-version=2`` to send the same traffic to another model version);
- a record without a ``request-id`` gets ``request-id: <topic>/<partition>/<offset>``
  of the recorded record, which is the id the worker would have answered it
  with, so responses to the original and to every replay join on one id;
- ``produced-at`` (ms, set by ``publish``) is refreshed to the send time,
  since it measures latency and the recorded one is stale.

Replayed records get new record timestamps (the producer's clock): the
worker's end-to-end metrics and the topic's retention expect "now".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producers.clients import KafkaSettings
from producers.errors import UsageError
from producers.publish import PRODUCED_AT, Sender
from producers.record import read_recording, request_id_of

__all__ = ["ReplayStats", "parse_headers", "replay"]


@dataclass(frozen=True)
class ReplayStats:
    records: int
    seconds: float
    recorded_span_s: float


def parse_headers(pairs: list[str], flag: str = "--set-header") -> list[tuple[str, bytes]]:
    """``["model-version=2"]`` -> ``[("model-version", b"2")]``."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {pair!r}: expected KEY=VALUE")
        out.append((key, value.encode("utf-8")))
    return out


def replay(settings: KafkaSettings, recording: Path, topic: str, *, speed: float | None = 1.0,
           set_headers: list[tuple[str, bytes]] | None = None,
           max_message_bytes: int | None = None, compression: str | None = None) -> ReplayStats:
    """Send every record of ``recording`` to ``topic``; ``speed=None`` means as fast as possible."""
    if speed is not None and speed <= 0:
        raise UsageError(f"--speed must be positive, got {speed}")
    table = read_recording(recording)
    overrides = dict(set_headers or [])
    timestamps = np.asarray(table.column("timestamp").to_numpy(zero_copy_only=False),
                            dtype=np.int64)
    order = np.argsort(timestamps, kind="stable")
    keys = table.column("key").to_pylist()
    values = table.column("value").to_pylist()
    headers = table.column("headers").to_pylist()
    topics = table.column("topic").to_pylist() if "topic" in table.column_names else None
    parts = table.column("partition").to_pylist() if "partition" in table.column_names else None
    offsets = table.column("offset").to_pylist() if "offset" in table.column_names else None
    span_s = float(timestamps.max() - timestamps.min()) / 1000 if len(timestamps) else 0.0
    with Sender(settings, topic, max_message_bytes=max_message_bytes,
                compression=compression) as sender:
        start = time.monotonic()
        first_ts = int(timestamps[order[0]]) if len(order) else 0
        for i in order.tolist():
            if speed is not None:
                due = start + (int(timestamps[i]) - first_ts) / 1000 / speed
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            hdrs = [(h["key"], h["value"]) for h in headers[i] or []]
            if topics is not None and parts is not None and offsets is not None and not any(
                    k == "request-id" for k, _ in hdrs):
                hdrs.append(("request-id",
                             request_id_of(None, topics[i], parts[i], offsets[i]).encode()))
            drop = set(overrides) | {PRODUCED_AT}
            hdrs = [(k, v) for k, v in hdrs if k not in drop]
            hdrs.extend(overrides.items())
            hdrs.append((PRODUCED_AT, str(time.time_ns() // 1_000_000).encode()))
            sender.send(keys[i], values[i], hdrs)
        sender.flush()
        elapsed = time.monotonic() - start
    rate = table.num_rows / elapsed if elapsed > 0 else float("inf")
    print(f"replayed {table.num_rows} record(s) to {topic} in {elapsed:.2f} s "
          f"({rate:.0f} records/s; recorded span {span_s:.2f} s)")
    return ReplayStats(table.num_rows, elapsed, span_s)
