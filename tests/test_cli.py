"""Flags, WORKER_* variables, credentials, and the one-line configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import parse_settings
from worker.config import ConfigError, consumer_config, producer_config

BASE = ["--input-topic", "a,b", "--output-topic", "out"]


def test_flags_and_environment(tmp_path: Path) -> None:
    env = {
        "WORKER_MODEL_REPOSITORY": str(tmp_path),
        "WORKER_MAX_BATCH_ROWS": "64",
        "WORKER_EXACTLY_ONCE": "true",
        "WORKER_PRELOAD": "m:2,n",
    }
    s = parse_settings(
        [*BASE, "--max-batch-rows", "32", "--kafka-option", "max.poll.records=7"], env
    )
    assert s.input_topics == ("a", "b") and s.dead_letter_topic == "a.dlq"
    assert s.max_batch_rows == 32  # the flag wins over the environment
    assert s.exactly_once and s.preload == (("m", 2), ("n", None))
    assert consumer_config(s)["max_poll_records"] == 7
    assert "max_poll_records" not in producer_config(s)  # routed only where accepted
    assert producer_config(s)["transactional_id"].startswith("inference-worker-")


def test_credentials_from_environment_never_in_repr(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr3t-value\n")
    env = {
        "WORKER_MODEL_REPOSITORY": str(tmp_path),
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "worker",
        "KAFKA_SASL_PASSWORD_FILE": str(secret),
    }
    s = parse_settings(BASE, env)
    assert consumer_config(s)["sasl_plain_password"] == "s3cr3t-value"
    assert producer_config(s)["sasl_mechanism"] == "SCRAM-SHA-512"
    assert "s3cr3t" not in repr(s)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--max-batch-rows", "0"], "--max-batch-rows"),
        (["--device", "tpu"], "--device"),
        (["--output-format", "xml"], "--output-format"),
        (["--kafka-option", "nonsense"], "--kafka-option"),
        (["--kafka-option", "no_such_setting=1"], "--kafka-option"),
        (["--preload", ":3"], "--preload"),
        (["--cache-max-bytes", "lots"], "--cache-max-bytes"),
    ],
)
def test_bad_flag_names_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings([*BASE, "--model-repository", str(tmp_path), *args], {})
    assert info.value.flag == flag


def test_bad_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "run",
            *BASE,
            "--model-repository",
            str(tmp_path),
            "--max-batch-delay-ms",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-batch-delay-ms" in lines[0]
    unknown = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "--bogus" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_help_shows_environment_variables() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    for var in (
        "WORKER_BOOTSTRAP_SERVERS",
        "WORKER_INPUT_TOPIC",
        "WORKER_MAX_BATCH_DELAY_MS",
        "WORKER_KAFKA_OPTION",
        "WORKER_EXACTLY_ONCE",
    ):
        assert var in out.stdout
