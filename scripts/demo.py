"""`make demo`: train the MNIST MLP on real digits, serve it, stream the held-out ones.

Trains the demo network on scikit-learn's bundled handwritten digits (a few
seconds of numpy, no download), exports it to ONNX, starts the broker and one
worker, streams the held-out digits through it (repeated to 10,000 rows) and
prints the accuracy of the worker's answers against the true labels, next to
throughput and latency, and a few digits with their predicted class.

Stops what it started (worker, and the broker if it was not already running),
also on Ctrl+C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.demo import (  # noqa: E402
    DEMO_INPUT,
    DEMO_MODEL,
    DEMO_OUTPUT,
    load_digits_28x28,
    train_mlp,
    write_trained_model,
)
from worker.protocol import decode_response, encode_request  # noqa: E402

ROWS, ROWS_PER_MESSAGE, PARTITIONS = 10_000, 50, 4
_SHADES = " .:-=+*#%@"
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"


def say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def start_broker(stack: ExitStack) -> str:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        return bootstrap
    running = subprocess.run([KAFKA_LOCAL, "status"], capture_output=True).returncode == 0
    out = subprocess.run([KAFKA_LOCAL, "start"], capture_output=True, text=True, check=True)
    if not running:
        stack.callback(lambda: subprocess.run([KAFKA_LOCAL, "stop"], capture_output=True))
    return out.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, worker: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("demo: the worker did not become ready; see .kafka-local/demo-worker.log")


def ascii_digits(images: list[np.ndarray], captions: list[str]) -> list[str]:
    """8x8 scans (0..16) side by side, three characters per pixel, captions underneath."""
    lines = []
    for row in range(8):
        lines.append("    ".join(
            "".join(_SHADES[min(9, int(v * 10 / 17))] * 3 for v in image[row])
            for image in images
        ))
    lines.append("    ".join(c.ljust(24) for c in captions))
    return lines


def main() -> int:
    with ExitStack() as stack:
        digits = load_digits_28x28()
        say(f"training the 784-32-10 MLP on {len(digits.y_train)} handwritten digits ...")
        trained = train_mlp(digits.x_train, digits.y_train)
        print(
            f"training:    {len(digits.y_train)} digits (8x8 scans upsampled to 28x28), "
            f"{trained.epochs} epochs in {trained.seconds:.1f} s, "
            f"train accuracy {trained.train_accuracy:.1%}"
        )
        repo = ROOT / "models"
        path = write_trained_model(repo, trained)
        say(f"trained model exported to {path.relative_to(ROOT)}")
        say("starting the local Kafka broker ...")
        bootstrap = start_broker(stack)

        run = uuid.uuid4().hex[:8]
        requests, predictions = f"demo-requests-{run}", f"demo-predictions-{run}"
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        stack.callback(admin.close)
        admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in (requests, predictions)])
        stack.callback(lambda: admin.delete_topics([requests, predictions]))

        port = free_port()
        log_path = ROOT / ".kafka-local" / "demo-worker.log"
        log_path.parent.mkdir(exist_ok=True)
        log_file = stack.enter_context(open(log_path, "wb"))
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "run",
                "--bootstrap-servers",
                bootstrap,
                "--input-topic",
                requests,
                "--output-topic",
                predictions,
                "--model-repository",
                str(repo),
                "--default-model",
                DEMO_MODEL,
                "--group-id",
                f"demo-{run}",
                "--metrics-port",
                str(port),
            ],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

        def stop_worker() -> None:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()

        stack.callback(stop_worker)
        say(f"worker started (pid {worker.pid}, log {log_path.relative_to(ROOT)})")
        wait_ready(port, worker)

        # The held-out digits, repeated until there are ROWS of them.
        repeats = -(-ROWS // len(digits.y_test))
        inputs = np.tile(digits.x_test, (repeats, 1))[:ROWS]
        labels = np.tile(digits.y_test, repeats)[:ROWS]
        producer = KafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=5, max_request_size=16 * 1024 * 1024
        )
        stack.callback(producer.close)
        consumer = KafkaConsumer(
            predictions,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        stack.callback(consumer.close)

        # One request first: the worker joins its group and loads the model
        # before the clock starts, as a long-running worker would have.
        # Version 1 is pinned: it is the model just trained, whatever else models/ holds.
        value, headers = encode_request(
            {DEMO_INPUT: inputs[:1]}, format="msgpack", request_id="warm-up", model_version=1
        )
        producer.send(requests, value=value, headers=headers)
        producer.flush()
        warm = 0
        while not warm and worker.poll() is None:
            warm = sum(len(rs) for rs in consumer.poll(timeout_ms=200).values())

        n_messages = ROWS // ROWS_PER_MESSAGE
        sent_at: dict[str, float] = {}
        t0 = time.time()
        for i in range(n_messages):
            rows = inputs[i * ROWS_PER_MESSAGE : (i + 1) * ROWS_PER_MESSAGE]
            rid = f"demo-{i}"
            value, headers = encode_request(
                {DEMO_INPUT: rows}, format="msgpack", request_id=rid, model_version=1
            )
            producer.send(requests, value=value, key=f"sensor-{i % 16}".encode(), headers=headers)
            sent_at[rid] = time.time()
        producer.flush()
        say(f"published {ROWS} rows in {n_messages} messages")

        latencies, answers = [], {}
        bar = tqdm(total=ROWS, unit="row", disable=not sys.stderr.isatty(), desc="predictions")
        deadline = time.monotonic() + 120
        last_ts = t0
        while len(answers) < n_messages and time.monotonic() < deadline:
            if worker.poll() is not None:
                say(f"worker exited early with status {worker.returncode}; see {log_path}")
                return 1
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    response = decode_response(r.value, r.headers)
                    rid = response.request_id or ""
                    answers[rid] = response.outputs[DEMO_OUTPUT]
                    latencies.append(r.timestamp / 1000 - sent_at.get(rid, r.timestamp / 1000))
                    last_ts = max(last_ts, r.timestamp / 1000)
                    bar.update(len(answers[rid]))
        bar.close()
        rows_answered = sum(len(a) for a in answers.values())
        elapsed = last_ts - t0
        lat = np.array(latencies) * 1000
        predicted = np.full(ROWS, -1)
        for rid, probs in answers.items():
            if rid.startswith("demo-"):
                i = int(rid.split("-")[1]) * ROWS_PER_MESSAGE
                predicted[i : i + len(probs)] = np.asarray(probs).argmax(axis=1)
        correct = int((predicted == labels).sum())
        print(
            f"predictions: {rows_answered} rows in {len(answers)} responses (of {ROWS} rows sent)"
        )
        print(
            f"accuracy:    {correct / ROWS:.1%} of the worker's answers match the true label "
            f"({len(digits.y_test)} held-out digits, each sent {repeats} times or fewer)"
        )
        print(
            f"throughput:  {rows_answered / elapsed:,.0f} rows/s end to end "
            f"({elapsed:.2f} s from first publish to last response)"
        )
        if len(lat):
            print(
                f"latency:     p50 {np.percentile(lat, 50):.1f} ms, "
                f"p99 {np.percentile(lat, 99):.1f} ms "
                "(publish -> response; one burst of 10,000 rows, so mostly queueing)"
            )
        print("a few held-out digits and the worker's answers:")
        held_out = len(digits.y_test)
        shown = [int(np.flatnonzero(labels[:held_out] == c)[0]) for c in range(4)]
        wrong = np.flatnonzero(predicted[:held_out] != labels[:held_out])
        shown.append(int(wrong[0]) if len(wrong) else 4)  # a mistake, when there is one
        captions = []
        for i in shown:
            probs = answers.get(f"demo-{i // ROWS_PER_MESSAGE}")
            p = float(np.asarray(probs)[i % ROWS_PER_MESSAGE].max()) if probs is not None else 0.0
            captions.append(f"{predicted[i]} (p={p:.2f}) true {labels[i]}")
        for line in ascii_digits([digits.images_test[i] for i in shown], captions):
            print("  " + line)
        return 0 if rows_answered == ROWS else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; stopped what the demo started")
        sys.exit(130)
