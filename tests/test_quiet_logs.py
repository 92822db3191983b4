"""Quiet logs: a Kafka client's repeated lines summarised, timestamps with a time zone."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.brokers import ROOT
from worker.observability import RepeatedLines, configure_logging


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_first_line_passes_then_one_summary_per_interval() -> None:
    clock = Clock()
    lines = RepeatedLines(interval_s=10.0, clock=clock)
    first = _record("worker.kafka.librdkafka", "FAIL %s: refused (after %dms)", "b:1", 0)
    assert lines.filter(first) and first.getMessage() == "FAIL b:1: refused (after 0ms)"
    held = 0
    for i in range(1, 50):  # 49 more within the first 9.8 s
        clock.now = 100.0 + i * 0.2
        held += not lines.filter(_record("worker.kafka.librdkafka", "FAIL b:1 (after %dms)", i))
    assert held == 49
    clock.now = 110.0
    summary = _record("worker.kafka.librdkafka", "FAIL b:1 (after %dms)", 7)
    assert lines.filter(summary)
    assert summary.getMessage() == "50 more in the last 10 s, the latest: FAIL b:1 (after 7ms)"
    # the summary opened the next window
    clock.now = 115.0
    assert not lines.filter(_record("worker.kafka.librdkafka", "FAIL again"))


def test_kafka_python_lines_of_any_kind_share_their_family_window() -> None:
    clock = Clock()
    lines = RepeatedLines(interval_s=10.0, clock=clock)
    assert lines.filter(_record("kafka.net.manager", "Connection failed"))
    assert not lines.filter(_record("kafka.net.connection", "Connection lost"))
    assert not lines.filter(_record("kafka.net.manager", "not ready", level=logging.WARNING))
    # librdkafka's family has a window of its own
    assert lines.filter(_record("worker.kafka.librdkafka", "FAIL"))


def test_a_quiet_family_starts_afresh_and_others_pass() -> None:
    clock = Clock()
    lines = RepeatedLines(interval_s=10.0, clock=clock)
    assert lines.filter(_record("kafka.conn", "down"))
    clock.now = 125.0
    again = _record("kafka.conn", "down")
    assert lines.filter(again) and again.getMessage() == "down"  # nothing held: no count
    for _ in range(3):  # the worker's own lines, and DEBUG lines asked for, always pass
        assert lines.filter(_record("worker.loop", "t[0]@5 -> dead letter"))
        assert lines.filter(_record("worker.kafka", "revoked t[0]", level=logging.WARNING))
        assert lines.filter(_record("kafka.conn", "detail", level=logging.DEBUG))


def test_text_log_lines_carry_utc_as_z(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", "INFO")
    try:
        record = logging.LogRecord("worker.loop", logging.INFO, __file__, 1, "at", None, None)
        record.created, record.msecs = 1_796_138_403.123456, 123.456  # 2026-12-01T15:20:03.123Z
        logging.getLogger().handlers[0].handle(record)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line == "2026-12-01T15:20:03.123Z INFO worker.loop: at"
    finally:
        logging.getLogger().handlers.clear()


def test_configured_handler_summarises_client_lines(capsys: pytest.CaptureFixture[str]) -> None:
    client = logging.getLogger("worker.kafka.librdkafka")
    level = client.level  # inference-producer's main() quiets it for the whole process
    client.setLevel(logging.NOTSET)
    configure_logging("json", "INFO")
    try:
        for _ in range(100):
            client.error("FAIL refused")
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    finally:
        logging.getLogger().handlers.clear()
        client.setLevel(level)


STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


@pytest.mark.slow  # the start-up's own 30 s: make test-slow, in CI
def test_an_unreachable_broker_says_little_then_fails(tmp_path: Path) -> None:
    """Both clients, as subprocesses side by side: the worker's own start-up gives up
    after 30 s; until then at most 5 lines, then the one fatal line and exit 1."""
    from worker.demo import write_demo_model

    models = tmp_path / "models"
    write_demo_model(models)
    procs = {}
    start = time.monotonic()
    for client in ("confluent", "kafka-python"):
        args = ["run", "--kafka-client", client, "--bootstrap-server", "127.0.0.1:1"]
        args += ["--input-topic", "in", "--output-topic", "out", "--model-repository", str(models)]
        args += ["--metrics-port", "0", "--device", "cpu"]
        procs[client] = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for client, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        lines = out.strip().splitlines()
        assert proc.returncode == 1, out[-3000:]
        fatal = [i for i, line in enumerate(lines) if "no answer from the Kafka cluster" in line]
        assert len(fatal) == 1, out[-3000:]
        assert fatal[0] <= 5, f"{client}: {fatal[0]} lines before the fatal one:\n{out}"
        assert all(STAMP.match(line) for line in lines), out
    assert time.monotonic() - start < 90
