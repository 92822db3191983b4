"""Helpers for tests that run a real worker against the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from worker.loop import Worker
from worker.observability import Metrics
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@cache
def go_tool(name: str) -> str:
    """The path of a Go command the tests use (promtool, helm, toxiproxy, compose), built once by
    ``scripts/go-tool NAME install`` into a cache outside the repository."""
    built = subprocess.run(
        [str(ROOT / "scripts" / "go-tool"), name, "install"],
        capture_output=True, text=True, timeout=3600, check=False,
    )
    if built.returncode != 0:
        raise RuntimeError(f"scripts/go-tool {name} install failed:\n{built.stderr[-3000:]}")
    return built.stdout.strip().splitlines()[-1]


def settings(
    bootstrap: str, input_topic: str, output_topic: str, repo: Path, group: str, **overrides: Any
) -> Settings:
    base = Settings(
        input_topics=(input_topic,),
        output_topic=output_topic,
        model_repository=repo,
        bootstrap_servers=bootstrap,
        group_id=group,
        metrics_port=0,
        device="cpu",
        drain_timeout_s=20.0,
    )
    return base.model_copy(update=overrides)


@contextmanager
def worker_thread(
    s: Settings, metrics: Metrics | None = None, *, exit_code: int | None = 0
) -> Iterator[Worker]:
    """A worker serving in a background thread; stopped and joined on exit.

    ``Worker.run()`` must then have returned ``exit_code``: 0 (the default) says
    the stop answered and committed everything polled; ``None`` checks nothing.
    """
    worker = Worker(s, metrics=metrics)
    errors: list[BaseException] = []
    codes: list[int] = []

    def target() -> None:
        try:
            codes.append(worker.run())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="worker", daemon=True)
    thread.start()
    try:
        yield worker
    except BaseException:
        worker.stop()
        thread.join(60)
        raise  # the test's own failure first
    worker.stop()
    thread.join(60)
    if errors:
        raise errors[0]
    assert not thread.is_alive(), "worker did not stop within 60 s"
    if exit_code is not None:
        assert codes == [exit_code], f"Worker.run() returned {codes[0]}, not {exit_code}"


def produce(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes, list]],
    partition: int | None = None,
) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024, linger_ms=5
    )
    try:
        for key, value, headers in records:
            producer.send(topic, value=value, key=key, headers=headers, partition=partition)
        producer.flush()
    finally:
        producer.close()


def _read(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Any]], bool],
    timeout: float,
    isolation: str,
    settle: float,
    missing: Callable[[list[Any]], str] | None = None,
) -> list[Any]:
    """Read ``topic`` from the beginning until ``done(records)``, then ``settle`` s more.

    With ``missing``, a read that times out first fails with ``missing(records)``
    (what never came); without it, it returns what came and the caller counts.
    """
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level=isolation,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(out) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        if missing is not None and not done(out):
            raise AssertionError(
                f"{topic}: after {timeout:.0f} s {len(out)} records, {missing(out)}"
            )
        end = time.monotonic() + settle
        while time.monotonic() < end:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
    finally:
        consumer.close()
    return out


def consume(
    bootstrap: str,
    topic: str,
    n: int,
    timeout: float = 60.0,
    isolation: str = "read_uncommitted",
    settle: float = 0.0,
) -> list[Any]:
    """Up to ``n`` records from the beginning (then ``settle`` s more, to catch extras),
    or what came within ``timeout``: the caller asserts how many it needs."""
    return _read(bootstrap, topic, lambda out: len(out) >= n, timeout, isolation, settle)


def consume_ids(
    bootstrap: str,
    topic: str,
    want: set[str],
    timeout: float = 90.0,
    isolation: str = "read_uncommitted",
    settle: float = 0.0,
) -> list[Any]:
    """Read from the beginning until every request id in ``want`` has an answer;
    fails, naming the ids still missing, if they do not all come within ``timeout``."""

    def done(out: list[Any]) -> bool:
        return want <= {header(r, "request-id") for r in out}

    def missing(out: list[Any]) -> str:
        absent = sorted(want - {header(r, "request-id") for r in out})
        return f"no answer to {len(absent)} of {len(want)} request ids: {absent[:10]}"

    return _read(bootstrap, topic, done, timeout, isolation, settle, missing)


def assert_same_outputs(got: object, want: object) -> None:
    """A decoded output equals ONNX Runtime's: tensors to 1e-5, maps key by key, strings exactly."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert dict(g).keys() == w.keys()
            assert list(dict(g).values()) == pytest.approx(list(w.values()), abs=1e-5)
    elif np.asarray(want).dtype.kind in "OUS":
        assert np.asarray(got).astype(str).tolist() == np.asarray(want).astype(str).tolist()
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


# Short enough that a killed member's partitions move on within seconds.
FAST_GROUP = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        consumer.close()


def worker_process(
    args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """``inference-worker run ARGS`` as a real process (for signals and kill -9)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def header(record: Any, name: str) -> str | None:
    for key, value in record.headers or []:
        if key == name:
            return value.decode()
    return None


def demo_requests(
    n: int, prefix: str, *, seed: int = 0, key_mod: int | None = None, rows: int = 1
) -> list[tuple[bytes, bytes, list]]:
    """``n`` msgpack requests of ``rows`` rows for the demo MLP, ids ``<prefix>-<i>``,
    keys ``k<i>`` (or ``k<i % key_mod>``, so several records share a key)."""
    from worker.protocol import encode_request

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        value, headers = encode_request(
            {"x": rng.random((rows, 784), dtype=np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id=f"{prefix}-{i}",
        )
        out.append((f"k{i if key_mod is None else i % key_mod}".encode(), value, headers))
    return out
