"""What a record becomes and how it goes out (worker.answers), on the fakes: no broker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import msgpack
import numpy as np
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fakes import Clock, FakeAdmin, FakeProducer
from worker.answers import (
    METADATA_REFRESH_S,
    RECORD_OVERHEAD,
    Answers,
    Outgoing,
    Slot,
    model_header,
    omit_value,
    record_size,
)
from worker.errors import DecodeError, ModelNotFound, TooLarge
from worker.kafka import KafkaFailure, Record
from worker.observability import Metrics
from worker.protocol import Bound, encode_request
from worker.settings import Settings
from worker.tracing import Trace, Tracing

TOO_LARGE = KafkaFailure("too large", name="MSG_SIZE_TOO_LARGE")


def _answers(clock: Clock | None = None, **overrides: object) -> Answers:
    s = Settings(input_topics=("in",), output_topic="out", model_repository=Path("."), **overrides)
    clock = clock or Clock()
    return Answers(s, Metrics(), clock=clock.monotonic, wall_clock=lambda: 2000.0)


def _slot(offset: int = 3, partition: int = 1, value: bytes = b"req") -> Slot:
    record = Record("in", partition, offset, b"key", value, [("model", b"m")], 1_999_000)
    return Slot(record)


def _response(slot: Slot, nbytes: int) -> Outgoing:
    return Outgoing("out", slot.record.key, b"x" * nbytes, [("model", b"m")], ok=True)


def _sample(a: Answers, name: str, **labels: str) -> float | None:
    return a.metrics.registry.get_sample_value(f"inference_worker_{name}", labels)


def test_record_size_counts_value_key_headers_and_the_batch_overhead() -> None:
    o = Outgoing("out", b"kk", b"v" * 10, [("ab", b"cde"), ("f", None)], ok=True)
    assert record_size(o) == 10 + 2 + (2 + 3 + 4) + (1 + 0 + 4) + RECORD_OVERHEAD


def test_omit_value_keeps_the_headers_and_says_how_many_bytes_went() -> None:
    o = Outgoing("dlq", None, b"v" * 7, [("error-type", b"x")], ok=False)
    assert omit_value(o) == Outgoing(
        "dlq", None, b"", [("error-type", b"x"), ("value-omitted", b"7")], ok=False
    )


def test_a_dead_letter_keeps_the_record_and_says_why_with_its_attempts() -> None:
    a, slot = _answers(), _slot()
    slot.attempts = 3
    dead = a.dead_letter(slot, DecodeError("bad body"), "m")
    assert (dead.topic, dead.key, dead.value, dead.ok) == ("in.dlq", b"key", b"req", False)
    headers = dict(dead.headers)
    assert headers["error-type"] == b"decode-error"
    assert headers["error-attempts"] == b"3"
    assert headers["source-topic"] == b"in"
    assert headers["source-partition"] == b"1"
    assert headers["source-offset"] == b"3"
    assert _sample(a, "dlq_total", error_type="decode-error") == 1
    # a record that failed on its first run says nothing of attempts
    first = a.dead_letter(_slot(offset=4), DecodeError("bad body"), "m")
    assert "error-attempts" not in dict(first.headers)


def test_a_dead_letter_is_logged_with_the_records_place_and_its_error_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, slot = _answers(), _slot(offset=3, partition=1)
    with caplog.at_level(logging.WARNING, logger="worker.answers"):
        a.dead_letter(slot, DecodeError("bad body"), "m")
    (line,) = caplog.records
    assert line.levelno == logging.WARNING
    assert line.getMessage() == "in[1]@3 -> dead letter (decode-error): bad body"
    # the fields a JSON log line carries
    fields = {k: getattr(line, k, None) for k in ("topic", "partition", "offset", "error_type")}
    assert fields == {"topic": "in", "partition": 1, "offset": 3, "error_type": "decode-error"}


def test_a_tombstones_dead_letter_has_an_empty_value() -> None:
    a = _answers()
    slot = Slot(Record("in", 0, 7, b"key", None, [("model", b"m")], 1_999_000))
    dead = a.dead_letter(slot, DecodeError("no body"), "m")
    assert dead.value == b"" and dead.key == b"key"


def test_model_header_is_the_model_a_record_names_in_its_headers() -> None:
    def record(headers: list[tuple[str, bytes | None]]) -> Record:
        return Record("in", 0, 0, None, b"", headers, 1)

    assert model_header(record([("model", b"m")])) == "m"
    assert model_header(record([("Model", b"m2")])) == "m2"  # any case
    assert model_header(record([("other", b"x")])) is None
    assert model_header(record([("model", b"\xff")])) is None  # not UTF-8: no model


def _traced(exporter: InMemorySpanExporter) -> Answers:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = Settings(input_topics=("in",), output_topic="out", model_repository=Path("."))
    return Answers(s, Metrics(), tracing=Tracing(provider), wall_clock=lambda: 2000.0)


def test_a_traced_dead_letter_carries_its_produce_span_which_ends_when_retired() -> None:
    exporter = InMemorySpanExporter()
    a, slot = _traced(exporter), _slot(offset=3, partition=1)
    slot.trace = Trace(Context(), None)
    dead = slot.out = a.dead_letter(slot, DecodeError("bad body"), "m")
    headers = dict(dead.headers)
    assert headers["error-type"] == b"decode-error"  # the dead letter's own headers kept
    assert headers["source-offset"] == b"3"
    assert exporter.get_finished_spans() == ()  # open until its delivery is committed
    a.retire([slot])
    (span,) = exporter.get_finished_spans()
    assert span.name == "produce"
    attributes = dict(span.attributes or {})
    assert (attributes["topic"], attributes["partition"], attributes["offset"]) == ("in", 1, 3)
    assert attributes["model"] == "m" and "version" not in attributes
    traceparent = headers["traceparent"]
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.decode().split("-")
    assert (int(trace_id, 16), int(span_id, 16)) == (
        span.context.trace_id,
        span.context.span_id,
    )


def test_emit_sends_to_the_input_partition_when_the_topic_has_it() -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot(partition=1)
    a.partitions["out"] = 4
    slot.out = _response(slot, 10)
    a.emit(p, slot)
    (sent,) = p.records
    assert (sent.topic, sent.partition, sent.value) == ("out", 1, b"x" * 10)


def test_emit_dead_letters_a_response_over_its_topics_limit() -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot()
    a.size_limits["out"] = 1000
    slot.out = _response(slot, 1000 - RECORD_OVERHEAD)  # with its headers: over
    size = record_size(slot.out)
    a.emit(p, slot)
    (sent,) = p.records
    assert sent.topic == "in.dlq" and sent.header("error-type") == "too-large"
    assert sent.header("error-message") == (
        f"the response: {size} bytes, over the limit of 1000 of topic 'out' (max.message.bytes)"
    )
    assert slot.out.ok is False
    # whose answer it was, also when the request named its model in its body
    bare = Slot(Record("in", 1, 4, b"key", b"req", [], 1_999_000))
    bare.out = _response(bare, 1000)
    a.emit(p, bare)
    assert p.records[-1].topic == "in.dlq" and p.records[-1].header("model") == "m"


def test_emit_sends_a_response_just_within_its_limit() -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot()
    slot.out = _response(slot, 100)
    a.size_limits["out"] = record_size(slot.out)
    a.emit(p, slot)
    assert [s.topic for s in p.records] == ["out"]


def test_our_clients_limit_caps_the_topics() -> None:
    a = _answers(max_message_bytes=5000)
    a.size_limits["out"] = 10_000
    assert a.limit("out") == 5000 and a.limit("unknown") == 5000


def test_emit_drops_the_value_of_a_dead_letter_over_its_topics_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot(value=b"r" * 5000)
    a.size_limits["in.dlq"] = 1000
    slot.out = a.dead_letter(slot, DecodeError("bad"), None)
    a.emit(p, slot)
    (sent,) = p.records
    assert sent.value == b"" and sent.header("value-omitted") == "5000"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "in[1]@3: dead letter too large to publish; value omitted"
    ]


def test_emit_sends_a_dead_letter_just_within_its_limit_with_its_value() -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot(value=b"r" * 500)
    slot.out = a.dead_letter(slot, DecodeError("bad"), None)
    a.size_limits["in.dlq"] = record_size(slot.out)
    a.emit(p, slot)
    (sent,) = p.records
    assert sent.value == b"r" * 500 and sent.header("value-omitted") is None


def test_emit_sends_to_the_keys_partition_when_the_topic_lacks_the_input_one() -> None:
    a, p = _answers(), FakeProducer({})
    slot = Slot(Record("in", 4, 0, b"foobar", b"req", [("model", b"m")], 1_999_000))
    a.partitions["out"] = 4
    slot.out = _response(slot, 10)
    a.emit(p, slot)
    (sent,) = p.records
    # the Java client's murmur2 partitioner: toPositive(murmur2(b"foobar")) % 4 == 2
    assert (sent.partition, sent.key) == (2, b"foobar")


def test_a_response_refused_with_its_batch_is_sent_again_alone_and_nothing_is_learnt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot(partition=1)
    a.partitions["out"] = 4
    slot.out = _response(slot, 500)
    with caplog.at_level(logging.WARNING, logger="worker.answers"):
        assert a.rescue(slot, TOO_LARGE) is True
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "in[1]@3: refused as too large with its batch; sending it again alone")
    ]
    assert slot.out.topic == "out" and slot.out.ok  # not called too large yet
    assert a.size_limits == {}
    a.emit(p, slot)
    # what was sent before goes first, and nothing joins it before it is acknowledged
    assert p.calls == ["flush", "send", "flush"]
    (sent,) = p.records
    assert (sent.topic, sent.key, sent.partition) == ("out", b"key", 1)
    other = _slot(offset=4)
    other.out = _response(other, 10)
    a.emit(p, other)  # others are sent as usual
    assert p.calls[3:] == ["send"]


def test_rescue_turns_a_response_refused_alone_into_a_dead_letter_and_learns_the_limit() -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot()
    slot.out = _response(slot, 500)
    size = record_size(slot.out)
    assert a.rescue(slot, TOO_LARGE) is True  # with its batch: sent again alone
    assert a.rescue(slot, TOO_LARGE) is True  # alone: too large
    assert slot.out.topic == "in.dlq" and slot.out.ok is False
    assert a.size_limits["out"] == size - 1
    headers = dict(slot.out.headers)
    assert headers["error-type"] == b"too-large"
    assert headers["error-message"] == (
        f"the response, refused by the broker: {size} bytes, over the limit of {size - 1} "
        "of topic 'out' (max.message.bytes)"
    ).encode()
    # whose answer it was, also when the request named its model in its body
    bare = Slot(Record("in", 1, 4, b"key", b"req", [], 1_999_000))
    bare.out = _response(bare, 500)
    a.rescue(bare, TOO_LARGE)
    a.rescue(bare, TOO_LARGE)
    assert ("model", b"m") in bare.out.headers
    # a limit learnt lower before stays: a refusal only ever lowers it
    a.size_limits["out"] = size - 50
    big = _slot(offset=5)
    big.out = _response(big, 500)
    a.rescue(big, TOO_LARGE)
    a.rescue(big, TOO_LARGE)
    assert a.size_limits["out"] == size - 50
    # the same record read again (exactly-once rewinds): dead-lettered before sending
    again = _slot()
    again.out = _response(again, 10)
    a.emit(p, again)
    assert [s.topic for s in p.records] == ["in.dlq"]


def test_a_response_refused_alone_and_read_again_says_its_size_over_the_learnt_limit() -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot()
    slot.out = _response(slot, 500)
    size = record_size(slot.out)
    a.rescue(slot, TOO_LARGE)
    a.rescue(slot, TOO_LARGE)  # alone: the limit learnt is one byte less
    again = _slot()  # exactly-once rewinds: the same record, the same answer
    again.out = _response(again, 500)
    a.emit(p, again)
    (sent,) = p.records
    assert sent.header("error-message") == (
        f"the response: {size} bytes, over the limit of {size - 1} "
        "of topic 'out' (max.message.bytes)"
    )


def test_rescue_drops_a_refused_dead_letters_value_once_then_gives_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, slot = _answers(), _slot(value=b"r" * 50)
    slot.out = a.dead_letter(slot, DecodeError("bad"), None)
    assert a.rescue(slot, TOO_LARGE) is True  # with its batch: sent again alone
    assert slot.out.value == b"r" * 50
    assert a.rescue(slot, TOO_LARGE) is True
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "in[1]@3: dead letter too large to publish; value omitted"
    ]
    assert slot.out.value == b"" and dict(slot.out.headers)["value-omitted"] == b"50"
    assert a.rescue(slot, TOO_LARGE) is True  # the value-less letter, alone
    assert a.rescue(slot, TOO_LARGE) is False


def test_rescue_leaves_other_refusals_alone() -> None:
    a, slot = _answers(), _slot()
    slot.out = _response(slot, 10)
    assert a.rescue(slot, KafkaFailure("denied", name="TOPIC_AUTHORIZATION_FAILED")) is False
    assert a.rescue(slot, ValueError("not kafka")) is False
    assert slot.out.ok and a.size_limits == {}


def test_refresh_asks_the_admin_at_most_every_interval_and_keeps_a_known_count() -> None:
    clock = Clock()
    a, admin = _answers(clock), FakeAdmin()
    admin.partition_counts["out"] = 3
    admin.limits["out"] = 4096
    a.refresh(admin)
    assert a.partitions == {"out": 3, "in.dlq": None} and a.size_limits == {"out": 4096}
    admin.partition_counts["out"] = 6
    clock.sleep(METADATA_REFRESH_S - 1)
    a.refresh(admin)
    assert a.partitions["out"] == 3
    a.refresh(admin, force=True)
    assert a.partitions["out"] == 6
    del admin.partition_counts["out"]  # the admin cannot say now: keep what we knew
    clock.sleep(METADATA_REFRESH_S)
    a.refresh(admin)
    assert a.partitions["out"] == 6


@pytest.mark.parametrize("ok", [True, False])
def test_retire_counts_each_outcome_and_its_end_to_end_time_by_model_version(ok: bool) -> None:
    a, slot = _answers(), _slot()
    slot.series = a.metrics.series("m", 2)  # resolved at decode
    slot.out = _response(slot, 1) if ok else a.dead_letter(slot, DecodeError("x"), "m")
    a.retire([slot])
    status, error_type = ("ok", "") if ok else ("dlq", "decode-error")
    labels = {"model": "m", "version": "2"}
    assert _sample(a, "messages_total", status=status, error_type=error_type, **labels) == 1
    assert _sample(a, "end_to_end_seconds_sum", **labels) == pytest.approx(1.0)


def test_retire_observes_end_to_end_times_under_a_second_and_skips_records_without_one() -> None:
    a = _answers()  # wall clock at 2000.0 s
    series = a.metrics.series("m", 2)
    slots = [
        Slot(Record("in", 0, offset, b"k", b"v", [], ts))
        for offset, ts in enumerate([1_999_750, None, -1, 0])  # only the first has one
    ]
    for slot in slots:
        slot.series = series
        slot.out = _response(slot, 1)
    a.retire(slots)
    labels = {"model": "m", "version": "2"}
    assert _sample(a, "end_to_end_seconds_count", **labels) == 1
    assert _sample(a, "end_to_end_seconds_sum", **labels) == pytest.approx(0.25)
    assert _sample(a, "messages_total", status="ok", error_type="", **labels) == 4


def test_retire_counts_a_record_without_an_answer_as_failed() -> None:
    a, slot = _answers(), _slot()
    other = _slot(offset=9)
    other.out = _response(other, 500)
    a.rescue(other, TOO_LARGE)  # another answer waits to be sent alone meanwhile
    a.retire([slot])  # slot.out never set
    labels = {"model": "", "version": "", "error_type": ""}
    assert _sample(a, "messages_total", status="dlq", **labels) == 1


def test_a_retired_record_read_again_is_sent_as_usual_not_alone() -> None:
    a, p, slot = _answers(), FakeProducer({}), _slot()
    slot.out = _response(slot, 500)
    a.rescue(slot, TOO_LARGE)  # refused with its batch: sent again alone
    a.emit(p, slot)
    a.retire([slot])
    again = _slot()  # the same record, read again (a rewind)
    again.out = _response(again, 500)
    a.emit(p, again)
    assert p.calls == ["flush", "send", "flush", "send"]


def test_retire_counts_a_record_whose_model_never_resolved_without_its_name() -> None:
    a, slot = _answers(), _slot()
    slot.out = a.dead_letter(slot, ModelNotFound("no model 'typo'"), "typo")
    a.retire([slot])
    labels = {"model": "", "version": "", "error_type": "model-not-found"}
    assert _sample(a, "messages_total", status="dlq", **labels) == 1
    names = {s.labels.get("model") for m in a.metrics.registry.collect() for s in m.samples}
    assert "typo" not in names


def _request_record(model: str | None, header_error: str | None = None) -> Record:
    value, headers = encode_request(
        {"x": np.zeros((1, 3), np.float32)}, format="msgpack", model=model, request_id="r-1"
    )
    return Record("in", 0, 5, None, value, list(headers), 1, header_error=header_error)


def test_decode_reads_the_request_and_the_model_it_names() -> None:
    request, model = _answers().decode(_request_record("m"))
    assert model == "m" and request.request_id == "r-1"


def test_decode_falls_back_to_the_default_model() -> None:
    _, model = _answers(default_model="fallback").decode(_request_record(None))
    assert model == "fallback"


def test_decode_without_any_model_is_model_not_found() -> None:
    with pytest.raises(ModelNotFound, match="no model named"):
        _answers().decode(_request_record(None))


def test_headers_the_client_could_not_read_are_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="bad header"):
        _answers().decode(_request_record("m", header_error="bad header"))


def test_decode_holds_requests_to_the_request_limits() -> None:
    with pytest.raises(TooLarge):
        _answers(max_request_rows=0 + 1).decode(
            Record(
                "in",
                0,
                0,
                None,
                *encode_request({"x": np.zeros((2, 3), np.float32)}, format="msgpack", model="m"),
                1,
            )
        )


def test_decode_reads_the_model_from_the_header_and_a_json_id_from_the_key() -> None:
    record = _request_record(None)  # the body names no model
    record = Record("in", 0, 5, None, record.value, [*record.headers, ("model", b"hdr")], 1)
    assert _answers().decode(record)[1] == "hdr"
    value, headers = encode_request({"x": np.zeros((1, 3), np.float32)}, format="json", model="m")
    keyed = Record("in", 0, 5, b"key-id", value, list(headers), 1)
    assert _answers().decode(keyed)[0].request_id == "key-id"  # as in MLServer


def test_decode_without_any_model_says_how_to_name_one() -> None:
    with pytest.raises(ModelNotFound) as caught:
        _answers().decode(_request_record(None))
    assert caught.value.message == (
        "no model named: expected a `model` header or body field "
        "(or a worker started with --default-model)"
    )


def test_decode_holds_requests_to_the_request_byte_limit() -> None:
    record = _request_record("m")
    size = len(record.value or b"")
    assert _answers(max_request_bytes=size).decode(record)[1] == "m"
    with pytest.raises(TooLarge, match=f"{size} bytes, over the limit of {size - 1}"):
        _answers(max_request_bytes=size - 1).decode(record)


def _decoded(a: Answers, passthrough: object = None) -> Slot:
    """A slot whose request (offset 5, id r-1) is decoded and bound, as intake leaves it."""
    value, headers = encode_request(
        {"x": np.zeros((1, 3), np.float32)},
        format="msgpack",
        model="m",
        request_id="r-1",
        passthrough=passthrough,
    )
    slot = Slot(Record("in", 0, 5, b"key", value, list(headers), 1))
    slot.request, _ = a.decode(slot.record)
    slot.bound = Bound(feeds={}, rows=1, passthrough=passthrough)
    return slot


def test_a_response_names_its_model_version_and_source_and_carries_the_passthrough() -> None:
    a = _answers()
    slot = _decoded(a, passthrough={"trace": [1, "a"]})
    out = a.response(slot, "m", 2, {"y": np.array([[1.5]], np.float32)})
    assert (out.topic, out.key, out.ok) == ("out", b"key", True)
    body = msgpack.unpackb(out.value, raw=False)
    assert (body["id"], body["model"], body["model_version"]) == ("r-1", "m", 2)
    assert body["passthrough"] == {"trace": [1, "a"]}
    headers = dict(out.headers)
    assert (headers["model"], headers["model-version"]) == (b"m", b"2")
    assert (headers["source-topic"], headers["source-partition"]) == (b"in", b"0")
    assert headers["source-offset"] == b"5"


def test_a_response_is_written_in_the_configured_output_format() -> None:
    a = _answers(output_format="json")
    out = a.response(_decoded(a), "m", 2, {"y": np.array([[1.5]], np.float32)})
    assert dict(out.headers)["content-type"] == b"application/json"
    assert json.loads(out.value)["model_version"] == "2"


def test_a_slot_never_decoded_has_no_response() -> None:
    with pytest.raises(ValueError, match=r"^in\[1\]@3: no request to answer$"):
        _answers().response(_slot(), "m", 1, {})


def test_a_traced_response_carries_its_produce_span_naming_the_model_version() -> None:
    exporter = InMemorySpanExporter()
    a = _traced(exporter)
    slot = _decoded(a)
    slot.trace = Trace(Context(), None)
    slot.out = a.response(slot, "m", 2, {"y": np.array([[1.5]], np.float32)})
    headers = dict(slot.out.headers)
    assert headers["model-version"] == b"2" and headers["source-offset"] == b"5"
    a.retire([slot])
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert (attributes["topic"], attributes["partition"], attributes["offset"]) == ("in", 0, 5)
    assert (attributes["model"], attributes["version"]) == ("m", 2)
    traceparent = headers["traceparent"]
    assert traceparent is not None
    assert int(traceparent.decode().split("-")[2], 16) == span.context.span_id
