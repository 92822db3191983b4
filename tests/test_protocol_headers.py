"""Headers: sniffing, precedence over body fields, response and dead-letter headers."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from worker.errors import DecodeError, SchemaMismatch
from worker.protocol import (
    ARROW,
    MSGPACK,
    decode_request,
    dlq_headers,
    encode_request,
    response_headers,
)

X = np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("fmt", ["arrow", "msgpack"])
def test_format_is_sniffed_without_content_type(fmt: str) -> None:
    value, _ = encode_request({"x": X}, format=fmt)
    assert decode_request(value, [], default_id="d").format == fmt


@pytest.mark.parametrize("ctype", [b"application/x-msgpack", b"Application/MsgPack; v=1",
                                   b"application/vnd.msgpack"])
def test_msgpack_content_type_aliases(ctype: bytes) -> None:
    value, _ = encode_request({"x": X}, format="msgpack")
    assert decode_request(value, [("Content-Type", ctype)], default_id="d").format == "msgpack"


def test_headers_win_over_body_fields() -> None:
    body = msgpack.packb({"inputs": {}, "id": "body-id", "model": "body-model",
                          "model_version": 2})
    request = decode_request(body, [("model", b"hdr-model"), ("model-version", b"5"),
                                    ("request-id", b"hdr-id")], default_id="d")
    assert (request.model, request.model_version, request.request_id) == ("hdr-model", 5,
                                                                          "hdr-id")
    request = decode_request(body, [], default_id="d")
    assert (request.model, request.model_version, request.request_id) == ("body-model", 2,
                                                                          "body-id")
    request = decode_request(msgpack.packb({"inputs": {}}), [], default_id="t/3/9")
    assert (request.model, request.model_version, request.request_id) == (None, None, "t/3/9")


def test_arrow_identification_comes_from_headers() -> None:
    value, headers = encode_request({"x": X}, format="arrow", model="m", model_version=3,
                                    request_id="r-1")
    request = decode_request(value, headers, default_id="d")
    assert (request.model, request.model_version, request.request_id) == ("m", 3, "r-1")


def test_last_repeated_header_wins() -> None:
    request = decode_request(msgpack.packb({"inputs": {}}),
                             [("model", b"first"), ("MODEL", b"second")], default_id="d")
    assert request.model == "second"


def test_response_headers_copy_the_request_and_replace_ours() -> None:
    value, _ = encode_request({"x": X}, format="msgpack")
    incoming = [("trace", b"abc"), ("content-type", MSGPACK.encode()), ("model", b"m"),
                ("source-offset", b"99"), ("request-id", b"r-7")]
    request = decode_request(value, incoming, default_id="d")
    headers = response_headers(request, content_type=ARROW, model="m", model_version=4,
                               topic="in", partition=2, offset=17)
    assert headers == [
        ("trace", b"abc"),
        ("content-type", ARROW.encode()),
        ("request-id", b"r-7"),
        ("model", b"m"),
        ("model-version", b"4"),
        ("source-topic", b"in"),
        ("source-partition", b"2"),
        ("source-offset", b"17"),
    ]


def test_dlq_headers_keep_the_original_and_add_the_error() -> None:
    original = [("content-type", MSGPACK.encode()), ("trace", b"abc")]
    headers = dlq_headers(original, SchemaMismatch("input 'x': expected float32[?,784]"),
                          topic="in", partition=0, offset=5, model="mnist-mlp")
    assert headers[:2] == original
    assert headers[2:] == [
        ("error-type", b"schema-mismatch"),
        ("error-message", b"input 'x': expected float32[?,784]"),
        ("source-topic", b"in"),
        ("source-partition", b"0"),
        ("source-offset", b"5"),
        ("model", b"mnist-mlp"),
    ]
    assert all(k != "model" for k, _ in dlq_headers([], DecodeError("x"), topic="t",
                                                    partition=0, offset=0, model=None))


@pytest.mark.parametrize("text", ["é" * 2000, "x" * 1023 + "é", "€" * 400, "short"])
def test_error_message_is_cut_to_1_kib_without_splitting_a_character(text: str) -> None:
    headers = dict(dlq_headers([], DecodeError(text), topic="t", partition=0, offset=0,
                               model=None))
    raw = headers["error-message"]
    assert len(raw) <= 1024
    decoded = raw.decode("utf-8")  # never a split character
    assert decoded == text or decoded.endswith("…")
