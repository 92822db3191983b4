"""Private brokers for tests that stop, restart or secure one (never the shared broker).

Each is a ``scripts/kafka-local`` broker on free ports with its own
``KAFKA_LOCAL_DIR`` under the test's tmp directory; the jars of the shared
broker are reused through ``KAFKA_HOME`` when they are cached, so nothing is
fetched again.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import go_tool

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kafka-local"
# The Kafka version is written once: docker-compose.yml's x-kafka-image.
_COMPOSE_IMAGE = re.search(
    r"x-kafka-image:.*apache/kafka:(\S+)", (ROOT / "docker-compose.yml").read_text()
)
assert _COMPOSE_IMAGE, "docker-compose.yml lost its x-kafka-image"
_KAFKA_VERSION = _COMPOSE_IMAGE.group(1)
_CACHED_JARS = ROOT / ".kafka-local" / "jars" / _KAFKA_VERSION


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base() -> int:
    """A port P such that P, P+1, P+2 and the controller port P+1000 are all free."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000)
        if all(_free(p) for p in (base, base + 1, base + 2, base + 1000)):
            return base
    raise RuntimeError("no free ports for a private broker")


@dataclass
class Broker:
    """A private kafka-local broker; ``stop()``/``start()`` simulate an outage."""

    directory: Path
    port: int
    security: bool = False
    acl: bool = False  # an authorizer: DENY ACLs refuse the SASL user (see scripts/kafka-local)
    advertised_port: int | None = None  # a fault proxy's port, advertised instead of ``port``

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.port + 1}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.port + 2}"

    @property
    def ca_file(self) -> Path:
        return self.directory / "tls" / "ca.pem"

    @property
    def password_file(self) -> Path:
        return self.directory / "sasl-password"

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "KAFKA_LOCAL_PORT": str(self.port),
            "KAFKA_LOCAL_DIR": str(self.directory),
            "KAFKA_LOCAL_SECURITY": "1" if self.security else "0",
            "KAFKA_LOCAL_ACL": "1" if self.acl else "0",
            # a small heap: it runs beside the shared broker on two cores
            "KAFKA_LOCAL_HEAP": "-Xms128m -Xmx512m",
        }
        env.pop("KAFKA_LOCAL_SASL_PASSWORD", None)
        env.pop("KAFKA_LOCAL_ADVERTISED_PORT", None)
        if self.advertised_port is not None:
            env["KAFKA_LOCAL_ADVERTISED_PORT"] = str(self.advertised_port)
        if (_CACHED_JARS / ".complete").exists():
            home = self.directory.parent / f"{self.directory.name}-home"
            home.mkdir(exist_ok=True)
            libs = home / "libs"
            if not libs.exists():
                libs.symlink_to(_CACHED_JARS)
            env["KAFKA_HOME"] = str(home)
        return env

    def start(self) -> None:
        out = subprocess.run(
            [str(SCRIPT), "start"],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"kafka-local start failed:\n{out.stderr[-3000:]}")

    def stop(self) -> None:
        subprocess.run(
            [str(SCRIPT), "stop"], env=self._env(), capture_output=True, timeout=90, check=False
        )


@contextmanager
def private_broker(
    *, security: bool = False, acl: bool = False, advertised_port: int | None = None
) -> Iterator[Broker]:
    """A broker of its own, stopped (and its directory removed) on exit.

    ``acl`` (with ``security``) adds an authorizer; ``advertised_port`` makes
    clients connect through a proxy listening there (started by the caller).
    """
    with tempfile.TemporaryDirectory(prefix="kl-test-") as tmp:
        broker = Broker(Path(tmp) / "kafka", _free_base(), security, acl, advertised_port)
        proxied = f"127.0.0.1:{advertised_port}"
        try:
            broker.start()
            yield broker
        finally:
            # the offsets reader of this broker (and of a proxy in front of it) goes too
            for address in [a for a in _ADMINS if a in (broker.bootstrap, proxied)]:
                with suppress(Exception):
                    _ADMINS.pop(address).close()
            with suppress(Exception):
                broker.stop()


# ---------------------------------------------------------------------------
# Reading what the broker holds, with clients that share no code with the worker
# ---------------------------------------------------------------------------


_ADMINS: dict[str, Any] = {}


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets of ``topic`` (partition -> next offset), as the
    broker's group coordinator reports them (an admin call, no group member).

    kafka-python's admin client: confluent-kafka 2.16's ``list_consumer_group_offsets``
    crashes the process (SIGSEGV) while a fresh broker's coordinator is still loading.
    """
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = _ADMINS.get(bootstrap)
    if admin is None:
        admin = _ADMINS[bootstrap] = KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="tests-offsets"
        )
    deadline = time.monotonic() + 20
    while True:
        try:
            offsets = admin.list_group_offsets(group)[group]
            break
        except KafkaError:  # the coordinator is loading or moving: ask again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == topic and meta.offset >= 0
    }


@dataclass
class Got:
    """One record read back: partition, offset, key, value and headers as sent."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return None if value is None else value.decode()
        return None


class TopicReader:
    """Reads every partition of a topic from the beginning (partitions added later
    too), with librdkafka; ``read_committed`` sees only committed transactions."""

    def __init__(self, bootstrap: str, topic: str, *, read_committed: bool = False) -> None:
        import confluent_kafka as ck

        self._ck = ck
        self.topic = topic
        self._c = ck.Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{random.getrandbits(48):x}",  # never commits
                "enable.auto.commit": False,
                "isolation.level": "read_committed" if read_committed else "read_uncommitted",
                "fetch.message.max.bytes": 16 * 1024 * 1024,
                "receive.message.max.bytes": 80 * 1024 * 1024,
            }
        )
        self._partitions: set[int] = set()
        self._checked = 0.0
        self.records: list[Got] = []

    def _assign_new(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        meta = self._c.list_topics(self.topic, timeout=5).topics.get(self.topic)
        if meta is None or meta.error is not None:
            return
        new = set(meta.partitions) - self._partitions
        if new:
            ck = self._ck
            self._c.incremental_assign(
                [ck.TopicPartition(self.topic, p, ck.OFFSET_BEGINNING) for p in sorted(new)]
            )
            self._partitions |= new

    def read(self, timeout_s: float = 0.2) -> None:
        self._assign_new()
        for m in self._c.consume(1000, timeout_s):
            if m.error() is None:
                self.records.append(
                    Got(m.partition(), m.offset(), m.key(), m.value(), list(m.headers() or []))
                )

    def until(self, done: Callable[[list[Got]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done(self.records):
            if time.monotonic() >= deadline:
                return False
            self.read()
        return True

    def settle(self, seconds: float) -> None:
        """Keep reading ``seconds`` more: late extras (duplicates) show up now."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.read()

    def ids(self, name: str = "request-id") -> Counter[str]:
        return Counter(r.header(name) or "" for r in self.records)

    def close(self) -> None:
        self._c.close()


@contextmanager
def reading(bootstrap: str, topic: str, *, read_committed: bool = False) -> Iterator[TopicReader]:
    reader = TopicReader(bootstrap, topic, read_committed=read_committed)
    try:
        yield reader
    finally:
        reader.close()


class Feeder(threading.Thread):
    """Publishes records at a steady pace (a live stream), with librdkafka."""

    def __init__(
        self, bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list]], per_s: float
    ) -> None:
        super().__init__(daemon=True, name="feeder")
        import confluent_kafka as ck

        self._topic, self._records, self._gap = topic, records, 1.0 / per_s
        self._p = ck.Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 2,
                "message.max.bytes": 16 << 20,
                "enable.idempotence": True,  # a retried send never doubles an input
            }
        )
        self.sent = 0
        self.failed: list[str] = []
        self.flowing = threading.Event()  # the first record is acknowledged
        self.halt = threading.Event()

    def run(self) -> None:
        def done(err: Any, _msg: Any) -> None:
            if err is not None:
                self.failed.append(str(err))
            else:
                self.flowing.set()

        start = time.monotonic()
        for i, (key, value, headers) in enumerate(self._records):
            if self.halt.is_set():
                break
            time.sleep(max(0.0, start + i * self._gap - time.monotonic()))
            self._p.produce(self._topic, value, key, headers=headers, on_delivery=done)
            self._p.poll(0)
            self.sent = i + 1
        self._p.flush(60)


def create_topic(bootstrap: str, topic: str, partitions: int = 1, **configs: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    future = admin.create_topics([NewTopic(topic, partitions, 1, config=configs)])[topic]
    future.result(timeout=30)





# ---------------------------------------------------------------------------
# Toxiproxy: a TCP proxy that injects faults on command (scripts/toxiproxy)
# ---------------------------------------------------------------------------


@dataclass
class Toxiproxy:
    """A running toxiproxy-server, driven through its HTTP API."""

    api: str

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import json
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def proxy(self, name: str, listen_port: int, upstream: str) -> None:
        self._call(
            "POST",
            "/proxies",
            {"name": name, "listen": f"127.0.0.1:{listen_port}", "upstream": upstream},
        )

    def add_toxic(self, proxy: str, name: str, kind: str, **attributes: Any) -> None:
        body = {"name": name, "type": kind, "stream": "downstream", "attributes": attributes}
        self._call("POST", f"/proxies/{proxy}/toxics", body)

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")


@contextmanager
def toxiproxy() -> Iterator[Toxiproxy]:
    """toxiproxy-server on a free port (built once by ``scripts/toxiproxy install``)."""
    import urllib.error
    import urllib.request

    binary = go_tool("toxiproxy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [binary, "-host", "127.0.0.1", "-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        api = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(api + "/version", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("toxiproxy-server did not answer") from None
                time.sleep(0.1)
        yield Toxiproxy(api)
    finally:
        proc.terminate()
        proc.wait(10)


def free_port() -> int:
    """A port nothing listens on now (for a proxy to take)."""
    while True:
        port = random.randrange(40000, 50000)
        if _free(port):
            return port
