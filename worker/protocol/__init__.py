"""The wire formats: record bytes + headers <-> Request / Response.

Three codecs share one interface, :class:`~.base.Codec` (a content type, a
sniff, and an encode/decode pair per direction): :mod:`.arrow` for Arrow IPC
streams, :mod:`.msgpack` for tensor maps and :mod:`.json` for the Open
Inference Protocol (V2) JSON of KServe/MLServer/Triton. :data:`CODECS` is the
registry; :mod:`.headers` reads and writes the Kafka headers, once for all
formats. The worker loop uses :func:`decode_request` -> :meth:`Request.bind`
-> ``session.run`` -> :func:`encode_response` + :func:`response_headers` (or
:func:`dlq_headers`); the producer tools use :func:`encode_request` and
:func:`decode_response`.

Nothing but a :class:`~worker.errors.WorkerError` leaves :func:`decode_request`,
:meth:`Request.bind` or :func:`encode_response`: bad bytes, and answers that
cannot be written, are data for the dead-letter topic, never a crash of the
partition.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from worker.errors import DecodeError, InferenceError, TooLarge, WorkerError

from . import headers as _headers
from .arrow import ArrowCodec
from .base import (
    ARROW,
    JSON,
    MSGPACK,
    Bound,
    Codec,
    Envelope,
    Headers,
    HeadersIn,
    Limits,
    Request,
    Response,
)
from .headers import dlq_headers, get_header
from .json import JsonCodec
from .msgpack import MsgpackCodec

__all__ = [
    "ARROW",
    "CODECS",
    "CONTENT_TYPES",
    "DEFAULT_LIMITS",
    "JSON",
    "MSGPACK",
    "Bound",
    "Codec",
    "CodecRegistry",
    "Envelope",
    "Headers",
    "HeadersIn",
    "Limits",
    "Request",
    "Response",
    "decode_request",
    "decode_response",
    "dlq_headers",
    "encode_request",
    "encode_response",
    "get_header",
    "response_headers",
]

DEFAULT_LIMITS = Limits()


class CodecRegistry:
    """Codecs by name and by media type; sniffing asks them in registration order."""

    def __init__(self, codecs: list[Codec]) -> None:
        self._codecs = list(codecs)
        self._by_name = {c.name: c for c in self._codecs}
        self._by_media = {m: c for c in self._codecs for m in c.media_types}

    def __iter__(self) -> Iterator[Codec]:
        return iter(self._codecs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def by_name(self, name: str) -> Codec:
        """The codec called ``name``; ``ValueError`` (a caller's bug) when there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(
                f"unknown format {name!r}; expected one of {', '.join(self._by_name)}"
            ) from None

    def for_content_type(self, content_type: str) -> Codec:
        """The codec answering with this canonical (or accepted) content type."""
        media = content_type.split(";", 1)[0].strip().lower()
        codec = self._by_media.get(media)
        if codec is None:
            raise ValueError(f"no codec for content type {content_type!r}")
        return codec

    def for_record(self, headers: HeadersIn, value: bytes) -> Codec:
        """The ``content-type`` header's codec, else the first whose sniff accepts ``value``."""
        media = _headers.media_type(headers)
        if media is None:
            for codec in self._codecs:
                if codec.sniff(value):
                    return codec
            raise DecodeError("the body matches no known format")
        named = self._by_media.get(media)
        if named is None:
            accepted = ", ".join(repr(c.content_type) for c in self._codecs)
            raise DecodeError(
                f"unsupported content-type {get_header(headers, 'content-type')!r}; "
                f"expected one of {accepted}"
            )
        return named


# Sniff order: Arrow's FF FF FF FF marker, then a JSON object's "{", then msgpack
# (which takes anything: a msgpack request is a map, never a byte "{" or "\xff").
CODECS = CodecRegistry([ArrowCodec(), JsonCodec(), MsgpackCodec()])
CONTENT_TYPES = {codec.name: codec.content_type for codec in CODECS}
"""Format name -> the canonical ``content-type`` header value."""


def decode_request(
    value: bytes,
    headers: HeadersIn,
    *,
    default_id: str,
    limits: Limits = DEFAULT_LIMITS,
    key: bytes | None = None,
) -> Request:
    """Parse a request record; the model is not known yet, so nothing is validated against one.

    The format comes from ``content-type``, else from sniffing. Oversized values
    are refused before parsing. ``key`` is the record key (a JSON request's id
    when it is UTF-8, as in MLServer). Only :class:`WorkerError` subclasses
    escape, and the returned request's :meth:`~Request.bind` wraps its own
    failures the same way.
    """
    try:
        if value is None:
            raise DecodeError("the record has no value (a tombstone); expected a request body")
        if len(value) > limits.max_bytes:
            raise TooLarge("the record value", len(value), limits.max_bytes)
        value = bytes(value) if not isinstance(value, bytes) else value
        envelope = _headers.envelope(list(headers or []), key=key, default_id=default_id)
        return CODECS.for_record(envelope.headers, value).decode_request(value, envelope, limits)
    except WorkerError:
        raise
    except Exception as exc:  # a codec bug must still become a dead letter, not a crash
        raise DecodeError(f"undecodable request: {type(exc).__name__}: {exc}") from exc


def _codec_for(request: Request, output_format: str) -> Codec:
    if output_format == "same":
        return CODECS.by_name(request.format)
    if output_format not in CONTENT_TYPES:
        raise ValueError(
            f"output_format must be same or one of {', '.join(CONTENT_TYPES)}, "
            f"got {output_format!r}"
        )
    return CODECS.by_name(output_format)


def encode_response(
    request: Request,
    bound: Bound | None,
    outputs: Mapping[str, object],
    *,
    model: str,
    model_version: int,
    output_format: str = "same",
) -> tuple[bytes, str]:
    """Outputs (axis 0 == rows, whole tensors for a request that ran ``alone``, or a
    list of dicts per row) -> ``(body, content_type)``.

    Only the outputs the request asked for are written (JSON ``outputs``). The
    request's passthrough travels along, converted across formats. An answer
    that cannot be written raises a :class:`WorkerError` (a dead letter).
    """
    codec = _codec_for(request, output_format)
    try:
        body = codec.encode_response(
            request, bound, request.select(outputs), model=model, model_version=model_version
        )
    except WorkerError:
        raise
    except Exception as exc:  # a codec bug: still a dead letter, never unreadable bytes
        raise InferenceError(
            f"the answer cannot be written as {codec.name}: {type(exc).__name__}: {exc}"
        ) from exc
    return body, codec.content_type


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
    """The request's headers (values byte for byte, minus those replaced), then
    content-type, request-id, model, model-version and source-topic/partition/offset,
    then the answer format's own (JSON: MLServer's CloudEvents headers)."""
    codec = CODECS.for_content_type(content_type)
    return _headers.response_headers(
        request.headers,
        request_id=request.request_id,
        content_type=content_type,
        model=model,
        model_version=model_version,
        topic=topic,
        partition=partition,
        offset=offset,
        extra=codec.response_headers(request, model=model, model_version=model_version),
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
    form: str | None = None,
) -> tuple[bytes, Headers]:
    """Build a request record ``(value, headers)`` as a producer would.

    ``form`` (``arrow_form`` is its older name) picks the tensor layout: Arrow
    ``auto`` (primitive for rank 1, ``arrow.fixed_shape_tensor`` above,
    FixedSizeList for strings), ``tensor``, ``fixed_size_list``, or
    ``primitive`` (rank 1; rank 2 becomes one column per feature, the tabular
    rule); JSON ``flat`` (the default) or ``nested``. Arrow passthrough: a
    ``pa.Table`` or dict of columns; msgpack and JSON: any value. Raises
    ``ValueError``/``TypeError`` on bad arguments (a producer-side bug).
    """
    if format not in CONTENT_TYPES:
        raise ValueError(f"format must be one of {', '.join(CONTENT_TYPES)}, got {format!r}")
    codec = CODECS.by_name(format)
    value = codec.encode_request(
        inputs,
        model=model,
        model_version=model_version,
        request_id=request_id,
        passthrough=passthrough,
        form=form or arrow_form,
    )
    headers: Headers = [("content-type", codec.content_type.encode())]
    if model is not None:
        headers.append(("model", model.encode()))
    if model_version is not None:
        headers.append(("model-version", str(model_version).encode()))
    if request_id is not None:
        headers.append(("request-id", request_id.encode()))
    return value, headers


def decode_response(value: bytes, headers: HeadersIn) -> Response:
    """Parse a response record; identification comes from headers first, then the body."""
    headers = list(headers or [])
    _headers.check_names(headers)
    try:
        codec = CODECS.for_record(headers, value)
        response = codec.decode_response(value)
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
