"""Faults against real processes: a broker outage, kill -9 at 20 seeded points, a rebalance storm.

Every test feeds a stream of uniquely identified requests and then reads the
output topic from the beginning: zero unanswered is the bar everywhere, and a
``read_committed`` reader must see zero duplicates with ``--exactly-once``.
The long ones are marked ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from tests.brokers import private_broker
from tests.harness import demo_requests, header, settings, worker_process, worker_thread

pytestmark = pytest.mark.kafka

KILL_POINTS = 20
KILL_SEED = 9
# Short sessions so a killed member's partitions move on within seconds.
QUICK_GROUP = ["session.timeout.ms=3000", "heartbeat.interval.ms=500"]


def _requests(n: int, prefix: str) -> list[tuple[bytes, bytes, list]]:
    return demo_requests(n, prefix, key_mod=13, rows=2)


class _Reader:
    """Reads a topic from the beginning, counting request ids, until told to stop."""

    def __init__(self, bootstrap: str, topic: str, isolation: str = "read_uncommitted") -> None:
        self._consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            isolation_level=isolation,
            max_partition_fetch_bytes=16 * 1024 * 1024,
        )
        self.ids: Counter[str] = Counter()

    def read(self, timeout_ms: int = 200) -> None:
        for records in self._consumer.poll(timeout_ms=timeout_ms).values():
            self.ids.update(header(r, "request-id") or "" for r in records)

    def until(
        self, want: set[str], timeout: float, alive: Callable[[], bool] = lambda: True
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            if want <= set(self.ids):
                return True
            self.read()
        return want <= set(self.ids)

    def until_count(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ids) < n and time.monotonic() < deadline:
            self.read()

    def settle(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.read()

    def close(self) -> None:
        self._consumer.close()


@contextmanager
def _reader(bootstrap: str, topic: str, isolation: str = "read_uncommitted") -> Iterator[_Reader]:
    reader = _Reader(bootstrap, topic, isolation)
    try:
        yield reader
    finally:
        reader.close()


class _Feeder(threading.Thread):
    """Publishes records at a steady pace (a live stream); rides out broker outages."""

    def __init__(self, bootstrap: str, topic: str, records: list, per_s: float) -> None:
        super().__init__(daemon=True, name="feeder")
        self._topic, self._records, self._gap = topic, records, 1.0 / per_s
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            linger_ms=5,
            acks="all",
            max_request_size=16 * 1024 * 1024,
            delivery_timeout_ms=180_000,
            request_timeout_ms=10_000,
        )
        self.errors: list[BaseException] = []
        # Set once the first record is acknowledged: the topic's metadata is then on the
        # broker, so a consumer that subscribes now is assigned its partitions at once.
        self.flowing = threading.Event()

    def run(self) -> None:
        try:
            start = time.monotonic()
            futures = []
            for i, (key, value, headers) in enumerate(self._records):
                time.sleep(max(0.0, start + i * self._gap - time.monotonic()))
                futures.append(
                    self._producer.send(self._topic, value=value, key=key, headers=headers)
                )
                if i == 0:
                    futures[0].get(30)
                    self.flowing.set()
            self._producer.flush(180)
            for future in futures:
                future.get(0)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._producer.close(10)


def _create(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def _args(bootstrap: str, requests: str, outputs: str, repo: Path, group: str) -> list[str]:
    args = ["--bootstrap-servers", bootstrap, "--input-topic", requests, "--output-topic", outputs]
    args += ["--model-repository", str(repo), "--group-id", group, "--metrics-port", "0"]
    args += ["--device", "cpu", "--max-batch-rows", "16", "--log-level", "WARNING"]
    for option in QUICK_GROUP:
        args += ["--kafka-option", option]
    return args


# ---------------------------------------------------------------------------
# 1. The broker stops for 10 s mid-stream and comes back
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_broker_outage_of_10s_worker_recovers_without_restart(
    model_repo: Path, tmp_path: Path
) -> None:
    n = 600
    with private_broker() as broker, ExitStack() as stack:
        bootstrap = broker.bootstrap
        requests, outputs = "outage-in", "outage-out"
        _create(bootstrap, requests, 2)
        _create(bootstrap, outputs, 1)
        feeder = _Feeder(bootstrap, requests, _requests(n, "o"), per_s=30)  # ~20 s of stream
        feeder.start()
        assert feeder.flowing.wait(30), feeder.errors
        log = tmp_path / "worker.log"
        proc = worker_process(
            _args(bootstrap, requests, outputs, repo=model_repo, group="outage"), log_path=log
        )
        stack.callback(lambda: proc.poll() is None and proc.kill())
        with _reader(bootstrap, outputs) as reader:
            reader.until_count(60, timeout=60)
            assert len(reader.ids) >= 60, log.read_text()[-3000:]
        broker.stop()  # mid-stream: the feeder keeps sending into its buffer
        time.sleep(10)
        assert proc.poll() is None, "the worker died during the outage:\n" + log.read_text()[-3000:]
        broker.start()
        feeder.join(240)
        assert not feeder.errors, feeder.errors
        with _reader(bootstrap, outputs) as reader:
            ok = reader.until(
                {f"o-{i}" for i in range(n)}, timeout=180, alive=lambda: proc.poll() is None
            )
            missing = n - len({f"o-{i}" for i in range(n)} & set(reader.ids))
        assert ok, (
            f"{missing} unanswered; worker alive: {proc.poll() is None}\n" + log.read_text()[-3000:]
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]


# ---------------------------------------------------------------------------
# 2. kill -9 at 20 seeded random points of a stream, restarted each time
# ---------------------------------------------------------------------------


def _kill_restart_cycle(
    bootstrap: str,
    new_topic: Callable[..., str],
    group: str,
    repo: Path,
    tmp_path: Path,
    exactly_once: bool,
) -> Counter[str]:
    n = 2000
    requests, outputs = new_topic(partitions=4), new_topic(partitions=2)
    points = sorted(random.Random(KILL_SEED).sample(range(40, n - 40), KILL_POINTS))
    args = _args(bootstrap, requests, outputs, repo, group)
    if exactly_once:
        args += ["--exactly-once", "--transactional-id", f"{group}-w"]
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    feeder = _Feeder(bootstrap, requests, _requests(n, "s"), per_s=200)  # a live stream, ~10 s
    feeder.start()
    assert feeder.flowing.wait(30), feeder.errors
    with _reader(bootstrap, outputs, isolation) as reader:
        for i, point in enumerate(points):
            proc = worker_process(args, log_path=tmp_path / f"w{i}.log")
            try:
                reader.until_count(point, timeout=90)
                assert len(reader.ids) >= point, (tmp_path / f"w{i}.log").read_text()[-3000:]
            finally:
                proc.send_signal(signal.SIGKILL)  # no drain, no commit, an open transaction
                proc.wait(10)
        feeder.join(120)
        assert not feeder.errors, feeder.errors
        proc = worker_process(args, log_path=tmp_path / "last.log")
        try:
            want = {f"s-{i}" for i in range(n)}
            reader.until(want, timeout=180)
            reader.settle(3.0)  # late duplicates would show up now
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        assert want <= set(reader.ids), (
            f"{len(want - set(reader.ids))} unanswered\n"
            + (tmp_path / "last.log").read_text()[-3000:]
        )
        return reader.ids


@pytest.mark.slow
def test_kill_9_at_20_points_at_least_once_answers_everything(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    tmp_path: Path,
) -> None:
    ids = _kill_restart_cycle(kafka_bootstrap, new_topic, group_id, model_repo, tmp_path, False)
    duplicates = sum(c - 1 for c in ids.values())
    print(f"at-least-once: {len(ids)} answered, {duplicates} repeated after {KILL_POINTS} kills")


@pytest.mark.slow
def test_kill_9_at_20_points_exactly_once_no_loss_no_duplicates(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    tmp_path: Path,
) -> None:
    ids = _kill_restart_cycle(kafka_bootstrap, new_topic, group_id, model_repo, tmp_path, True)
    twice = [rid for rid, c in ids.items() if c > 1]
    assert not twice, f"a read_committed reader saw {len(twice)} duplicates, e.g. {twice[:5]}"


# ---------------------------------------------------------------------------
# 3. Three workers joining and leaving during a stream
# ---------------------------------------------------------------------------


@pytest.mark.slow  # over 12 s: make test stays under its 10 minutes
def test_rebalance_storm_three_workers_join_and_leave(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path
) -> None:
    n = 900
    requests, outputs = new_topic(partitions=6), new_topic(partitions=2)
    s = settings(
        kafka_bootstrap,
        requests,
        outputs,
        model_repo,
        group_id,
        max_batch_rows=16,
        kafka_properties={"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"},
    )
    feeder = _Feeder(kafka_bootstrap, requests, _requests(n, "rb"), per_s=60)  # ~15 s
    # (at second, action): every member comes and goes at least once; one is always there
    schedule = [
        (0, "+a"),
        (1.5, "+b"),
        (3, "+c"),
        (5, "-a"),
        (6.5, "+a"),
        (8, "-b"),
        (9.5, "-c"),
        (11, "+b"),
        (12.5, "+c"),
        (14, "-a"),
        (15.5, "-b"),
    ]
    members: dict[str, ExitStack] = {}
    feeder.start()
    assert feeder.flowing.wait(30), feeder.errors
    start = time.monotonic()
    try:
        for at, action in schedule:
            time.sleep(max(0.0, start + at - time.monotonic()))
            name = action[1:]
            if action[0] == "+":
                members[name] = ExitStack()
                members[name].enter_context(worker_thread(s))
            else:
                members.pop(name).close()  # a clean leave: drain, commit, leave the group
        feeder.join(60)
        assert not feeder.errors, feeder.errors
        with _reader(kafka_bootstrap, outputs) as reader:
            want = {f"rb-{i}" for i in range(n)}
            assert reader.until(want, timeout=90), f"{len(want - set(reader.ids))} unanswered"
            for stack in list(members.values()):
                stack.close()  # the last member leaves: each stop must have committed
            members.clear()
            reader.settle(2.0)  # a late repeat would show up now
            repeats = sum(c - 1 for c in reader.ids.values())
    finally:
        for stack in members.values():
            stack.close()
    print(f"rebalance storm: {n} answered, {repeats} repeated, {len(schedule)} membership changes")
    # Every change is a clean join or leave: revoked partitions are committed before
    # their next owner reads them, so at-least-once repeats nothing here.
    assert repeats == 0, f"{repeats} answers repeated across clean rebalances"
