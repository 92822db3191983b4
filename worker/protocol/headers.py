"""Kafka record headers: reading the request's, writing the response's and the DLQ's.

Header names are matched case-insensitively (a Java producer may well write
``Content-Type``) and, when a name repeats, the last one wins: the DLQ appends
its headers to the original ones unchanged, so a record that went through the
DLQ twice still reads as its latest failure.
"""

from __future__ import annotations

from worker.errors import DecodeError, WorkerError

from .base import ARROW, MSGPACK, Headers

__all__ = [
    "MAX_ERROR_MESSAGE_BYTES",
    "content_format",
    "dlq_headers",
    "get_header",
    "parse_version",
    "response_headers",
]

MAX_ERROR_MESSAGE_BYTES = 1024

# Media types accepted on requests; responses always use the canonical two.
_FORMATS = {
    ARROW: "arrow",
    MSGPACK: "msgpack",
    "application/msgpack": "msgpack",
    "application/vnd.msgpack": "msgpack",
}
_RESPONSE_REPLACED = (
    "content-type",
    "request-id",
    "model",
    "model-version",
    "source-topic",
    "source-partition",
    "source-offset",
)


def get_header(headers: Headers, name: str) -> str | None:
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


def content_format(headers: Headers, value: bytes) -> str:
    """``"arrow"`` or ``"msgpack"``: the header, else sniff the Arrow continuation marker."""
    ctype = get_header(headers, "content-type")
    if ctype is None:
        return "arrow" if value[:4] == b"\xff\xff\xff\xff" else "msgpack"
    media = ctype.split(";", 1)[0].strip().lower()
    if media not in _FORMATS:
        raise DecodeError(
            f"unsupported content-type {ctype!r}; expected {ARROW!r} or {MSGPACK!r}"
        )
    return _FORMATS[media]


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


def _without(headers: Headers, names: tuple[str, ...]) -> Headers:
    return [(k, v) for k, v in headers if not (isinstance(k, str) and k.lower() in names)]


def _source(topic: str, partition: int, offset: int) -> Headers:
    return [
        ("source-topic", topic.encode()),
        ("source-partition", str(partition).encode()),
        ("source-offset", str(offset).encode()),
    ]


def response_headers(
    request_headers: Headers,
    *,
    request_id: str,
    content_type: str,
    model: str,
    model_version: int,
    topic: str,
    partition: int,
    offset: int,
) -> Headers:
    """The request's headers minus the ones replaced, then the §3 response headers."""
    return [
        *_without(request_headers, _RESPONSE_REPLACED),
        ("content-type", content_type.encode()),
        ("request-id", request_id.encode()),
        ("model", model.encode()),
        ("model-version", str(model_version).encode()),
        *_source(topic, partition, offset),
    ]


def cut_utf8(text: str, limit: int = MAX_ERROR_MESSAGE_BYTES) -> bytes:
    """``text`` as UTF-8 in at most ``limit`` bytes, never splitting a character."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw
    ellipsis = "…".encode()
    return raw[: limit - len(ellipsis)].decode("utf-8", errors="ignore").encode() + ellipsis


def dlq_headers(
    headers: Headers,
    error: WorkerError,
    *,
    topic: str,
    partition: int,
    offset: int,
    model: str | None,
) -> Headers:
    """The original headers unchanged, plus what went wrong and where (§3 dead-letter record)."""
    extra: Headers = [
        ("error-type", error.error_type.encode()),
        ("error-message", cut_utf8(str(error))),
        *_source(topic, partition, offset),
    ]
    if model is not None:
        extra.append(("model", model.encode()))
    return [*headers, *extra]
