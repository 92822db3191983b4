"""SASL (SCRAM-SHA-512, PLAIN) and TLS against a secured broker of this module's own.

Credentials come only from ``KAFKA_*`` variables or files, never flags; they
must never appear in anything the worker or the producer tools print; a wrong
password or an untrusted certificate must end the process within seconds,
with one clear line and exit status 1, instead of retrying forever. A Java
client's ``client.properties`` (``sasl.jaas.config`` and all) works as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from tests.brokers import ROOT, Broker, private_broker
from tests.harness import header

pytestmark = pytest.mark.kafka

FAIL_FAST_S = 30.0


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[Broker]:
    with private_broker(security=True) as broker:
        yield broker


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.demo import write_demo_model

    repo = tmp_path_factory.mktemp("secure") / "models"
    write_demo_model(repo)
    return repo


def _sasl_env(broker: Broker, **extra: str) -> dict[str, str]:
    return {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "worker",
        **extra,
    }


def _ssl_env(ca_file: Path) -> dict[str, str]:
    return {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": str(ca_file)}


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "WORKER_"))}
    return {**env, **extra}


def _cli(
    module: str, args: list[str], env: dict[str, str], timeout: float
) -> tuple[int, str, float]:
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=_clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.returncode, out.stdout + out.stderr, time.monotonic() - start


def _publish(
    bootstrap: str, topic: str, env: dict[str, str], rows: int = 12
) -> tuple[int, str, float]:
    args = ["publish", "--bootstrap-servers", bootstrap, "--topic", topic, "--format", "msgpack"]
    args += ["--model", "mnist-mlp", "--synthetic", "784", "--rows", str(rows), "--batch-rows", "3"]
    return _cli("producers.cli", args, env, timeout=120)


def _worker_args(
    bootstrap: str, topic: str, models: Path, extra: tuple[str, ...] = ()
) -> list[str]:
    return [
        "run",
        "--bootstrap-servers",
        bootstrap,
        "--input-topic",
        topic,
        "--output-topic",
        f"{topic}.out",
        "--model-repository",
        str(models),
        "--group-id",
        f"{topic}-g",
        "--metrics-port",
        "0",
        "--device",
        "cpu",
        "--log-level",
        "DEBUG",  # the most talkative setting must still not leak a secret
        *extra,
    ]


def _serve_and_collect(
    bootstrap: str,
    topic: str,
    models: Path,
    env: dict[str, str],
    client: dict[str, object],
    n: int,
    log_path: Path,
    extra: tuple[str, ...] = (),
) -> tuple[list, str]:
    """Run a worker subprocess with ``env`` until ``n`` answers are readable with ``client``."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *_worker_args(bootstrap, topic, models, extra)],
            cwd=ROOT,
            env=_clean_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    consumer = KafkaConsumer(
        f"{topic}.out",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        **client,  # type: ignore[arg-type]
    )
    answers: list = []
    try:
        deadline = time.monotonic() + 90
        while len(answers) < n and time.monotonic() < deadline and proc.poll() is None:
            for records in consumer.poll(timeout_ms=300).values():
                answers.extend(records)
    finally:
        consumer.close()
        proc.terminate()
        proc.wait(60)
    return answers, log_path.read_text(errors="replace")


def test_worker_and_publish_over_sasl_scram(
    secure_broker: Broker, models: Path, tmp_path: Path
) -> None:
    password = secure_broker.password_file.read_text().strip()
    # the producer reads the password from a file (a mounted Secret), the worker from a variable
    producer_env = _sasl_env(
        secure_broker, KAFKA_SASL_PASSWORD_FILE=str(secure_broker.password_file)
    )
    rc, out, _ = _publish(secure_broker.sasl_bootstrap, "sasl-in", producer_env)
    assert rc == 0, out
    client = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
        "sasl_plain_password": password,
    }
    answers, log = _serve_and_collect(
        secure_broker.sasl_bootstrap,
        "sasl-in",
        models,
        _sasl_env(secure_broker, KAFKA_SASL_PASSWORD=password),
        client,
        n=4,
        log_path=tmp_path / "worker.log",
    )
    assert len(answers) == 4, log[-3000:]
    assert all(header(r, "model") == "mnist-mlp" for r in answers)
    assert password not in out and password not in log


def test_worker_and_publish_over_tls(secure_broker: Broker, models: Path, tmp_path: Path) -> None:
    env = _ssl_env(secure_broker.ca_file)
    rc, out, _ = _publish(secure_broker.ssl_bootstrap, "tls-in", env)
    assert rc == 0, out
    client = {"security_protocol": "SSL", "ssl_cafile": str(secure_broker.ca_file)}
    answers, log = _serve_and_collect(
        secure_broker.ssl_bootstrap, "tls-in", models, env, client, 4, tmp_path / "worker.log"
    )
    assert len(answers) == 4, log[-3000:]


def _assert_fails_fast(rc: int, out: str, elapsed: float, expect: str, secret: str | None) -> None:
    assert rc == 1, out[-3000:]
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.0f} s: {out[-2000:]}"
    lines = [line for line in out.splitlines() if expect in line]
    assert lines, f"no line says {expect!r}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    if secret is not None:
        assert secret not in out


WRONG = "not-the-password-0xDEADBEEF"


def test_wrong_password_fails_fast_worker(secure_broker: Broker, models: Path) -> None:
    env = _sasl_env(secure_broker, KAFKA_SASL_PASSWORD=WRONG)
    rc, out, elapsed = _cli(
        "worker.cli", _worker_args(secure_broker.sasl_bootstrap, "x", models), env, timeout=120
    )
    _assert_fails_fast(rc, out, elapsed, "authentication failed", WRONG)


def test_wrong_password_fails_fast_publish(secure_broker: Broker) -> None:
    env = _sasl_env(secure_broker, KAFKA_SASL_PASSWORD=WRONG)
    rc, out, elapsed = _publish(secure_broker.sasl_bootstrap, "x", env)
    _assert_fails_fast(rc, out, elapsed, "authentication failed", WRONG)


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the broker's certificate."""
    path = tmp_path_factory.mktemp("foreign") / "ca.pem"
    subprocess.run(
        [
            *["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"],
            "-keyout",
            str(path.with_suffix(".key")),
            "-out",
            str(path),
            "-subj",
            "/CN=stranger",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return path


def test_untrusted_certificate_fails_fast_worker(
    secure_broker: Broker, models: Path, foreign_ca: Path
) -> None:
    rc, out, elapsed = _cli(
        "worker.cli",
        _worker_args(secure_broker.ssl_bootstrap, "x", models),
        _ssl_env(foreign_ca),
        timeout=120,
    )
    _assert_fails_fast(rc, out, elapsed, "certificate verify failed", None)


def test_untrusted_certificate_fails_fast_publish(secure_broker: Broker, foreign_ca: Path) -> None:
    rc, out, elapsed = _publish(secure_broker.ssl_bootstrap, "x", _ssl_env(foreign_ca))
    _assert_fails_fast(rc, out, elapsed, "certificate verify failed", None)


def test_generated_secrets_are_private(secure_broker: Broker) -> None:
    assert secure_broker.password_file.stat().st_mode & 0o077 == 0
    assert (secure_broker.directory / "tls" / "ca.key").stat().st_mode & 0o077 == 0
    assert (secure_broker.directory / "jaas.conf").stat().st_mode & 0o077 == 0
    config = (secure_broker.directory / "server.properties").read_text()
    assert secure_broker.password_file.read_text().strip() not in config


_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def _client_properties(path: Path, broker: Broker, mechanism: str) -> Path:
    """A client.properties as Confluent Cloud and Kafka's tools hand it out."""
    password = broker.password_file.read_text().strip()
    path.write_text(
        "# Required connection configs for Kafka producer, consumer, and admin\n"
        f"bootstrap.servers={broker.sasl_bootstrap}\n"
        "security.protocol=SASL_PLAINTEXT\n"
        f"sasl.mechanism={mechanism}\n"
        f"sasl.jaas.config={_MODULES[mechanism]} required \\\n"
        f"    username='worker' password='{password}';\n"
        "# Best practice for higher availability in Apache Kafka clients prior to 3.0\n"
        "session.timeout.ms=45000\n"
        "acks=all\n"
    )
    return path


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
# the kafka-python half runs in `make test-slow`, as every two-client test's
@pytest.mark.parametrize(
    "backend", ["confluent", pytest.param("kafka-python", marks=pytest.mark.slow)]
)
def test_a_java_client_properties_file_with_jaas(
    secure_broker: Broker, models: Path, tmp_path: Path, mechanism: str, backend: str
) -> None:
    password = secure_broker.password_file.read_text().strip()
    props = _client_properties(tmp_path / "client.properties", secure_broker, mechanism)
    topic = f"jaas-{mechanism.lower()}-{backend}"
    args = ["publish", "--bootstrap-servers", secure_broker.sasl_bootstrap, "--topic", topic]
    args += ["--format", "msgpack", "--model", "mnist-mlp", "--synthetic", "784", "--rows", "6"]
    args += ["--batch-rows", "3", "--kafka-config", str(props), "--kafka-client", backend]
    rc, out, _ = _cli("producers.cli", args, {}, timeout=120)
    assert rc == 0, out
    client = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "worker",
        "sasl_plain_password": password,
    }
    answers, log = _serve_and_collect(
        secure_broker.sasl_bootstrap,
        topic,
        models,
        {},
        client,
        n=2,
        log_path=tmp_path / "worker.log",
        extra=("--kafka-config", str(props), "--kafka-client", backend),
    )
    assert len(answers) == 2, log[-3000:]
    assert all(header(r, "model") == "mnist-mlp" for r in answers)
    assert password not in out and password not in log
