#!/usr/bin/env python3
"""Soak test: the worker at 80% of its measured maximum for a while; throughput, lag and RSS.

    scripts/soak.py [--minutes 10] [--fraction 0.8] [--out soak.png]

1. Measure: a backlog of requests is published, a worker process drains it,
   and the rate between 10% and 90% of the answers is its maximum.
2. Soak: a fresh worker is fed at ``--fraction`` of that rate for
   ``--minutes``; every 2 s its /metrics (answers, consumer lag) and its RSS
   (psutil) are sampled.
3. Report: a PNG of throughput, lag and RSS over time, and a verdict: RSS must
   not grow after warm-up (the first fifth of the run, at least 20 s). Exit
   status 0 when it holds, 1 when RSS grows or the worker falls behind for good.

Uses ``--bootstrap-servers`` or ``KAFKA_BOOTSTRAP_SERVERS``, else starts (or
reuses) ``scripts/kafka-local``. Not part of CI: ``make soak``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from kafka import KafkaProducer  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402

from worker.demo import write_demo_model  # noqa: E402
from worker.protocol import encode_request  # noqa: E402

# RSS may move this much after warm-up without counting as growth (allocator noise,
# batch buffers of different sizes); a leak of a few KiB per message exceeds it fast.
RSS_TOLERANCE = 0.05
RSS_TOLERANCE_FLOOR = 12 * 1024 * 1024
SAMPLE_S = 2.0


def _bootstrap(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    out = subprocess.run(
        [str(ROOT / "scripts" / "kafka-local"), "start"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"soak: scripts/kafka-local start failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pool:
    """Pre-encoded request bodies (encoding must not eat the CPU the worker needs)."""

    def __init__(self, rows: int, size: int = 32) -> None:
        rng = np.random.default_rng(0)
        self.values = [
            encode_request(
                {"x": rng.random((rows, 784), dtype=np.float32)},
                format="msgpack",
                model="mnist-mlp",
            )[0]
            for _ in range(size)
        ]

    def send(self, producer: KafkaProducer, topic: str, i: int) -> None:
        value = self.values[i % len(self.values)]
        producer.send(topic, value=value, key=str(i % 64).encode())


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path

    def metrics(self) -> dict[str, float]:
        """Answered messages (ok + dlq) and total consumer lag, from /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        answered = lag = 0.0
        for line in text.splitlines():
            if line.startswith("inference_worker_messages_total{"):
                answered += float(line.rsplit(" ", 1)[1])
            elif line.startswith("inference_worker_consumer_lag{"):
                lag += float(line.rsplit(" ", 1)[1])
        return {"answered": answered, "lag": lag}

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_worker(
    bootstrap: str, topic: str, repo: Path, logdir: Path, name: str, extra: Sequence[str] = ()
) -> WorkerProcess:
    port = _free_port()
    log = logdir / f"{name}.log"
    args = [sys.executable, "-m", "worker.cli", "run", "--bootstrap-servers", bootstrap]
    args += ["--input-topic", topic, "--output-topic", f"{topic}.out", "--model-repository"]
    args += [str(repo), "--default-model", "mnist-mlp", "--group-id", f"{topic}-g"]
    args += ["--metrics-port", str(port), "--device", "cpu", "--log-level", "WARNING", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    worker = WorkerProcess(proc, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"soak: the worker exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            worker.metrics()
            return worker
        except OSError:
            time.sleep(0.3)
    sys.exit("soak: the worker's /metrics did not answer within 60 s")


def measure_max(bootstrap: str, repo: Path, logdir: Path, pool: Pool, messages: int) -> float:
    """Messages/s the worker drains a backlog at (10%..90% of the answers)."""
    topic = f"soak-max-{uuid.uuid4().hex[:8]}"
    _create(bootstrap, topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1)
    for i in range(messages):
        pool.send(producer, topic, i)
    producer.flush()
    producer.close()
    worker = start_worker(bootstrap, topic, repo, logdir, "measure")
    marks: dict[float, float] = {}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = worker.metrics()["answered"]
            now = time.monotonic()
            for frac in (0.1, 0.9):
                if frac not in marks and done >= frac * messages:
                    marks[frac] = now
            if 0.9 in marks:
                break
            time.sleep(0.1)
    finally:
        worker.stop()
    if 0.9 not in marks:
        sys.exit("soak: the worker did not drain the backlog within 10 minutes")
    return 0.8 * messages / max(marks[0.9] - marks[0.1], 1e-3)


def _create(bootstrap: str, topic: str, partitions: int = 4) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1), NewTopic(f"{topic}.out", 4, 1)])
    finally:
        admin.close()


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)


class Feeder(threading.Thread):
    """Publishes at a steady message rate until stopped."""

    def __init__(self, bootstrap: str, topic: str, pool: Pool, per_s: float) -> None:
        super().__init__(daemon=True, name="feeder")
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
        self.topic, self.pool, self.gap = topic, pool, 1.0 / per_s
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set():
            due = start + self.sent * self.gap
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.05))
                continue
            self.pool.send(self.producer, self.topic, self.sent)
            self.sent += 1
        self.producer.flush(30)
        self.producer.close(10)


def soak(
    bootstrap: str, repo: Path, logdir: Path, pool: Pool, per_s: float, minutes: float
) -> Samples:
    topic = f"soak-{uuid.uuid4().hex[:8]}"
    _create(bootstrap, topic)
    worker = start_worker(bootstrap, topic, repo, logdir, "soak")
    feeder = Feeder(bootstrap, topic, pool, per_s)
    samples = Samples()
    feeder.start()
    start = last_t = time.monotonic()
    last_answered = 0.0
    try:
        while time.monotonic() - start < minutes * 60:
            time.sleep(SAMPLE_S)
            if worker.proc.poll() is not None:
                sys.exit(f"soak: the worker died:\n{worker.log.read_text()[-2000:]}")
            m, now = worker.metrics(), time.monotonic()
            samples.t.append(now - start)
            samples.rate.append((m["answered"] - last_answered) / (now - last_t))
            samples.lag.append(m["lag"])
            samples.rss_mib.append(worker.rss() / 2**20)
            last_answered, last_t = m["answered"], now
            print(
                f"  t={samples.t[-1]:6.0f}s  {samples.rate[-1]:7.1f} msg/s  "
                f"lag {samples.lag[-1]:6.0f}  RSS {samples.rss_mib[-1]:6.1f} MiB",
                flush=True,
            )
    finally:
        feeder.halt.set()
        feeder.join(60)
        worker.stop()
    return samples


def verdict(samples: Samples, per_s: float) -> tuple[bool, str]:
    n = len(samples.t)
    warm = next((i for i, t in enumerate(samples.t) if t >= max(20.0, samples.t[-1] / 5)), n)
    after = samples.rss_mib[warm:]
    if len(after) < 4:
        return False, "too short to judge RSS (run at least a minute)"
    quarter = max(2, len(after) // 4)
    early, late = statistics.median(after[:quarter]), statistics.median(after[-quarter:])
    allowed = max(early * RSS_TOLERANCE, RSS_TOLERANCE_FLOOR / 2**20)
    slope = float(np.polyfit(samples.t[warm:], after, 1)[0]) * 60  # MiB per minute
    rss_ok = late - early <= allowed
    lag_tail = samples.lag[-quarter:]
    lag_ok = statistics.median(lag_tail) <= max(50.0, per_s * 5)  # within ~5 s of input
    text = (
        f"RSS after warm-up: {early:.1f} -> {late:.1f} MiB (allowed +{allowed:.1f}), "
        f"trend {slope:+.2f} MiB/min: {'STABLE' if rss_ok else 'GROWING'}; "
        f"lag at the end {statistics.median(lag_tail):.0f} messages: "
        f"{'KEEPING UP' if lag_ok else 'FALLING BEHIND'}"
    )
    return rss_ok and lag_ok, text


def plot(samples: Samples, per_s: float, max_rate: float, out: Path, summary: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(samples.t, samples.rate, label="answered")
    axes[0].axhline(per_s, color="grey", linestyle="--", label=f"offered ({per_s:.0f}/s)")
    axes[0].axhline(max_rate, color="red", linestyle=":", label=f"measured max ({max_rate:.0f}/s)")
    axes[0].set_ylabel("messages/s")
    axes[0].legend(loc="lower right")
    axes[1].plot(samples.t, samples.lag, color="tab:orange")
    axes[1].set_ylabel("consumer lag (messages)")
    axes[2].plot(samples.t, samples.rss_mib, color="tab:green")
    axes[2].set_ylabel("worker RSS (MiB)")
    axes[2].set_xlabel("seconds")
    fig.suptitle(f"inference-worker soak\n{summary}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fraction", type=float, default=0.8, help="of the measured maximum")
    # 64 rows a message keeps the Python feeder (one send per message) well below the
    # worker's cost, so the offered rate is really offered on a 2-core machine.
    parser.add_argument("--rows", type=int, default=64, help="rows per request message")
    parser.add_argument("--backlog", type=int, default=2000, help="messages for the measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "soak.png")
    parser.add_argument("--bootstrap-servers")
    args = parser.parse_args(argv)

    bootstrap = _bootstrap(args.bootstrap_servers)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        repo, logdir = Path(tmp) / "models", Path(tmp)
        write_demo_model(repo)
        pool = Pool(args.rows)
        print(f"soak: measuring the maximum ({args.backlog} messages of {args.rows} rows) ...")
        max_rate = measure_max(bootstrap, repo, logdir, pool, args.backlog)
        per_s = args.fraction * max_rate
        print(
            f"soak: maximum {max_rate:.0f} msg/s ({max_rate * args.rows:.0f} rows/s); "
            f"feeding {per_s:.0f} msg/s for {args.minutes:g} min"
        )
        samples = soak(bootstrap, repo, logdir, pool, per_s, args.minutes)
    ok, summary = verdict(samples, per_s)
    mean_rate = statistics.mean(samples.rate[len(samples.rate) // 5 :] or samples.rate)
    summary = f"{mean_rate:.0f} msg/s answered; {summary}"
    plot(samples, per_s, max_rate, args.out, summary)
    print(f"soak: {summary}")
    print(f"soak: plot in {args.out}")
    print(f"soak: verdict {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
