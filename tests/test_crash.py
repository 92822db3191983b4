"""Crashes that land mid-stream, a member joining mid-stream, partitions added mid-stream.

The input is paced (a live stream), and every kill is checked at the moment it
happens: the group's committed offsets, read from the broker, are strictly
between 0 and what has been published so far, so the worker had committed some
of the stream and not all of it. After a restart, every input must have an
answer (at-least-once), and a ``read_committed`` reader must see each exactly
once (``--exactly-once``). One kill -9 per delivery mode and backend runs in
``make test``; twenty in a row per mode are ``slow`` (``make test-slow``).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.brokers import (
    Feeder,
    committed_offsets,
    create_topic,
    free_port,
    private_broker,
    reading,
    toxiproxy,
)
from tests.harness import demo_requests, worker_process

pytestmark = pytest.mark.kafka

RATE = 100  # records per second published
# The longest kill -> restart -> commits-again cycle seen on 2 cores: a stream of many
# kills must still be arriving at the last one (else the last kills are not mid-stream).
KILL_CYCLE_S = 8
QUICK_GROUP = ["session.timeout.ms=6000", "heartbeat.interval.ms=500"]


def _requests(n: int, prefix: str) -> list[tuple[bytes, bytes, list]]:
    return demo_requests(n, prefix, seed=20, key_mod=17)


def _args(
    bootstrap: str,
    requests: str,
    outputs: str,
    repo: Path,
    group: str,
    client: str,
    txn: str | None,
) -> list[str]:
    args = ["--bootstrap-servers", bootstrap, "--input-topic", requests]
    args += ["--output-topic", outputs, "--model-repository", str(repo)]
    args += ["--group-id", group, "--metrics-port", "0", "--device", "cpu"]
    args += ["--kafka-client", client, "--commit-interval-ms", "100", "--log-level", "INFO"]
    for option in QUICK_GROUP:
        args += ["--kafka-option", option]
    if txn is not None:
        args += ["--exactly-once", "--transactional-id", txn]
    return args


def _total(bootstrap: str, group: str, topic: str) -> int:
    return sum(committed_offsets(bootstrap, group, topic).values())


def _wait_mid_stream(
    bootstrap: str,
    group: str,
    topic: str,
    feeder: Feeder,
    proc: subprocess.Popen[bytes],
    log: Path,
    at_least: int,
) -> int:
    """Wait until the group committed ``at_least`` records; returns the total then,
    checked to be strictly between 0 and what has been published."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker died:\n" + log.read_text()[-3000:]
        done = _total(bootstrap, group, topic)
        if done >= at_least:
            published = feeder.sent
            assert 0 < done < published, f"not mid-stream: {done} committed of {published}"
            return done
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} committed in 60 s:\n{log.read_text()[-3000:]}")


def _kill_mid_stream(
    bootstrap: str,
    new_topic: Callable[..., str],
    group: str,
    repo: Path,
    client: str,
    tmp_path: Path,
    *,
    exactly_once: bool,
    kills: int,
) -> tuple[int, int]:
    """``kills`` kill -9s, each mid-stream, then a clean run to the end; returns
    (answers missing, read_committed duplicates).

    Every input below the offsets committed at the first kill was answered by the
    first run alone, so it must have exactly one answer: a restart that ignored the
    committed offsets would answer it again.
    """
    n = 300 + (150 if kills == 1 else RATE * KILL_CYCLE_S) * kills
    requests, outputs = new_topic(partitions=2), new_topic(partitions=2)
    txn = f"{group}-txn" if exactly_once else None
    args = _args(bootstrap, requests, outputs, repo, group, client, txn)
    feeder = Feeder(bootstrap, requests, _requests(n, "c"), per_s=RATE)
    feeder.start()
    assert feeder.flowing.wait(30), feeder.failed
    step = n // (kills + 2)
    first_kill: dict[int, int] = {}
    try:
        for k in range(kills):
            log = tmp_path / f"w{k}.log"
            proc = worker_process(args, log_path=log)
            try:
                _wait_mid_stream(bootstrap, group, requests, feeder, proc, log, (k + 1) * step)
            finally:
                proc.send_signal(signal.SIGKILL)  # no drain, no commit, an open transaction
                proc.wait(10)
            if k == 0:
                first_kill = committed_offsets(bootstrap, group, requests)
        log = tmp_path / "last.log"
        proc = worker_process(args, log_path=log)
        try:
            feeder.join(n / RATE + 60)
            assert not feeder.failed, feeder.failed
            want = {f"c-{i}" for i in range(n)}
            with reading(bootstrap, outputs, read_committed=exactly_once) as out:
                out.until(lambda rs: want <= {r.header("request-id") for r in rs}, 120)
                out.settle(2.0)  # late duplicates would show up now
                ids = out.ids()
            missing = len(want - set(ids))
            duplicates = sum(c - 1 for c in ids.values())
            assert not missing, f"{missing} unanswered:\n{log.read_text()[-3000:]}"
            settled = _committed_at(bootstrap, requests, first_kill)
            assert settled, f"nothing committed before the first kill: {first_kill}"
            again = sorted(rid for rid in settled if ids[rid] != 1)
            assert not again, (
                f"{len(again)} of {len(settled)} inputs committed before the first kill "
                f"answered again after the restart, e.g. {again[:5]}"
            )
            deadline = time.monotonic() + 30
            while _total(bootstrap, group, requests) < n and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _total(bootstrap, group, requests) == n
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        assert rc == 0, log.read_text()[-3000:]
    finally:
        feeder.halt.set()
        feeder.join(30)
    return missing, duplicates


def _committed_at(bootstrap: str, topic: str, offsets: dict[int, int]) -> set[str]:
    """Request ids of the inputs below ``offsets`` (partition -> committed offset)."""
    want = sum(offsets.values())
    with reading(bootstrap, topic) as inputs:
        inputs.until(
            lambda rs: sum(r.offset < offsets.get(r.partition, 0) for r in rs) >= want, 30
        )
        return {
            r.header("request-id") or ""
            for r in inputs.records
            if r.offset < offsets.get(r.partition, 0)
        }


@pytest.mark.slow  # over 12 s: make test stays under its 10 minutes
@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_kill_9_mid_stream_then_restart_nothing_lost(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
    mode: str,
) -> None:
    exactly_once = mode == "exactly-once"
    missing, duplicates = _kill_mid_stream(
        kafka_bootstrap,
        new_topic,
        group_id,
        model_repo,
        kafka_client,
        tmp_path,
        exactly_once=exactly_once,
        kills=1,
    )
    assert missing == 0
    if exactly_once:
        assert duplicates == 0, f"a read_committed reader saw {duplicates} duplicates"


@pytest.mark.slow
@pytest.mark.timeout(600)  # a 163 s stream and 20 restarts (kafka-python's take longest)
@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_kill_9_mid_stream_20_times(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
    mode: str,
) -> None:
    exactly_once = mode == "exactly-once"
    missing, duplicates = _kill_mid_stream(
        kafka_bootstrap,
        new_topic,
        group_id,
        model_repo,
        kafka_client,
        tmp_path,
        exactly_once=exactly_once,
        kills=20,
    )
    print(f"{mode} {kafka_client}: 20 kills, {missing} lost, {duplicates} repeated")
    assert missing == 0
    if exactly_once:
        assert duplicates == 0, f"a read_committed reader saw {duplicates} duplicates"


def _second_worker_joins_mid_stream(
    bootstrap: str,
    new_topic: Callable[..., str],
    group: str,
    repo: Path,
    client: str,
    tmp_path: Path,
    *,
    exactly_once: bool,
    commit_interval_ms: int = 100,
) -> Counter[str]:
    """Worker a serves a stream; b joins once a has committed part of it (a gives b
    some partitions mid-stream); both stop cleanly (exit 0) once every input is
    answered. Returns the request ids of the answers (``read_committed`` when
    ``exactly_once``)."""
    n = 1500
    requests, outputs = new_topic(partitions=4), new_topic(partitions=2)
    feeder = Feeder(bootstrap, requests, _requests(n, "r"), per_s=RATE)
    feeder.start()
    assert feeder.flowing.wait(30), feeder.failed
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for name in ("a", "b"):
            log = tmp_path / f"{name}.log"
            txn = f"{group}-{name}" if exactly_once else None
            args = _args(bootstrap, requests, outputs, repo, group, client, txn)
            args += ["--commit-interval-ms", str(commit_interval_ms)]
            procs.append((worker_process(args, log_path=log), log))
            if name == "a":  # b joins once a has committed part of the stream
                _wait_mid_stream(bootstrap, group, requests, feeder, *procs[0], 100)
        # The rebalance happens mid-stream: b owns partitions while records still arrive.
        deadline = time.monotonic() + 30
        while "assigned" not in procs[1][1].read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "assigned" in procs[1][1].read_text(), "b never got partitions"
        assert feeder.sent < n, "the stream ended before the rebalance"
        feeder.join(n / RATE + 60)
        want = {f"r-{i}" for i in range(n)}
        with reading(bootstrap, outputs, read_committed=exactly_once) as out:
            out.until(lambda rs: want <= {r.header("request-id") for r in rs}, 120)
            out.settle(2.0)
            ids = out.ids()
        logs = "\n".join(log.read_text()[-1500:] for _, log in procs)
        assert want <= set(ids), f"{len(want - set(ids))} unanswered:\n{logs}"
    finally:
        feeder.halt.set()
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        rcs = [proc.wait(60) for proc, _ in procs]
    assert rcs == [0, 0], [log.read_text()[-2000:] for _, log in procs]
    return ids


@pytest.mark.slow  # over 12 s: make test stays under its 10 minutes
def test_exactly_once_across_a_rebalance_second_worker_joins_mid_stream(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    ids = _second_worker_joins_mid_stream(
        kafka_bootstrap, new_topic, group_id, model_repo, kafka_client, tmp_path, exactly_once=True
    )
    twice = [rid for rid, c in ids.items() if c > 1]
    assert not twice, f"read_committed duplicates across the rebalance: {twice[:5]}"


@pytest.mark.slow  # over 12 s: make test stays under its 10 minutes
def test_at_least_once_clean_rebalance_repeats_nothing(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    """At-least-once may repeat answers after a crash, never after a clean handover: a
    revoked partition's answered records are committed before the next owner reads it.
    Periodic commits are 3 s apart here (300 records), so only the revocation's commit
    covers what a answered between its last one and b taking its partitions."""
    ids = _second_worker_joins_mid_stream(
        kafka_bootstrap,
        new_topic,
        group_id,
        model_repo,
        kafka_client,
        tmp_path,
        exactly_once=False,
        commit_interval_ms=3000,
    )
    twice = [rid for rid, c in ids.items() if c > 1]
    assert not twice, f"{len(twice)} answers repeated across a clean rebalance: {twice[:5]}"


def test_partitions_added_while_running_are_consumed_and_committed(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    model_repo: Path,
    kafka_client: str,
    tmp_path: Path,
) -> None:
    import confluent_kafka as ck
    from confluent_kafka.admin import AdminClient, NewPartitions

    requests, outputs = new_topic(partitions=1), new_topic(partitions=3)
    records = _requests(90, "p")
    p = ck.Producer({"bootstrap.servers": kafka_bootstrap})
    for key, value, headers in records[:30]:
        p.produce(requests, value, key, headers=headers, partition=0)
    p.flush(30)
    log = tmp_path / "worker.log"
    args = _args(kafka_bootstrap, requests, outputs, model_repo, group_id, kafka_client, None)
    # Metadata every 2 s instead of 30 s (each client names that property its own way).
    refresh = {
        "confluent": "topic.metadata.refresh.interval.ms",
        "kafka-python": "metadata.max.age.ms",
    }
    args += ["--kafka-option", f"{refresh[kafka_client]}=2000"]
    proc = worker_process(args, log_path=log)
    try:
        with reading(kafka_bootstrap, outputs) as out:
            assert out.until(lambda rs: len(rs) >= 30, 60), log.read_text()[-3000:]
            admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
            admin.create_partitions([NewPartitions(requests, 3)])[requests].result(30)
            p = ck.Producer({"bootstrap.servers": kafka_bootstrap})  # knows the new ones
            deadline = time.monotonic() + 15
            while len(p.list_topics(requests, timeout=5).topics[requests].partitions) < 3:
                assert time.monotonic() < deadline, "the new partitions never showed"
                time.sleep(0.2)
            for i, (key, value, headers) in enumerate(records[30:]):
                p.produce(requests, value, key, headers=headers, partition=i % 3)
            p.flush(30)
            want = {f"p-{i}" for i in range(90)}
            ok = out.until(lambda rs: want <= {r.header("request-id") for r in rs}, 45)
            assert ok, (
                f"{len(want - {r.header('request-id') for r in out.records})} unanswered:\n"
                + log.read_text()[-3000:]
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if committed_offsets(kafka_bootstrap, group_id, requests) == {0: 50, 1: 20, 2: 20}:
                break
            time.sleep(0.2)
        assert committed_offsets(kafka_bootstrap, group_id, requests) == {0: 50, 1: 20, 2: 20}
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]


# librdkafka 2.16.0: rd_kafka_send_offsets_to_transaction() ignores the timeout it is
# given (confluentinc/librdkafka#5456, not fixed in that release), so after the
# resets the loop thread waits in it until the backend's deadline ends the process.
# What the worker guarantees meanwhile, the two tests after this one check.
_LIBRDKAFKA_5456 = pytest.mark.xfail(
    # Not strict: whether librdkafka blocks depends on where the resets catch it; one
    # run in several passes (seen on a fresh-clone CI run), which is no fix.
    strict=False,
    reason=(
        "librdkafka#5456: send_offsets_to_transaction() ignores its timeout after "
        "connection resets, so this process exits 1 at the call's deadline; a stop "
        "signal ends it sooner, and a restart answers each input once (the next tests)"
    ),
)
RESET_DRAIN_S = 5  # --drain-timeout of the reset tests
# When the librdkafka backend's deadline ends a transactional call that ignored its
# timeout: max(30 s, the worker's transaction.timeout.ms of 10 s) + 5 s.
TXN_DEADLINE_S = 35


@contextmanager
def _resets_mid_stream(
    model_repo: Path, kafka_client: str, tmp_path: Path, n: int
) -> Iterator[_ResetRun]:
    """A worker (``--exactly-once``) on a broker of its own behind Toxiproxy, fed ``n``
    requests at RATE/s; every connection is reset for 2 s once it has committed 100."""
    listen = free_port()
    with toxiproxy() as proxy, private_broker(advertised_port=listen) as broker:
        proxy.proxy("kafka", listen, f"127.0.0.1:{broker.port}")
        bootstrap = f"127.0.0.1:{listen}"
        requests, outputs = "reset-in", "reset-out"
        create_topic(bootstrap, requests, 2)
        create_topic(bootstrap, outputs, 2)
        group = f"reset-{kafka_client}"
        args = _args(bootstrap, requests, outputs, model_repo, group, kafka_client, f"{group}-t")
        args += ["--drain-timeout", str(RESET_DRAIN_S)]
        feeder = Feeder(bootstrap, requests, _requests(n, "x"), per_s=RATE)
        feeder.start()
        assert feeder.flowing.wait(30), feeder.failed
        run = _ResetRun(bootstrap, outputs, args, tmp_path / "worker.log")
        try:
            _wait_mid_stream(bootstrap, group, requests, feeder, run.proc, run.log, 100)
            proxy.add_toxic("kafka", "reset", "reset_peer", timeout=0)
            time.sleep(2.0)
            proxy.remove_toxic("kafka", "reset")
            feeder.join(n / RATE + 60)
            assert not feeder.failed, feeder.failed
            yield run
        finally:
            feeder.halt.set()
            run.stop()
            feeder.join(30)


class _ResetRun:
    """The worker process of a reset test, started at once; ``stop()`` is SIGTERM, and
    a process still running 5 s past its stop watchdog gets SIGABRT (faulthandler
    writes every thread's stack into its log)."""

    def __init__(self, bootstrap: str, outputs: str, args: list[str], log: Path) -> None:
        self.bootstrap, self.outputs, self.args, self.log = bootstrap, outputs, args, log
        self.proc = worker_process(args, env={"PYTHONFAULTHANDLER": "1"}, log_path=log)
        self.rc: int | None = None
        self.stop_took_s = 0.0

    def answers(self, want: set[str]) -> Counter[str]:
        """Request ids a ``read_committed`` reader sees: until each of ``want`` came, or
        nothing new came for 15 s (a hang), then 2 s more for late duplicates."""
        with reading(self.bootstrap, self.outputs, read_committed=True) as out:
            seen, moved = 0, time.monotonic()
            while not want <= {r.header("request-id") for r in out.records}:
                out.read()
                if len(out.records) > seen:
                    seen, moved = len(out.records), time.monotonic()
                elif time.monotonic() - moved > 15:
                    break
            out.settle(2.0)
            return out.ids()

    def assert_each_answered_once(self, want: set[str]) -> None:
        """After a restart: every one of ``want`` answered, none twice, for read_committed."""
        ids = self.answers(want)
        assert want <= set(ids), (
            f"{len(want - set(ids))} unanswered after the restart:\n"
            + self.log.read_text()[-3000:]
        )
        twice = [rid for rid, c in ids.items() if c > 1]
        assert not twice, f"read_committed duplicates across the restart: {twice[:5]}"

    def stop(self) -> None:
        if self.rc is not None:
            return
        deadline = time.monotonic() + 60  # SIGTERM before the handlers are in kills it
        while "serving " not in self.log.read_text() and self.proc.poll() is None:
            assert time.monotonic() < deadline, "never served:\n" + self.log.read_text()[-3000:]
            time.sleep(0.1)
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.rc = self.proc.wait(RESET_DRAIN_S + 2 + 5)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(10)
            raise AssertionError(
                "the worker ignored SIGTERM past its stop watchdog; its threads:\n"
                + self.log.read_text()[-6000:]
            ) from None
        self.stop_took_s = time.monotonic() - start

    def restart(self) -> None:
        self.stop()
        self.log = self.log.with_name("restarted.log")
        self.proc = worker_process(self.args, log_path=self.log)
        self.rc = None


@pytest.mark.slow
@pytest.mark.parametrize(
    "kafka_client", [pytest.param("confluent", marks=_LIBRDKAFKA_5456), "kafka-python"]
)
def test_exactly_once_across_connection_resets_mid_stream(
    model_repo: Path, kafka_client: str, tmp_path: Path
) -> None:
    """Every connection to the broker is reset for 2 s mid-stream (Toxiproxy's
    ``reset_peer`` between a broker of our own, which advertises the proxy's port, and
    every client); transactions in flight fail or retry. A ``read_committed`` reader must
    still see each input answered exactly once, from the same worker process."""
    n = 800
    want = {f"x-{i}" for i in range(n)}
    with _resets_mid_stream(model_repo, kafka_client, tmp_path, n) as run:
        ids = run.answers(want)
        assert run.proc.poll() is None, "the worker died:\n" + run.log.read_text()[-3000:]
        assert want <= set(ids), (
            f"{len(want - set(ids))} unanswered:\n" + run.log.read_text()[-3000:]
        )
        twice = [rid for rid, c in ids.items() if c > 1]
        assert not twice, f"read_committed duplicates after resets: {twice[:5]}"
        aborts = run.log.read_text().count("transaction aborted")
        print(f"{kafka_client}: {aborts} transactions aborted by the resets")
        run.stop()
    assert run.rc == 0, run.log.read_text()[-3000:]


@pytest.mark.slow
def test_exactly_once_connection_resets_then_sigterm_and_restart_each_answer_once(
    model_repo: Path, kafka_client: str, tmp_path: Path
) -> None:
    """What the worker guarantees while librdkafka#5456 stands: after the resets, a
    SIGTERM ends the process within ``--drain-timeout`` + 2 s whether or not its loop is
    stuck in the client, and a restart (same transactional id) answers what is left, so
    a ``read_committed`` reader sees every input exactly once."""
    n = 800
    want = {f"x-{i}" for i in range(n)}
    with _resets_mid_stream(model_repo, kafka_client, tmp_path, n) as run:
        time.sleep(3.0)
        run.stop()
        assert run.stop_took_s <= RESET_DRAIN_S + 2 + 1, f"stop took {run.stop_took_s:.1f} s"
        assert run.rc in (0, 1), run.log.read_text()[-3000:]
        first_rc, first_took = run.rc, run.stop_took_s
        run.restart()
        run.assert_each_answered_once(want)
        print(f"{kafka_client}: first run exit {first_rc} {first_took:.1f} s after SIGTERM")
        run.stop()
    assert run.rc == 0, run.log.read_text()[-3000:]


@pytest.mark.slow
def test_exactly_once_stuck_call_after_resets_exits_at_its_deadline_and_restart_answers_once(
    model_repo: Path, tmp_path: Path
) -> None:
    """librdkafka#5456 as it happens: after the resets the confluent worker's loop may
    wait in ``send_offsets_to_transaction`` past its timeout. When it does, the
    backend's deadline must end the process (exit 1, one line naming the call and the
    issue) within ``TXN_DEADLINE_S`` and a few seconds of the stream's end, without a
    stop signal. Whether librdkafka blocks depends on where the resets catch it (the
    mid-stream test beside this one passes when it does not); when it does not, the
    worker must have answered every input once, with no deadline fired. Either way a
    restart must then answer each input exactly once for ``read_committed``.
    ``tests/test_txn_deadline.py`` checks the deadline on a call that always blocks."""
    n = 800
    want = {f"x-{i}" for i in range(n)}
    with _resets_mid_stream(model_repo, "confluent", tmp_path, n) as run:
        fed = time.monotonic()
        ids = run.answers(want)  # every input, or nothing new for 15 s (a stuck call)
        try:
            # The call may block a while after the stream's end (measured: exit 36-37 s after).
            rc = run.proc.wait(0.5 if want <= set(ids) else TXN_DEADLINE_S + 30)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - fed
        text = run.log.read_text()
        stuck = [line for line in text.splitlines() if "still blocked" in line]
        if rc is None:
            assert want <= set(ids), (
                f"{len(want - set(ids))} unanswered and still running {took:.0f} s after the "
                "stream ended, no deadline fired:\n" + text[-3000:]
            )
            assert not stuck and not [i for i, c in ids.items() if c > 1], text[-3000:]
            print(f"librdkafka did not block this time: all {n} answered once, no deadline")
        else:
            assert rc == 1 and len(stuck) == 1, text[-3000:]
            assert "send_offsets_to_transaction(reset-in[" in stuck[0], stuck[0]
            assert f"still blocked {TXN_DEADLINE_S} s" in stuck[0] and "librdkafka#5456" in stuck[0]
            print(f"exit 1 {took:.1f} s after the stream ended: {stuck[0][-400:]}")
        run.restart()
        run.assert_each_answered_once(want)
        run.stop()
    assert run.rc == 0, run.log.read_text()[-3000:]
