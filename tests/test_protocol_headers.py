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
from worker.protocol.headers import check_names, cut_utf8, media_type, parse_version

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


# -- the header rules one function at a time: names, media type, versions, the 1 KiB cut --


def test_check_names_passes_text_names_and_names_the_first_undecodable_one() -> None:
    check_names([("trace", b"abc"), ("", None), ("Model", b"m")])  # no error
    name = b"\xff" + b"n" * 100
    with pytest.raises(DecodeError) as info:
        check_names([("trace", b"abc"), (name, b"v"), (b"\xfe", b"w")])
    # The message quotes the name's first 64 bytes, never more.
    assert str(info.value) == f"header name {name[:64]!r} is not UTF-8 text"


def test_a_long_undecodable_request_header_name_is_quoted_up_to_64_bytes() -> None:
    value, _ = encode_request({"x": X}, format="msgpack")
    name = b"\xff" + b"n" * 100
    with pytest.raises(DecodeError) as info:
        decode_request(value, [(name, b"v")], default_id="d")
    assert str(info.value) == f"header name {name[:64]!r} is not UTF-8 text"


@pytest.mark.parametrize(("raw", "media"), [
    (b"application/json", "application/json"),
    (b" Application/JSON ; charset=utf-8; q=1", "application/json"),
    (b"application/x-msgpack;v=1;w=2", "application/x-msgpack"),
])  # fmt: skip
def test_media_type_is_the_lower_case_value_without_parameters(raw: bytes, media: str) -> None:
    assert media_type([("trace", b"t"), ("CONTENT-TYPE", raw)]) == media
    assert media_type([("content-type", raw)]) == media
    assert media_type([("trace", b"t")]) is None


def test_an_unknown_content_type_is_a_decode_error_even_when_the_body_sniffs() -> None:
    value, _ = encode_request({"x": X}, format="msgpack")
    with pytest.raises(DecodeError, match=r"^unsupported content-type 'text/plain; v=1'"):
        decode_request(value, [("Content-Type", b"text/plain; v=1")], default_id="d")
    # The content-type names the format: a msgpack body sent as JSON is not sniffed as msgpack.
    with pytest.raises(DecodeError):
        decode_request(value, [("content-type", b"application/json")], default_id="d")


@pytest.mark.parametrize(("label", "version"), [
    ("3", 3), ("v3", 3), ("V3", 3), (" v12 ", 12), ("1", 1), ("v1", 1), ("V1", 1),
    ("v0.1.0", None), ("0", None), ("v0", None), ("v", None), ("", None), ("vv3", None),
    ("latest", None), ("v３", None), ("-1", None),
])  # fmt: skip
def test_mlserver_version_an_integer_bare_or_after_a_v_else_the_newest(
    label: str, version: int | None
) -> None:
    body = msgpack.packb({"inputs": {}})
    request = decode_request(body, [("mlserver-version", label.encode())], default_id="d")
    assert request.model_version == version
    # The header wins over the body's model_version; a label that names no version leaves it.
    body = msgpack.packb({"inputs": {}, "model_version": 7})
    request = decode_request(body, [("MLServer-Version", label.encode())], default_id="d")
    assert request.model_version == (7 if version is None else version)


def test_model_version_wins_over_mlserver_version_which_still_must_be_utf8() -> None:
    body = msgpack.packb({"inputs": {}})
    request = decode_request(body, [("model-version", b"4"), ("mlserver-version", b"v9")],
                             default_id="d")  # fmt: skip
    assert request.model_version == 4
    request = decode_request(body, [("mlserver-version", b"v9"), ("model-version", b"4")],
                             default_id="d")  # fmt: skip
    assert request.model_version == 4


@pytest.mark.parametrize("raw", [b"0", b"-2", b"v3", b"1.5", b"abc", b"", "３".encode()])
def test_a_bad_model_version_header_is_a_decode_error_that_names_the_header(raw: bytes) -> None:
    body = msgpack.packb({"inputs": {}})
    with pytest.raises(DecodeError) as info:
        decode_request(body, [("Model-Version", raw)], default_id="d")
    assert str(info.value) == (
        f"header 'model-version': expected a positive integer model version, "
        f"got {raw.decode()!r}"
    )


def test_mlserver_model_is_a_synonym_that_model_wins_over() -> None:
    body = msgpack.packb({"inputs": {}, "model": "body-model"})
    request = decode_request(body, [("MLServer-Model", b"theirs")], default_id="d")
    assert request.model == "theirs"
    request = decode_request(body, [("model", b"ours"), ("mlserver-model", b"theirs")],
                             default_id="d")  # fmt: skip
    assert request.model == "ours"
    request = decode_request(body, [("mlserver-model", b"theirs"), ("model", b"ours")],
                             default_id="d")  # fmt: skip
    assert request.model == "ours"


@pytest.mark.parametrize(("raw", "version"), [(3, 3), (1, 1), ("7", 7), (" 12 ", 12)])
def test_parse_version_accepts_positive_integers(raw: object, version: int) -> None:
    assert parse_version(raw, "here") == version


@pytest.mark.parametrize("raw", [True, False, 0, -3, "0", "-3", "abc", "1.5", "３", "", " ",
                                 2.0, None, [1]])  # fmt: skip
def test_parse_version_refuses_anything_else_saying_where_and_what(raw: object) -> None:
    with pytest.raises(DecodeError) as info:
        parse_version(raw, "msgpack body 'model_version'")
    assert str(info.value) == (
        f"msgpack body 'model_version': expected a positive integer model version, got {raw!r}"
    )


@pytest.mark.parametrize(("text", "cut"), [
    ("x" * 1024, b"x" * 1024),
    ("x" * 1025, b"x" * 1021 + "…".encode()),
    ("é" * 512, "é".encode() * 512),
    ("é" * 2000, "é".encode() * 510 + "…".encode()),  # 1021 bytes would split an é
    ("€" * 400, "€".encode() * 340 + "…".encode()),
    ("", b""),
])  # fmt: skip
def test_error_message_cut_is_exact(text: str, cut: bytes) -> None:
    assert cut_utf8(text) == cut
    headers = dict(dlq_headers([], DecodeError(text), topic="t", partition=0, offset=0,
                               model=None))  # fmt: skip
    assert headers["error-message"] == cut


def test_an_error_message_that_is_not_valid_unicode_is_still_written() -> None:
    """A lone surrogate (a JSON body may hold "\\udcff") cannot be UTF-8: it becomes '?'."""
    error = SchemaMismatch("unknown input '\udcff'")
    headers = dict(dlq_headers([], error, topic="t", partition=0, offset=0, model=None))
    assert headers["error-message"] == b"unknown input '?'"
    assert cut_utf8("\udcff" * 2000) == b"?" * 1021 + "…".encode()
