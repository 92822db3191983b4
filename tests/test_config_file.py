"""``--config FILE``: precedence flag > environment > file > default, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

import pytest

from tests.harness import ROOT, consume_ids, demo_requests, header, produce
from worker.cli import parse_settings
from worker.errors import ConfigError
from worker.settings import Settings, flags


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "config.toml",
        f"""
input_topic = ["a", "b"]
output_topic = "out"
model_repository = "{tmp_path}"
bootstrap_servers = "file:9092"
max_batch_rows = 512
max_batch_delay_ms = 7
group_id = "from-file"
kafka_option = ["linger.ms=4", "client.rack=r1,r2"]
preload = ["m:2", "n"]
drain_timeout = 12
exactly_once = true
cache_max_bytes = "64M"
""",
    )


def test_every_level_of_the_precedence(config: Path) -> None:
    s = parse_settings(
        ["--config", str(config), "--max-batch-rows", "3"],
        {"WORKER_MAX_BATCH_ROWS": "64", "WORKER_MAX_BATCH_DELAY_MS": "9"},
    )
    assert s.max_batch_rows == 3  # flag over variable over file
    assert s.max_batch_delay_ms == 9.0  # variable over file
    assert s.group_id == "from-file"  # file over default
    assert s.retry_attempts == 3  # default
    # lists, aliases (input_topic, drain_timeout), switches and sizes as the flags take them
    assert s.input_topics == ("a", "b") and s.drain_timeout_s == 12.0
    assert s.preload == (("m", 2), ("n", None)) and s.exactly_once
    assert s.cache_max_bytes == 64 << 20
    assert s.kafka_properties == {"linger.ms": "4", "client.rack": "r1,r2"}


def test_the_file_from_worker_config(config: Path) -> None:
    s = parse_settings([], {"WORKER_CONFIG": str(config)})
    assert s.max_batch_rows == 512 and s.output_topic == "out"
    assert s.config == config


def test_bootstrap_servers_order(config: Path) -> None:
    assert parse_settings([], {"WORKER_CONFIG": str(config)}).bootstrap_servers == "file:9092"
    env = {"WORKER_CONFIG": str(config), "KAFKA_BOOTSTRAP_SERVERS": "kafka:1"}
    assert parse_settings([], env).bootstrap_servers == "kafka:1"  # over the file
    env["WORKER_BOOTSTRAP_SERVERS"] = "worker:1"
    assert parse_settings([], env).bootstrap_servers == "worker:1"  # over KAFKA_
    s = parse_settings(["--bootstrap-server", "flag:1"], env)
    assert s.bootstrap_servers == "flag:1"


def test_kafka_bootstrap_servers_without_a_file(tmp_path: Path) -> None:
    args = ["--input-topic", "a", "--output-topic", "o", "--model-repository", str(tmp_path)]
    assert parse_settings(args, {}).bootstrap_servers == "localhost:9092"
    s = parse_settings(args, {"KAFKA_BOOTSTRAP_SERVERS": "b1:9092,b2:9092"})
    assert s.bootstrap_servers == "b1:9092,b2:9092"


def test_settings_in_code_read_the_same_sources(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_CONFIG", str(config))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:1")
    s = Settings(max_batch_rows=8)
    assert (s.max_batch_rows, s.group_id, s.bootstrap_servers) == (8, "from-file", "kafka:1")


@pytest.mark.parametrize(
    ("text", "where", "why"),
    [
        ("max_bach_rows = 5\n", "max_bach_rows", "did you mean max_batch_rows"),
        ("input_topics = ['x']\n", "input_topics", "unknown key"),  # the field, not the flag
        ("kafka_properties = {}\n", "kafka_properties", "unknown key"),  # not a flag
        ("config = 'other.toml'\n", "config", "cannot name another"),
        ("max_batch_rows = 0\n", "max_batch_rows", "greater than 0"),
        ("max_batch_rows = 'lots'\n", "max_batch_rows", "'lots'"),
        ("device = 'tpu'\n", "device", "'tpu'"),
        ("drain_timeout = -1\n", "drain_timeout", "greater than or equal to 0"),
        ("model_repository = '/no/such/dir'\n", "model_repository", "not a directory"),
        ("kafka_option = ['nonsense']\n", "kafka_option", "KEY=VALUE"),
    ],
)
def test_a_bad_key_or_value_names_the_file_and_key(
    tmp_path: Path, text: str, where: str, why: str
) -> None:
    path = _write(tmp_path / "bad.toml", text)
    base = ["--input-topic", "a", "--output-topic", "o"]
    if "model_repository" not in text:
        base += ["--model-repository", str(tmp_path)]
    with pytest.raises(ConfigError) as info:
        parse_settings(["--config", str(path), *base], {})
    assert info.value.flag == f"{path}: {where}"
    assert why in info.value.reason


def test_a_bad_value_in_the_environment_names_the_variable_not_the_file(config: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(["--config", str(config)], {"WORKER_MAX_BATCH_ROWS": "0"})
    assert info.value.flag == "WORKER_MAX_BATCH_ROWS"


def test_a_file_that_is_not_there_or_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(["--config", str(tmp_path / "nope.toml")], {})
    assert info.value.flag == "--config" and "no such file" in info.value.reason
    with pytest.raises(ConfigError) as info:
        parse_settings([], {"WORKER_CONFIG": str(tmp_path / "nope.toml")})
    assert info.value.flag == "WORKER_CONFIG"
    broken = _write(tmp_path / "broken.toml", "max_batch_rows = \n")
    with pytest.raises(ConfigError) as info:
        parse_settings(["--config", str(broken)], {})
    assert info.value.flag == str(broken) and "line 1" in info.value.reason


def test_every_flag_can_be_a_key_of_the_documented_file(tmp_path: Path) -> None:
    """docs/configuration.md's example holds every key, and is a file the worker takes."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert example, "docs/configuration.md has no toml example"
    props = _write(tmp_path / "client.properties", "linger.ms=1\nclient.id=doc\n")
    text = example.group(1).replace("/srv/models", str(tmp_path))
    text = text.replace("/etc/inference-worker/client.properties", str(props))
    keys = set(tomllib.loads(text))
    assert keys == {f.replace("-", "_") for f in flags().values()} - {"config"}
    s = parse_settings(["--config", str(_write(tmp_path / "c.toml", text))], {})
    assert s.model_repository == tmp_path
    assert s.kafka_properties["client.id"] == "doc" and s.kafka_properties["linger.ms"] == "5"


def test_exits_2_with_one_line_naming_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.toml", "max_batch_rows = -5\n")
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "max_batch_rows" in lines[0], lines


def test_help_names_the_config_flag_and_kafka_bootstrap_servers() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--config FILE" in out and "[WORKER_CONFIG]" in out
    text = " ".join(out.split())
    also = "(also KAFKA_BOOTSTRAP_SERVERS, below WORKER_BOOTSTRAP_SERVERS)"
    assert f"{also} [WORKER_BOOTSTRAP_SERVERS]" in text


def test_the_flag_names_the_file_over_worker_config(config: Path, tmp_path: Path) -> None:
    other = _write(tmp_path / "other.toml", 'input_topic = "x"\noutput_topic = "y"\n')
    env = {"WORKER_CONFIG": str(other), "WORKER_MODEL_REPOSITORY": str(tmp_path)}
    assert parse_settings(["--config", str(config)], env).group_id == "from-file"
    assert parse_settings([], env).input_topics == ("x",)


def test_the_given_environment_replaces_the_process_environment(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_MAX_BATCH_ROWS", "7")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "process:1")
    s = parse_settings(["--config", str(config)], {})
    assert (s.max_batch_rows, s.bootstrap_servers) == (512, "file:9092")
    s = parse_settings(["--config", str(config)])  # the process's own
    assert (s.max_batch_rows, s.bootstrap_servers) == (7, "process:1")


@pytest.mark.kafka
def test_a_worker_configured_by_its_file_alone_answers(
    kafka_bootstrap: str, new_topic: Callable[..., str], group_id: str, model_repo: Path,
    tmp_path: Path,
) -> None:
    """As the Kubernetes ConfigMap runs it: ``--config FILE``, the broker from
    ``KAFKA_BOOTSTRAP_SERVERS``, no other flag or ``WORKER_*`` variable."""
    requests, answers = new_topic(), new_topic()
    path = _write(
        tmp_path / "config.toml",
        f'input_topic = ["{requests}"]\noutput_topic = "{answers}"\n'
        f'model_repository = "{model_repo}"\ngroup_id = "{group_id}"\n'
        'metrics_port = 0\ndevice = "cpu"\nmax_batch_delay_ms = 1\n',
    )
    produce(kafka_bootstrap, requests, demo_requests(3, "cfg"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", "--config", str(path)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        got = consume_ids(kafka_bootstrap, answers, {f"cfg-{i}" for i in range(3)}, timeout=60)
    finally:
        proc.terminate()
        rc = proc.wait(60)
    assert {header(r, "request-id") for r in got} >= {"cfg-0", "cfg-1", "cfg-2"}, log.read_text()
    assert rc == 0, log.read_text()[-3000:]
