"""OpenTelemetry spans around the worker's hop, with the ``otel`` extra.

Configured only the way every OpenTelemetry SDK is: ``OTEL_TRACES_EXPORTER``
names the exporters (``console``, ``otlp`` with its package installed, ...),
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_PROPAGATORS``, ``OTEL_BSP_*`` and the exporters' own variables are read
by the SDK itself. A tracer provider the application already installed (e.g.
``opentelemetry-instrument``) is used as it is. Without either, or without
the extra, :class:`Tracing` is off: every hook returns at once and a
request's ``traceparent`` is copied to its answer like any other header.

What a traced record gets (the messaging conventions for batch processing):

- ``decode`` (per record, a child of the request's context): bytes to a bound
  request, with topic, partition, offset, model and version;
- ``process`` (per batch): links to every record's context, parented by that
  context when the whole batch shares one trace; the worker's logs carry its
  ``trace_id``/``span_id`` while the batch runs;
- ``run`` (a child of ``process``): one ``session.run``;
- ``produce`` (per answer or dead letter, a child of the request's context,
  linked to its batch's ``process``): from the answer's headers to its
  acknowledgement; its ``traceparent`` replaces the copied one on the record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import metadata
from typing import TYPE_CHECKING, Any, cast

from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.batching import Batch
    from worker.kafka import Record

__all__ = ["Trace", "TraceLogFilter", "Tracing"]

log = logging.getLogger("worker.tracing")

_NULL: AbstractContextManager[None] = nullcontext()
_HEADERS = ("traceparent", "tracestate", "baggage")


class Trace:
    """One record's tracing state: the request's context and its open ``produce`` span."""

    __slots__ = ("context", "link", "produce")

    def __init__(self, context: Any, link: Any) -> None:
        self.context = context  # the request's context (an empty one when it had none)
        self.link = link  # a Link to the request's span, or None
        self.produce: Any = None


class Tracing:
    """The worker's spans; ``enabled`` is False (and every hook free) when tracing is off."""

    def __init__(self, provider: Any = None) -> None:
        """Spans from ``provider`` (an SDK ``TracerProvider``); off when ``None``."""
        self.enabled = provider is not None
        self._provider = provider
        self._tracer: Any = None
        if provider is not None:
            from opentelemetry import trace

            self._trace = trace
            self._tracer = provider.get_tracer("inference-worker")
            # Log lines written inside a span (a batch, a decode) carry its ids.
            for handler in logging.getLogger().handlers:
                if not any(isinstance(f, TraceLogFilter) for f in handler.filters):
                    handler.addFilter(TraceLogFilter())

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Tracing:
        """On when the SDK is installed and configured (see the module docstring)."""
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            return cls()
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        installed = trace.get_tracer_provider()
        if isinstance(installed, TracerProvider):
            return cls(installed)
        names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
        if not names or names == ["none"]:
            return cls()
        provider = TracerProvider()  # resource, sampler and limits from OTEL_* variables
        for name in names:
            provider.add_span_processor(BatchSpanProcessor(_exporter(name)()))
        trace.set_tracer_provider(provider)
        log.info("tracing: spans exported to %s", ", ".join(names))
        return cls(provider)

    # -- per record ------------------------------------------------------------------

    def around_decode(self, admit: Callable[..., None]) -> Callable[..., None]:
        """``admit`` (a record's decode) inside its ``decode`` span, current meanwhile
        (for logs); ``admit`` itself when tracing is off, so that costs nothing.

        The slot ``admit`` takes has the ``record`` and gets its :class:`Trace` as
        ``slot.trace``; ``slot.series``, when set by then, names the model version.
        """
        if not self.enabled:
            return admit

        def traced(slot: Any, *args: Any) -> None:
            with self._decoding(slot):
                admit(slot, *args)

        return traced

    @contextmanager
    def _decoding(self, slot: Any) -> Iterator[Any]:
        from opentelemetry import propagate

        record: Record = slot.record
        context = propagate.extract(record.headers, getter=cast(Any, _GETTER))
        parent = self._trace.get_current_span(context).get_span_context()
        link = self._trace.Link(parent, _where(record)) if parent.is_valid else None
        slot.trace = Trace(context, link)
        with self._tracer.start_as_current_span(
            "decode", context=context, attributes=_where(record)
        ) as span:
            try:
                yield span
            finally:
                series = getattr(slot, "series", None)
                if series is not None:
                    span.set_attributes({"model": series.model, "version": series.version})

    def stamp(
        self,
        state: Trace,
        headers: list[tuple[Any, bytes | None]],
        record: Record,
        model: str | None,
        version: int | None,
    ) -> list[tuple[Any, bytes | None]]:
        """Open the record's ``produce`` span and write its context into ``headers``
        (in place of the request's): the answer continues the request's trace."""
        from opentelemetry import propagate

        if state.produce is not None:
            state.produce.end()  # an answer replaced by a dead letter (too large)
        current = self._trace.get_current_span().get_span_context()
        links = [self._trace.Link(current)] if current.is_valid else []
        attributes = _where(record)
        if model:
            attributes["model"] = model
        if version is not None:
            attributes["version"] = version
        state.produce = span = self._tracer.start_span(
            "produce",
            context=state.context,
            kind=self._trace.SpanKind.PRODUCER,
            links=links,
            attributes=attributes,
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=self._trace.set_span_in_context(span))
        kept = [(k, v) for k, v in headers if k not in carrier and k not in _HEADERS]
        return [*kept, *((k, v.encode()) for k, v in carrier.items())]

    def delivered(self, state: Trace) -> None:
        """The record's answer or dead letter is acknowledged: ``produce`` ends."""
        if state.produce is not None:
            state.produce.end()
            state.produce = None

    # -- per batch ---------------------------------------------------------------------

    def around_batch(
        self, run: Callable[[Batch], None], traces: Callable[[Batch], Sequence[Any]]
    ) -> Callable[[Batch], None]:
        """``run`` inside the batch's ``process`` span (``run`` itself when tracing is off)."""
        if not self.enabled:
            return run

        def traced(batch: Batch) -> None:
            with self._process(batch, [t for t in traces(batch) if t is not None]):
                run(batch)

        return traced

    @contextmanager
    def _process(self, batch: Batch, states: list[Trace]) -> Iterator[Any]:
        from opentelemetry.context import Context

        links = [s.link for s in states if s.link is not None]
        traces = {link.context.trace_id for link in links}
        # One trace for the whole batch: the process span joins it; else a trace of its own.
        parent = states[0].context if len(traces) == 1 and len(links) == len(states) else Context()
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.batch.message_count": len(batch.jobs),
            "model": batch.model,
            "version": batch.version,
        }
        with self._tracer.start_as_current_span(
            "process",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        ) as span:
            yield span

    def running(self, model: str, version: int) -> AbstractContextManager[Any]:
        """Around one ``session.run``: the ``run`` span, a child of ``process``."""
        if not self.enabled:
            return _NULL
        return self._tracer.start_as_current_span(
            "run", attributes={"model": model, "version": version}
        )

    def close(self) -> None:
        """Export what is still buffered (a worker that stops loses no span)."""
        flush = getattr(self._provider, "force_flush", None)
        if flush is not None:
            flush(5000)


def _where(record: Record) -> dict[str, Any]:
    return {
        "messaging.system": "kafka",
        "messaging.destination.name": record.topic,
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
    }


def _exporter(name: str) -> Any:
    """The span exporter an ``OTEL_TRACES_EXPORTER`` name stands for (its entry point)."""
    found = metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
    for entry in found:
        return entry.load()
    known = sorted(e.name for e in metadata.entry_points(group="opentelemetry_traces_exporter"))
    raise ConfigError(
        "OTEL_TRACES_EXPORTER",
        f"no span exporter named {name!r} is installed (installed: {', '.join(known)}; "
        "otlp comes with opentelemetry-exporter-otlp)",
    )


class _HeaderGetter:
    """Reads W3C context from Kafka headers: (name, bytes) pairs, names case-sensitive."""

    def get(self, carrier: Iterable[tuple[Any, bytes | None]], key: str) -> list[str] | None:
        for name, value in carrier:
            if name == key and value is not None:
                try:
                    return [value.decode("ascii")]
                except UnicodeDecodeError:
                    return None  # not a W3C header: no context
        return None

    def keys(self, carrier: Iterable[tuple[Any, bytes | None]]) -> list[str]:
        return [str(name) for name, _ in carrier]


_GETTER = _HeaderGetter()


class TraceLogFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` to log records written inside a span."""

    def filter(self, record: logging.LogRecord) -> bool:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True
