"""What the benchmarks move: models, messages, topics, worker processes, timings.

Everything here is shared by :mod:`bench.run` and :mod:`bench.baselines`:
the two models (the demo MLP and ``light_resnet50`` with a dynamic batch
axis), pre-encoded request messages, small Kafka helpers (topics, publishing,
reading back, committed offsets) and a worker run as its own process, the way
it runs in production.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import confluent_kafka as ck
import numpy as np
import onnx
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.structs import TopicPartition
from onnx import numpy_helper

from worker.demo import DEMO_INPUT, DEMO_MODEL, DEMO_OUTPUT, write_demo_model
from worker.protocol import encode_request
from worker.settings import MAX_MESSAGE_BYTES

__all__ = [
    "ROOT",
    "Kafka",
    "Model",
    "Rec",
    "WorkerProcess",
    "bootstrap_servers",
    "build_repository",
    "log",
    "make_messages",
    "percentiles",
    "process_cpu_seconds",
    "rate_from_timestamps",
    "workers",
]

ROOT = Path(__file__).resolve().parents[1]
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
_VERBOSE = sys.stderr.isatty() or bool(os.environ.get("BENCH_VERBOSE"))


def log(msg: str, *, force: bool = False) -> None:
    """Progress on stderr, only on a terminal or with ``BENCH_VERBOSE=1`` (quiet when piped)
    unless ``force``."""
    if _VERBOSE or force:
        print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- models ------------------------------------------------------------------


class Rec(NamedTuple):
    """A record read back: ``timestamp`` in ms, ``headers`` as (name, value) pairs."""

    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Model:
    name: str
    input: str
    output: str
    row_shape: tuple[int, ...]
    rows_per_message: int
    kind: str  # "io-bound" | "compute-bound"


MLP = Model(DEMO_MODEL, DEMO_INPUT, DEMO_OUTPUT, (784,), 64, "io-bound")
CNN_NAME = "resnet50-light"


def _light_resnet50() -> Path | None:
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    return path if path.exists() else None


def _write_resnet50(repo: Path) -> Model:
    """``light_resnet50`` (weights from ConstantOfShape, so the file is 80 KB but
    the compute is a full ResNet-50 at 224x224) with axis 0 made dynamic."""
    src = _light_resnet50()
    assert src is not None
    m = onnx.load(str(src))
    inits = {i.name for i in m.graph.initializer}
    used = {name for node in m.graph.node for name in node.input}
    # IR 3 lists initializers as graph inputs; the worker would take them for model inputs.
    keep_inputs = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep_inputs)
    keep_inits = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep_inits)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    for init in m.graph.initializer:
        if init.name == "OC2_DUMMY_1":  # the Reshape before the classifier: [1, 2048]
            init.CopyFrom(numpy_helper.from_array(np.array([-1, 2048], np.int64), init.name))
    m.ir_version = 8
    onnx.checker.check_model(m)
    path = repo / CNN_NAME / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return Model(
        CNN_NAME, m.graph.input[0].name, m.graph.output[0].name, (3, 224, 224), 4, "compute-bound"
    )


def _write_big_cnn(repo: Path) -> Model:
    """Fallback when this onnx wheel has no light models: a VGG-ish CNN of similar cost."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(50)
    nodes, inits, prev, ch = [], {}, "image", 3
    for i, out_ch in enumerate((64, 128, 256, 256, 512)):
        w = rng.normal(0, 0.05, (out_ch, ch, 3, 3)).astype(np.float32)
        inits[f"w{i}"], inits[f"b{i}"] = w, np.zeros(out_ch, np.float32)
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        prev, ch = f"p{i}", out_ch
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"]),
    ]
    inits["fw"] = rng.normal(0, 0.05, (ch, 1000)).astype(np.float32)
    inits["fb"] = np.zeros(1000, np.float32)
    graph = helper.make_graph(
        nodes,
        "big_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = repo / CNN_NAME / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return Model(CNN_NAME, "image", "logits", (3, 224, 224), 4, "compute-bound")


def build_repository(repo: Path) -> dict[str, Model]:
    """Write both models into ``repo``; returns them by role ("mlp", "cnn")."""
    write_demo_model(repo)
    cnn = _write_resnet50(repo) if _light_resnet50() else _write_big_cnn(repo)
    return {"mlp": MLP, "cnn": cnn}


def make_messages(model: Model, count: int, distinct: int = 8) -> list[tuple[bytes, list]]:
    """``count`` Arrow requests of ``model.rows_per_message`` rows each.

    A few distinct payloads are cycled: the bytes on the wire are the same
    size either way, and memory stays small.
    """
    rng = np.random.default_rng(1)
    pool = []
    for _ in range(min(distinct, count)):
        x = rng.random((model.rows_per_message, *model.row_shape), dtype=np.float32)
        pool.append(encode_request({model.input: x}, format="arrow", model=model.name))
    return [pool[i % len(pool)] for i in range(count)]


# -- kafka -------------------------------------------------------------------


def bootstrap_servers() -> str:
    """``KAFKA_BOOTSTRAP_SERVERS``, else the local broker (started if needed; never stopped)."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        return env
    out = subprocess.run([str(KAFKA_LOCAL), "start"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


class Kafka:
    """The few broker operations the benchmarks need, on one admin client."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.run_id = uuid.uuid4().hex[:8]
        self._admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
        self._topics: list[str] = []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._topics:
                self._admin.delete_topics(self._topics)
        self._admin.close()

    def topic(self, label: str, partitions: int = 1, *, append_time: bool = False) -> str:
        """A fresh topic; ``append_time``: records carry the broker's append time."""
        name = f"bench-{self.run_id}-{label}"
        config = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
        if append_time:
            config["message.timestamp.type"] = "LogAppendTime"
        self._admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config)])
        self._topics.append(name)
        return name

    def group(self, label: str) -> str:
        return f"bench-{self.run_id}-{label}-{uuid.uuid4().hex[:6]}"

    def publish(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, list]],
        partitions: int = 1,
        *,
        producer: KafkaProducer | None = None,
    ) -> None:
        """Send all ``messages`` round-robin over ``partitions``, then flush."""
        if producer is None:  # librdkafka: hundreds of MB in seconds
            fast = ck.Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5,
                                "message.max.bytes": MAX_MESSAGE_BYTES + 65536})  # fmt: skip
            for i, (value, headers) in enumerate(messages):
                while True:
                    try:
                        fast.produce(topic, value, headers=headers, partition=i % partitions)
                        break
                    except BufferError:
                        fast.poll(0.05)
            if fast.flush(120):
                raise RuntimeError(f"publishing to {topic}: not all messages acknowledged")
            return
        own = False
        p = producer
        try:
            for i, (value, headers) in enumerate(messages):
                p.send(topic, value=value, headers=headers, partition=i % partitions)
            p.flush()
        finally:
            if own:
                p.close()

    def publish_gated(
        self, topic: str, messages: Sequence[tuple[bytes, list]], partitions: int
    ) -> KafkaProducer:
        """Publish inside an open transaction and return the producer.

        The worker reads ``read_committed``, so nothing is visible until the
        caller commits: every worker can join its group first, and the clock
        starts for all of them at once.
        """
        p = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            max_request_size=MAX_MESSAGE_BYTES,
            linger_ms=5,
            batch_size=1024 * 1024,
            transactional_id=f"bench-{uuid.uuid4().hex[:8]}",
            transaction_timeout_ms=120_000,
        )
        p.init_transactions()
        p.begin_transaction()
        self.publish(topic, messages, partitions, producer=p)
        return p

    def wait_assigned(self, group: str, members: int, partitions: int, timeout: float) -> None:
        """Until the group is stable with ``members`` members sharing ``partitions``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._admin.describe_groups([group]).get(group, {})
            owned = [
                sum(len(a["partitions"]) for a in m["member_assignment"]["assigned_partitions"])
                for m in info.get("members", [])
                if m.get("member_assignment")
            ]
            if (
                info.get("group_state") == "Stable"
                and len(owned) == members
                and sum(owned) == partitions
                and min(owned) > 0
            ):
                return
            time.sleep(0.2)
        raise RuntimeError(f"group {group}: {members} members not assigned within {timeout} s")

    def end_offsets(self, topic: str) -> dict[int, int]:
        c = KafkaConsumer(bootstrap_servers=self.bootstrap)
        try:
            tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
            return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
        finally:
            c.close()

    def committed(self, group: str) -> dict[int, int]:
        offsets = self._admin.list_group_offsets(group).get(group, {})
        return {tp.partition: om.offset for tp, om in offsets.items() if om.offset >= 0}

    def wait_committed(
        self, group: str, ends: dict[int, int], timeout: float, alive: Any = None
    ) -> bool:
        """Poll the group's committed offsets until they reach ``ends`` (or time out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.committed(group)
            if all(done.get(p, 0) >= end for p, end in ends.items()):
                return True
            if alive is not None and not alive():
                return False
            time.sleep(0.25)
        return False

    def read(self, topic: str, count: int, timeout: float = 60.0) -> list[Rec]:
        """The first ``count`` records of ``topic`` (all partitions), from the beginning.

        librdkafka, no group: reading back a latency run's inputs is hundreds of MB.
        """
        c = ck.Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"bench-read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "max.partition.fetch.bytes": MAX_MESSAGE_BYTES,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "receive.message.max.bytes": 65 * 1024 * 1024,
        })  # fmt: skip
        out: list[Rec] = []
        try:
            meta = c.list_topics(topic, timeout=10).topics[topic]
            c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in meta.partitions])
            deadline = time.monotonic() + timeout
            while len(out) < count and time.monotonic() < deadline:
                msgs: list[Any] = c.consume(1000, 0.2)
                for m in msgs:
                    if m.error() is None:
                        out.append(Rec(m.partition(), m.offset(), m.timestamp()[1], m.key(),
                                       m.value(), m.headers() or []))  # fmt: skip
        finally:
            c.close()
        return out

    def drop(self, *topics: str) -> None:
        """Delete ``topics`` now (a latency run writes hundreds of MB)."""
        with contextlib.suppress(Exception):
            self._admin.delete_topics(list(topics))
        self._topics = [t for t in self._topics if t not in topics]


# -- measurements ------------------------------------------------------------


def rate_from_timestamps(records: Sequence[Any], rows_of: Any) -> float:
    """Rows/s between the first and the last output record (their CreateTime, ms).

    Records stamped in the first millisecond are left out of the count: they
    (one coalesced run's answers) were made before the clock started.
    """
    if len(records) < 2:
        return float("nan")
    first = min(r.timestamp for r in records)
    span = (max(r.timestamp for r in records) - first) / 1000
    rows = sum(rows_of(r) for r in records if r.timestamp > first)
    return rows / span if span > 0 else float("nan")


def _stat(path: Path) -> tuple[str, list[str]] | None:
    """A /proc ``stat`` file: the name in parentheses and the fields after it; None when
    it cannot be read (not Linux, or the process or thread is gone)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()


def _cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (every thread, librdkafka's included); NaN elsewhere."""
    stat = _stat(Path(f"/proc/{pid}/stat"))
    return float("nan") if stat is None else _cpu_seconds(stat[1])


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of ``pid``'s threads so far, summed per thread name. librdkafka names
    its own (``rdk:main``, ``rdk:broker1``...); Python's threads, and native threads
    that no one names, keep the process's name, reported as ``""``."""
    out: dict[str, float] = {}
    process = _stat(Path(f"/proc/{pid}/stat"))
    if process is None:
        return out
    for task in Path(f"/proc/{pid}/task").glob("*"):
        stat = _stat(task / "stat")
        if stat is None:
            continue  # the thread ended meanwhile
        key = "" if stat[0] == process[0] else stat[0]
        out[key] = out.get(key, 0.0) + _cpu_seconds(stat[1])
    return out


def minor_faults(pid: int) -> int:
    """Minor page faults of ``pid`` so far (every thread): fresh memory touched."""
    stat = _stat(Path(f"/proc/{pid}/stat"))
    return 0 if stat is None else int(stat[1][7])


def thread_groups(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds between two :func:`thread_cpu_seconds` readings, per group: librdkafka's
    broker threads, its other threads, the Python threads (the loop, the inference pool,
    the metrics server; ONNX Runtime runs on them with one intra-op thread), the rest.
    A thread that ended between the readings is lost."""
    groups: dict[str, float] = {}
    for name, seconds in after.items():
        group = ("librdkafka broker threads" if name.startswith("rdk:broker")
                 else "librdkafka other threads" if name.startswith("rdk:")
                 else "Python threads (loop, inference, metrics)" if name == ""
                 else "other threads")  # fmt: skip
        groups[group] = groups.get(group, 0.0) + seconds - before.get(name, 0.0)
    return groups


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> list[float]:
    if not values:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), qs)]


# -- the worker as a process ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProcess:
    """``python -m worker.cli run`` with its own metrics port; peak RSS read at the end."""

    bootstrap: str
    input_topic: str
    output_topic: str
    repository: Path
    model: str
    group: str
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # over this process's environment
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    _log: IO[bytes] | None = None

    def __enter__(self) -> WorkerProcess:
        self.port = _free_port()
        args = [
            sys.executable, "-m", "worker.cli", "run",
            "--bootstrap-servers", self.bootstrap,
            "--input-topic", self.input_topic,
            "--output-topic", self.output_topic,
            "--model-repository", str(self.repository),
            "--default-model", self.model,
            "--preload", self.model,
            "--group-id", self.group,
            "--device", "cpu",
            "--metrics-port", str(self.port),
            "--log-level", "WARNING",
            *self.extra,
        ]  # fmt: skip
        # A file, not a pipe: a chatty worker must never block on a full pipe.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log,
            env={**os.environ, **self.env} if self.env else None,
        )  # fmt: skip
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            url = f"http://127.0.0.1:{self.port}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready within {timeout} s: {self.stderr_tail()}")

    def metrics(self) -> dict[str, float]:
        """Samples from ``/metrics`` by ``name{labels}``, and summed over the other labels
        by ``name`` and by each single ``name{label="value"}`` (e.g. every model's
        ``inference_worker_messages_total{status="dlq"}``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        sums: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if not m:
                continue
            name, labels, value = m.group(1), m.group(2), float(m.group(3))
            if not labels:
                out[name] = value
                continue
            out[name + labels] = value
            sums[name] = sums.get(name, 0.0) + value
            for pair in re.findall(r'\w+="(?:\\.|[^"\\])*"', labels):
                key = f"{name}{{{pair}}}"
                sums[key] = sums.get(key, 0.0) + value
        return {**sums, **out}

    def peak_rss(self) -> int | None:
        """VmHWM (the kernel's high-water mark of resident memory), else psutil's current RSS."""
        assert self.proc is not None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        with contextlib.suppress(Exception):
            import psutil

            return int(psutil.Process(self.proc.pid).memory_info().rss)
        return None

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the process has used so far."""
        assert self.proc is not None
        return process_cpu_seconds(self.proc.pid)

    def stderr_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, None):
            log(f"worker exited {self.proc.returncode}: {self.stderr_tail()}", force=True)
        if self._log is not None:
            self._log.close()


@contextlib.contextmanager
def workers(n: int, **kwargs: Any) -> Iterator[list[WorkerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(WorkerProcess(**kwargs)) for _ in range(n)]
