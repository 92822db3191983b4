"""Flags, WORKER_* variables, credentials, and the one-line configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import parse_settings
from worker.errors import ConfigError
from worker.kafka.options import for_clients, kafka_python_config

BASE = ["--input-topic", "a,b", "--output-topic", "out"]


def test_flags_and_environment(tmp_path: Path) -> None:
    env = {
        "WORKER_MODEL_REPOSITORY": str(tmp_path),
        "WORKER_MAX_BATCH_ROWS": "64",
        "WORKER_EXACTLY_ONCE": "true",
        "WORKER_PRELOAD": "m:2,n",
    }
    s = parse_settings(
        [*BASE, "--max-batch-rows", "32", "--kafka-option", "fetch.max.bytes=1048576"], env
    )
    assert s.input_topics == ("a", "b") and s.dead_letter_topic == "a.dlq"
    assert s.max_batch_rows == 32  # the flag wins over the environment
    assert s.exactly_once and s.preload == (("m", 2), ("n", None))
    assert s.kafka_client == "confluent"
    assert for_clients(s.kafka_properties, "consumer")["fetch.max.bytes"] == "1048576"
    assert "fetch.max.bytes" not in for_clients(s.kafka_properties, "producer")  # routed
    assert s.txn_id.startswith("inference-worker-")


def test_kafka_config_file_then_options_win(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text(
        "# as Kafka's tools take it\nsecurity.protocol = PLAINTEXT\nfetch.max.bytes: 2097152\n"
        "linger.ms=7\n"
    )
    s = parse_settings(
        [
            *BASE,
            "--model-repository",
            str(tmp_path),
            "--kafka-config",
            str(props),
            "--kafka-option",
            "linger.ms=3",
        ],
        {},
    )
    assert s.kafka_properties == {
        "security.protocol": "PLAINTEXT",
        "fetch.max.bytes": "2097152",
        "linger.ms": "3",
    }
    # kafka-python gets the same properties under its own keywords
    kp = parse_settings(
        [
            *BASE,
            "--model-repository",
            str(tmp_path),
            "--kafka-config",
            str(props),
            "--kafka-client",
            "kafka-python",
        ],
        {},
    )
    assert kafka_python_config(kp.kafka_properties, "consumer")["fetch_max_bytes"] == 2097152
    assert kafka_python_config(kp.kafka_properties, "producer")["linger_ms"] == 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 << 20), ("64Mi", 64 << 20), ("1.5G", 3 << 29), ("2KiB", 2048), ("100", 100)],
)
def test_sizes_accept_the_usual_spellings(tmp_path: Path, text: str, expected: int) -> None:
    s = parse_settings([*BASE, "--model-repository", str(tmp_path), "--cache-max-bytes", text], {})
    assert s.cache_max_bytes == expected


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
    assert s.kafka_properties["sasl.password"] == "s3cr3t-value"
    assert kafka_python_config(s.kafka_properties, "producer")["sasl_mechanism"] == "SCRAM-SHA-512"
    assert "s3cr3t" not in repr(s)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--max-batch-rows", "0"], "--max-batch-rows"),
        (["--device", "tpu"], "--device"),
        (["--output-format", "xml"], "--output-format"),
        (["--kafka-option", "nonsense"], "--kafka-option"),
        (["--kafka-option", "no.such.property=1"], "--kafka-option"),
        (["--kafka-option", "linger.ms=soon"], "--kafka-option"),
        (["--kafka-client", "kafka-python", "--kafka-option", "no.such=1"], "--kafka-option"),
        (["--kafka-client", "rdkafka"], "--kafka-client"),
        (["--kafka-config", "/no/such/file.properties"], "--kafka-config"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--preload", ":3"], "--preload"),
        (["--cache-max-bytes", "lots"], "--cache-max-bytes"),
    ],
)
def test_bad_flag_names_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings([*BASE, "--model-repository", str(tmp_path), *args], {})
    assert info.value.flag == flag


def test_a_misspelt_switch_in_the_environment_is_refused(tmp_path: Path) -> None:
    env = {"WORKER_MODEL_REPOSITORY": str(tmp_path), "WORKER_EXACTLY_ONCE": "ture"}
    with pytest.raises(ConfigError) as info:
        parse_settings(BASE, env)
    assert info.value.flag == "WORKER_EXACTLY_ONCE"


def test_version_prints_and_exits_zero() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.startswith("inference-worker ")


def test_unknown_kafka_property_exits_2_naming_it(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "run",
            *BASE,
            "--model-repository",
            str(tmp_path),
            "--kafka-option",
            "no.such.property=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no.such.property" in lines[0], lines


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


def test_every_setting_has_help_a_group_and_its_variable() -> None:
    from worker.kafka import DEFAULT_BACKEND
    from worker.settings import GROUPS, Settings

    assert Settings.model_fields["kafka_client"].default == DEFAULT_BACKEND
    for name, info in Settings.model_fields.items():
        assert info.description, f"{name} has no docstring"
        if name != "kafka_properties":
            assert isinstance(info.json_schema_extra, dict)
            assert info.json_schema_extra["group"] in GROUPS, name
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for title in GROUPS.values():
        assert f"\n{title}:\n" in out, title


def test_kafka_tools_spelling_of_bootstrap_and_environment_lists(tmp_path: Path) -> None:
    s = parse_settings(
        ["--bootstrap-server", "b1:9092,b2:9092", "--model-repository", str(tmp_path)],
        {
            "WORKER_INPUT_TOPIC": "x, y",
            "WORKER_OUTPUT_TOPIC": "out",
            "WORKER_KAFKA_OPTION": "linger.ms=2\nclient.rack=a,b",
        },
    )
    assert s.bootstrap_servers == "b1:9092,b2:9092"
    assert s.input_topics == ("x", "y")
    assert s.kafka_properties == {"linger.ms": "2", "client.rack": "a,b"}


def test_a_required_flag_names_itself_and_its_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(["--output-topic", "o", "--model-repository", str(tmp_path)], {})
    assert info.value.flag == "--input-topic"
    assert "WORKER_INPUT_TOPIC" in str(info.value)
