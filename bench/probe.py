"""Quick A/B probes of one worker setting: paced latency, or throughput at saturation.

    bench/probe.py latency --rate 315 -- --coalesce-below-rows 1024
    bench/probe.py saturation --messages 5000 -- --coalesce-below-rows 1024
    bench/probe.py saturation --rows 64 --py-spy /tmp/worker.txt -- --kafka-client confluent

Everything after ``--`` goes to ``inference-worker run``. Run the two settings
alternately, several times, and compare medians: this machine is noisy. The
full, side-by-side figures come from ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import Kafka, bootstrap_servers  # noqa: E402
from worker.demo import write_demo_model  # noqa: E402
from worker.protocol import encode_request  # noqa: E402

ROWS = 64


def _worker(
    bootstrap: str, tin: str, tout: str, repo: Path, extra: list[str],
    switch_interval: float | None = None,
) -> subprocess.Popen[bytes]:
    # An experiment, not a setting of the worker: the interpreter's GIL switch interval.
    launch = ["-m", "worker.cli"] if switch_interval is None else [
        "-c", f"import sys; sys.setswitchinterval({switch_interval}); "
        "from worker.cli import entry; entry()"]
    return subprocess.Popen(
        [sys.executable, *launch, "run", "--bootstrap-servers", bootstrap,
         "--input-topic", tin, "--output-topic", tout, "--model-repository", str(repo),
         "--default-model", "mnist-mlp", "--preload", "mnist-mlp", "--group-id", f"g-{tin}",
         "--metrics-port", "0", "--log-level", "WARNING", *extra],
        cwd=ROOT,
    )  # fmt: skip


def _read(consumer: KafkaConsumer, n: int, timeout: float) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for records in consumer.poll(200).values():
            out.extend(records)
    return out


def _saturation(args: argparse.Namespace, bootstrap: str, tin: str, tout: str, repo: Path,
                extra: list[str], message: tuple[bytes, list[Any]]) -> int:  # fmt: skip
    """Publish, start the worker, wait for its commits (reading nothing meanwhile: the
    2 cores are the worker's), then rate its answers from their timestamps."""
    k = Kafka(bootstrap)
    group = f"g-{tin}"
    k.publish(tin, [message] * args.messages)
    worker = _worker(bootstrap, tin, tout, repo, extra, args.switch_interval)
    spy = None
    try:
        if args.py_spy is not None:  # the steady state only: from the first commit on
            deadline = time.monotonic() + 120
            while not k.committed(group).get(0) and time.monotonic() < deadline:
                time.sleep(0.05)
            exe = Path(sys.executable).with_name("py-spy")
            spy = subprocess.Popen([str(exe) if exe.exists() else "py-spy", "record",
                                    "-p", str(worker.pid), "-r", "200", "-f", "raw",
                                    "--threads", "--nonblocking",
                                    "-o", str(args.py_spy), *args.py_spy_flag])  # fmt: skip
        if not k.wait_committed(group, {0: args.messages}, 600, lambda: worker.poll() is None):
            print("the worker did not finish", file=sys.stderr)
            return 1
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    stamps = sorted(r.timestamp for r in k.read(tout, args.messages))
    k.close()
    rate = args.rows * (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    print(f"saturation: {rate:,.0f} rows/s over {len(stamps)} responses {extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["latency", "saturation"])
    parser.add_argument("--rate", type=float, default=315.0, help="messages/s (latency)")
    parser.add_argument("--seconds", type=float, default=10.0, help="paced span (latency)")
    parser.add_argument("--messages", type=int, default=5000, help="pre-published (saturation)")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows per message")
    parser.add_argument("--format", choices=["arrow", "msgpack", "json"], default="msgpack")
    parser.add_argument("--py-spy", metavar="FILE", type=Path, default=None,
                        help="profile the worker at saturation with py-spy (raw folded stacks, "
                        "all threads, 200 Hz) into FILE")  # fmt: skip
    parser.add_argument("--switch-interval", type=float, default=None, metavar="S",
                        help="run the worker with sys.setswitchinterval(S) (an A/B experiment "
                        "on GIL hand-offs; Python's default is 0.005)")  # fmt: skip
    parser.add_argument("--py-spy-flag", action="append", default=[], metavar="FLAG",
                        help="extra py-spy record flag, e.g. --py-spy-flag=--gil (repeatable)")
    args = parser.parse_args(own)

    bootstrap = bootstrap_servers()
    run = uuid.uuid4().hex[:8]
    tin, tout = f"probe-in-{run}", f"probe-out-{run}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    # LogAppendTime: the load generator's own queueing is not charged to the worker
    admin.create_topics([
        NewTopic(tin, 1, 1, topic_configs={"message.timestamp.type": "LogAppendTime"}),
        NewTopic(tout, 1, 1),
    ])  # fmt: skip
    repo = Path(tempfile.mkdtemp(prefix="probe-models-"))
    write_demo_model(repo)
    x = np.random.default_rng(0).random((args.rows, 784), dtype=np.float32)
    value, headers = encode_request({"x": x}, format=args.format)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, max_request_size=16 << 20)
    consumer = KafkaConsumer(tout, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=None, fetch_max_bytes=64 << 20)  # fmt: skip
    worker = None
    try:
        if args.mode == "saturation":
            return _saturation(args, bootstrap, tin, tout, repo, extra, (value, headers))
        worker = _worker(bootstrap, tin, tout, repo, extra, args.switch_interval)
        warm = 20  # the worker joins its group before the clock starts
        for _ in range(warm):
            producer.send(tin, value=value, headers=headers)
        producer.flush()
        _read(consumer, warm, 120)
        n = int(args.rate * args.seconds)
        start = time.monotonic()
        for j in range(n):
            delay = start + j / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.send(tin, value=value, headers=headers)
        producer.flush()
        answers = _read(consumer, n + warm, 120)
        requests = {r.offset: r.timestamp for r in _read(
            KafkaConsumer(tin, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                          group_id=None, fetch_max_bytes=64 << 20), n + warm, 120)}  # fmt: skip
        lat = np.array([
            r.timestamp - requests[int(dict(r.headers)["source-offset"])]
            for r in answers if int(dict(r.headers)["source-offset"]) >= warm
        ])  # fmt: skip
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        print(f"latency at {args.rate:g} msg/s: p50 {p50:.0f} p95 {p95:.0f} p99 {p99:.0f} ms "
              f"over {len(lat)} responses {extra}")  # fmt: skip
        return 0
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        producer.close()
        consumer.close()
        admin.delete_topics([tin, tout])
        admin.close()


if __name__ == "__main__":
    sys.exit(main())
