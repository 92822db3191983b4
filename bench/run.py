"""`make bench`: how close the worker runs to its limits, side by side in one run.

Against one broker (``KAFKA_BOOTSTRAP_SERVERS``, else ``scripts/kafka-local
start``), for the demo MLP (I/O-bound) and ResNet-50 (compute-bound):

- MLP streams of 256-, 64- and 16-row Arrow messages: the worker at saturation
  (messages published before it starts; first to last response timestamp) on
  both Kafka backends (confluent, the default, and kafka-python), next to a
  librdkafka drain and a kafka-python drain (the worker's own clients, no
  decoding or inference), a per-message librdkafka application (what a Quix
  Streams app does: one message at a time, decode, run, encode, produce), raw
  ONNX Runtime, and on the 64-row stream a naive and a per-row loop, as ratios;
- CPU time per message of every loop's process (every thread, the Kafka
  client's included), which depends far less on the machine's other load than
  rows/s; mean rows per ``session.run`` and peak RSS of the worker process;
- the tail: the worker and the per-message app, each its own process, under a
  paced producer of 16-row messages at 10%, 25% and 50% of the app's own
  maximum, alternating which goes first, p50/p95/p99 over 3 rounds;
- end-to-end latency (request append to response record timestamp) under a
  paced producer at 10% and 50% of each backend's own measured maximum, next
  to the librdkafka drain under the same schedule;
- the CNN: worker vs raw ONNX Runtime; 1 vs 2 worker processes in one group.

This machine is shared, so every comparison is a ratio of runs made in this
invocation, the compared loops run interleaved (their order rotates every
repetition), and every figure is the median over repetitions. A full run writes
``bench/results/latest.{json,md,png}``; ``--quick`` and ``--only`` write to
``--out`` (default a temporary directory) and leave those alone.

    .venv/bin/python bench/run.py [--quick] [--only streams,tail,latency,cnn,scaling] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import confluent_kafka as ck  # noqa: E402
import kafka  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench import baselines  # noqa: E402
from bench.workloads import (  # noqa: E402
    Kafka,
    Model,
    WorkerProcess,
    bootstrap_servers,
    build_repository,
    log,
    make_messages,
    percentiles,
    process_cpu_seconds,
    rate_from_timestamps,
    workers,
)
from worker.protocol import decode_request, encode_response, response_headers  # noqa: E402
from worker.settings import MAX_MESSAGE_BYTES  # noqa: E402
from worker.signature import Signature  # noqa: E402

GOALS = {
    "worker_vs_per_message": 1.3,
    "worker_vs_rdkafka_drain": 0.8,
    "p99_ms_at_50pct": 25.0,  # an upper bound, or the app's p99 where larger (tail section)
    "worker_vs_naive": 30.0,
    "worker_vs_per_row": 5.0,
    "cnn_worker_vs_raw_ort": 0.9,
}
LATEST = ROOT / "bench" / "results" / "latest.json"
SECTIONS = ("streams", "tail", "latency", "cnn", "scaling")
TAIL_LEVELS = (("10%", 0.10), ("25%", 0.25), ("50%", 0.50))
"""The tail section's offered loads, as fractions of the per-message app's own maximum."""
CPU_GOAL = 0.8
"""CPU per message, worker / per-message app: an upper bound."""
BACKENDS = {"worker": "confluent", "worker_kafka_python": "kafka-python"}
WORKERS = {
    "worker": ["--kafka-client", "confluent"],
    "worker_kafka_python": ["--kafka-client", "kafka-python"],
}


@dataclass(frozen=True)
class Plan:
    reps: int
    """Repetitions of every throughput measurement (>= 3; figures are medians)."""
    streams: tuple[tuple[int, int], ...]
    """(rows per message, messages) of each MLP stream."""
    loop_messages: int
    """The first messages of the 64-row stream for the naive and per-row loops (slow)."""
    cnn_messages: int
    scale_messages: int
    """Messages per 1-vs-2-worker run (published again for each run)."""
    latency_s: float
    """Seconds of paced load per level."""
    side_reps: int
    """Repetitions of the latency and 1-vs-2-worker runs (>= 3)."""


FULL = Plan(reps=5, streams=((256, 800), (64, 2400), (16, 4000)), loop_messages=80,
            cnn_messages=12, scale_messages=1200, latency_s=4.0, side_reps=3)  # fmt: skip
QUICK = Plan(reps=3, streams=((256, 300), (64, 800), (16, 1200)), loop_messages=40,
             cnn_messages=4, scale_messages=400, latency_s=3.0, side_reps=3)  # fmt: skip

# name -> (what it is, in the tables)
LOOPS = {
    "worker": "worker, confluent backend (the default)",
    "worker_kafka_python": "worker, kafka-python backend",
    "rdkafka_drain": "librdkafka drain (worker's confluent clients, no work)",
    "kafka_python_drain": "kafka-python drain (worker's kafka-python clients, no work)",
    "per_message": "per-message librdkafka app (Quix-style, one message at a time)",
    "naive": "naive loop, kafka-python (Python rows, JSON out per row)",
    "per_row": "per-row binary loop, kafka-python (batch-1 runs)",
    "raw_ort": "raw ONNX Runtime (same batches, from memory)",
}
# (numerator, denominator) of each reported ratio
PAIRS = [
    ("worker", "per_message"),
    ("worker", "rdkafka_drain"),
    ("worker", "raw_ort"),
    ("worker", "worker_kafka_python"),
    ("worker_kafka_python", "kafka_python_drain"),
    ("per_message", "rdkafka_drain"),
    ("rdkafka_drain", "kafka_python_drain"),
    ("worker", "naive"),
    ("worker", "per_row"),
]


def med(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # NaN-free
    return statistics.median(values) if values else float("nan")


def _max(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return max(values) if values else float("nan")


def worker_response(session: ort.InferenceSession, message: tuple[bytes, list], model: str
                    ) -> tuple[bytes, list[tuple[str, bytes]]]:  # fmt: skip
    """The worker's answer to ``message`` (same codec, same headers): the drains' record."""
    value, headers = message
    request = decode_request(value, headers, default_id="bench/0/0")
    bound = request.bind(Signature.from_session(session))
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, bound.feeds), strict=True))
    body, content_type = encode_response(request, bound, outputs, model=model, model_version=1)
    out_headers = response_headers(
        request, content_type=content_type, model=model, model_version=1, topic="bench",
        partition=0, offset=0,
    )  # fmt: skip
    return body, [(str(k), v or b"") for k, v in out_headers]


class Bench:
    def __init__(self, plan: Plan, repo: Path, kafka_: Kafka, models: dict[str, Model],
                 skip: Sequence[str] = ()) -> None:  # fmt: skip
        self.plan, self.repo, self.k, self.models = plan, repo, kafka_, models
        self.bootstrap = kafka_.bootstrap
        self.skip = set(skip)
        self.last_cpu_s = float("nan")
        self.errors: list[str] = []

    def _model_path(self, m: Model) -> Path:
        return self.repo / m.name / "1" / "model.onnx"

    def _worker(self, m: Model, in_topic: str, out_topic: str, group: str,
                extra: list[str] | None = None) -> WorkerProcess:  # fmt: skip
        return WorkerProcess(self.bootstrap, in_topic, out_topic, self.repo, m.name, group,
                             extra or [])  # fmt: skip

    def saturate(
        self, m: Model, in_topic: str, count: int, label: str, extra: list[str] | None = None
    ) -> dict[str, Any]:
        """One worker process over ``count`` pre-published messages: rows/s, rows/run, RSS."""
        out, group = self.k.topic(label), self.k.group(label)
        ends = self.k.end_offsets(in_topic)
        with self._worker(m, in_topic, out, group, extra) as w:
            w.wait_ready()
            cpu = w.cpu_seconds()  # start-up (imports, model load) left out
            if not self.k.wait_committed(group, ends, 180, w.alive):  # a stall is a failed run
                raise RuntimeError(f"{label}: worker did not finish: {w.stderr_tail()}")
            cpu = w.cpu_seconds() - cpu
            metrics, rss = w.metrics(), w.peak_rss()
        records = self.k.read(out, count)
        self.k.drop(out)
        if len(records) != count:
            raise RuntimeError(f"{label}: {len(records)} responses for {count} requests")
        runs = metrics.get("inference_worker_batch_rows_count", 0.0)
        return {
            "rows_per_s": rate_from_timestamps(records, lambda r: m.rows_per_message),
            "rows_per_run": metrics.get("inference_worker_batch_rows_sum", 0.0) / runs
            if runs else float("nan"),
            "peak_rss_bytes": rss,
            "cpu_s": cpu,
            "dlq": metrics.get('inference_worker_messages_total{status="dlq"}', 0.0),
        }

    def kafka_loop(self, label: str, m: Model, count: int, per_record_rows: int,
                   fn: Callable[[str, str, int], None]) -> float:  # fmt: skip
        """Rows/s of a baseline loop ``fn(out_topic, group, count)``, from its output timestamps;
        its CPU seconds (this process, every thread) in ``self.last_cpu_s``."""
        out, group = self.k.topic(label), self.k.group(label)
        cpu = process_cpu_seconds(os.getpid())
        fn(out, group, count)
        self.last_cpu_s = process_cpu_seconds(os.getpid()) - cpu
        expected = count * m.rows_per_message // per_record_rows
        records = self.k.read(out, expected)
        self.k.drop(out)
        if len(records) != expected:
            raise RuntimeError(f"{label}: {len(records)} outputs, expected {expected}")
        return rate_from_timestamps(records, lambda r: per_record_rows)

    # -- MLP streams: the worker on both backends vs the baselines ----------------

    def stream(self, rows: int, count: int) -> dict[str, Any]:
        m, p, bs = replace(self.models["mlp"], rows_per_message=rows), self.plan, self.bootstrap
        loops = rows == 64  # the naive and per-row loops, as before, on 64-row messages
        log(f"mlp/{rows}: publishing {count} messages of {rows} rows")
        msgs = make_messages(m, count)
        topic = self.k.topic(f"mlp{rows}-in", partitions=2)
        self.k.publish(topic, msgs, partitions=2)
        session = baselines.ort_session(self._model_path(m))
        sig = Signature.from_session(session)
        batches = [decode_request(v, h, default_id="b/0/0").bind(sig).feeds for v, h in msgs]
        response = worker_response(session, msgs[0], m.name)
        names = [n for n in LOOPS if (loops or n not in ("naive", "per_row"))
                 and n not in self.skip]  # fmt: skip
        samples: dict[str, list[float]] = {n: [] for n in names}
        per_run: dict[str, list[float]] = {n: [] for n in WORKERS if n in names}
        cpu_per_msg: dict[str, list[float]] = {n: [] for n in names if n != "raw_ort"}
        errors: list[str] = []
        rss: dict[str, list[float]] = {n: [] for n in WORKERS if n in names}

        def measure(name: str, i: int) -> float:
            label = f"mlp{rows}-{name}-{i}".replace("_", "-")
            if name in WORKERS:
                sat = self.saturate(m, topic, count, label, WORKERS[name])
                per_run[name].append(sat["rows_per_run"])
                cpu_per_msg[name].append(sat["cpu_s"] / count * 1e6)
                rss[name].append(sat["peak_rss_bytes"] or float("nan"))
                return float(sat["rows_per_s"])
            if name == "rdkafka_drain":
                return self.kafka_loop(label, m, count, rows, lambda o, g, n: baselines
                                       .rdkafka_drain(bs, topic, o, g, n, response))  # fmt: skip
            if name == "kafka_python_drain":
                return self.kafka_loop(label, m, count, rows, lambda o, g, n: baselines.drain(
                    bs, topic, o, g, n, response))  # fmt: skip
            if name == "per_message":
                return self.kafka_loop(label, m, count, rows, lambda o, g, n: baselines
                                       .per_message_app(bs, topic, o, g, n, session))  # fmt: skip
            if name == "naive":
                return self.kafka_loop(label, m, p.loop_messages, 1, lambda o, g, n: baselines
                                       .naive(bs, topic, o, g, n, session, m.input))  # fmt: skip
            if name == "per_row":
                return self.kafka_loop(label, m, p.loop_messages, 1, lambda o, g, n: baselines
                                       .per_row(bs, topic, o, g, n, session))  # fmt: skip
            return baselines.raw_ort(session, batches)

        for i in range(p.reps):
            order = names[i % len(names):] + names[: i % len(names)]  # rotate: no fixed slot
            log(f"mlp/{rows} rep {i + 1}/{p.reps}: {', '.join(order)}")
            for name in order:
                try:
                    samples[name].append(measure(name, i))
                except Exception as exc:  # one failed run must not cost the whole bench
                    log(f"mlp/{rows} {name} rep {i + 1} failed: {exc}", force=True)
                    errors.append(f"mlp/{rows} {name} rep {i + 1}: {exc}")
                    self.errors.append(errors[-1])
                    samples[name].append(float("nan"))
                    self.last_cpu_s = float("nan")
                    if name in WORKERS:
                        per_run[name].append(float("nan"))
                        rss[name].append(float("nan"))
                        cpu_per_msg[name].append(float("nan"))
                if name not in WORKERS and name in cpu_per_msg:
                    n = p.loop_messages if name in ("naive", "per_row") else count
                    cpu_per_msg[name].append(self.last_cpu_s / n * 1e6)
            log("  " + ", ".join(f"{n} {samples[n][-1]:,.0f}" for n in names))
        self.k.drop(topic)
        ratios, best = {}, {}
        for a, b in PAIRS:
            if a in samples and b in samples:
                ratios[f"{a}_vs_{b}"] = med([x / y for x, y in zip(samples[a], samples[b],
                                                                    strict=True)])  # fmt: skip
                best[f"{a}_vs_{b}"] = _max(samples[a]) / _max(samples[b])
        cpu_ratios = {}
        if "worker" in cpu_per_msg and "per_message" in cpu_per_msg:
            cpu_ratios["worker_vs_per_message"] = med([
                x / y for x, y in zip(cpu_per_msg["worker"], cpu_per_msg["per_message"],
                                      strict=True)])  # fmt: skip
        return {
            "model": asdict(m),
            "messages": count,
            "message_bytes": len(msgs[0][0]),
            "loop_messages": p.loop_messages if loops else 0,
            "rows_per_s": {k: med(v) for k, v in samples.items()},
            "samples": samples,
            "ratios": ratios,
            "best_ratios": best,
            "rows_per_run": {k: med(v) for k, v in per_run.items()},
            "cpu_us_per_message": {k: med(v) for k, v in cpu_per_msg.items()},
            "cpu_us_per_message_samples": cpu_per_msg,
            "cpu_ratios": cpu_ratios,
            "peak_rss_bytes": {k: med(v) for k, v in rss.items()},
            "response_bytes": len(response[0]),
            "errors": errors,
        }

    # -- CNN: worker vs raw ORT ------------------------------------------------

    def cnn(self) -> dict[str, Any]:
        m, p = self.models["cnn"], self.plan
        log(f"cnn: publishing {p.cnn_messages} messages of {m.rows_per_message} images")
        msgs = make_messages(m, p.cnn_messages, distinct=2)
        topic = self.k.topic("cnn-in")
        self.k.publish(topic, msgs)
        session = baselines.ort_session(self._model_path(m))
        sig = Signature.from_session(session)
        batches = [decode_request(v, h, default_id="b/0/0").bind(sig).feeds for v, h in msgs]
        # One message per run in both, so both run exactly the same batches.
        extra = ["--max-batch-rows", str(m.rows_per_message)]
        samples: dict[str, list[float]] = {"worker": [], "raw_ort": []}
        rows_per_run, rss = [], []
        for i in range(p.reps):
            log(f"cnn rep {i + 1}/{p.reps}: worker, raw ORT")
            sat = self.saturate(m, topic, p.cnn_messages, f"cnn-w{i}", extra)
            samples["worker"].append(sat["rows_per_s"])
            rows_per_run.append(sat["rows_per_run"])
            rss.append(sat["peak_rss_bytes"])
            samples["raw_ort"].append(baselines.raw_ort(session, batches))
            log(f"  worker {samples['worker'][-1]:.2f} rows/s, raw {samples['raw_ort'][-1]:.2f}")
        return {
            "model": asdict(m),
            "messages": p.cnn_messages,
            "best_ratios": {"worker_vs_raw_ort": max(samples["worker"]) / max(samples["raw_ort"])},
            "worker_flags": extra,
            "rows_per_s": {k: med(v) for k, v in samples.items()},
            "samples": samples,
            "ratios": {"worker_vs_raw_ort": med([
                w / r for w, r in zip(samples["worker"], samples["raw_ort"], strict=True)
            ])},
            "rows_per_run": med(rows_per_run),
            "peak_rss_bytes": med([r for r in rss if r]),
        }

    # -- latency under paced load --------------------------------------------------

    def latency(self, maxima: dict[str, float], response_bytes: int) -> dict[str, Any]:
        """p50/p95/p99 at 10% and 50% of each backend's own maximum (``maxima``, rows/s
        on 64-row messages), and the librdkafka drain under the confluent worker's schedule.

        The input topics stamp records with the broker's append time, so the
        load generator's own client queueing (it shares the 2 cores) is not
        charged to the worker; the drain, run as its own process under the
        same schedule, shows what the Kafka client alone costs on this machine.
        """
        m, p = self.models["mlp"], self.plan
        msgs = make_messages(m, 16)
        levels = (("10%", 0.10), ("50%", 0.50))
        targets = {"worker": maxima["worker"], "rdkafka_drain": maxima["worker"],
                   "worker_kafka_python": maxima["worker_kafka_python"]}  # fmt: skip
        targets = {t: top for t, top in targets.items() if top == top and t not in self.skip}
        got: dict[str, dict[str, list[list[float]]]] = {
            t: {name: [] for name, _ in levels} for t in targets
        }
        sent: dict[str, dict[str, list[float]]] = {t: {name: [] for name, _ in levels}
                                                   for t in targets}  # fmt: skip
        for i in range(p.side_reps):
            for target, top in targets.items():
                log(f"latency rep {i + 1}/{p.side_reps}: {target} (max {top:,.0f} rows/s)")
                schedule = [(name, f * top / m.rows_per_message) for name, f in levels]

                def start(in_t: str, out_t: str, group: str, total: int, target: str = target
                          ) -> Any:  # fmt: skip
                    if target in BACKENDS:
                        return self._worker(m, in_t, out_t, group,
                                            ["--kafka-client", BACKENDS[target]])  # fmt: skip
                    return BaselineProcess(self.bootstrap, in_t, out_t, group, total, "drain",
                                           ["--response-bytes", str(response_bytes)])  # fmt: skip

                label = f"lat-{target}{i}".replace("_", "-")
                per_level, rates = self._paced_run(label, start, msgs, schedule)
                for name, values in per_level.items():
                    got[target][name].append(percentiles(values))
                    sent[target][name].append(rates.get(name, float("nan")) * m.rows_per_message)
        return _latency_table(targets, levels, got, sent)

    def tail(self, app_max: float) -> dict[str, Any]:
        """The worker (confluent) and the per-message app, each its own process, at 10%, 25%
        and 50% of the app's own maximum (``app_max``, rows/s on 16-row messages).

        Rounds alternate which of the two goes first; every figure is the median
        over rounds. Latency: request append time to answer record timestamp, as
        in :meth:`latency`.
        """
        m, p = replace(self.models["mlp"], rows_per_message=16), self.plan
        msgs = make_messages(m, 16)
        levels = TAIL_LEVELS
        path = self._model_path(m)
        targets = {t: app_max for t in ("worker", "per_message") if t not in self.skip}
        got: dict[str, dict[str, list[list[float]]]] = {
            t: {name: [] for name, _ in levels} for t in targets
        }
        sent: dict[str, dict[str, list[float]]] = {t: {name: [] for name, _ in levels}
                                                   for t in targets}  # fmt: skip
        schedule = [(name, f * app_max / m.rows_per_message) for name, f in levels]
        names = list(targets)
        for i in range(p.side_reps):
            for target in names[i % len(names):] + names[: i % len(names)]:
                log(f"tail round {i + 1}/{p.side_reps}: {target} (app max {app_max:,.0f} rows/s)")

                def start(in_t: str, out_t: str, group: str, total: int, target: str = target
                          ) -> Any:  # fmt: skip
                    if target == "worker":
                        return self._worker(m, in_t, out_t, group)
                    return BaselineProcess(self.bootstrap, in_t, out_t, group, total,
                                           "per-message", ["--model", str(path)])  # fmt: skip

                label = f"tail-{target}{i}".replace("_", "-")
                per_level, rates = self._paced_run(label, start, msgs, schedule)
                for name, values in per_level.items():
                    got[target][name].append(percentiles(values))
                    sent[target][name].append(rates.get(name, float("nan")) * m.rows_per_message)
        return {"rows_per_message": m.rows_per_message, "app_max_rows_per_s": app_max,
                **_latency_table(targets, levels, got, sent)}  # fmt: skip

    def _paced_run(self, label: str, start: Callable[[str, str, str, int], Any],
                   msgs: Sequence[tuple[bytes, list]], schedule: Sequence[tuple[str, float]]
                   ) -> tuple[dict[str, list[float]], dict[str, float]]:  # fmt: skip
        """One process (``start(in, out, group, total)``) under 20 warm-up messages, then
        each ``(level, messages/s)`` of ``schedule`` for ``plan.latency_s`` seconds:
        milliseconds from request append to answer, per level (empty after a failure), and
        the messages/s the broker appended per level (below the schedule's where this
        machine could not send faster)."""
        warm = 20
        counts = {name: max(1, int(per_s * self.plan.latency_s)) for name, per_s in schedule}
        total = warm + sum(counts.values())
        in_t = self.k.topic(label, append_time=True)
        out_t, group = self.k.topic(f"{label}-out"), self.k.group(label)
        per_level: dict[str, list[float]] = {name: [] for name, _ in schedule}
        rates: dict[str, float] = {}
        producer = ck.Producer({
            "bootstrap.servers": self.bootstrap, "linger.ms": 0,
            "message.max.bytes": MAX_MESSAGE_BYTES + 65536,
        })  # fmt: skip
        try:
            # Answers, not commits, mark progress: the per-message app commits every 5 s.
            with start(in_t, out_t, group, total) as proc:
                proc.wait_ready()
                _paced(producer, in_t, msgs, 200.0, warm, b"warm")
                producer.flush(30)
                self.k.read(out_t, warm, 60)
                for name, per_s in schedule:
                    _paced(producer, in_t, msgs, per_s, counts[name], name.encode())
                producer.flush(60)
                answers = self.k.read(out_t, total, 120)
                if len(answers) < total:
                    raise RuntimeError(f"{label}: {len(answers)} answers to {total} requests: "
                                       f"{proc.stderr_tail()}")  # fmt: skip
            requests = {_header(r, "seq"): r.timestamp for r in self.k.read(in_t, total)}
            for name, _ in schedule:
                stamps = [t for seq, t in requests.items() if seq and seq.startswith(f"{name}-")]
                span_ms = max(stamps) - min(stamps) if stamps else 0
                rates[name] = (len(stamps) - 1) * 1000.0 / span_ms if span_ms > 0 else float("nan")
            for r in answers:
                sent = requests.get(_header(r, "seq"))
                phase = _header(r, "phase")
                if sent is not None and phase in per_level:
                    per_level[phase].append(r.timestamp - sent)
        except Exception as exc:  # one failed run must not cost the whole bench
            log(f"{label} failed: {exc}", force=True)
            self.errors.append(f"{label}: {exc}")
            per_level, rates = {name: [] for name, _ in schedule}, {}
        finally:
            self.k.drop(in_t, out_t)
        return per_level, rates

    # -- 1 vs 2 workers ------------------------------------------------------------

    def scaling(self) -> dict[str, Any]:
        m, p = self.models["mlp"], self.plan
        msgs = make_messages(m, p.scale_messages)
        n = p.scale_messages
        ends = {0: (n + 1) // 2, 1: n // 2}  # round-robin; the commit marker is not consumed
        samples: dict[int, list[float]] = {1: [], 2: []}
        for i in range(p.side_reps):
            for count in (1, 2):
                log(f"scaling rep {i + 1}/{p.side_reps}: {count} worker(s)")
                label = f"scale{count}-{i}"
                in_t, out_t, group = self.k.topic(label, 2), self.k.topic(f"{label}-out"), \
                    self.k.group(label)  # fmt: skip
                producer = self.k.publish_gated(in_t, msgs, partitions=2)
                try:
                    with workers(count, bootstrap=self.bootstrap, input_topic=in_t,
                                 output_topic=out_t, repository=self.repo, model=m.name,
                                 group=group) as ws:  # fmt: skip
                        for w in ws:
                            w.wait_ready()
                        self.k.wait_assigned(group, count, 2, 60)
                        producer.commit_transaction()  # the messages appear, for all at once
                        if not self.k.wait_committed(group, ends, 300):
                            raise RuntimeError(f"{label}: workers did not finish")
                finally:
                    producer.close()
                records = self.k.read(out_t, n)
                self.k.drop(in_t, out_t)
                samples[count].append(rate_from_timestamps(records, lambda r: m.rows_per_message))
        one, two = med(samples[1]), med(samples[2])
        return {
            "messages": n,
            "rows_per_s": {"1": one, "2": two},
            "samples": {str(k): v for k, v in samples.items()},
            "speedup": med([b / a for a, b in zip(samples[1], samples[2], strict=True)]),
        }


def _paced(producer: ck.Producer, topic: str, msgs: Sequence[tuple[bytes, list]],
           per_s: float, count: int, phase: bytes) -> None:  # fmt: skip
    """Send ``count`` messages at ``per_s`` a second on a fixed schedule (late sends do not
    wait for the next slot, so the offered rate holds while the machine can send it; with
    the client's queue full a send waits for room); each carries ``phase`` and a ``seq``."""
    start = time.monotonic()
    for j in range(count):
        delay = start + j / per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        value, headers = msgs[j % len(msgs)]
        seq = f"{phase.decode()}-{j}".encode()
        # with the client's queue full this waits for room: this machine sends no faster
        baselines._produce(producer, topic, value, None, [*headers, ("phase", phase),
                           ("seq", seq)], _ignore)  # fmt: skip
        producer.poll(0)


def _ignore(*_: Any) -> None:
    """A delivery report nobody reads (the paced run reads the topic back)."""


def _header(record: Any, name: str) -> str | None:
    for key, value in record.headers or []:
        if key == name:
            return str(value.decode())
    return None


def _latency_table(targets: dict[str, float], levels: Sequence[tuple[str, float]],
                   got: dict[str, dict[str, list[list[float]]]],
                   sent: dict[str, dict[str, list[float]]]) -> dict[str, Any]:  # fmt: skip
    """Medians over repetitions of each target's p50/p95/p99 per level (failed runs left
    out), and of the rows/s the broker appended (``sent``)."""
    out: dict[str, Any] = {}
    for target, top in targets.items():
        out[target] = {}
        for name, fraction in levels:
            reps = [r for r in got[target][name] if r and r[0] == r[0]]
            out[target][name] = {
                "offered_rows_per_s": fraction * top,
                "sent_rows_per_s": med(sent[target][name]),
                "p50_ms": med([r[0] for r in reps]),
                "p95_ms": med([r[1] for r in reps]),
                "p99_ms": med([r[2] for r in reps]),
                "samples_ms": reps,
            }
    return out


class BaselineProcess:
    """``bench/baselines.py LOOP --client confluent ...`` (the drain or the per-message app)
    as its own process, shaped like a WorkerProcess."""

    def __init__(self, bootstrap: str, in_topic: str, out_topic: str, group: str, count: int,
                 loop: str, extra: list[str]) -> None:  # fmt: skip
        self.args = [sys.executable, str(ROOT / "bench" / "baselines.py"), loop,
                     "--bootstrap-servers", bootstrap, "--input-topic", in_topic,
                     "--output-topic", out_topic, "--group-id", group, "--count", str(count),
                     "--client", "confluent", *extra]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BaselineProcess:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> None:
        pass  # the warm-up messages wait for it

    def stderr_tail(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.alive():
            self.proc.terminate()
        if self.proc is not None:
            self.proc.wait(30)


# -- report ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "kafka_python": kafka.__version__,
        "confluent_kafka": importlib.metadata.version("confluent-kafka"),
        "librdkafka": ck.libversion()[0],
        "platform": platform.platform(),
    }


def kafka_python_reference(path: Path = LATEST) -> dict[str, Any] | None:
    """The kafka-python worker's figures before the Kafka seam, from ``latest.json``.

    A file written by this version carries them forward unchanged; one written
    before (the worker on kafka-python only) has them as its MLP worker figures.
    """
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if "kafka_python_reference" in old:
        return dict(old["kafka_python_reference"])
    try:
        return {
            "source": "bench/results/latest.json before the Kafka seam (worker on kafka-python)",
            "rows_per_message": old["mlp"]["model"]["rows_per_message"],
            "worker_rows_per_s": old["mlp"]["rows_per_s"]["worker"],
            "drain_rows_per_s": old["mlp"]["rows_per_s"]["drain"],
            "worker_vs_drain": old["mlp"]["ratios"]["worker_vs_drain"],
            "p99_ms_at_50pct": old["latency"]["50%"]["worker"]["p99_ms"],
            "p50_ms_at_50pct": old["latency"]["50%"]["worker"]["p50_ms"],
        }
    except (KeyError, TypeError):
        return None


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    nan = float("nan")
    rows: list[tuple[str, float, str, float]] = []
    streams = results.get("streams", {})
    for key, st in streams.items():
        q = st["ratios"]
        rows += [
            (f"{key}-row: worker / per-message app", q.get("worker_vs_per_message", nan), ">=",
             GOALS["worker_vs_per_message"]),
            (f"{key}-row: worker / librdkafka drain", q.get("worker_vs_rdkafka_drain", nan), ">=",
             GOALS["worker_vs_rdkafka_drain"]),
            (f"{key}-row: CPU per message, worker / per-message app",
             st.get("cpu_ratios", {}).get("worker_vs_per_message", nan), "<=", CPU_GOAL),
        ]  # fmt: skip
    rows += _tail_goals(results.get("tail"))
    lat = results.get("latency")
    if lat and "worker" in lat:
        rows.append(("64-row: worker p99 at 50% of its max (ms)", lat["worker"]["50%"]["p99_ms"],
                     "<=", GOALS["p99_ms_at_50pct"]))  # fmt: skip
    ref = results.get("kafka_python_reference")
    if ref and "64" in streams:
        st = streams["64"]
        kp = st["rows_per_s"].get("worker_kafka_python", nan)
        rows += [
            (f"64-row: kafka-python worker rows/s / before the seam ({_fmt(kp)} / "
             f"{_fmt(ref['worker_rows_per_s'])})", kp / ref["worker_rows_per_s"], ">=", 1.0),
            ("64-row: (kafka-python worker / kafka-python drain) / the same before",
             st["ratios"].get("worker_kafka_python_vs_kafka_python_drain", nan)
             / ref["worker_vs_drain"], ">=", 1.0),
        ]  # fmt: skip
        if lat and "worker_kafka_python" in lat:
            p99 = lat["worker_kafka_python"]["50%"]["p99_ms"]
            rows.append((f"64-row: kafka-python worker p99 at 50% / before ({_fmt(p99)} / "
                         f"{_fmt(ref['p99_ms_at_50pct'])} ms)", p99 / ref["p99_ms_at_50pct"],
                         "<=", 1.0))  # fmt: skip
    if "64" in streams:
        q = streams["64"]["ratios"]
        rows += [
            ("64-row: worker / naive", q.get("worker_vs_naive", nan), ">=",
             GOALS["worker_vs_naive"]),
            ("64-row: worker / per-row", q.get("worker_vs_per_row", nan), ">=",
             GOALS["worker_vs_per_row"]),
        ]  # fmt: skip
    if "cnn" in results:
        rows.append(("CNN worker / raw ORT", results["cnn"]["ratios"]["worker_vs_raw_ort"], ">=",
                     GOALS["cnn_worker_vs_raw_ort"]))  # fmt: skip
    return [
        {"goal": name, "value": value, "op": op, "target": target,
         "met": value >= target if op == ">=" else value <= target}
        for name, value, op, target in rows
    ]  # fmt: skip


def _tail_goals(tail: dict[str, Any] | None) -> list[tuple[str, float, str, float]]:
    """At 10% and 25% of the app's maximum: worker p99 <= app p99 and p50 <= app p50 + 1 ms;
    at 50%: worker p99 <= 25 ms or the app's p99, whichever is larger."""
    if not tail or "worker" not in tail or "per_message" not in tail:
        return []
    w, a = tail["worker"], tail["per_message"]
    rows: list[tuple[str, float, str, float]] = []

    def ratio(what: str, level: str, worker: float, bound: float, bound_is: str) -> None:
        rows.append((f"16-row at {level} of the app's max: worker {what} / {bound_is} "
                     f"({_fmt(worker)} / {_fmt(bound)} ms)", worker / bound, "<=", 1.0))

    for level in ("10%", "25%"):
        ratio("p99", level, w[level]["p99_ms"], a[level]["p99_ms"], "app p99")
        ratio("p50", level, w[level]["p50_ms"], a[level]["p50_ms"] + 1.0, "(app p50 + 1 ms)")
    top = max(GOALS["p99_ms_at_50pct"], a["50%"]["p99_ms"])
    ratio("p99", "50%", w["50%"]["p99_ms"], top, "max(25 ms, app p99)")
    return rows


def _sent(level: dict[str, Any]) -> str:
    """The rows/s the broker appended at a level, as a share of the offered load."""
    sent = level.get("sent_rows_per_s", float("nan"))
    if sent != sent:
        return "n/a"
    return f"{sent / level['offered_rows_per_s']:.0%}"


def _fmt(v: float) -> str:
    if v != v:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def markdown(results: dict[str, Any]) -> str:
    mach = results["machine"]
    lines = [
        f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), onnxruntime {mach['onnxruntime']}, "
        f"confluent-kafka {mach['confluent_kafka']} (librdkafka {mach['librdkafka']}), "
        f"kafka-python {mach['kafka_python']}, Python {mach['python']}; "
        f"{results['plan']['reps']} repetitions, medians; `{results['command']}`.",
        "",
        "Ratios: median of the per-repetition ratios; best/best: fastest run over fastest "
        "run (the least disturbed by other load on the machine). CPU µs/message: user + "
        "system CPU of the loop's process, every thread (the Kafka client's included, the "
        "broker's not), per message; the worker's start-up left out. Latency tables, sent: "
        "the rows/s the broker appended, as a share of the offered load (less where the "
        "load generator, on the same cores, could not send faster).",
    ]
    for key, st in results.get("streams", {}).items():
        r, q, bq = st["rows_per_s"], st["ratios"], st["best_ratios"]
        lines += [
            "",
            f"| {st['model']['name']}, {key} rows/message ({st['message_bytes'] / 1e3:,.0f} kB), "
            f"{st['messages']} messages | rows/s | worker / this | best/best "
            "| CPU µs/message |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        cpu = st.get("cpu_us_per_message", {})
        for name, what in LOOPS.items():
            if name not in r:
                continue
            ratio = "1.00" if name == "worker" else _fmt(q.get(f"worker_vs_{name}", float("nan")))
            best = "1.00" if name == "worker" else _fmt(bq.get(f"worker_vs_{name}", float("nan")))
            used = f"{cpu[name]:,.0f}" if name in cpu else ""
            lines.append(f"| {what} | {r[name]:,.0f} | {ratio} | {best} | {used} |")
        for key2, what in (
            ("worker_kafka_python_vs_kafka_python_drain",
             "kafka-python worker / kafka-python drain"),
            ("per_message_vs_rdkafka_drain", "per-message app / librdkafka drain"),
            ("rdkafka_drain_vs_kafka_python_drain", "librdkafka drain / kafka-python drain"),
        ):  # fmt: skip
            if key2 in q:
                lines.append(f"| *{what}* | | {q[key2]:.2f} | {bq[key2]:.2f} | |")
        cq = st.get("cpu_ratios", {}).get("worker_vs_per_message")
        if cq is not None:
            lines.append(f"| *CPU per message, worker / per-message app* | | | | {cq:.2f} |")
    if "cnn" in results:
        cnn = results["cnn"]
        cq, cb = cnn["ratios"], cnn["best_ratios"]
        lines += [
            "",
            f"| {cnn['model']['name']} ({cnn['model']['rows_per_message']} images/message) "
            "| rows/s | worker / this | best/best |",
            "| --- | ---: | ---: | ---: |",
            f"| worker (1 process) | {cnn['rows_per_s']['worker']:.2f} | 1.00 | 1.00 |",
            f"| raw ONNX Runtime (same batches) | {cnn['rows_per_s']['raw_ort']:.2f} "
            f"| {cq['worker_vs_raw_ort']:.2f} | {cb['worker_vs_raw_ort']:.2f} |",
        ]
    figures = ["", "| figure | value |", "| --- | ---: |"]
    lines += figures
    for key, st in results.get("streams", {}).items():
        for name in st["rows_per_run"]:
            lines.append(f"| MLP {key}-row, {LOOPS[name]}: mean rows per session.run, peak RSS "
                         f"| {st['rows_per_run'][name]:,.0f}, "
                         f"{st['peak_rss_bytes'][name] / 2**20:,.0f} MiB |")  # fmt: skip
    if "cnn" in results:
        cnn = results["cnn"]
        lines.append(f"| CNN mean rows per session.run, peak RSS | {cnn['rows_per_run']:,.0f}, "
                     f"{cnn['peak_rss_bytes'] / 2**20:,.0f} MiB |")  # fmt: skip
    if "scaling" in results:
        sc = results["scaling"]
        lines += [
            f"| MLP 64-row, 1 worker | {sc['rows_per_s']['1']:,.0f} rows/s |",
            f"| MLP 64-row, 2 workers, one group | {sc['rows_per_s']['2']:,.0f} rows/s "
            f"({sc['speedup']:.2f}x) |",
        ]
    if lines[-3:] == figures:  # none to show
        del lines[-3:]
    if "tail" in results:
        tail = results["tail"]
        lines += [
            "",
            f"| MLP {tail['rows_per_message']}-row latency at a fixed offered load (fractions "
            f"of the per-message app's {tail['app_max_rows_per_s']:,.0f} rows/s) "
            "| offered rows/s | sent | p50 ms | p95 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, _ in TAIL_LEVELS:
            for target in ("worker", "per_message"):
                if target in tail:
                    x = tail[target][name]
                    lines.append(
                        f"| {LOOPS[target].split(' (')[0]}, at {name} "
                        f"| {x['offered_rows_per_s']:,.0f} | {_sent(x)} "
                        f"| {x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x['p99_ms']:.0f} |"
                    )
    if "latency" in results:
        lat = results["latency"]
        lines += [
            "",
            "| MLP 64-row latency, request append to response timestamp | offered rows/s "
            "| sent | p50 ms | p95 ms | p99 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        whose = {"worker": "of its max", "rdkafka_drain": "of the confluent worker's max",
                 "worker_kafka_python": "of its max"}  # fmt: skip
        for name in ("10%", "50%"):
            for target in lat:
                x = lat[target][name]
                lines.append(
                    f"| {LOOPS[target].split(' (')[0]}, at {name} {whose[target]} "
                    f"| {x['offered_rows_per_s']:,.0f} | {_sent(x)} "
                    f"| {x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x['p99_ms']:.0f} |"
                )
    ref = results.get("kafka_python_reference")
    if ref:
        lines += [
            "",
            f"Before the Kafka seam (kafka-python only; {ref['source']}): worker "
            f"{ref['worker_rows_per_s']:,.0f} rows/s on {ref['rows_per_message']}-row messages, "
            f"worker / drain {ref['worker_vs_drain']:.2f}, p50/p99 at 50% load "
            f"{ref['p50_ms_at_50pct']:.0f}/{ref['p99_ms_at_50pct']:.0f} ms.",
        ]
    if results.get("errors"):
        lines += ["", "Failed runs (left out of the medians):", ""]
        lines += [f"- {e}" for e in results["errors"]]
    lines += ["", "| goal | value | target | |", "| --- | ---: | ---: | --- |"]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {_fmt(g['value'])} | {g['op']} {_fmt(g['target'])} "
                     f"| {'met' if g['met'] else '**missed**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = results.get("streams", {})
    fig, axes = plt.subplots(1, len(streams) + 1, figsize=(6 * (len(streams) + 1), 5))
    axes = list(axes) if len(streams) else [axes]
    for ax, (key, st) in zip(axes, streams.items(), strict=False):
        names = [n for n in LOOPS if n in st["rows_per_s"] and n != "raw_ort"]
        values = [st["rows_per_s"][n] for n in names]
        ax.barh(names[::-1], values[::-1], color=["C0" if n.startswith("worker") else "C7"
                                                   for n in names[::-1]])  # fmt: skip
        ax.set_title(f"MLP, {key} rows/message: rows/s")
        for y, v in enumerate(values[::-1]):
            ax.annotate(f"{v:,.0f}", (v, y), va="center", fontsize=8)
    ax = axes[-1]
    lat = results.get("latency")
    if lat:
        pcts = ["p50_ms", "p95_ms", "p99_ms"]
        series = [(t, n) for n in ("10%", "50%") for t in lat]
        width = 0.8 / len(series)
        for j, (target, name) in enumerate(series):
            ax.bar([i + j * width for i in range(3)], [lat[target][name][p] for p in pcts],
                   width=width, label=f"{target}, {name} load",
                   hatch="//" if target == "rdkafka_drain" else None)  # fmt: skip
        ax.axhline(GOALS["p99_ms_at_50pct"], color="k", ls="--", lw=0.8, label="p99 goal")
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 for i in range(3)], ["p50", "p95", "p99"])
        ax.set_title("MLP 64-row latency, ms")
        ax.legend(fontsize=7)
    fig.suptitle(f"inference-worker bench: {results['machine']['nproc']} CPUs, "
                 f"{results['machine']['cpu']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _response_bytes(bench: Bench) -> int:
    """The size of the worker's answer to a 64-row demo MLP request (for the drain)."""
    m = replace(bench.models["mlp"], rows_per_message=64)
    session = baselines.ort_session(bench.repo / m.name / "1" / "model.onnx")
    return len(worker_response(session, make_messages(m, 1)[0], m.name)[0])


def _maxima(results: dict[str, Any], bench: Bench, plan: Plan, repo: Path, k: Kafka,
            skip: list[str]) -> tuple[dict[str, float], int]:  # fmt: skip
    """Each backend's maximum on 64-row messages (from this run's streams, else one quick
    saturation run each) and the response size, for the latency section."""
    st = results.get("streams", {}).get("64")
    if st is None:
        others = [n for n in LOOPS if n not in BACKENDS]
        st = Bench(replace(plan, reps=1), repo, k, bench.models, [*skip, *others]).stream(64, 600)
    return {n: st["rows_per_s"].get(n, float("nan")) for n in BACKENDS}, st["response_bytes"]


def _app_max(results: dict[str, Any], bench: Bench, plan: Plan, repo: Path, k: Kafka,
             skip: list[str]) -> float:  # fmt: skip
    """The per-message app's maximum on 16-row messages: from this run's 16-row stream,
    else one saturation run of the app alone (for ``--only tail``)."""
    if "per_message" in skip:
        raise RuntimeError("the tail section needs the per-message app (it is in --skip)")
    top = results.get("streams", {}).get("16", {}).get("rows_per_s", {}).get("per_message")
    if top is None or top != top:  # not measured, or every run failed
        others = [n for n in LOOPS if n != "per_message"]
        count = next((n for rows, n in plan.streams if rows == 16), 1200)
        st = Bench(replace(plan, reps=1), repo, k, bench.models, others).stream(16, count)
        top = st["rows_per_s"]["per_message"]
    if top != top:
        raise RuntimeError("no maximum of the per-message app on 16-row messages")
    return float(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (about 4 minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help=f"comma-separated loops to leave out of "
                        f"the streams and latency, of {','.join(LOOPS)}")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="where results go (default: bench/results for a full run, "
                        "a temporary directory otherwise)")  # fmt: skip
    parser.add_argument("--latency-max", type=float, default=None, metavar="ROWS_PER_S",
                        help="the latency section's maximum for both backends, instead of "
                        "measuring it (to compare runs at one offered load)")  # fmt: skip
    parser.add_argument("--tail-max", type=float, default=None, metavar="ROWS_PER_S",
                        help="the tail section's per-message app maximum, instead of "
                        "measuring it (to compare runs at one offered load)")  # fmt: skip
    args = parser.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
    full = (not args.quick and set(only) == set(SECTIONS) and not args.skip
            and args.latency_max is None and args.tail_max is None)
    out_dir = args.out or (ROOT / "bench" / "results" if full
                           else Path(tempfile.mkdtemp(prefix="bench-results-")))  # fmt: skip
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    bootstrap = bootstrap_servers()
    log(f"broker {bootstrap}; plan {plan}; sections {only}", force=True)
    command = ".venv/bin/python bench/run.py" + (" --quick" if args.quick else "")
    if not full and set(only) != set(SECTIONS):
        command += f" --only {','.join(only)}"
    if args.skip:
        command += f" --skip {args.skip}"
    if args.latency_max is not None:
        command += f" --latency-max {args.latency_max:g}"
    if args.tail_max is not None:
        command += f" --tail-max {args.tail_max:g}"
    results: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "plan": asdict(plan),
        "broker": bootstrap,
        "kafka_python_reference": kafka_python_reference(),
    }
    k = Kafka(bootstrap)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
            repo = Path(tmp)
            skip = [x.strip() for x in args.skip.split(",") if x.strip()]
            bench = Bench(plan, repo, k, build_repository(repo), skip)
            sections: dict[str, Callable[[], Any]] = {
                "streams": lambda: {str(rows): bench.stream(rows, n) for rows, n in plan.streams},
                "tail": lambda: bench.tail(
                    args.tail_max or _app_max(results, bench, plan, repo, k, skip)
                ),
                "latency": lambda: bench.latency(
                    *(({n: args.latency_max for n in BACKENDS}, _response_bytes(bench))
                      if args.latency_max else _maxima(results, bench, plan, repo, k, skip))
                ),
                "cnn": bench.cnn,
                "scaling": bench.scaling,
            }
            for name in SECTIONS:
                if name not in only:
                    continue
                try:
                    results[name] = sections[name]()
                except Exception as exc:  # the other sections still run and report
                    log(f"section {name} failed: {type(exc).__name__}: {exc}", force=True)
                    bench.errors.append(f"section {name}: {type(exc).__name__}: {exc}")
            results["errors"] = bench.errors
    finally:
        k.close()
    results["goals"] = goals(results)
    results["seconds"] = round(time.monotonic() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (out_dir / "latest.md").write_text(table)
    chart(results, out_dir / "latest.png")
    print(table)
    log(f"done in {results['seconds']:.0f} s; wrote {out_dir}/latest.{{json,md,png}}", force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
