"""The whole loop on fake clients (tests/fakes.py): no broker, the real model runs.

Each test starts a :class:`~worker.loop.Worker` with ``clients=`` the fakes
and watches what lands on the fake topics and what the fake group commits.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fakes import FakeKafka, FakeProducer
from worker.answers import RECORD_OVERHEAD
from worker.commit import COVER_AHEAD
from worker.demo import write_demo_model
from worker.errors import ConfigError, FatalError, ModelLoadError
from worker.flow import POLL_RECORDS
from worker.kafka import KafkaFailure, Metadata, TopicPartition, TransactionFailed
from worker.loop import Worker
from worker.observability import Metrics
from worker.protocol import encode_request
from worker.recovery import CLEAN, RUNNING, try_marker
from worker.repository import ModelRef
from worker.runtime import RuntimeOptions, Session, load_session
from worker.settings import Settings

IN0 = TopicPartition("in", 0)
IN1 = TopicPartition("in", 1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    write_demo_model(path)
    return path


def _settings(repo: Path, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "input_topics": ("in",),
        "metrics_bind": "127.0.0.1",
        "device": "cpu",
        "drain_timeout_s": 10.0,
    }
    return Settings(
        output_topic="out",
        model_repository=repo,
        metrics_port=0,
        **{**defaults, **overrides},
    )


def _produce(kafka: FakeKafka, tp: TopicPartition, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        value, headers = encode_request(
            {"x": np.full((1, 784), i / 100, np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id=f"{tp.partition}-{i}",
        )
        kafka.consumer.append(tp, value, f"k{i}".encode(), headers)


def _until(what: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Serving:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.rc: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def _run(self) -> None:
        try:
            self.rc = self.worker.run()
        except BaseException as exc:
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


@contextmanager
def serving(
    repo: Path, kafka: FakeKafka, loader: Any = load_session, **overrides: Any
) -> Iterator[Serving]:
    """The worker in a thread; stopped (and its drain waited for) on exit."""
    s = Serving(Worker(_settings(repo, **overrides), clients=kafka.clients, loader=loader))
    s.thread.start()
    try:
        yield s
    finally:
        s.worker.stop()
        s.thread.join(30)
        assert s.done, "the worker did not stop within 30 s"


def _is_try(metadata: Metadata) -> bool:
    return isinstance(metadata, str) and metadata.startswith("try:")


def _ids(kafka: FakeKafka, topic: str) -> list[str | None]:
    return [s.header("request-id") for s in kafka.landed(topic)]


def _get(port: int | None, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET ``path`` from the worker's metrics server: the status and the body."""
    assert port is not None
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _later(when: Callable[[], object], then: Callable[[], None], timeout: float = 20.0) -> None:
    """``then()`` on another thread once ``when()`` holds (not at all after ``timeout``)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not when():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        then()

    threading.Thread(target=watch, name="later", daemon=True).start()


def _run_here(worker: Worker, limit_s: float = 20.0, **bounds: Any) -> tuple[int, bool]:
    """``worker.run(**bounds)`` on this thread (the main one, as the CLI runs it); a
    timer stops it after ``limit_s``. Returns its status and whether the timer had to."""
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        worker.stop()

    timer = threading.Timer(limit_s, stop)
    timer.start()
    try:
        rc = worker.run(**bounds)
    finally:
        timer.cancel()
    return rc, stopped.is_set()


# -- records in, answers and dead letters out ----------------------------------------------------


def test_records_in_answers_and_dead_letters_out_and_everything_committed(repo: Path) -> None:
    kafka = FakeKafka()
    kafka.admin.partition_counts.update({"out": 2, "in.dlq": 2})
    _produce(kafka, IN0, 5)
    kafka.consumer.append(IN1, b"not a request", b"bad")
    idle = Worker(_settings(repo), clients=kafka.clients)
    assert idle.assignment() == set() and idle.metrics_port is None  # not running
    with serving(repo, kafka) as s:
        _until(lambda: kafka.group.get(IN0) == 5 and kafka.group.get(IN1) == 1)
        assert s.worker.assignment() == {IN0, IN1}
    assert sorted(_ids(kafka, "out")) == [f"0-{i}" for i in range(5)]
    (dead,) = kafka.landed("in.dlq")
    assert dead.header("error-type") == "decode-error"
    assert (dead.key, dead.value, dead.partition) == (b"bad", b"not a request", 1)
    assert all(s.header("content-type") for s in kafka.landed("out"))
    # answers keep their key and go to the input's partition
    assert {(s.key, s.partition) for s in kafka.landed("out")} == {
        (f"k{i}".encode(), 0) for i in range(5)
    }


def test_a_request_that_finds_the_runs_idle_never_waits_for_the_batching_delay(
    repo: Path,
) -> None:
    kafka = FakeKafka()
    with serving(repo, kafka, max_batch_delay_ms=600_000.0):  # ten minutes of "company"
        for i in range(3):  # one at a time: each finds every run slot free
            _produce(kafka, IN0, 1, first=i)
            _until(lambda i=i: len(kafka.landed("out")) == i + 1)
    assert _ids(kafka, "out") == ["0-0", "0-1", "0-2"]


def test_requests_polled_while_every_run_slot_is_busy_are_coalesced_into_one_batch(
    repo: Path,
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    loader = SlowLoader(slow_x=0.0, seconds=1.5)  # record 0 holds the only run slot
    with serving(repo, kafka, loader=loader, max_batch_delay_ms=600_000.0, inline_below_ms=0) as s:
        assert loader.running.wait(10)
        for i in range(1, 4):  # one poll each while record 0 runs
            _produce(kafka, IN0, 1, first=i)
            _until(lambda i=i: kafka.consumer.positions.get(IN0) == i + 1)
        _until(lambda: kafka.group.get(IN0) == 4)
    # record 0's run, then one run of the three that waited for the slot
    assert _sample(s.worker.metrics, "batch_rows_count", **MV) == 2
    assert _ids(kafka, "out") == [f"0-{i}" for i in range(4)]


def test_on_one_cpu_thread_a_run_that_waits_is_timed_by_its_cpu_time_and_goes_inline(
    repo: Path,
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    loader = SlowLoader(slow_x=0.0, seconds=0.3)  # 0.3 s of waiting, no CPU time
    with serving(repo, kafka, loader=loader, inline_below_ms=50.0) as s:
        _until(lambda: kafka.group.get(IN0) == 1)
        _produce(kafka, IN0, 1, first=1)
        _until(lambda: kafka.group.get(IN0) == 2)
    assert _sample(s.worker.metrics, "inline_batches_total") == 1  # the second run


def test_offsets_are_committed_only_after_the_answers_are_acknowledged(repo: Path) -> None:
    kafka = FakeKafka()
    kafka.setup = lambda p: setattr(p, "hold_all", True)
    _produce(kafka, IN0, 3)
    with serving(repo, kafka, commit_interval_ms=0):
        _until(lambda: kafka.producers and len(kafka.producer.records) == 3)
        time.sleep(0.3)  # many commit rounds
        assert kafka.group.get(IN0, 0) == 0  # answered, sent, not acknowledged: not committed
        kafka.producer.hold_all = False
        _until(lambda: kafka.group.get(IN0) == 3)
    assert _ids(kafka, "out") == ["0-0", "0-1", "0-2"]


def test_a_refused_answer_stops_the_worker_and_nothing_at_or_after_it_is_committed(
    repo: Path,
) -> None:
    kafka = FakeKafka()

    def refuse(p: FakeProducer) -> None:
        p.refuse_topic["out"] = KafkaFailure("not authorised", name="TOPIC_AUTHORIZATION_FAILED")

    kafka.setup = refuse
    _produce(kafka, IN0, 3)
    with serving(repo, kafka) as s:
        _until(lambda: s.done)
    assert isinstance(s.error, FatalError) and "refused an answer" in str(s.error)
    assert kafka.group.get(IN0, 0) == 0
    assert kafka.landed("out") == []


def test_exactly_once_answers_and_offsets_land_together_in_transactions(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 3)
    kafka.consumer.append(IN0, b"not a request")
    with serving(repo, kafka, exactly_once=True):
        _until(lambda: kafka.group.get(IN0) == 4)
    assert kafka.configs[1].transactional_id is not None  # the producer, opened second
    assert kafka.producer.calls[0] == "init_transactions"
    assert _ids(kafka, "out") == ["0-0", "0-1", "0-2"] and len(kafka.landed("in.dlq")) == 1
    sent = [v for values, *_ in kafka.producer.transactions for v in values]
    assert len(sent) == 4  # every answer and dead letter went out in a transaction
    assert kafka.producer.transactions[-1][1] == {IN0: 4}


# -- start-up: the metrics port, readiness, configuration errors ----------------------------------


def test_the_metrics_server_listens_on_metrics_bind_only_and_the_serving_line_names_it(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    try:  # the loopback /8 is this host's on Linux, not on every system
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        pytest.skip("127.0.0.2 is not an address of this host")
    kafka = FakeKafka()
    more = TopicPartition("more", 0)
    _produce(kafka, IN0, 1)
    _produce(kafka, more, 1)
    with (
        caplog.at_level("INFO", "worker"),
        serving(repo, kafka, input_topics=("in", "more"), metrics_bind="127.0.0.2") as s,
    ):
        _until(lambda: kafka.group.get(IN0) == 1 and kafka.group.get(more) == 1)
        port = s.worker.metrics_port
        assert _get(port, "/healthz", host="127.0.0.2")[0] == 200
        with pytest.raises(ConnectionRefusedError):
            _get(port, "/healthz", host="127.0.0.1")  # not every address: only the one asked
    assert (
        "serving in,more -> out (dlq in.dlq, group inference-worker, device cpu, "
        f"client confluent, metrics :{port})"
    ) in caplog.messages
    assert "assigned in[0], more[0]" in caplog.messages


def test_ready_once_the_preloads_are_loaded_and_the_broker_answered(repo: Path) -> None:
    kafka = FakeKafka()
    loads: list[tuple[str, int, bool]] = []

    def loader(ref: ModelRef, options: RuntimeOptions) -> Session:
        loads.append((ref.name, ref.version, kafka.consumer.handler is None))
        return load_session(ref, options)

    with serving(repo, kafka, loader=loader, preload="mnist-mlp") as s:
        _until(lambda: s.worker.metrics_port is not None or s.done, timeout=10)
        port = s.worker.metrics_port
        _until(lambda: _get(port, "/readyz")[0] == 200 or s.done, timeout=10)
        assert _get(port, "/readyz") == (200, "ready\n")
        assert _get(port, "/v2/health/ready")[0] == 200
        # the Open Inference Protocol's metadata, read from the repository
        status, body = _get(port, "/v2/models/mnist-mlp")
        assert status == 200 and json.loads(body)["name"] == "mnist-mlp"
        assert _sample(s.worker.metrics, "model_cache_models") == 1
    assert s.error is None
    assert loads == [("mnist-mlp", 1, True)]  # loaded before the group was joined


@pytest.mark.parametrize("preload", ["mnist-mlp:7", "no-such-model"])
def test_a_preload_the_repository_lacks_is_a_config_error_naming_preload(
    repo: Path, preload: str
) -> None:
    with serving(repo, FakeKafka(), preload=preload) as s:
        _until(lambda: s.done)
    assert isinstance(s.error, ConfigError), s.error
    assert s.error.flag == "--preload"
    name = preload.partition(":")[0]
    assert s.error.reason.startswith(f"{name}: model {name!r} "), s.error.reason


def test_a_device_that_cannot_be_used_is_a_config_error_naming_device(repo: Path) -> None:
    with serving(repo, FakeKafka(), device="cuda:99") as s:
        _until(lambda: s.done)
    assert isinstance(s.error, ConfigError), s.error
    assert s.error.flag == "--device"
    # the flag named once, in front: "--device: cuda:99: ..."
    assert str(s.error).startswith("--device: cuda:99: "), s.error
    assert str(s.error).count("--device") == 1, s.error


def test_liveness_fails_when_commits_stall_for_the_groups_session_timeout(repo: Path) -> None:
    kafka = FakeKafka()
    kafka.setup = lambda p: setattr(p, "hold_all", True)  # no answer is acknowledged
    _produce(kafka, IN0, 2)
    with serving(repo, kafka, kafka_properties={"session.timeout.ms": "400"}) as s:
        _until(lambda: kafka.producers and len(kafka.producer.records) == 2)
        port = s.worker.metrics_port
        _until(lambda: _get(port, "/healthz")[0] == 503, timeout=5)
        status, why = _get(port, "/healthz")
        assert status == 503
        assert why.startswith("commits stalled: 2 records pending"), why
        assert why.rstrip().endswith("(limit 0.4 s)"), why
        kafka.producer.hold_all = False
        _until(lambda: kafka.group.get(IN0) == 2)
        assert _get(port, "/healthz")[0] == 200


# -- run() on the main thread, as the CLI runs it: its bounds, SIGTERM ----------------------------


def test_run_returns_once_count_records_are_committed(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    worker = Worker(_settings(repo), clients=kafka.clients)

    # the rest once the first two are committed: the count spans commits
    _later(lambda: kafka.group.get(IN0) == 2, lambda: _produce(kafka, IN0, 3, first=2))
    before = signal.getsignal(signal.SIGTERM)
    assert _run_here(worker, count=5) == (0, False)  # returned by itself
    assert worker.committed_records == 5 and kafka.group[IN0] == 5
    assert signal.getsignal(signal.SIGTERM) is before  # its handlers are undone


def test_run_returns_after_timeout_seconds_having_answered_what_it_polled(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    worker = Worker(_settings(repo), clients=kafka.clients)
    started = time.monotonic()
    assert _run_here(worker, timeout=0.5) == (0, False)
    assert time.monotonic() - started >= 0.5
    assert kafka.group[IN0] == 2 and _ids(kafka, "out") == ["0-0", "0-1"]


def test_sigterm_stops_the_worker_which_drains_and_returns_0(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 3)
    worker = Worker(_settings(repo), clients=kafka.clients)
    before = signal.getsignal(signal.SIGTERM)

    # SIGTERM once all is committed, and never without the worker's handler in place
    _later(
        lambda: kafka.group.get(IN0) == 3 and signal.getsignal(signal.SIGTERM) is not before,
        lambda: os.kill(os.getpid(), signal.SIGTERM),
    )
    assert _run_here(worker) == (0, False)  # stopped by the signal, not by the timer
    assert kafka.consumer.commits[-1] == ({IN0: 3}, CLEAN)
    assert signal.getsignal(signal.SIGTERM) is before


# -- revocation -----------------------------------------------------------------------------------


def test_at_least_once_revocation_commits_what_was_answered(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 4)
    _produce(kafka, IN1, 2)
    # No commit comes due while serving: only the revocations can commit the answers.
    with serving(repo, kafka, commit_interval_ms=600_000) as s:
        _until(lambda: len(kafka.landed("out")) == 6)
        assert kafka.group.get(IN0) == 0  # the start, committed at assignment
        kafka.consumer.rebalance("revoke", [IN1])
        _until(lambda: IN1 not in kafka.consumer.assigned)
        assert kafka.consumer.commits[-1] == ({IN1: 2}, CLEAN)
        assert s.worker.committed_records == 2  # the revocation's records count as committed
        kafka.consumer.rebalance("revoke", [IN0])
        _until(lambda: IN0 not in kafka.consumer.assigned)
        assert kafka.consumer.commits[-1] == ({IN0: 4}, CLEAN)
        assert s.worker.committed_records == 6
    assert kafka.group[IN0] == 4 and kafka.group[IN1] == 2


@pytest.mark.parametrize("exactly_once", [False, True])
def test_records_polled_in_the_call_that_revoked_their_partition_are_left_to_its_next_read(
    repo: Path, exactly_once: bool
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    with serving(repo, kafka, exactly_once=exactly_once, commit_interval_ms=50):
        _until(lambda: len(kafka.landed("out")) == 2 and kafka.group.get(IN0) == 2)
        with kafka.consumer.lock:
            # librdkafka returns records fetched before a revocation from the same
            # consume() that ran the callback: they are no longer this member's.
            kafka.consumer.rebalance("revoke", [IN0], late=True)
            _produce(kafka, IN0, 3, first=2)
            # given back in the next poll: read again from the offset committed, 2
            kafka.consumer.rebalance("assign", [IN0])
        _until(lambda: kafka.group.get(IN0) == 5)
    # each answered once: the stale copies were dropped, not answered beside the new ones
    assert sorted(_ids(kafka, "out")) == [f"0-{i}" for i in range(5)]


def test_exactly_once_revocation_abandons_uncommitted_work_and_commits_nothing(
    repo: Path,
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 4)
    with serving(repo, kafka, exactly_once=True, commit_interval_ms=600_000) as s:
        _until(lambda: kafka.consumer.positions.get(IN0) == 4 and kafka.group.get(IN0) == 0)
        _until(lambda: s.worker._tracker.answered([IN0]))
        before = list(kafka.consumer.commits)
        kafka.consumer.rebalance("revoke", [IN0])
        _until(lambda: IN0 not in kafka.consumer.assigned)
        # the next owner answers them again, in its own transaction
        assert kafka.consumer.commits == before
        assert kafka.group[IN0] == 0
    assert kafka.producer.transactions == [] and kafka.landed("out") == []


def test_a_revocation_forces_out_the_batches_waiting_for_a_run_slot_and_waits_no_longer(
    repo: Path,
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    loader = SlowLoader(slow_x=0.0, seconds=0.5)  # record 0 holds the only run slot
    settings = {"max_batch_delay_ms": 600_000.0, "inline_below_ms": 0, "drain_timeout_s": 8.0}
    with serving(repo, kafka, loader=loader, commit_interval_ms=600_000, **settings):
        assert loader.running.wait(10)
        _produce(kafka, IN0, 1, first=1)  # polled while record 0 runs: waits for the slot
        _until(lambda: kafka.consumer.positions.get(IN0) == 2)
        started = time.monotonic()
        kafka.consumer.rebalance("revoke", [IN0])
        _until(lambda: IN0 not in kafka.consumer.assigned)
        took = time.monotonic() - started
        assert kafka.consumer.commits[-1] == ({IN0: 2}, CLEAN)  # both answered and committed
    assert _ids(kafka, "out") == ["0-0", "0-1"]
    assert took < 4.0, took  # as soon as they were answered, not after --drain-timeout


# -- backpressure ---------------------------------------------------------------------------------


def test_backpressure_pauses_the_fullest_partitions_and_resumes_them(repo: Path) -> None:
    kafka = FakeKafka()
    kafka.setup = lambda p: setattr(p, "hold_all", True)
    _produce(kafka, IN0, 12)
    _produce(kafka, IN1, 2)
    one = len(kafka.consumer.log[IN0][0].value or b"")
    with serving(repo, kafka, max_inflight_bytes=4 * one, commit_interval_ms=0):
        # acknowledgements held: the budget stays spent, and after a second IN0 pauses
        _until(lambda: any(IN0 in p for p in kafka.consumer.pauses), timeout=10)
        assert IN0 in kafka.consumer.paused
        kafka.producer.hold_all = False
        _until(lambda: kafka.group.get(IN0) == 12 and kafka.group.get(IN1) == 2)
        assert any(IN0 in r for r in kafka.consumer.resumes)
        assert IN0 not in kafka.consumer.paused


def test_with_the_budget_spent_acknowledged_answers_are_committed_at_once(repo: Path) -> None:
    # The loop waiting for acknowledgements on a spent budget commits them as they come,
    # not at the next --commit-interval (ten minutes here). What is acknowledged once the
    # budget has room again (at most the 4 requests it holds) waits for the interval: CI
    # once saw the last acknowledgement freed the budget in step 6's unforced commit and
    # sat there (offset 11 of 12, and once 2 of 12), until the drain.
    kafka = FakeKafka(latency_s=0.2)
    _produce(kafka, IN0, 12)
    one = len(kafka.consumer.log[IN0][0].value or b"")
    with serving(repo, kafka, max_inflight_bytes=4 * one, commit_interval_ms=600_000):
        _until(lambda: kafka.group.get(IN0, 0) >= 12 - 4, timeout=10)
    assert _ids(kafka, "out") == [f"0-{i}" for i in range(12)]
    assert kafka.group.get(IN0) == 12  # the drain committed the rest


# -- transient failures ---------------------------------------------------------------------------


class FlakyLoader:
    """Fails the first ``fails`` loads as a model file still being written would."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.calls = 0

    def __call__(self, ref: ModelRef, options: RuntimeOptions) -> Session:
        self.calls += 1
        if self.calls <= self.fails:
            raise ModelLoadError(f"model {ref}: half written")
        return load_session(ref, options)


def test_a_retry_that_succeeds_answers_and_holds_its_partition_meanwhile(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    loader = FlakyLoader(fails=1)
    with (
        caplog.at_level("WARNING", "worker"),
        serving(repo, kafka, loader=loader, retry_backoff_ms=50),
    ):
        _until(lambda: kafka.group.get(IN0) == 1)
    # the flag's backoff, in seconds
    assert any(m.endswith("; retry 1 of 3 in 0.05 s") for m in caplog.messages), caplog.text
    assert _ids(kafka, "out") == ["0-0"] and kafka.landed("in.dlq") == []
    assert loader.calls == 2
    assert any(IN0 in p for p in kafka.consumer.pauses)  # nothing new while waiting
    assert any(IN0 in r for r in kafka.consumer.resumes)


def test_a_retry_that_keeps_failing_dead_letters_after_the_last_attempt(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    loader = FlakyLoader(fails=100)
    with serving(repo, kafka, loader=loader, retry_backoff_ms=10, retry_attempts=2):
        _until(lambda: kafka.group.get(IN0) == 1)
    (dead,) = kafka.landed("in.dlq")
    assert dead.header("error-type") == "model-load-error"
    assert dead.header("error-attempts") == "3"
    assert kafka.landed("out") == []


def test_a_partition_waiting_for_a_retry_takes_nothing_new_until_the_retry(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    flaky = FlakyLoader(fails=1)
    at_load: list[int | None] = []  # IN0's fetch position at each load

    def loader(ref: ModelRef, options: RuntimeOptions) -> Session:
        at_load.append(kafka.consumer.positions.get(IN0))
        return flaky(ref, options)

    with serving(repo, kafka, loader=loader, retry_backoff_ms=300):
        _until(lambda: flaky.calls == 1)
        _produce(kafka, IN0, 1, first=1)  # comes while record 0 waits for its retry
        _until(lambda: kafka.group.get(IN0) == 2)
    assert at_load == [1, 1]  # record 1 was not polled before record 0's retry
    assert _ids(kafka, "out") == ["0-0", "0-1"]


def test_a_record_waiting_for_its_retry_when_a_transaction_aborts_runs_once(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The abort rewinds its partition: the copy waiting for its retry is dropped, and
    # the record read again after the seek is the one that runs.
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    kafka.consumer.log[IN1] = []  # assigned, empty for now
    loader = FlakyLoader(fails=1)
    with (
        caplog.at_level("WARNING", "worker"),
        serving(repo, kafka, loader=loader, exactly_once=True, retry_backoff_ms=1000) as s,
    ):
        _until(lambda: any(" retry 1 of 3 " in m for m in caplog.messages))
        kafka.producer.fail["commit_transaction"] = TransactionFailed("abortable", name="_X")
        kafka.consumer.append(IN1, b"not a request")  # its dead letter's transaction aborts
        _until(lambda: kafka.group.get(IN0) == 1 and kafka.group.get(IN1) == 1)
    assert "abort_transaction" in kafka.producer.calls and (IN0, 0) in kafka.consumer.seeks
    assert _ids(kafka, "out") == ["0-0"]
    assert _sample(s.worker.metrics, "rows_total", **MV) == 1  # run once, not twice


# -- size limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["topic config", "broker refusal"])
def test_an_answer_over_the_output_topics_limit_becomes_a_dead_letter(repo: Path, who: str) -> None:
    kafka = FakeKafka()
    if who == "topic config":
        kafka.admin.limits["out"] = 200
    else:  # the admin does not know; the broker refuses the send
        kafka.setup = lambda p: p.max_bytes.update({"out": 20})
    _produce(kafka, IN0, 2)
    with serving(repo, kafka):
        _until(lambda: kafka.group.get(IN0) == 2)
    assert kafka.landed("out") == []
    dead = kafka.landed("in.dlq")
    assert [d.header("request-id") for d in dead] == ["0-0", "0-1"]
    assert {d.header("error-type") for d in dead} == {"too-large"}


@pytest.mark.parametrize("exactly_once", [False, True])
def test_answers_that_fit_are_batched_within_the_topics_limit(
    repo: Path, exactly_once: bool
) -> None:
    # The broker checks max.message.bytes against a whole batch: answers that each fit
    # all land when the producer's batches are cut below the smallest limit.
    kafka = FakeKafka()
    kafka.admin.limits["out"] = 1000
    kafka.setup = lambda p: p.max_bytes.update({"out": 1000})
    _produce(kafka, IN0, 40)
    with serving(repo, kafka, exactly_once=exactly_once):
        _until(lambda: kafka.group.get(IN0) == 40)
    assert _ids(kafka, "out") == [f"0-{i}" for i in range(40)]
    assert kafka.landed("in.dlq") == []
    producers = [c for c in kafka.configs if c.client_id.endswith("-producer")]
    assert producers and all(c.batch_max_bytes == 1000 - RECORD_OVERHEAD for c in producers)
    refused = [v for p in kafka.producers for v, d in p.sent if d.error is not None]
    assert refused == []  # no batch was ever over the limit


@pytest.mark.parametrize("exactly_once", [False, True])
def test_an_answer_refused_with_its_batch_is_sent_again_alone_not_dead_lettered(
    repo: Path, exactly_once: bool
) -> None:
    # The admin does not know the limit (batches are cut at librdkafka's default):
    # whole batches are refused, each answer then goes alone, and all land.
    kafka = FakeKafka()
    kafka.setup = lambda p: p.max_bytes.update({"out": 1000})
    _produce(kafka, IN0, 40)
    with serving(repo, kafka, exactly_once=exactly_once):
        _until(lambda: kafka.group.get(IN0) == 40)
    assert sorted(_ids(kafka, "out"), key=lambda i: int(str(i)[2:])) == [
        f"0-{i}" for i in range(40)
    ]
    assert kafka.landed("in.dlq") == []
    refused = [v for p in kafka.producers for v, d in p.sent if d.error is not None]
    assert refused  # batches were refused: the answers went again, alone


def test_a_lower_limit_found_by_a_refresh_gets_a_producer_with_smaller_batches(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.answers.METADATA_REFRESH_S", 0.0)  # refresh every turn
    kafka = FakeKafka()
    _produce(kafka, IN0, 10)
    with serving(repo, kafka):
        _until(lambda: kafka.group.get(IN0) == 10)
        assert len(kafka.producers) == 1
        # An operator lowers the output topic's limit while the worker serves.
        kafka.setup = lambda p: p.max_bytes.update({"out": 1000})
        kafka.admin.limits["out"] = 1000
        _until(lambda: len(kafka.producers) == 2)
        assert kafka.producers[0].closed
        assert kafka.configs[-1].batch_max_bytes == 1000 - RECORD_OVERHEAD
        _produce(kafka, IN0, 40, first=10)
        _until(lambda: kafka.group.get(IN0) == 50)
    assert _ids(kafka, "out") == [f"0-{i}" for i in range(50)]
    assert [v for v, d in kafka.producers[1].sent if d.error is not None] == []


# -- after an unclean stop ------------------------------------------------------------------------


def test_after_an_unclean_stop_each_record_runs_alone_behind_a_try_marker(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 3)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING  # the last owner died mid-stream
    with serving(repo, kafka):
        _until(lambda: kafka.group.get(IN0) == 3)
    markers = [(o, m) for o, m in kafka.consumer.commits if _is_try(m)]
    assert markers == [({IN0: i}, try_marker(i, 1)) for i in range(3)]
    assert _ids(kafka, "out") == ["0-0", "0-1", "0-2"]


@pytest.mark.parametrize("exactly_once", [False, True])
def test_no_record_runs_past_the_groups_run_marker(repo: Path, exactly_once: bool) -> None:
    # A crash while any record runs leaves a marker that reaches it: the next owner runs
    # everything up to it one at a time. One marker commit reaches the whole poll.
    kafka = FakeKafka()
    _produce(kafka, IN0, 40)
    seen: list[tuple[int, str]] = []  # (offset run, the group's metadata then)

    def loader(ref: ModelRef, options: RuntimeOptions) -> Session:
        session = load_session(ref, options)
        run = session.run

        def watched(feeds: dict[str, np.ndarray]) -> dict[str, object]:
            x = next(iter(feeds.values()))
            for row in x:
                seen.append((round(float(row[0]) * 100), kafka.consumer.metadata_of[IN0]))
            return run(feeds)

        session.run = watched  # type: ignore[method-assign]
        return session

    with serving(repo, kafka, loader=loader, exactly_once=exactly_once):
        _until(lambda: kafka.group.get(IN0) == 40)
    assert sorted(o for o, _ in seen) == list(range(40))
    assert all(m.startswith("run:") and int(m[4:]) >= o for o, m in seen), seen
    at_start = [m for o, m in kafka.consumer.commits if o == {IN0: 0}]
    # the start (nothing ran), then the marker: the whole poll and the lead
    assert at_start == ["run:-1", {IN0: f"run:{39 + COVER_AHEAD}"}]


@pytest.mark.parametrize("exactly_once", [False, True])
def test_on_a_trickle_no_record_waits_for_a_run_marker_commit(
    repo: Path, exactly_once: bool
) -> None:
    # One record per poll: the loop moves the marker ahead between polls, while no
    # record waits, so after the first record none waits for its own marker commit.
    kafka = FakeKafka()
    commit = kafka.consumer.commit
    ran = [0]  # records run so far
    waited: list[int] = []  # records polled and not run yet when a marker was committed
    reach: list[tuple[int, int]] = []  # (highest offset polled, the marker's reach)

    def watched(offsets: dict[TopicPartition, int], metadata: Any = "") -> None:
        if isinstance(metadata, dict) and str(metadata.get(IN0, "")).startswith("run:"):
            polled = kafka.consumer.positions.get(IN0, 0)
            waited.append(polled - ran[0])
            reach.append((polled - 1, int(metadata[IN0][4:])))
        commit(offsets, metadata)

    def loader(ref: ModelRef, options: RuntimeOptions) -> Session:
        session = load_session(ref, options)
        run = session.run

        def counted(feeds: dict[str, np.ndarray]) -> dict[str, object]:
            ran[0] += len(next(iter(feeds.values())))
            return run(feeds)

        session.run = counted  # type: ignore[method-assign]
        return session

    kafka.consumer.commit = watched  # type: ignore[method-assign]
    n = 2 * COVER_AHEAD
    with serving(repo, kafka, loader=loader, exactly_once=exactly_once):
        for i in range(n):
            _produce(kafka, IN0, 1, first=i)
            _until(lambda i=i: ran[0] == i + 1)  # type: ignore[misc]
        _until(lambda: kafka.group.get(IN0) == n)
    assert waited[0] == 1 and len(waited) > 2  # the first record's marker, then ahead
    assert waited[1:] == [0] * (len(waited) - 1), waited
    assert all(last <= polled + COVER_AHEAD for polled, last in reach), reach
    assert _ids(kafka, "out") == [f"0-{i}" for i in range(n)]


def test_a_careful_partitions_marker_is_not_moved_ahead(repo: Path) -> None:
    # Its marker is the try marker of the record running alone (or what settled): a
    # marker reaching ahead would replace it, and a crash would not be counted.
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING
    with serving(repo, kafka, loader=FlakyLoader(fails=1), retry_backoff_ms=50):
        _until(lambda: kafka.group.get(IN0) == 2)
    runs = [m[IN0] for _, m in kafka.consumer.commits if isinstance(m, dict) and IN0 in m]
    assert runs and all(int(m[4:]) <= 1 for m in runs), runs  # none past the records


def test_a_record_that_crashed_the_worker_three_times_is_dead_lettered_unrun(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = try_marker(0, 2)  # two careful runs of 0 crashed
    with serving(repo, kafka):
        _until(lambda: kafka.group.get(IN0) == 2)
    (dead,) = kafka.landed("in.dlq")
    assert dead.header("request-id") == "0-0"
    assert "crashed the worker 3 times" in (dead.header("error-message") or "")
    assert _ids(kafka, "out") == ["0-1"]


def test_after_a_clean_stop_nothing_runs_alone(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = CLEAN
    with serving(repo, kafka):
        _until(lambda: kafka.group.get(IN0) == 2)
    assert not [m for _, m in kafka.consumer.commits if _is_try(m)]


def test_a_careful_record_retried_after_a_transient_failure_runs_behind_its_try_marker(
    repo: Path,
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING
    loader = FlakyLoader(fails=1)  # record 0's first attempt: the model fails to load
    with serving(repo, kafka, loader=loader, retry_backoff_ms=50):
        _until(lambda: kafka.group.get(IN0) == 2)
    assert loader.calls == 2
    markers = [(o, m) for o, m in kafka.consumer.commits if _is_try(m)]
    assert markers == [({IN0: i}, try_marker(i, 1)) for i in range(2)]
    assert _ids(kafka, "out") == ["0-0", "0-1"]


def test_past_the_last_owners_run_marker_its_partition_goes_back_to_normal_once(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 4)
    _produce(kafka, IN1, 2)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = f"{RUNNING}:0"  # it died while record 0 ran
    with caplog.at_level("INFO", "worker"), serving(repo, kafka):
        _until(lambda: kafka.group.get(IN0) == 4 and kafka.group.get(IN1) == 2)
    markers = [(o, m) for o, m in kafka.consumer.commits if _is_try(m)]
    assert markers == [({IN0: 0}, try_marker(0, 1))]  # only record 0 ran alone
    assert [m for m in caplog.messages if "normal" in m] == ["in[0]: back to normal"]


class SlowLoader:
    """The real model; a run whose first input is ``slow_x`` takes ``seconds`` (it
    starts ``running`` first)."""

    def __init__(self, slow_x: float, seconds: float) -> None:
        self.slow_x, self.seconds = slow_x, seconds
        self.running = threading.Event()

    def __call__(self, ref: ModelRef, options: RuntimeOptions) -> Session:
        session = load_session(ref, options)
        run = session.run

        def slow_run(feeds: dict[str, np.ndarray]) -> dict[str, object]:
            if np.isclose(next(iter(feeds.values())).flat[0], self.slow_x):
                self.running.set()
                time.sleep(self.seconds)
            return run(feeds)

        session.run = slow_run  # type: ignore[method-assign]
        return session


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_careful_record_that_outlives_the_drain_timeout_is_waited_for(
    repo: Path, exactly_once: bool
) -> None:
    # After an unclean stop, record 0 runs 3 s alone, --drain-timeout 1: the try marker
    # of record 1 must not be committed past it (a crash then would lose record 0).
    kafka = FakeKafka()
    _produce(kafka, IN0, 4)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING
    loader = SlowLoader(slow_x=0.0, seconds=3.0)
    with serving(repo, kafka, loader=loader, drain_timeout_s=1.0, exactly_once=exactly_once):
        _until(lambda: kafka.group.get(IN0) == 4)
        _until(lambda: not kafka.consumer.paused)  # the careful wait's pause is released
        assert IN0 in kafka.consumer.pauses[0]  # paused while record 0 ran
    assert _ids(kafka, "out") == ["0-0", "0-1", "0-2", "0-3"]
    commits = [(o[IN0], m) for o, m in kafka.consumer.commits if IN0 in o]
    markers = [(o, m) for o, m in commits if _is_try(m)]
    assert markers == [(i, try_marker(i, 1)) for i in range(4)]
    for i in range(1, 4):
        # Record i-1 settled: its partition moved to i, clean, right before i's marker.
        at = commits.index((i, try_marker(i, 1)))
        assert commits[at - 1] == (i, CLEAN), commits


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_careful_record_revoked_and_reassigned_mid_run_is_never_committed_unanswered(
    repo: Path, exactly_once: bool
) -> None:
    # After an unclean stop, record 0 runs alone; the group takes its partition away and
    # gives it back while it runs (its work is abandoned). The partition's offset must not
    # move past record 0 before its answer has landed (a crash then would lose it).
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING
    loader = SlowLoader(slow_x=0.0, seconds=1.0)
    landed_at_commit: list[tuple[int, str, list[str | None]]] = []
    commit = kafka.consumer.commit

    def watched(offsets: Any, metadata: str = "") -> None:
        if IN0 in offsets:
            landed_at_commit.append((offsets[IN0], metadata, _ids(kafka, "out")))
        commit(offsets, metadata)

    kafka.consumer.commit = watched  # type: ignore[method-assign]
    with serving(repo, kafka, loader=loader, exactly_once=exactly_once):
        assert loader.running.wait(10)
        kafka.consumer.rebalance("revoke", [IN0])
        kafka.consumer.rebalance("assign", [IN0])
        _until(lambda: kafka.group.get(IN0) == 2 and {"0-0", "0-1"} <= set(_ids(kafka, "out")))
    for offset, metadata, landed in landed_at_commit:
        assert offset == 0 or "0-0" in landed, (offset, metadata, landed_at_commit)


def test_after_an_abort_in_careful_mode_the_rewound_partitions_polled_records_are_dropped(
    repo: Path,
) -> None:
    # The first transaction (record 0's answer, committed while the careful loop settles
    # it) aborts: the partition is rewound to 0 while records 1..5 of the same poll are
    # still in hand. They must be dropped (read again after the seek), no marker
    # committed for a slot no longer live, and each record answered once, in order.
    kafka = FakeKafka()
    _produce(kafka, IN0, 6)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING
    first = [True]

    def setup(p: FakeProducer) -> None:
        if first[0]:
            p.fail["commit_transaction"] = TransactionFailed("abortable", name="_ABORTED")
            first[0] = False

    kafka.setup = setup
    with serving(repo, kafka, exactly_once=True):
        _until(lambda: kafka.group.get(IN0) == 6)
    assert _ids(kafka, "out") == [f"0-{i}" for i in range(6)]
    assert (IN0, 0) in kafka.consumer.seeks
    markers = [o[IN0] for o, m in kafka.consumer.commits if _is_try(m)]
    assert markers == sorted(markers) and markers[0] == 0, markers  # none past the rewind
    assert markers.count(1) == 1


def test_a_careful_records_try_marker_is_committed_only_once_its_model_is_loaded(
    repo: Path,
) -> None:
    # A death while the model loads (an OOM kill) must charge no record a crash.
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING
    at_load: list[list[str]] = []

    def loader(ref: ModelRef, options: RuntimeOptions) -> Session:
        at_load.append([m for _, m in kafka.consumer.commits if _is_try(m)])
        return load_session(ref, options)

    with serving(repo, kafka, loader=loader):
        _until(lambda: kafka.group.get(IN0) == 2)
    assert at_load[0] == []  # no marker while the model loaded
    markers = [(o, m) for o, m in kafka.consumer.commits if _is_try(m)]
    assert markers == [({IN0: i}, try_marker(i, 1)) for i in range(2)]
    assert _ids(kafka, "out") == ["0-0", "0-1"]


def test_a_stop_in_careful_mode_abandons_the_running_record_uncharged_and_exits_0(
    repo: Path,
) -> None:
    # After an unclean stop, record 1 runs alone behind its try marker and takes 8 s;
    # SIGTERM (stop()) meanwhile: the worker neither waits for it nor charges it a crash
    # (the try marker is replaced by the last settled offset, clean), and exits 0 soon.
    kafka = FakeKafka()
    _produce(kafka, IN0, 5)
    kafka.group[IN0] = 0
    kafka.consumer.metadata_of[IN0] = RUNNING
    loader = SlowLoader(slow_x=0.01, seconds=8.0)
    started = time.monotonic()
    # Its model's runs are short enough for the polling thread, but not a careful one's.
    with serving(repo, kafka, loader=loader, drain_timeout_s=5.0, inline_below_ms=1000) as s:
        assert loader.running.wait(20)
        assert kafka.consumer.commits[-1] == ({IN0: 1}, try_marker(1, 1))
        stopped = time.monotonic()
        s.worker.stop()
        s.thread.join(20)
        assert s.done
        assert time.monotonic() - stopped < 3.0, "the stop waited for the careful run"
    assert s.error is None and s.rc == 0
    assert kafka.consumer.commits[-1] == ({IN0: 1}, CLEAN)  # not charged: no try marker left
    assert _ids(kafka, "out") == ["0-0"]
    assert kafka.landed("in.dlq") == []
    assert not [m for o, m in kafka.consumer.commits if _is_try(m) and o[IN0] > 1]
    assert time.monotonic() - started < 30


def test_a_careful_records_run_is_awaited_before_anything_is_committed_around_it(
    repo: Path,
) -> None:
    # IN0 answered but not committed yet (commits 10 min apart), then IN1's record 0 runs
    # alone after an unclean stop (0.3 s). No transaction may commit IN0's answers while
    # it runs: it would leave record 0 behind its try marker for a second round, where a
    # death of the process charges it a crash it did not cause.
    kafka = FakeKafka()
    _produce(kafka, IN0, POLL_RECORDS + 5)  # the first poll takes IN0's only
    _produce(kafka, IN1, 2, first=50)
    kafka.group[IN1] = 0
    kafka.consumer.metadata_of[IN1] = RUNNING
    loader = SlowLoader(slow_x=0.5, seconds=0.3)
    during: list[tuple[int, int]] = []
    slow_run = loader.__call__

    def watched(ref: ModelRef, options: RuntimeOptions) -> Session:
        session = slow_run(ref, options)
        run = session.run

        def counted(feeds: dict[str, np.ndarray]) -> dict[str, object]:
            before = len(kafka.producer.transactions)
            out = run(feeds)
            if np.isclose(next(iter(feeds.values())).flat[0], 0.5):
                during.append((before, len(kafka.producer.transactions)))
            return out

        session.run = counted  # type: ignore[method-assign]
        return session

    with serving(repo, kafka, loader=watched, exactly_once=True, commit_interval_ms=600_000):
        _until(lambda: kafka.group.get(IN1) == 2 and kafka.group.get(IN0) == POLL_RECORDS + 5)
    assert len(during) == 1 and during[0][0] == during[0][1], during
    first = next(t for t in kafka.producer.transactions if IN1 in t[1])
    assert first[1][IN1] == 1  # record 0 settled in the first transaction holding IN1
    assert {"1-50", "1-51"} <= set(_ids(kafka, "out"))


# -- stop -----------------------------------------------------------------------------------------


def test_a_stop_drains_commits_everything_as_clean_and_returns_0(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka(latency_s=0.3)  # acknowledgements still on their way at the stop
    _produce(kafka, IN0, 5)
    with caplog.at_level("INFO", "worker"), serving(repo, kafka, commit_interval_ms=600_000) as s:
        _until(lambda: kafka.producers and len(kafka.producer.records) == 5)
    assert s.rc == 0 and s.error is None
    assert "drained: everything polled was answered and committed" in caplog.messages
    assert IN0 in kafka.consumer.pauses[-1]  # no new records during the drain
    assert kafka.consumer.commits[-1] == ({IN0: 5}, CLEAN)
    # The drain's own commit of the answers is clean already, not only the marker after
    # it: a crash between the two leaves the next owner nothing to run one at a time.
    assert [c for c in kafka.consumer.commits if c[0] == {IN0: 5}] == [({IN0: 5}, CLEAN)] * 2
    assert _ids(kafka, "out") == [f"0-{i}" for i in range(5)]
    assert kafka.consumer.closed and kafka.producer.closed and kafka.admin.closed


def test_a_drain_that_times_out_returns_1_and_leaves_no_clean_marker(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka()
    kafka.setup = lambda p: setattr(p, "hold_all", True)  # no answer is ever acknowledged
    _produce(kafka, IN0, 3)
    with caplog.at_level("INFO", "worker"), serving(repo, kafka, drain_timeout_s=0.5) as s:
        _until(lambda: kafka.producers and len(kafka.producer.records) == 3)
    assert s.rc == 1 and s.error is None
    assert "drain timed out: 3 polled records left uncommitted (answered after a restart)" in (
        caplog.messages
    )
    assert not any(m.startswith("drained") for m in caplog.messages)
    # The next owner must treat the partition as stopped mid-stream: no clean marker.
    assert all(metadata != CLEAN for _, metadata in kafka.consumer.commits)
    assert kafka.group[IN0] == 0


def test_records_of_a_partition_assigned_during_the_drain_are_left_for_after_the_restart(
    repo: Path,
) -> None:
    kafka = FakeKafka()
    kafka.setup = lambda p: setattr(p, "hold_all", True)  # the drain runs out its time
    _produce(kafka, IN0, 1)
    stopping = threading.Event()
    pause = kafka.consumer.pause

    def paused(tps: Any) -> None:
        pause(tps)
        if stopping.is_set():  # the drain's pause: the group assigns IN1 in its next poll
            kafka.consumer.rebalance("assign", [IN1])

    kafka.consumer.pause = paused  # type: ignore[method-assign]
    with serving(repo, kafka, drain_timeout_s=0.5) as s:
        _until(lambda: kafka.producers and len(kafka.producer.records) == 1)
        _produce(kafka, IN1, 2)
        stopping.set()
        s.worker.stop()
        s.thread.join(20)
        assert s.done
    assert s.error is None and s.rc == 1  # IN0's answer was never acknowledged
    assert IN1 in kafka.consumer.assigned and kafka.consumer.positions[IN1] > 0  # polled
    assert [r.header("request-id") for r in kafka.producer.records] == ["0-0"]  # not answered
    assert kafka.group.get(IN1) is None


def test_a_revocation_whose_answers_do_not_come_in_time_commits_nothing_and_says_so(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka()
    kafka.setup = lambda p: setattr(p, "hold_all", True)
    _produce(kafka, IN0, 2)
    loader = SlowLoader(slow_x=0.0, seconds=1.5)  # record 0 is still running at the revoke
    settings = {"drain_timeout_s": 0.3, "commit_interval_ms": 50}
    with caplog.at_level("WARNING", "worker"), serving(repo, kafka, loader=loader, **settings):
        assert loader.running.wait(10)
        before = list(kafka.consumer.commits)
        kafka.consumer.rebalance("revoke", [IN0])
        _until(lambda: IN0 not in kafka.consumer.assigned)
        assert kafka.consumer.commits == before  # the next owner answers them
    assert "revoked in[0]: in-flight work abandoned uncommitted" in caplog.messages


def test_a_retry_waiting_when_its_partition_is_revoked_is_given_up(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    loader = FlakyLoader(fails=100)
    with serving(repo, kafka, loader=loader, retry_backoff_ms=400, retry_attempts=5) as s:
        _until(lambda: loader.calls >= 1)
        kafka.consumer.rebalance("revoke", [IN0])
        _until(lambda: IN0 not in kafka.consumer.assigned)
        calls = loader.calls
        time.sleep(1.0)  # two backoffs: a retry still scheduled would have run by now
        assert loader.calls == calls
    assert s.rc == 0 and s.error is None
    assert kafka.landed("in.dlq") == [] and kafka.landed("out") == []


def test_a_clean_stop_marker_that_fails_is_logged_and_the_stop_stays_clean(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 2)
    with caplog.at_level("WARNING", "worker"), serving(repo, kafka, commit_interval_ms=20) as s:
        _until(lambda: kafka.group.get(IN0) == 2)
        kafka.consumer.fail = [KafkaFailure("coordinator moved")]  # the marker's commit
    assert s.rc == 0 and s.error is None  # every answer was committed before it
    assert "the clean-stop marker failed: coordinator moved" in caplog.messages
    assert kafka.consumer.fail == []


# -- metrics --------------------------------------------------------------------------------------

MV = {"model": "mnist-mlp", "version": "1"}
UNKNOWN = {"model": "", "version": ""}


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"inference_worker_{name}", labels)


def test_outcomes_rows_and_times_are_counted_by_model_version_and_error_type(repo: Path) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 3)
    kafka.consumer.append(IN1, b"not a request")
    value, headers = encode_request(
        {"x": np.zeros((1, 784), np.float32)}, format="msgpack", model="no-such-model"
    )
    kafka.consumer.append(IN1, value, None, list(headers))
    with serving(repo, kafka) as s:
        _until(lambda: kafka.group.get(IN0) == 3 and kafka.group.get(IN1) == 2)
    m = s.worker.metrics
    assert _sample(m, "messages_total", status="ok", error_type="", **MV) == 3
    assert _sample(m, "messages_total", status="dlq", error_type="decode-error", **UNKNOWN) == 1
    assert _sample(m, "messages_total", status="dlq", error_type="model-not-found", **UNKNOWN) == 1
    assert _sample(m, "rows_total", **MV) == 3
    # every answered record waited from its poll to its run, and ran
    assert _sample(m, "queue_seconds_count", **MV) == 3
    assert (_sample(m, "queue_seconds_sum", **MV) or 0.0) > 0
    assert _sample(m, "batch_rows_sum", **MV) == 3
    assert (_sample(m, "inference_seconds_count", **MV) or 0.0) >= 1
    assert _sample(m, "end_to_end_seconds_count", **MV) == 3
    # a name from a request never becomes a label value
    labelled = {
        sample.labels.get("model") for family in m.registry.collect() for sample in family.samples
    }
    assert "no-such-model" not in labelled


def test_rebalances_and_assigned_partitions_follow_every_callback(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = FakeKafka()
    _produce(kafka, IN0, 1)
    _produce(kafka, IN1, 1)
    with serving(repo, kafka) as s:
        m = s.worker.metrics
        _until(lambda: kafka.group.get(IN0) == 1 and kafka.group.get(IN1) == 1)
        assert (_sample(m, "rebalances_total"), _sample(m, "assigned_partitions")) == (1, 2)
        kafka.consumer.rebalance("revoke", [IN1])
        _until(lambda: _sample(m, "rebalances_total") == 2)
        assert _sample(m, "assigned_partitions") == 1
        with caplog.at_level("WARNING", "worker"):
            kafka.consumer.rebalance("lose", [IN0])
            _until(lambda: _sample(m, "rebalances_total") == 3)
        assert "lost in[0]: in-flight work abandoned" in caplog.messages
        assert _sample(m, "assigned_partitions") == 0
        kafka.consumer.rebalance("assign", [IN0, IN1])
        _until(lambda: _sample(m, "rebalances_total") == 4)
        assert _sample(m, "assigned_partitions") == 2


def test_an_aborted_transaction_is_counted(repo: Path) -> None:
    kafka = FakeKafka()
    kafka.setup = lambda p: p.fail.update(commit_transaction=TransactionFailed("fenced"))
    _produce(kafka, IN0, 2)
    with serving(repo, kafka, exactly_once=True) as s:
        _until(lambda: kafka.group.get(IN0) == 2)  # answered again after the abort
    assert "abort_transaction" in kafka.producer.calls
    assert _sample(s.worker.metrics, "transactions_aborted_total") == 1
