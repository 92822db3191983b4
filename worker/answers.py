"""What a record becomes: its answer or its dead letter, and how each goes out.

A polled record has a :class:`Slot` in its partition's line; its ``out`` is an
:class:`Outgoing`: a response to the output topic or a dead letter to the
dead-letter topic. :class:`Answers` knows the output topics' partition counts
and size limits (refreshed from the admin client, at most every
:data:`METADATA_REFRESH_S`), sends a slot's answer to its partition, and
turns an answer too large for its topic into something the broker takes: a
response becomes a dead letter, a dead letter keeps its headers and drops its
value (:func:`omit_value`). It is the committers' outbox: ``emit``,
``rescue``, ``retire``.

No Kafka client inside: the producer and admin are passed in; the clock is
injected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from worker.errors import DecodeError, ModelNotFound, TooLarge, WorkerError
from worker.kafka import Admin, Delivery, KafkaFailure, Producer, Record
from worker.kafka.partition import output_partition
from worker.observability import Metrics, ModelSeries
from worker.offsets import Entry
from worker.protocol import (
    Bound,
    Limits,
    Request,
    decode_request,
    dlq_headers,
    encode_response,
    response_headers,
)
from worker.protocol.headers import get_header
from worker.settings import Settings
from worker.tracing import Trace, Tracing

__all__ = [
    "ALONE_FLUSH_S",
    "METADATA_REFRESH_S",
    "RECORD_OVERHEAD",
    "Answers",
    "Outgoing",
    "Slot",
    "log_fields",
    "model_header",
    "omit_value",
    "record_size",
]

log = logging.getLogger(__name__)

# Bytes a record adds to its value inside a one-record batch (batch and record
# headers, with room to spare), for the check against max.message.bytes.
RECORD_OVERHEAD = 128
METADATA_REFRESH_S = 30.0
# How long sending one answer alone waits for what is before it, then for itself.
ALONE_FLUSH_S = 30.0

Key = tuple[str, int, int, str]  # input topic, partition, offset; the answer's topic


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[Any, bytes | None]]
    ok: bool  # a response (True) or a dead letter (False)


class Slot(Entry):
    """One input record's place in its partition's line (``out``: its :class:`Outgoing`)."""

    __slots__ = (
        "attempts",
        "bound",
        "cache_key",
        "polled",
        "record",
        "request",
        "series",
        "trace",
    )

    def __init__(self, record: Record, polled: float | None = None) -> None:
        super().__init__(record.offset, len(record.value or b""))
        self.record = record
        self.attempts = 1  # runs so far, counting the one under way
        self.request: Request | None = None
        self.bound: Bound | None = None
        self.cache_key: bytes | None = None  # response-cache key, when that cache is on
        # When it was polled (monotonic), for queue_seconds.
        self.polled = time.monotonic() if polled is None else polled
        self.series: ModelSeries | None = None  # its model version's metrics, once resolved
        self.trace: Trace | None = None  # set while tracing is on

    @property
    def where(self) -> str:
        return self.record.where


def record_size(o: Outgoing) -> int:
    """What ``o`` weighs against a topic's max.message.bytes (an upper estimate)."""
    headers = sum(len(k) + len(v or b"") + 4 for k, v in o.headers)
    return len(o.value) + len(o.key or b"") + headers + RECORD_OVERHEAD


def omit_value(o: Outgoing) -> Outgoing:
    """A dead letter too large to publish: its headers, no value, ``value-omitted: <bytes>``."""
    return replace(
        o, value=b"", headers=[*o.headers, ("value-omitted", str(len(o.value)).encode())]
    )


def log_fields(r: Record) -> dict[str, Any]:
    return {"topic": r.topic, "partition": r.partition, "offset": r.offset}


def model_header(record: Record) -> str | None:
    try:
        return get_header(record.headers, "model")
    except WorkerError:
        return None


class Answers:
    """Builds answers and dead letters, and sends them within their topics' limits.

    With ``tracing`` on, each answer and dead letter carries its own ``produce``
    span's ``traceparent``, and that span ends when the record is settled.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        tracing: Tracing | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing or Tracing()
        self._limits = Limits(
            max_bytes=settings.max_request_bytes or settings.max_message_bytes,
            max_rows=settings.max_request_rows,
        )
        self._clock = clock
        self._wall_clock = wall_clock
        self._last_metadata: float | None = None
        self.partitions: dict[str, int | None] = {}  # output/DLQ topic -> partition count
        self.size_limits: dict[str, int] = {}  # output/DLQ topic -> max.message.bytes
        # Answers the broker refused as too large (exactly-once re-reads them after the
        # abort): dead-lettered at once the next time.
        self.refused_large: set[tuple[str, int, int]] = set()
        # Answers the broker refused with their batch: sent again alone (a batch of
        # answers that each fit can be over the limit), before any is called too large.
        self.alone: set[Key] = set()

    # -- what a record becomes ---------------------------------------------------

    def decode(self, record: Record) -> tuple[Request, str]:
        """The record's request and the model it names (its header or body, else
        ``--default-model``); a :class:`~worker.errors.WorkerError` says why not."""
        if record.header_error is not None:
            raise DecodeError(record.header_error)
        request = decode_request(
            record.value,  # type: ignore[arg-type]
            record.headers,
            default_id=f"{record.topic}/{record.partition}/{record.offset}",
            limits=self._limits,
            key=record.key,
        )
        model = request.model or self.settings.default_model
        if not model:
            raise ModelNotFound(
                "no model named: expected a `model` header or body field "
                "(or a worker started with --default-model)"
            )
        return request, model

    def response(self, slot: Slot, model: str, version: int, outputs: dict[str, Any]) -> Outgoing:
        request = slot.request
        if request is None:
            raise ValueError(f"{slot.where}: no request to answer")
        r = slot.record
        body, content_type = encode_response(
            request,
            slot.bound,
            outputs,
            model=model,
            model_version=version,
            output_format=self.settings.output_format,
        )
        headers = response_headers(
            request,
            content_type=content_type,
            model=model,
            model_version=version,
            topic=r.topic,
            partition=r.partition,
            offset=r.offset,
        )
        if slot.trace is not None:
            headers = self.tracing.stamp(slot.trace, headers, r, model, version)
        return Outgoing(self.settings.output_topic, r.key, body, headers, ok=True)

    def dead_letter(self, slot: Slot, exc: WorkerError, model: str | None) -> Outgoing:
        r = slot.record
        log.warning(
            "%s -> dead letter (%s): %s",
            slot.where,
            exc.error_type,
            exc.message,
            extra={**log_fields(r), "error_type": exc.error_type},
        )
        self.metrics.dlq.labels(error_type=exc.error_type).inc()
        headers = dlq_headers(
            list(r.headers),
            exc,
            topic=r.topic,
            partition=r.partition,
            offset=r.offset,
            model=model,
        )
        if slot.attempts > 1:
            headers.append(("error-attempts", str(slot.attempts).encode()))
        if slot.trace is not None:
            headers = self.tracing.stamp(slot.trace, headers, r, model, None)
        return Outgoing(self.settings.dead_letter_topic, r.key, r.value or b"", headers, ok=False)

    # -- the output topics ---------------------------------------------------------

    def refresh(self, admin: Admin, *, force: bool = False) -> None:
        """Partition counts and max.message.bytes of the output and dead-letter topics."""
        now = self._clock()
        last = self._last_metadata
        if not force and last is not None and now - last < METADATA_REFRESH_S:
            return
        self._last_metadata = now
        topics = [self.settings.output_topic, self.settings.dead_letter_topic]
        for topic in topics:
            count = admin.partitions(topic)
            if count is not None or topic not in self.partitions:
                self.partitions[topic] = count
        self.size_limits.update(admin.max_message_bytes(topics))

    def limit(self, topic: str) -> int:
        """The largest record ``topic`` takes: its max.message.bytes, within our clients'."""
        ours = self.settings.max_message_bytes
        return min(self.size_limits.get(topic, ours), ours)

    def batch_bytes(self) -> int:
        """The largest record batch the producer may fill: the broker checks a topic's
        max.message.bytes against the whole batch, so the smallest limit of the output
        and dead-letter topics, less a batch's overhead."""
        s = self.settings
        smallest = min(self.limit(s.output_topic), self.limit(s.dead_letter_topic))
        return max(1, smallest - RECORD_OVERHEAD)

    # -- the committers' outbox --------------------------------------------------------

    def emit(self, producer: Producer, slot: Slot) -> Delivery:
        """Send a slot's answer to its partition; one over its topic's limit becomes a
        dead letter, a dead letter over *its* topic's limit keeps its headers and
        drops its value."""
        o: Outgoing = slot.out
        size, limit = record_size(o), self.limit(o.topic)
        if o.ok and (slot.record.topic, slot.record.partition, slot.offset) in self.refused_large:
            size = max(size, limit + 1)  # refused before: the broker's limit is lower
        if o.ok and size > limit:  # the response is too large: dead-letter the request
            o = slot.out = self.dead_letter(
                slot,
                TooLarge(
                    "the response", size, limit, where=f"topic {o.topic!r} (max.message.bytes)"
                ),
                get_header(o.headers, "model"),
            )
        if not o.ok and record_size(o) > self.limit(o.topic):
            log.error("%s: dead letter too large to publish; value omitted", slot.where)
            o = slot.out = omit_value(o)
        r = slot.record
        partition = output_partition(r.partition, o.key, self.partitions.get(o.topic))
        if (r.topic, r.partition, r.offset, o.topic) not in self.alone:
            return producer.send(o.topic, o.value, o.key, o.headers, partition)
        # Refused with its batch before: in a batch of its own this time (what was sent
        # before it goes first, and nothing joins it before it is acknowledged).
        producer.flush(ALONE_FLUSH_S)
        delivery = producer.send(o.topic, o.value, o.key, o.headers, partition)
        producer.flush(ALONE_FLUSH_S)
        return delivery

    def rescue(self, slot: Slot, error: BaseException) -> bool:
        """A delivery the broker refused as too large. Sent with others, it may be its
        batch that was: it is sent again alone, and nothing is learnt. Refused alone,
        it is: the answer becomes a dead letter (a dead letter loses its value), and
        the topic's limit is learnt."""
        if not isinstance(error, KafkaFailure) or not error.too_large:
            return False
        o: Outgoing = slot.out
        r = slot.record
        key = (r.topic, r.partition, r.offset, o.topic)
        if key not in self.alone:
            log.warning(
                "%s: refused as too large with its batch; sending it again alone", slot.where
            )
            self.alone.add(key)
            return True
        self.alone.discard(key)
        size = record_size(o)
        self.size_limits[o.topic] = min(self.size_limits.get(o.topic, size), size - 1)
        if o.ok:
            self.refused_large.add((r.topic, r.partition, r.offset))
            slot.out = self.dead_letter(
                slot,
                TooLarge(
                    "the response, refused by the broker",
                    size,
                    self.limit(o.topic),
                    where=f"topic {o.topic!r} (max.message.bytes)",
                ),
                get_header(o.headers, "model"),
            )
            return True
        if o.value:
            log.error("%s: dead letter too large to publish; value omitted", slot.where)
            slot.out = omit_value(o)
            return True
        return False

    def retire(self, slots: Sequence[Slot]) -> None:
        """Committed: end each one's trace, count it as answered or dead-lettered (by
        error type) under its model version, and observe its end-to-end time."""
        now = self._wall_clock()
        answered: dict[ModelSeries, int] = {}  # counted once per series
        for slot in slots:
            if self.alone and slot.out is not None:
                r = slot.record
                self.alone.discard((r.topic, r.partition, r.offset, slot.out.topic))
            if slot.trace is not None:
                self.tracing.delivered(slot.trace)
            series = slot.series or self.metrics.unknown
            out = slot.out
            if out is not None and out.ok:
                answered[series] = answered.get(series, 0) + 1
            else:
                failure = get_header(out.headers, "error-type") if out is not None else None
                series.failed(failure or "").inc()
            ts = slot.record.timestamp_ms
            if ts and ts > 0:
                series.end_to_end_seconds.observe(max(0.0, now - ts / 1000))
        for series, n in answered.items():
            series.ok.inc(n)
