"""Shared fixtures: one real Kafka broker per session, a fresh topic and group per test.

The broker is found in the order of spec §1: ``KAFKA_BOOTSTRAP_SERVERS`` if set;
else a testcontainers Kafka container when a Docker engine answers; else
``scripts/kafka-local start`` (which reuses a broker that is already running).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"], capture_output=True, timeout=10, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a real Kafka 4.x broker."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if _docker_answers():
        import yaml
        from testcontainers.kafka import KafkaContainer

        # docker-compose.yml's image: the project's one Kafka version (kafka-local's too).
        image = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-kafka-image"]
        with KafkaContainer(image).with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    out = subprocess.run(
        [str(ROOT / "scripts" / "kafka-local"), "start"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"scripts/kafka-local start failed:\n{out.stderr}")
    # The broker stays up for the next run (start is idempotent); `make test`
    # leaves stopping it to `scripts/kafka-local stop`.
    yield out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[object]:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="tests-admin")
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture()
def new_topic(kafka_admin: object) -> Iterator[Callable[..., str]]:
    """Factory: ``new_topic(partitions=1)`` creates a uniquely named topic, deleted afterwards."""
    from kafka.admin import NewTopic

    created: list[str] = []

    def make(partitions: int = 1, prefix: str = "t", **configs: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        kafka_admin.create_topics(  # type: ignore[attr-defined]
            [NewTopic(name, partitions, 1, topic_configs=configs or {})]
        )
        created.append(name)
        return name

    try:
        yield make
    finally:
        if created:
            # teardown must not mask the test's own failure
            with contextlib.suppress(Exception):
                kafka_admin.delete_topics(created)  # type: ignore[attr-defined]


@pytest.fixture()
def group_id() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"


# The kafka-python half of every two-backend test runs in `make test-slow`: it is
# several times slower, and `make test` must stay within its time budget.
BOTH_CLIENTS = ["confluent", pytest.param("kafka-python", marks=pytest.mark.slow)]


@pytest.fixture(params=BOTH_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """The worker's Kafka backend (``--kafka-client``): a test that asks runs on both."""
    return str(request.param)


@pytest.fixture()
def model_repo(tmp_path: Path) -> Path:
    """A model repository holding the demo MLP as version 1."""
    from worker.demo import write_demo_model

    repo = tmp_path / "models"
    write_demo_model(repo)
    return repo


@pytest.fixture()
def exit_stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _cuda_problem() -> str | None:
    """Why GPU tests cannot run here, or None: the worker's own probe, not a provider list.

    onnxruntime-gpu lists CUDAExecutionProvider even where libcublasLt or cuDNN
    cannot load; the probe creates and runs a Conv + MatMul session on device 0.
    """
    try:
        from worker.runtime import cuda_probe
    except ImportError as exc:
        return f"worker.runtime does not import: {exc}"
    return cuda_probe(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    problem = _cuda_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA GPU: {problem}")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
