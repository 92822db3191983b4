"""A record that kills the process natively is dead-lettered after its 3rd crash.

The crash is real: the worker process (tests/poison_worker.py) loads sessions
that abort the process (SIGABRT, as a crash inside a native kernel would) when
they run the poison request's row. Each crash is a real process death; the test
restarts the worker as Kubernetes would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import BOTH_CLIENTS
from tests.harness import (
    FAST_GROUP,
    ROOT,
    committed,
    consume,
    consume_ids,
    header,
    produce,
    worker_process,
)
from worker.demo import write_demo_model
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka

POISON = "r-10"
N = 30  # requests; request r-<i> holds rows of i / N, so the poison row is all 10 / N


def _poisoned_worker(
    args: list[str], log_path: Path, poison: float = 10 / N
) -> subprocess.Popen[bytes]:
    """The worker, its sessions aborting the process on the poison request's row."""
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.poison_worker", str(poison), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _args(
    bootstrap: str, requests: str, outputs: str, repo: Path, group: str, client: str
) -> list[str]:
    return [
        "--bootstrap-servers", bootstrap,
        "--input-topic", requests,
        "--output-topic", outputs,
        "--model-repository", str(repo),
        "--group-id", group,
        "--metrics-port", "0",
        "--device", "cpu",
        "--kafka-client", client,
        *(f"--kafka-option={k}={v}" for k, v in FAST_GROUP.items()),
    ]  # fmt: skip


def _publish(bootstrap: str, topic: str, n: int) -> list[tuple[bytes, bytes, Any]]:
    """``n`` one-row msgpack requests for the demo MLP, ``r-<i>`` whose row is i / n;
    returns the records (key, value, headers) as sent."""
    records = []
    for i in range(n):
        value, headers = encode_request(
            {"x": np.full((1, 784), i / n, np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id=f"r-{i}",
        )
        records.append((f"k{i}".encode(), value, headers))
    produce(bootstrap, topic, records)
    return records


@pytest.mark.slow  # over 12 s: make test stays under its 10 minutes
@pytest.mark.parametrize("client", BOTH_CLIENTS)
def test_a_record_that_crashes_the_process_is_dead_lettered_and_its_partition_goes_on(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    client: str,
) -> None:
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()
    n = N
    records = _publish(kafka_bootstrap, requests, n)
    args = _args(kafka_bootstrap, requests, outputs, repo, group_id, client)
    crashes = 0
    want = {f"r-{i}" for i in range(n)} - {POISON}
    for attempt in range(6):
        proc = _poisoned_worker(args, tmp_path / f"worker-{attempt}.log")
        try:
            # Either it dies on the poison pill, or it gets past it.
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                answered = consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=0.5)
                if answered:
                    break
            if proc.poll() is not None:
                assert proc.returncode != 0
                crashes += 1
                continue
            dlq = consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=30)
            answers = consume_ids(kafka_bootstrap, outputs, want, timeout=60)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
        break
    else:
        pytest.fail(f"still crashing after {crashes} restarts")
    # one unnoticed crash, then two careful runs that crash; the third is not run
    assert crashes == 3, crashes
    assert len(dlq) == 1 and header(dlq[0], "request-id") == POISON
    assert header(dlq[0], "error-type") == "inference-error"
    assert "crashed the worker" in (header(dlq[0], "error-message") or "")
    assert dlq[0].key == b"k10" and dlq[0].value == records[10][1]
    assert want <= {header(r, "request-id") for r in answers}
    # the partition went on: everything is committed after a clean stop
    assert proc.returncode == 0
    assert committed(kafka_bootstrap, group_id, requests) == {0: n}


def test_a_clean_stop_leaves_nothing_to_run_carefully(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, tmp_path: Path
) -> None:
    """The poison-pill check costs nothing after a clean stop: no record runs alone."""
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()

    def request(rid: str) -> tuple[None, bytes, list[tuple[str, bytes]]]:
        value, headers = encode_request(
            {"x": np.zeros((1, 784), np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id=rid,
        )
        return None, value, headers

    produce(kafka_bootstrap, requests, [request("a")])
    args = _args(kafka_bootstrap, requests, outputs, repo, group_id, "confluent")
    for run, log_name in enumerate(("first.log", "second.log")):
        proc = worker_process(args, log_path=tmp_path / log_name)
        try:
            consume_ids(kafka_bootstrap, outputs, {"a"} if run == 0 else set(), timeout=60)
            if run == 1:
                produce(kafka_bootstrap, requests, [request("b")])
                consume_ids(kafka_bootstrap, outputs, {"b"}, timeout=60)
            time.sleep(0.5)
        finally:
            proc.terminate()
            assert proc.wait(60) == 0
    second = (tmp_path / "second.log").read_text()
    assert "one at a time" not in second, second[-2000:]


FAR = 700  # requests; the poison pill among them far past the last commit
FAR_POISON = 640


@pytest.mark.slow
@pytest.mark.parametrize(
    ("client", "exactly_once"),
    [("confluent", False), ("kafka-python", False), ("confluent", True)],
    ids=["confluent", "kafka-python", "exactly-once-confluent"],
)
def test_a_poison_pill_far_past_the_last_commit_crashes_the_worker_at_most_3_times(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    group_id: str,
    tmp_path: Path,
    client: str,
    exactly_once: bool,
) -> None:
    """The careful window reaches every record handed to inference before the crash,
    however far past the committed offset (with a fixed window of 500 records the
    pill at 640 ran outside it after every restart: a crash loop)."""
    repo = tmp_path / "models"
    write_demo_model(repo)
    requests, outputs = new_topic(), new_topic()
    _publish(kafka_bootstrap, requests, FAR)
    # Nothing committed while serving: the group's offset stays at 0 until the pill.
    args = [
        *_args(kafka_bootstrap, requests, outputs, repo, group_id, client),
        "--commit-interval-ms", "600000",
        *(["--exactly-once"] if exactly_once else []),
    ]  # fmt: skip
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    poison = f"r-{FAR_POISON}"
    crashes = 0
    for attempt in range(6):
        proc = _poisoned_worker(args, tmp_path / f"worker-{attempt}.log", FAR_POISON / FAR)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if consume(kafka_bootstrap, f"{requests}.dlq", 1, timeout=0.5):
                    break
            if proc.poll() is not None:
                assert proc.returncode != 0
                assert committed(kafka_bootstrap, group_id, requests)[0] is not None
                crashes += 1
                continue
            dlq = consume(kafka_bootstrap, f"{requests}.dlq", 1, 30, isolation)
            want = {f"r-{i}" for i in range(FAR)} - {poison}
            if exactly_once:
                # Answers leave in the next transaction, at the interval or the drain: the
                # records after the pill came in its poll; the drain commits them.
                time.sleep(1.0)
            else:
                consume_ids(kafka_bootstrap, outputs, want, timeout=120)
            proc.terminate()
            assert proc.wait(60) == 0
            answers = consume(kafka_bootstrap, outputs, len(want), 60, isolation, settle=1.0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
        break
    else:
        pytest.fail(f"still crashing after {crashes} restarts")
    assert crashes == 3, crashes  # one unnoticed, two careful runs of the pill
    assert len(dlq) == 1 and header(dlq[0], "request-id") == poison
    assert "crashed the worker" in (header(dlq[0], "error-message") or "")
    ids = [header(r, "request-id") for r in answers]
    assert want <= set(ids)
    if exactly_once:  # each answer once for read_committed
        assert len(ids) == len(want), len(ids)
    assert committed(kafka_bootstrap, group_id, requests) == {0: FAR}
