"""Kafka record headers: reading the request's, writing the response's and the DLQ's.

Header names are matched case-insensitively (a Java producer may well write
``Content-Type``) and, when a name repeats, the last one wins: the DLQ appends
its headers to the original ones unchanged, so a record that went through the
DLQ twice still reads as its latest failure.

Values are bytes or NULL (None) and are copied to answers byte for byte; only
the headers the worker reads must be UTF-8. A name that is not a ``str`` is one
the Kafka layer could not decode (not UTF-8): such a record is a decode error.
MLServer's ``mlserver-model`` / ``mlserver-version`` are synonyms of ``model``
/ ``model-version``; when both are present, ours win.
"""

from __future__ import annotations

import functools
from collections.abc import Container, Sequence

from worker.errors import DecodeError, WorkerError

from .base import Envelope, Headers, HeadersIn

__all__ = [
    "MAX_ERROR_MESSAGE_BYTES",
    "READ_HEADERS",
    "check_names",
    "cut_utf8",
    "dlq_headers",
    "envelope",
    "get_header",
    "media_type",
    "parse_version",
    "readable",
    "response_headers",
]

MAX_ERROR_MESSAGE_BYTES = 1024
READ_HEADERS = (
    "content-type",
    "model",
    "model-version",
    "request-id",
    "mlserver-model",
    "mlserver-version",
)
"""The headers whose values the worker interprets (so they must be UTF-8)."""

_RESPONSE_REPLACED = (
    "content-type",
    "request-id",
    "model",
    "model-version",
    "source-topic",
    "source-partition",
    "source-offset",
)


def get_header(headers: HeadersIn, name: str) -> str | None:
    """UTF-8 value of the last header called ``name`` (any case); None when absent."""
    value: bytes | None = None
    for key, raw in headers:
        if isinstance(key, str) and key.lower() == name and raw is not None:
            value = raw
    if value is None:
        return None
    try:
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError) as exc:
        raise DecodeError(f"header {name!r} is not UTF-8 text") from exc


def check_names(headers: HeadersIn) -> None:
    """:class:`DecodeError` when a header name is not text (the Kafka layer hands an
    undecodable name over as bytes: a client could not even write it back)."""
    for key, _ in headers:
        if not isinstance(key, str):
            raise DecodeError(f"header name {bytes(key)[:64]!r} is not UTF-8 text")


def readable(headers: HeadersIn) -> Headers:
    """The headers whose names are text: all that a dead letter can carry."""
    return [(k, v) for k, v in headers if isinstance(k, str)]


def media_type(headers: HeadersIn) -> str | None:
    """The ``content-type`` header's media type, lower case, parameters dropped."""
    ctype = get_header(headers, "content-type")
    return None if ctype is None else ctype.split(";", 1)[0].strip().lower()


def _mlserver_version(raw: str) -> int | None:
    """MLServer versions are free-form labels (``v0.1.0``); ours are integers. An
    integer, bare or after a ``v``, names a version; any other label means newest."""
    text = raw.strip()
    text = text[1:] if text[:1] in ("v", "V") else text
    if text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    return None


def _read(headers: HeadersIn) -> dict[str, str]:
    """One pass: the last non-NULL value of every header the worker reads, as text.
    Every such value must be UTF-8, even one a later header or a synonym shadows."""
    found: dict[str, str] = {}
    for key, raw in headers:
        if not isinstance(key, str):
            raise DecodeError(f"header name {bytes(key)[:64]!r} is not UTF-8 text")
        name = key.lower()
        if name in READ_HEADERS and raw is not None:
            try:
                found[name] = bytes(raw).decode("utf-8")
            except (UnicodeDecodeError, TypeError) as exc:
                raise DecodeError(f"header {name!r} is not UTF-8 text") from exc
    return found


def envelope(headers: HeadersIn, *, key: bytes | None, default_id: str) -> Envelope:
    """Read every header the worker interprets, once, with the same rules for all codecs."""
    found = _read(headers)
    version: int | None = None
    if "model-version" in found:
        version = parse_version(found["model-version"], "header 'model-version'")
    elif "mlserver-version" in found:
        version = _mlserver_version(found["mlserver-version"])
    return Envelope(
        headers=list(headers),  # type: ignore[arg-type]  # _read checked: every name is a str
        model=found.get("model") or found.get("mlserver-model"),
        model_version=version,
        request_id=found.get("request-id"),
        key=bytes(key) if key is not None else None,
        default_id=default_id,
    )


def parse_version(raw: object, where: str) -> int:
    """A model version: a positive integer, from a header string or a body int."""
    if isinstance(raw, bool):
        version = None
    elif isinstance(raw, int):
        version = raw
    elif isinstance(raw, str):
        text = raw.strip()
        version = int(text) if text.isascii() and text.isdigit() else None
    else:
        version = None
    if version is None or version < 1:
        raise DecodeError(f"{where}: expected a positive integer model version, got {raw!r}")
    return version


_RESPONSE_REPLACED_SET = frozenset(_RESPONSE_REPLACED)


def _without(headers: HeadersIn, names: Container[str]) -> Headers:
    return [(k, v) for k, v in headers if isinstance(k, str) and k.lower() not in names]


@functools.lru_cache(maxsize=1024)
def _answer_headers(
    content_type: str, model: str, model_version: int
) -> tuple[tuple[str, bytes], tuple[str, bytes], tuple[str, bytes]]:
    """content-type, model and model-version, encoded once per model version."""
    return (
        ("content-type", content_type.encode()),
        ("model", model.encode()),
        ("model-version", str(model_version).encode()),
    )


def _source(topic: str, partition: int, offset: int) -> Headers:
    return [
        ("source-topic", topic.encode()),
        ("source-partition", str(partition).encode()),
        ("source-offset", str(offset).encode()),
    ]


def response_headers(
    request_headers: HeadersIn,
    *,
    request_id: str,
    content_type: str,
    model: str,
    model_version: int,
    topic: str,
    partition: int,
    offset: int,
    extra: Sequence[tuple[str, bytes | None]] = (),
) -> Headers:
    """The request's headers minus the ones replaced, then the response headers,
    then the format's ``extra`` ones (which also replace same-named request headers)."""
    replaced: Container[str] = _RESPONSE_REPLACED_SET
    if extra:
        replaced = _RESPONSE_REPLACED_SET.union(k.lower() for k, _ in extra)
    ctype, name, version = _answer_headers(content_type, model, model_version)
    return [
        *_without(request_headers, replaced),
        ctype,
        ("request-id", request_id.encode()),
        name,
        version,
        *_source(topic, partition, offset),
        *extra,
    ]


def cut_utf8(text: str, limit: int = MAX_ERROR_MESSAGE_BYTES) -> bytes:
    """``text`` as UTF-8 in at most ``limit`` bytes, never splitting a character."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw
    ellipsis = "…".encode()
    return raw[: limit - len(ellipsis)].decode("utf-8", errors="ignore").encode() + ellipsis


def dlq_headers(
    headers: HeadersIn,
    error: WorkerError,
    *,
    topic: str,
    partition: int,
    offset: int,
    model: str | None,
) -> Headers:
    """The original headers unchanged (all whose names are text: a name the Kafka
    layer could not decode cannot be written back), plus what went wrong and where."""
    extra: Headers = [
        ("error-type", error.error_type.encode()),
        ("error-message", cut_utf8(str(error))),
        *_source(topic, partition, offset),
    ]
    if model is not None:
        extra.append(("model", model.encode()))
    return [*readable(headers), *extra]
