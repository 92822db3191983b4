"""inference-producer redrive: dead letters back to their topic, exactly once, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from producers.cli import main
from producers.errors import UsageError
from producers.redrive import REDRIVE_GROUP, parse_dead_letter, parse_time
from tests.conftest import BOTH_CLIENTS
from tests.harness import ROOT, committed, consume, consume_ids, header, settings, worker_thread
from worker.demo import DEMO_MODEL, write_demo_model

Headers = list[tuple[str, bytes]]

@pytest.fixture(params=BOTH_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Each broker test runs on both Kafka clients the tools can use."""
    return str(request.param)



def _block(source: str, partition: int, offset: int, error: str = "model-not-found",
           model: str | None = "m") -> Headers:
    """What the worker appends to a request's headers when it dead-letters it."""
    block = [("error-type", error.encode()), ("error-message", b"what went wrong"),
             ("source-topic", source.encode()), ("source-partition", str(partition).encode()),
             ("source-offset", str(offset).encode())]
    return block + ([("model", model.encode())] if model is not None else [])


# --- the header rule, without a broker ------------------------------------------


def test_only_the_dead_letters_own_headers_are_removed() -> None:
    # a request that is itself an upstream worker's answer: its own model and source-* stay
    own: Headers = [("request-id", b"r-1"), ("model", b"upstream-model"),
                    ("source-topic", b"upstream"), ("source-partition", b"4"),
                    ("raw", b"\xff\x00")]
    letter = parse_dead_letter([*own, *_block("requests", 2, 17, model="m")])
    assert letter is not None
    assert letter.headers == own
    assert (letter.error_type, letter.model, letter.source_topic, letter.source_partition) == (
        "model-not-found", "m", "requests", 2)
    assert letter.redrive_count == 0 and not letter.value_omitted


def test_retries_omitted_values_and_redrive_counts_are_read() -> None:
    own: Headers = [("request-id", b"r-2"), ("redrive-count", b"2"), ("model", b"a")]
    headers = [*own, ("error-attempts", b"3"), *_block("t", 0, 5, "inference-error", None),
               ("value-omitted", b"2000000")]
    letter = parse_dead_letter(headers)
    assert letter is not None
    assert letter.headers == [("request-id", b"r-2"), ("model", b"a")]  # count is re-added
    assert letter.model == "a"  # the worker added none: the request's own names it
    assert letter.redrive_count == 2 and letter.value_omitted
    assert parse_dead_letter([("request-id", b"r-3")]) is None
    # the worker's own order: error-attempts after the block it appended
    letter = parse_dead_letter([*own, *_block("t", 0, 5, "model-load-error"),
                                ("error-attempts", b"3")])
    assert letter is not None and letter.headers == [("request-id", b"r-2"), ("model", b"a")]
    assert (letter.error_type, letter.model) == ("model-load-error", "m")


def test_times_are_iso_8601_or_epoch_milliseconds() -> None:
    ms = int(datetime(2026, 12, 1, 15, 30, tzinfo=timezone.utc).timestamp() * 1000)
    assert parse_time("2026-12-01T15:30:00Z", "--since") == ms
    assert parse_time("2026-12-01T15:30:00", "--since") == ms  # no zone: UTC
    assert parse_time("2026-12-01T16:30:00+01:00", "--since") == ms
    assert parse_time(str(ms), "--since") == ms
    with pytest.raises(UsageError, match="--until 'yesterday': expected ISO-8601"):
        parse_time("yesterday", "--until")


# --- against the broker --------------------------------------------------------------


def _produce(bootstrap: str, topic: str,
             records: Sequence[tuple[bytes | None, bytes, Headers, int, int | None]]) -> None:
    """(key, value, headers, partition, timestamp_ms) records, in order."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        for key, value, headers, partition, ts in records:
            producer.send(topic, value=value, key=key, headers=headers, partition=partition,
                          timestamp_ms=ts)
        producer.flush()
    finally:
        producer.close()


def _letters(n: int, source: str, partitions: int = 1, **block: Any
             ) -> list[tuple[bytes | None, bytes, Headers, int, int | None]]:
    """n dead letters; r-i is on partition i % partitions at offset i // partitions."""
    return [(f"k{i}".encode(), f"v{i}".encode(),
             [("request-id", f"r-{i}".encode()), *_block(source, i % partitions, i, **block)],
             i % partitions, None) for i in range(n)]


def _ids(records: list[Any]) -> Counter[str]:
    return Counter(header(r, "request-id") or "" for r in records)


def _table(out: str) -> dict[tuple[str, str], int]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            rows[(parts[0], parts[1])] = int(parts[2])
    return rows


@pytest.mark.kafka
def test_a_missing_model_redriven_is_answered_exactly_once(
    kafka_bootstrap: str, kafka_client: str,
    new_topic: Callable[..., str], kafka_admin: Any, group_id: str,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from kafka.admin import NewTopic

    requests, answers = new_topic(partitions=2), new_topic()
    dlq = f"{requests}.dlq"
    kafka_admin.create_topics([NewTopic(dlq, 2, 1)])
    repo = tmp_path / "models"
    repo.mkdir()
    boot = ["--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client]
    try:
        assert main(["publish", *boot, "--topic", requests, "--format", "msgpack", "--model",
                     DEMO_MODEL, "--synthetic", "784", "--rows", "24", "--batch-rows", "2"]) == 0
        sent = consume(kafka_bootstrap, requests, 12)
        want = set(_ids(sent))
        assert len(want) == 12
        with worker_thread(settings(kafka_bootstrap, requests, answers, repo, group_id)):
            letters = consume(kafka_bootstrap, dlq, 12, timeout=60)
            assert {header(r, "error-type") for r in letters} == {"model-not-found"}
            # The fix: a model not found is never remembered (worker/repository.py,
            # worker/cache.py), so the next lookup, the redriven records', finds it.
            write_demo_model(repo)
            assert main(["redrive", *boot, "--dlq-topic", dlq, "--group-id", f"{group_id}-r"]
                        ) == 0
            got = consume_ids(kafka_bootstrap, answers, want, timeout=60, settle=3)
        assert _table(capsys.readouterr().out)[("model-not-found", DEMO_MODEL)] == 12
        assert _ids(got) == Counter(dict.fromkeys(want, 1))  # every request, exactly once
        for r in got:  # answers copy the request's headers: none of the dead letter's
            assert header(r, "error-type") is None and header(r, "error-message") is None
            assert header(r, "redrive-count") == "1"
        assert len(consume(kafka_bootstrap, dlq, 13, timeout=3)) == 12  # nothing failed again
        # a second run finds nothing left: its group committed past every dead letter
        assert main(["redrive", *boot, "--dlq-topic", dlq, "--group-id", f"{group_id}-r"]) == 0
        assert _table(capsys.readouterr().out) == {}
    finally:
        kafka_admin.delete_topics([dlq])


@pytest.mark.kafka
def test_republished_records_keep_key_value_headers_and_partition(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
) -> None:
    dlq, source = new_topic(partitions=2), new_topic(partitions=3)
    own: Headers = [("request-id", b"r-0"), ("model", b"own"), ("source-topic", b"upstream"),
                    ("binary", b"\x00\xff")]
    _produce(kafka_bootstrap, dlq, [(b"key", b"\x01value", [*own, *_block(source, 2, 9)], 1,
                                     None)])
    assert main(["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
                 "--dlq-topic", dlq,
                 "--group-id", group_id]) == 0
    [r] = consume(kafka_bootstrap, source, 1, timeout=30, settle=1)
    assert (r.key, r.value, r.partition) == (b"key", b"\x01value", 2)
    assert list(r.headers) == [*own, ("redrive-count", b"1")]


@pytest.mark.kafka
def test_max_then_rerun_sends_each_record_once(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dlq, source = new_topic(partitions=2), new_topic(partitions=2)
    _produce(kafka_bootstrap, dlq, _letters(30, source, partitions=2))
    args = ["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--dlq-topic", dlq,
            "--group-id", group_id]
    assert main([*args, "--max", "7"]) == 0
    out = capsys.readouterr().out
    assert _table(out) == {("model-not-found", "m"): 7}
    assert "left for a later run: at most 23" in out
    assert sum(o or 0 for o in committed(kafka_bootstrap, group_id, dlq).values()) == 7
    assert main(args) == 0
    assert _table(capsys.readouterr().out) == {("model-not-found", "m"): 23}
    got = consume(kafka_bootstrap, source, 31, timeout=5)
    assert _ids(got) == Counter({f"r-{i}": 1 for i in range(30)})


@pytest.mark.kafka
def test_a_killed_redrive_resumed_sends_everything_and_nothing_acknowledged_twice(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
) -> None:
    n = 60
    dlq, source = new_topic(partitions=2), new_topic(partitions=2)
    _produce(kafka_bootstrap, dlq, _letters(n, source, partitions=2))
    args = ["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--dlq-topic", dlq,
            "--group-id", group_id]
    proc = subprocess.Popen([sys.executable, "-m", "producers.cli", *args, "--rate", "15"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        consume(kafka_bootstrap, source, 15, timeout=60)  # about a second into the run
        # Freeze it, then see what the broker holds: records on the target topic
        # whose dead letter is at or after the committed offset were acknowledged
        # (or in flight) but not committed, the only ones a rerun may send again.
        os.kill(proc.pid, signal.SIGSTOP)
        offsets = committed(kafka_bootstrap, group_id, dlq)
        before = _ids(consume(kafka_bootstrap, source, n, timeout=3))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = sum(o or 0 for o in offsets.values())
    assert 0 < done < n, offsets  # really interrupted half-way
    uncommitted = {f"r-{i}" for i in range(n) if i // 2 >= (offsets[i % 2] or 0)}
    unacked_but_sent = set(before) & uncommitted
    assert len(unacked_but_sent) <= 1  # paced: one record at a time between ack and commit

    assert main(args) == 0
    after = _ids(consume(kafka_bootstrap, source, n + 5, timeout=5))
    assert set(after) == {f"r-{i}" for i in range(n)}  # everything sent
    twice = {rid for rid, c in after.items() if c > 1}
    assert twice <= unacked_but_sent, twice  # nothing committed was sent again
    assert max(after.values()) <= 2


@pytest.mark.kafka
def test_dry_run_prints_the_table_and_sends_nothing(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dlq, source = new_topic(), new_topic()
    t0 = (int(time.time()) - 3600) * 1000
    mix = [("decode-error", "a")] * 3 + [("model-not-found", "b")] * 4 + [
        ("model-not-found", "a")] * 2
    _produce(kafka_bootstrap, dlq, [
        (None, b"v", [("request-id", f"r-{i}".encode()), *_block(source, 0, i, e, m)], 0,
         t0 + i * 1000) for i, (e, m) in enumerate(mix)])
    args = ["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--dlq-topic", dlq,
            "--group-id", group_id, "--dry-run"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "record/s" not in err  # no progress bar when stderr is not a terminal
    assert _table(out) == {("model-not-found", "b"): 4, ("decode-error", "a"): 3,
                           ("model-not-found", "a"): 2}
    lines = out.splitlines()
    assert lines[0].split() == ["error-type", "model", "would", "send"]
    assert lines[4].split() == ["total", "9"]
    assert main([*args, "--error-type", "model-not-found", "--model", "a"]) == 0
    out = capsys.readouterr().out
    assert _table(out) == {("model-not-found", "a"): 2}
    assert "passed over): 7" in out
    since = datetime.fromtimestamp((t0 + 3000) / 1000, tz=timezone.utc).isoformat()
    assert main([*args, "--since", since, "--until", str(t0 + 6000)]) == 0  # records 3, 4, 5
    assert _table(capsys.readouterr().out) == {("model-not-found", "b"): 3}
    assert main([*args, "--progress"]) == 0
    assert "9/9" in capsys.readouterr().err  # the bar, forced
    assert consume(kafka_bootstrap, source, 1, timeout=3) == []  # nothing sent
    assert committed(kafka_bootstrap, group_id, dlq) == {0: None}  # nothing committed


@pytest.mark.kafka
def test_records_redriven_three_times_are_refused_unless_forced(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dlq, source = new_topic(), new_topic()
    _produce(kafka_bootstrap, dlq, [
        (None, b"v", [("request-id", f"r-{c}".encode()), ("redrive-count", str(c).encode()),
                      *_block(source, 0, c)], 0, None) for c in (2, 3, 5)])
    args = ["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--dlq-topic", dlq]
    assert main([*args, "--group-id", group_id]) == 0
    out = capsys.readouterr().out
    assert _table(out) == {("model-not-found", "m"): 1}
    assert "refused, redriven 3 times already (--force sends it): 2" in out
    [r] = consume(kafka_bootstrap, source, 1, timeout=30, settle=2)
    assert (header(r, "request-id"), header(r, "redrive-count")) == ("r-2", "3")

    assert main([*args, "--group-id", f"{group_id}-forced", "--force"]) == 0
    assert _table(capsys.readouterr().out) == {("model-not-found", "m"): 3}
    got = consume(kafka_bootstrap, source, 4, timeout=30, settle=2)
    assert sorted((header(r, "request-id"), header(r, "redrive-count")) for r in got) == [
        ("r-2", "3"), ("r-2", "3"), ("r-3", "4"), ("r-5", "6")]


@pytest.mark.kafka
def test_exactly_once_redrive_killed_and_resumed_is_seen_once_by_read_committed(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    n = 40
    dlq, source = new_topic(partitions=2), new_topic(partitions=2)
    _produce(kafka_bootstrap, dlq, _letters(n, source, partitions=2))
    args = ["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--dlq-topic", dlq, "--group-id", group_id, "--exactly-once"]
    proc = subprocess.Popen([sys.executable, "-m", "producers.cli", *args, "--rate", "20"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        consume(kafka_bootstrap, source, 10, timeout=60, isolation="read_committed")
        proc.send_signal(signal.SIGKILL)  # wherever it is: mid-transaction or between
    finally:
        proc.kill()
        proc.wait()
    first = sum(o or 0 for o in committed(kafka_bootstrap, group_id, dlq).values())
    assert 0 < first < n  # really interrupted half-way

    assert main(args) == 0  # a fresh producer with the same id aborts the open transaction
    assert _table(capsys.readouterr().out) == {("model-not-found", "m"): n - first}
    got = consume(kafka_bootstrap, source, n + 1, timeout=5, isolation="read_committed")
    assert _ids(got) == Counter({f"r-{i}": 1 for i in range(n)})
    assert sum(o or 0 for o in committed(kafka_bootstrap, group_id, dlq).values()) == n


@pytest.mark.kafka
def test_an_open_transaction_left_by_a_killed_redrive_is_aborted_before_offsets_are_read(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # What a redrive killed between send_offsets_to_transaction and
    # commit_transaction leaves: pending offsets that make the group's committed
    # offsets "unstable" until the transaction ends. The next run must abort it
    # (init_transactions with the same id) before it reads them, not time out.
    import confluent_kafka as ck

    n = 6
    dlq, source = new_topic(), new_topic()
    _produce(kafka_bootstrap, dlq, _letters(n, source))
    left = ck.Producer({"bootstrap.servers": kafka_bootstrap,
                        "transactional.id": f"{REDRIVE_GROUP}.{group_id}.{dlq}"})
    left.init_transactions(30)
    left.begin_transaction()
    left.produce(source, b"never committed", headers=[("request-id", b"orphan")])
    meta = ck.Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
    left.send_offsets_to_transaction([ck.TopicPartition(dlq, 0, 3)],
                                     meta.consumer_group_metadata(), 30)
    meta.close()
    left.flush(10)  # the transaction stays open: no commit, no abort

    args = ["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--dlq-topic", dlq, "--group-id", group_id, "--exactly-once"]
    assert main(args) == 0
    assert _table(capsys.readouterr().out) == {("model-not-found", "m"): n}  # from offset 0
    got = consume(kafka_bootstrap, source, n + 1, timeout=5, isolation="read_committed")
    assert _ids(got) == Counter({f"r-{i}": 1 for i in range(n)})
    assert committed(kafka_bootstrap, group_id, dlq) == {0: n}


@pytest.mark.kafka
def test_ctrl_c_commits_what_was_sent(
    kafka_bootstrap: str, kafka_client: str, new_topic: Callable[..., str], group_id: str,
) -> None:
    n = 40
    dlq, source = new_topic(), new_topic()
    _produce(kafka_bootstrap, dlq, _letters(n, source))
    args = ["redrive", "--bootstrap-servers", kafka_bootstrap, "--kafka-client", kafka_client,
            "--dlq-topic", dlq, "--group-id", group_id]
    proc = subprocess.Popen([sys.executable, "-m", "producers.cli", *args, "--rate", "10"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        consume(kafka_bootstrap, source, 5, timeout=60)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert code == 130, err
    assert "interrupted" in err
    sent = _ids(consume(kafka_bootstrap, source, n, timeout=3))
    assert committed(kafka_bootstrap, group_id, dlq) == {0: len(sent)}  # all, and only, sent
    assert main(args) == 0
    assert _ids(consume(kafka_bootstrap, source, n + 1, timeout=5)) == Counter(
        {f"r-{i}": 1 for i in range(n)})
