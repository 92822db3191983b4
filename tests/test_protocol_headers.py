"""Headers: sniffing, precedence over body fields, response and dead-letter headers,
byte-for-byte copies, and which headers must be UTF-8."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from worker.errors import DecodeError, SchemaMismatch
from worker.protocol import (
    ARROW,
    MSGPACK,
    HeadersIn,
    decode_request,
    dlq_headers,
    encode_request,
    response_headers,
)

X = np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("fmt", ["arrow", "msgpack", "json"])
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


def test_response_headers_of_each_model_version_and_format_are_their_own() -> None:
    """The answer's content-type, model and model-version are encoded once per model
    version and reused: answers of another version, model or format never get them."""
    value, _ = encode_request({"x": X}, format="msgpack")
    request = decode_request(value, [("request-id", b"r")], default_id="d")
    seen = []
    for ctype, model, version in [(ARROW, "m", 1), (ARROW, "m", 2), (MSGPACK, "m", 2),
                                  (ARROW, "n", 2), (ARROW, "m", 1)]:  # fmt: skip
        headers = dict(response_headers(request, content_type=ctype, model=model,
                                        model_version=version, topic="t", partition=0,
                                        offset=5))  # fmt: skip
        seen.append((headers["content-type"], headers["model"], headers["model-version"]))
    assert seen == [(ARROW.encode(), b"m", b"1"), (ARROW.encode(), b"m", b"2"),
                    (MSGPACK.encode(), b"m", b"2"), (ARROW.encode(), b"n", b"2"),
                    (ARROW.encode(), b"m", b"1")]  # fmt: skip


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
    assert raw is not None and len(raw) <= 1024
    decoded = raw.decode("utf-8")  # never a split character
    assert decoded == text or decoded.endswith("…")


# -- v2 header rules: byte-for-byte copies, what must be UTF-8, names the client could not read --


@pytest.mark.parametrize("fmt", ["arrow", "msgpack", "json"])
def test_header_values_are_copied_byte_for_byte_null_included(fmt: str) -> None:
    value, _ = encode_request({"x": X}, format=fmt)
    incoming = [("bin", b"\xff\x00\xfe"), ("null", None), ("", b"empty name"),
                ("big", b"v" * 100_000), ("dup", b"1"), ("dup", b"2")]
    request = decode_request(value, incoming, default_id="d")
    headers = response_headers(request, content_type=ARROW, model="m", model_version=1,
                               topic="t", partition=0, offset=0)
    assert headers[:6] == incoming


@pytest.mark.parametrize("name", ["model", "model-version", "content-type", "request-id",
                                  "mlserver-model", "mlserver-version", "Model"])
def test_a_read_header_that_is_not_utf8_is_a_decode_error(name: str) -> None:
    value, _ = encode_request({"x": X}, format="msgpack")
    with pytest.raises(DecodeError, match="is not UTF-8 text"):
        decode_request(value, [(name, b"\xff\xfe")], default_id="d")


def test_a_null_read_header_counts_as_absent() -> None:
    value, _ = encode_request({"x": X}, format="msgpack", model="body-model")
    request = decode_request(value, [("model", None), ("model-version", None)], default_id="d")
    assert (request.model, request.model_version) == ("body-model", None)


def test_a_header_name_the_client_could_not_decode_is_a_decode_error() -> None:
    value, _ = encode_request({"x": X}, format="msgpack")
    headers: HeadersIn = [("trace", b"abc"), (b"\xff\xfename", b"v"), ("", b"")]
    with pytest.raises(DecodeError, match=r"header name b'\\xff\\xfename' is not UTF-8") as info:
        decode_request(value, headers, default_id="d")
    # The dead letter keeps every header that could be read, and says what went wrong.
    dlq = dlq_headers(headers, info.value, topic="in", partition=1, offset=2, model=None)
    assert dlq[:2] == [("trace", b"abc"), ("", b"")]
    assert dict(dlq[2:])["error-type"] == b"decode-error"
    assert all(isinstance(k, str) for k, _ in dlq)


def test_hundreds_of_headers() -> None:
    value, _ = encode_request({"x": X}, format="msgpack")
    incoming = [(f"h{i}", str(i).encode()) for i in range(500)] + [("model", b"m")]
    request = decode_request(value, incoming, default_id="d")
    assert request.model == "m"
    headers = response_headers(request, content_type=MSGPACK, model="m", model_version=1,
                               topic="t", partition=0, offset=0)
    assert headers[:500] == incoming[:500]
    assert len(dlq_headers(incoming, DecodeError("x"), topic="t", partition=0, offset=0,
                           model="m")) == 501 + 6


def test_json_answer_adds_cloudevents_headers_only_to_json_answers() -> None:
    value, _ = encode_request({"x": X}, format="json")
    request = decode_request(value, [("Ce-Id", b"theirs")], default_id="d")
    as_msgpack = response_headers(request, content_type=MSGPACK, model="m", model_version=1,
                                  topic="t", partition=0, offset=0)
    assert [k for k, _ in as_msgpack if k.lower().startswith("ce-")] == ["Ce-Id"]
    as_json = response_headers(request, content_type="application/json", model="m",
                               model_version=1, topic="t", partition=0, offset=0)
    assert [v for k, v in as_json if k == "Ce-Id"] == [b"d"]
