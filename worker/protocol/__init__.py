"""The wire format (spec §3): record bytes + headers <-> Request / Response.

Two codecs share one interface (a content type and an encode/decode pair per
direction): :mod:`.arrow` for Arrow IPC streams and :mod:`.msgpack` for
tensor maps; :mod:`.headers` reads and writes the Kafka headers. The worker
loop uses :func:`decode_request` -> :meth:`Request.bind` -> ``session.run`` ->
:func:`encode_response` + :func:`response_headers` (or :func:`dlq_headers`);
the producer tools use :func:`encode_request` and :func:`decode_response`.

Nothing but a :class:`~worker.errors.WorkerError` leaves :func:`decode_request`
or :meth:`Request.bind`: bad bytes are data for the dead-letter topic, never a
crash of the partition.
"""

from __future__ import annotations

from typing import Any

import msgpack as _mp
import numpy as np
import pyarrow as pa

from worker.errors import DecodeError, TooLarge, WorkerError
from worker.signature import Signature

from . import arrow as _arrow
from . import headers as _headers
from . import msgpack as _msgpack
from .base import ARROW, MSGPACK, Bound, Headers, Limits, Request, Response
from .headers import dlq_headers, get_header

__all__ = [
    "ARROW",
    "CONTENT_TYPES",
    "DEFAULT_LIMITS",
    "MSGPACK",
    "Bound",
    "Headers",
    "Limits",
    "Request",
    "Response",
    "decode_request",
    "decode_response",
    "dlq_headers",
    "encode_request",
    "encode_response",
    "response_headers",
]

DEFAULT_LIMITS = Limits()
CONTENT_TYPES = {"arrow": ARROW, "msgpack": MSGPACK}
"""Format name -> the canonical ``content-type`` header value."""


def decode_request(
    value: bytes, headers: Headers, *, default_id: str, limits: Limits = DEFAULT_LIMITS
) -> Request:
    """Parse a request record; the model is not known yet, so nothing is validated against one.

    The format comes from ``content-type``, else from sniffing the Arrow stream's
    ``FF FF FF FF`` continuation marker, else msgpack. Oversized values are refused
    before parsing. Only :class:`WorkerError` subclasses escape, and the returned
    request's :meth:`~Request.bind` wraps its own failures the same way.
    """
    try:
        if value is None:
            raise DecodeError("the record has no value (a tombstone); expected a request body")
        if len(value) > limits.max_bytes:
            raise TooLarge(
                f"record value of {len(value)} bytes, over the limit of {limits.max_bytes}"
            )
        value = bytes(value) if not isinstance(value, bytes) else value
        headers = list(headers or [])
        fmt = _headers.content_format(headers, value)
        codec = _arrow.decode_request if fmt == "arrow" else _msgpack.decode_request
        request = codec(value, headers, default_id=default_id, limits=limits)
    except WorkerError:
        raise
    except Exception as exc:  # a codec bug must still become a dead letter, not a crash
        raise DecodeError(f"undecodable request: {type(exc).__name__}: {exc}") from exc
    request._binder = _guarded(request._binder)
    return request


def _guarded(binder: Any) -> Any:
    def bind(signature: Signature) -> Bound:
        try:
            bound: Bound = binder(signature)
        except WorkerError:
            raise
        except Exception as exc:
            raise DecodeError(
                f"request does not fit the model: {type(exc).__name__}: {exc}"
            ) from exc
        return bound

    return bind


def _format_for(request: Request, output_format: str) -> str:
    if output_format == "same":
        return request.format
    if output_format not in CONTENT_TYPES:
        raise ValueError(f"output_format must be same, arrow or msgpack, got {output_format!r}")
    return output_format


def _rows_of(outputs: dict[str, object]) -> int:
    for value in outputs.values():
        if isinstance(value, np.ndarray):
            return int(value.shape[0]) if value.ndim else 1
        if isinstance(value, list):
            return len(value)
    return 0


def encode_response(
    request: Request,
    bound: Bound | None,
    outputs: dict[str, object],
    *,
    model: str,
    model_version: int,
    output_format: str = "same",
) -> tuple[bytes, str]:
    """Outputs (axis 0 == rows, or a list of dicts per row) -> ``(body, content_type)``.

    The request's passthrough travels along; across formats an Arrow table
    becomes a map of column lists, and a msgpack value becomes columns when it
    is a map of row-length lists (else it rides in the schema metadata).
    """
    fmt = _format_for(request, output_format)
    passthrough = bound.passthrough if bound is not None else None
    rows = bound.rows if bound is not None else _rows_of(outputs)
    if fmt == "msgpack":
        if isinstance(passthrough, pa.Table):
            passthrough = passthrough.to_pydict()
        body = _msgpack.encode_response(
            request.request_id, outputs, passthrough, model=model, model_version=model_version
        )
        return body, MSGPACK
    table, extra = _arrow_passthrough(passthrough, rows)
    return _arrow.encode_response(outputs, rows, table, extra), ARROW


def _arrow_passthrough(
    passthrough: object, rows: int
) -> tuple[pa.Table | None, dict[bytes, bytes] | None]:
    if passthrough is None or isinstance(passthrough, pa.Table):
        return passthrough, None
    if isinstance(passthrough, dict) and all(
        isinstance(v, list) and len(v) == rows for v in passthrough.values()
    ):
        try:
            return pa.table({str(k): v for k, v in passthrough.items()}), None
        except (pa.ArrowException, TypeError, ValueError):
            pass  # not column-shaped after all: fall through to metadata
    packed = _mp.packb(passthrough, default=str, use_bin_type=True)
    return None, {_arrow.PASSTHROUGH_METADATA_KEY: packed}


def response_headers(
    request: Request,
    *,
    content_type: str,
    model: str,
    model_version: int,
    topic: str,
    partition: int,
    offset: int,
) -> Headers:
    """The request's headers (minus those replaced), then content-type, request-id, model,
    model-version and source-topic/partition/offset (§3)."""
    return _headers.response_headers(
        request.headers,
        request_id=request.request_id,
        content_type=content_type,
        model=model,
        model_version=model_version,
        topic=topic,
        partition=partition,
        offset=offset,
    )


def encode_request(
    inputs: dict[str, np.ndarray],
    *,
    format: str,
    model: str | None = None,
    model_version: int | None = None,
    request_id: str | None = None,
    passthrough: object = None,
    arrow_form: str = "auto",
) -> tuple[bytes, Headers]:
    """Build a request record ``(value, headers)`` as a producer would.

    ``arrow_form``: ``auto`` (primitive for rank 1, ``arrow.fixed_shape_tensor``
    above, FixedSizeList for strings), ``tensor``, ``fixed_size_list``, or
    ``primitive`` (rank 1; rank 2 becomes one column per feature, the tabular rule).
    Arrow passthrough: a ``pa.Table`` or dict of columns; msgpack: any value.
    Raises ``ValueError``/``TypeError`` on bad arguments (a producer-side bug).
    """
    if format not in CONTENT_TYPES:
        raise ValueError(f"format must be arrow or msgpack, got {format!r}")
    if format == "arrow":
        value = _arrow.encode_request(inputs, passthrough=passthrough, arrow_form=arrow_form)
    else:
        value = _msgpack.encode_request(
            inputs, model=model, model_version=model_version, request_id=request_id,
            passthrough=passthrough,
        )
    headers: Headers = [("content-type", CONTENT_TYPES[format].encode())]
    if model is not None:
        headers.append(("model", model.encode()))
    if model_version is not None:
        headers.append(("model-version", str(model_version).encode()))
    if request_id is not None:
        headers.append(("request-id", request_id.encode()))
    return value, headers


def decode_response(value: bytes, headers: Headers) -> Response:
    """Parse a response record; identification comes from headers first, then the body."""
    headers = list(headers or [])
    fmt = _headers.content_format(headers, value)
    try:
        if fmt == "arrow":
            response = _arrow.decode_response(value, _unpack_any)
        else:
            response = _msgpack.decode_response(value)
    except WorkerError:
        raise
    except Exception as exc:
        raise DecodeError(f"undecodable response: {type(exc).__name__}: {exc}") from exc
    response.request_id = get_header(headers, "request-id") or response.request_id
    response.model = get_header(headers, "model") or response.model
    version = get_header(headers, "model-version")
    if version is not None:
        response.model_version = _headers.parse_version(version, "header 'model-version'")
    return response


def _unpack_any(raw: bytes) -> object:
    return _mp.unpackb(raw, raw=False, strict_map_key=False)
