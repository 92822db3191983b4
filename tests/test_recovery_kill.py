"""Nothing lost when a worker is killed twice while one record runs long.

Real processes on a real broker (tests/poison_worker.py, whose sessions sleep on
the slow record's row): record r-0 runs 8 s, r-1..r-5 a few ms, ``--drain-timeout
1``. kill -9 while r-0 runs; the restart runs the records one at a time (the
last owner died mid-stream) and must wait for r-0 however long it runs, not
commit r-1's try marker past it; kill -9 again once the group's offset moves; a
third run finishes. Every record is answered (exactly once under
``--exactly-once``, read_committed), none dead-lettered.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BOTH_CLIENTS
from tests.harness import FAST_GROUP, ROOT, committed, consume, consume_ids, header, produce
from worker.demo import write_demo_model
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka

N = 6
SLOW_X = 0.5  # r-0's rows; the others hold i / 10
SLOW_S = 8.0


def _worker(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.poison_worker", f"99/{SLOW_X}/{SLOW_S}", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait(what: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


@pytest.mark.slow  # ~35 s a run (two kills, an 8 s record): make test-slow, in CI
@pytest.mark.parametrize("client", BOTH_CLIENTS)
@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_killed_twice_while_a_record_runs_long_nothing_is_lost(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    client: str,
    exactly_once: bool,
) -> None:
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()
    records = []
    for i in range(N):
        x = SLOW_X if i == 0 else i / 10
        value, headers = encode_request(
            {"x": np.full((1, 784), x, np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id=f"r-{i}",
        )
        records.append((f"k{i}".encode(), value, headers))
    produce(kafka_bootstrap, requests, records)
    args = [
        "--bootstrap-servers", kafka_bootstrap,
        "--input-topic", requests,
        "--output-topic", outputs,
        "--model-repository", str(repo),
        "--group-id", group_id,
        "--metrics-port", "0",
        "--device", "cpu",
        "--kafka-client", client,
        "--drain-timeout", "1",
        "--commit-interval-ms", "50",
        *(["--exactly-once"] if exactly_once else []),
        *(f"--kafka-option={k}={v}" for k, v in FAST_GROUP.items()),
    ]  # fmt: skip

    def slow_runs(log: Path) -> int:
        return log.read_text(errors="replace").count("slow row") if log.exists() else 0

    def offset() -> int:
        return committed(kafka_bootstrap, group_id, requests).get(0) or 0

    # 1. Killed while r-0 runs (with the others, in one batch): nothing committed.
    log1 = tmp_path / "worker-1.log"
    proc = _worker(args, log1)
    try:
        _wait(lambda: slow_runs(log1) > 0, 60, "r-0 never ran")
    finally:
        proc.kill()
        proc.wait(30)
    # 2. The restart runs r-0 alone; killed once the group's offset moves past 0.
    log2 = tmp_path / "worker-2.log"
    proc = _worker(args, log2)
    try:
        _wait(lambda: slow_runs(log2) > 0, 60, "r-0 never ran after the restart")
        _wait(lambda: offset() >= 1, 60, log2.read_text(errors="replace")[-3000:])
    finally:
        proc.kill()
        proc.wait(30)
    # 3. A third run finishes and stops cleanly.
    log3 = tmp_path / "worker-3.log"
    proc = _worker(args, log3)
    want = {f"r-{i}" for i in range(N)}
    try:
        got = consume_ids(kafka_bootstrap, outputs, want, timeout=90, isolation="read_committed")
        _wait(lambda: offset() == N, 60, log3.read_text(errors="replace")[-3000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log3.read_text(errors="replace")[-3000:]
    ids = [header(r, "request-id") for r in got]
    assert set(ids) == want, "answers lost"
    if exactly_once:
        late = consume(
            kafka_bootstrap, outputs, len(ids) + 1, timeout=3, isolation="read_committed"
        )
        assert sorted(header(r, "request-id") for r in late) == sorted(want), "duplicates"
    assert consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=2) == []


def test_sigterm_during_a_careful_run_exits_0_and_charges_no_crash(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    # kill -9 while r-0 runs; the restart runs r-0 alone (try:0:1); SIGTERM meanwhile
    # (a rolling update): exit 0 at once, and offset 0 committed clean over the marker.
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()
    value, headers = encode_request(
        {"x": np.full((1, 784), SLOW_X, np.float32)}, format="msgpack", model="mnist-mlp"
    )
    produce(kafka_bootstrap, requests, [(b"k0", value, headers)])
    args = [
        "--bootstrap-servers", kafka_bootstrap,
        "--input-topic", requests,
        "--output-topic", outputs,
        "--model-repository", str(repo),
        "--group-id", group_id,
        "--metrics-port", "0",
        "--device", "cpu",
        "--drain-timeout", "5",
        *(f"--kafka-option={k}={v}" for k, v in FAST_GROUP.items()),
    ]  # fmt: skip
    for run in (1, 2):
        log = tmp_path / f"worker-{run}.log"
        proc = _worker(args, log)
        try:
            _wait(lambda log=log: _ran(log), 60, f"r-0 never ran in run {run}")
        finally:
            if run == 1:
                proc.kill()
                proc.wait(30)
    assert "try:0:1" in _metadata(kafka_bootstrap, group_id, requests)
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    took = time.monotonic() - stopped
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    assert took < SLOW_S, f"the stop waited {took:.1f} s for the careful run"
    assert _metadata(kafka_bootstrap, group_id, requests) == "0:clean"


def _ran(log: Path) -> bool:
    return log.exists() and "slow row" in log.read_text(errors="replace")


def _metadata(bootstrap: str, group: str, topic: str) -> str:
    """``<offset>:<metadata>`` the group committed for partition 0 of ``topic``."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        got = consumer.committed(TopicPartition(topic, 0), metadata=True)
    finally:
        consumer.close()
    return "" if got is None else f"{got.offset}:{(got.metadata or '').rstrip(chr(0))}"
