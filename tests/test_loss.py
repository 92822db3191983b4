"""Nothing lost: a delivery the broker refuses, while later sends succeed.

A broker of this module's own runs an authorizer (``scripts/kafka-local`` with
``KAFKA_LOCAL_ACL=1``); the worker logs in as the SASL user ``worker``, and a
DENY WRITE ACL on the dead-letter topic makes the broker refuse one dead
letter (``TOPIC_AUTHORIZATION_FAILED``) while answers to the output topic keep
being acknowledged. The group's committed offsets are read from the broker by
an admin call: nothing at or after the refused record may ever be committed.
Then the ACL is removed (the cause fixed) and the record must be answered
exactly once (read_committed for ``--exactly-once``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import (
    Broker,
    committed_offsets,
    create_topic,
    private_broker,
    reading,
)
from tests.harness import produce, worker_process
from worker.protocol import encode_request

pytestmark = pytest.mark.kafka

N = 30
BAD = 10  # the offset whose dead letter the broker refuses


@pytest.fixture(scope="module")
def acl_broker() -> Iterator[Broker]:
    with private_broker(security=True, acl=True) as broker:
        yield broker


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.demo import write_demo_model

    repo = tmp_path_factory.mktemp("loss") / "models"
    write_demo_model(repo)
    return repo


def _acl(broker: Broker, topic: str, *, deny: bool) -> None:
    """DENY WRITE on ``topic`` for User:worker (``deny``), or remove that ACL."""
    from confluent_kafka.admin import (
        AclBinding,
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})  # ANONYMOUS: a super user
    args = (ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, "User:worker", "*")
    rule = (AclOperation.WRITE, AclPermissionType.DENY)
    if deny:
        futures = admin.create_acls([AclBinding(*args, *rule)])
    else:
        futures = admin.delete_acls([AclBindingFilter(*args, *rule)])
    for future in futures.values():
        future.result(timeout=15)
    time.sleep(0.5)  # the authorizer applies the metadata record asynchronously


def _records() -> list[tuple[bytes, bytes, list]]:
    rng = np.random.default_rng(14)
    out = []
    for i in range(N):
        if i == BAD:  # not a request at all: a decode-error dead letter
            out.append((b"k-bad", b"\x00 not a request", [("request-id", b"r-bad")]))
            continue
        value, headers = encode_request(
            {"x": rng.random((1, 784), dtype=np.float32)},
            format="msgpack",
            model="mnist-mlp",
            request_id=f"r-{i}",
        )
        out.append((f"k{i}".encode(), value, headers))
    return out


def _worker(
    broker: Broker,
    topics: tuple[str, str, str],
    models: Path,
    group: str,
    client: str,
    log: Path,
    *extra: str,
) -> object:
    requests, outputs, _ = topics
    args = ["--bootstrap-servers", broker.sasl_bootstrap, "--input-topic", requests]
    args += ["--output-topic", outputs, "--model-repository", str(models)]
    args += ["--group-id", group, "--metrics-port", "0", "--device", "cpu"]
    args += ["--kafka-client", client, "--commit-interval-ms", "50", "--drain-timeout", "20"]
    # A short session: a member left behind by the previous run expires within seconds.
    args += ["--kafka-option", "session.timeout.ms=6000", "--log-level", "INFO", *extra]
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "worker",
        "KAFKA_SASL_PASSWORD_FILE": str(broker.password_file),
    }
    return worker_process(args, env=env, log_path=log)


def _topics(broker: Broker, name: str) -> tuple[str, str, str]:
    requests, outputs = f"{name}-in", f"{name}-out"
    dlq = f"{requests}.dlq"
    for topic in (requests, outputs, dlq):
        create_topic(broker.bootstrap, topic)
    return requests, outputs, dlq


@pytest.mark.parametrize(
    "kafka_client",
    [
        "confluent",
        pytest.param("kafka-python", marks=pytest.mark.slow),  # the kafka-python half: slow
    ],
)
def test_refused_dead_letter_at_least_once_never_committed_past_then_answered(
    acl_broker: Broker, models: Path, kafka_client: str, tmp_path: Path
) -> None:
    b = acl_broker
    name = f"alo-{kafka_client}"
    topics = requests, outputs, dlq = _topics(b, name)
    group = f"{name}-g"
    _acl(b, dlq, deny=True)
    produce(b.bootstrap, requests, _records())

    log = tmp_path / "refused.log"
    proc = _worker(b, topics, models, group, kafka_client, log)
    try:
        rc = proc.wait(90)  # type: ignore[attr-defined]
    finally:
        if proc.poll() is None:  # type: ignore[attr-defined]
            proc.kill()  # type: ignore[attr-defined]
    text = log.read_text()
    assert rc == 1, f"the worker went on past a refused dead letter (rc {rc}):\n{text[-3000:]}"
    assert "refused" in text, text[-3000:]
    committed = committed_offsets(b.bootstrap, group, requests).get(0)
    assert committed is None or committed <= BAD, (
        f"committed {committed}, past the refused record at {BAD}:\n{text[-3000:]}"
    )
    with reading(b.bootstrap, outputs) as out:
        out.settle(2.0)
        later = {r.header("request-id") for r in out.records} & {
            f"r-{i}" for i in range(BAD + 1, N)
        }
    # The refusal is the only failure: answers after it were sent and acknowledged.
    assert later, "no answer after the refused record was delivered: not the fault under test"

    _acl(b, dlq, deny=False)  # the cause is fixed; a restart answers what was not committed
    log2 = tmp_path / "restart.log"
    proc = _worker(b, topics, models, group, kafka_client, log2)
    try:
        with reading(b.bootstrap, dlq) as dead, reading(b.bootstrap, outputs) as out:
            want = {f"r-{i}" for i in range(N) if i != BAD}
            assert dead.until(lambda rs: len(rs) >= 1, 60), log2.read_text()[-3000:]
            assert out.until(lambda rs: want <= {r.header("request-id") for r in rs}, 60)
            dead.settle(1.0)
        (letter,) = dead.records
        assert letter.header("source-offset") == str(BAD)
        assert letter.header("error-type") == "decode-error"
        assert letter.value == b"\x00 not a request"
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        rc = proc.wait(60)  # type: ignore[attr-defined]
    assert rc == 0, log2.read_text()[-3000:]
    assert committed_offsets(b.bootstrap, group, requests) == {0: N}


def test_refused_dead_letter_exactly_once_aborts_then_each_answer_once(
    acl_broker: Broker, models: Path, kafka_client: str, tmp_path: Path
) -> None:
    """A transaction with a refused send never counts; after the fix, a read_committed
    reader sees every input answered exactly once."""
    b = acl_broker
    name = f"eos-{kafka_client}"
    topics = requests, outputs, dlq = _topics(b, name)
    group = f"{name}-g"
    _acl(b, dlq, deny=True)
    produce(b.bootstrap, requests, _records())

    log = tmp_path / "eos.log"
    extra = ("--exactly-once", "--transactional-id", f"{name}-txn")
    proc = _worker(b, topics, models, group, kafka_client, log, *extra)
    try:
        deadline = time.monotonic() + 60
        while "transaction aborted" not in log.read_text() and time.monotonic() < deadline:
            if proc.poll() is not None:  # type: ignore[attr-defined]
                break
            time.sleep(0.2)
        text = log.read_text()
        assert "transaction aborted" in text, text[-3000:]
        time.sleep(2.0)  # a few more rounds of refusal
        committed = committed_offsets(b.bootstrap, group, requests).get(0)
        assert committed is None or committed <= BAD, f"committed {committed}:\n{text[-6000:]}"
        with reading(b.bootstrap, outputs, read_committed=True) as out:
            out.settle(1.0)
            visible = {r.header("request-id") for r in out.records}
        assert not visible & {f"r-{i}" for i in range(BAD, N)}, "an aborted answer is visible"

        _acl(b, dlq, deny=False)
        if proc.poll() is not None:  # type: ignore[attr-defined]
            proc = _worker(b, topics, models, group, kafka_client, tmp_path / "eos2.log", *extra)
        with (
            reading(b.bootstrap, dlq, read_committed=True) as dead,
            reading(b.bootstrap, outputs, read_committed=True) as out,
        ):
            want = {f"r-{i}" for i in range(N) if i != BAD}
            ok = out.until(lambda rs: want <= {r.header("request-id") for r in rs}, 60)
            assert ok, log.read_text()[-3000:]
            assert dead.until(lambda rs: len(rs) >= 1, 30), log.read_text()[-3000:]
            out.settle(2.0)
            dead.settle(0.5)
            twice = [rid for rid, n in out.ids().items() if n > 1]
        assert not twice, f"read_committed duplicates: {twice}"
        assert len(out.records) == N - 1
        (letter,) = dead.records
        assert letter.header("source-offset") == str(BAD)
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        rc = proc.wait(60)  # type: ignore[attr-defined]
    assert rc == 0, log.read_text()[-3000:]
    assert committed_offsets(b.bootstrap, group, requests) == {0: N}
