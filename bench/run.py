"""`make bench`: how close the worker runs to its limits, side by side in one run.

Against one broker (``KAFKA_BOOTSTRAP_SERVERS``, else ``scripts/kafka-local
start``), for the demo MLP (I/O-bound) and ResNet-50 (compute-bound):

- worker rows/s at saturation (messages published before the worker starts;
  first to last response timestamp), next to raw ONNX Runtime, a drain loop
  (the same Kafka clients, no decoding or inference), a naive loop and a
  per-row binary loop, each over the same messages, as ratios;
- mean rows per ``session.run`` and peak RSS of the worker process;
- end-to-end latency (request to response record timestamp) under a paced
  producer at 10% and 50% of the worker's own measured maximum;
- 1 vs 2 worker processes in one group.

This machine is shared, so every comparison is a ratio of runs made in this
invocation, runs of the compared loops are interleaved, and every figure is
the median over repetitions. Writes ``bench/results/latest.{json,md,png}``.

    .venv/bin/python bench/run.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kafka  # noqa: E402
import onnxruntime as ort  # noqa: E402
from kafka import KafkaProducer  # noqa: E402

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
    rate_from_timestamps,
    workers,
)
from worker.config import MAX_MESSAGE_BYTES  # noqa: E402
from worker.protocol import decode_request  # noqa: E402
from worker.signature import Signature  # noqa: E402

GOALS = {
    "mlp_worker_vs_drain": 0.8,
    "mlp_worker_vs_naive": 30.0,
    "mlp_worker_vs_per_row": 5.0,
    "mlp_p99_ms_at_50pct": 25.0,  # an upper bound
    "cnn_worker_vs_raw_ort": 0.9,
}


@dataclass(frozen=True)
class Plan:
    reps: int
    """Repetitions of every measurement (>= 3; figures are medians)."""
    mlp_messages: int
    """MLP messages the worker and the drain move per repetition."""
    loop_messages: int
    """The first messages of the same topic for the naive and per-row loops (they are slow)."""
    cnn_messages: int
    scale_messages: int
    """Messages per 1-vs-2-worker run (published again for each run)."""
    latency_s: float
    """Seconds of paced load per level."""


FULL = Plan(reps=5, mlp_messages=2000, loop_messages=80, cnn_messages=16,
            scale_messages=1200, latency_s=10.0)  # fmt: skip
QUICK = Plan(reps=3, mlp_messages=600, loop_messages=40, cnn_messages=6,
             scale_messages=400, latency_s=3.0)  # fmt: skip


def med(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # NaN-free
    return statistics.median(values) if values else float("nan")


class Bench:
    def __init__(self, plan: Plan, repo: Path, kafka_: Kafka, models: dict[str, Model]) -> None:
        self.plan, self.repo, self.k, self.models = plan, repo, kafka_, models
        self.bootstrap = kafka_.bootstrap

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
            if not self.k.wait_committed(group, ends, 600, w.alive):
                raise RuntimeError(f"{label}: worker did not finish: {w.stderr_tail()}")
            metrics, rss = w.metrics(), w.peak_rss()
        records = self.k.read(out, count)
        if len(records) != count:
            raise RuntimeError(f"{label}: {len(records)} responses for {count} requests")
        runs = metrics.get("inference_worker_batch_rows_count", 0.0)
        return {
            "rows_per_s": rate_from_timestamps(records, lambda r: m.rows_per_message),
            "rows_per_run": metrics.get("inference_worker_batch_rows_sum", 0.0) / runs
            if runs else float("nan"),
            "peak_rss_bytes": rss,
            "dlq": metrics.get('inference_worker_messages_total{status="dlq"}', 0.0),
            "response": (records[0].value, list(records[0].headers or [])),
        }

    def kafka_loop(self, label: str, in_topic: str, count: int, per_record_rows: int,
                   fn: Callable[[str, str, int], None]) -> float:  # fmt: skip
        """Rows/s of a baseline loop ``fn(out_topic, group, count)``, from its output timestamps."""
        out, group = self.k.topic(label), self.k.group(label)
        fn(out, group, count)
        expected = count * self.models["mlp"].rows_per_message // per_record_rows
        records = self.k.read(out, expected)
        if len(records) != expected:
            raise RuntimeError(f"{label}: {len(records)} outputs, expected {expected}")
        return rate_from_timestamps(records, lambda r: per_record_rows)

    # -- MLP: worker vs drain, naive, per-row, raw ORT ---------------------------

    def mlp(self) -> dict[str, Any]:
        m, p, bs = self.models["mlp"], self.plan, self.bootstrap
        log(f"mlp: publishing {p.mlp_messages} messages of {m.rows_per_message} rows")
        msgs = make_messages(m, p.mlp_messages)
        topic = self.k.topic("mlp-in", partitions=2)
        self.k.publish(topic, msgs, partitions=2)
        session = baselines.ort_session(self._model_path(m))
        sig = Signature.from_session(session)
        batches = [decode_request(v, h, default_id="b/0/0").bind(sig).feeds for v, h in msgs]
        rows = p.loop_messages * m.rows_per_message
        samples: dict[str, list[float]] = {k: [] for k in
                                           ("worker", "drain", "naive", "per_row", "raw_ort")}
        rows_per_run, rss, response = [], [], None
        for i in range(p.reps):
            log(f"mlp rep {i + 1}/{p.reps}: worker")
            sat = self.saturate(m, topic, p.mlp_messages, f"mlp-w{i}")
            samples["worker"].append(sat["rows_per_s"])
            rows_per_run.append(sat["rows_per_run"])
            rss.append(sat["peak_rss_bytes"])
            response = response or sat["response"]
            log(f"mlp rep {i + 1}/{p.reps}: drain, naive, per-row, raw ORT")
            samples["drain"].append(self.kafka_loop(
                f"mlp-d{i}", topic, p.mlp_messages, m.rows_per_message,
                lambda out, g, n, resp=response: baselines.drain(bs, topic, out, g, n, resp)))
            samples["naive"].append(self.kafka_loop(
                f"mlp-n{i}", topic, p.loop_messages, 1,
                lambda out, g, n: baselines.naive(bs, topic, out, g, n, session, m.input)))
            samples["per_row"].append(self.kafka_loop(
                f"mlp-p{i}", topic, p.loop_messages, 1,
                lambda out, g, n: baselines.per_row(bs, topic, out, g, n, session)))
            samples["raw_ort"].append(baselines.raw_ort(session, batches))  # fmt: skip
            log(f"  worker {samples['worker'][-1]:,.0f} rows/s, drain {samples['drain'][-1]:,.0f},"
                f" naive {samples['naive'][-1]:,.0f}, per-row {samples['per_row'][-1]:,.0f}")
        ratios = {
            f"worker_vs_{b}": med([w / x for w, x in zip(samples["worker"], samples[b],
                                                          strict=True)])
            for b in ("drain", "naive", "per_row", "raw_ort")
        }  # fmt: skip
        best = {f"worker_vs_{b}": max(samples["worker"]) / max(samples[b])
                for b in ("drain", "naive", "per_row", "raw_ort")}  # fmt: skip
        return {
            "model": asdict(m),
            "messages": p.mlp_messages,
            "best_ratios": best,
            "loop_messages": p.loop_messages,
            "loop_rows": rows,
            "rows_per_s": {k: med(v) for k, v in samples.items()},
            "samples": samples,
            "ratios": ratios,
            "rows_per_run": med(rows_per_run),
            "peak_rss_bytes": med([r for r in rss if r]),
            "response_bytes": len(response[0]) if response else 0,
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

    def latency(self, max_rows_per_s: float, response_bytes: int) -> dict[str, Any]:
        """p50/p95/p99 at 10% and 50% of ``max_rows_per_s``, for the worker and the drain.

        The input topics stamp records with the broker's append time, so the
        load generator's own client queueing (it shares the 2 cores) is not
        charged to the worker; the drain, run as its own process under the
        same schedule, shows what the Kafka clients alone cost on this machine.
        """
        m, p = self.models["mlp"], self.plan
        msgs = make_messages(m, 16)
        levels = (("10%", 0.10), ("50%", 0.50))
        counts = {name: max(1, int(f * max_rows_per_s / m.rows_per_message * p.latency_s))
                  for name, f in levels}  # fmt: skip
        warm = 20
        total = warm + sum(counts.values())
        got: dict[str, dict[str, list[list[float]]]] = {
            t: {name: [] for name, _ in levels} for t in ("worker", "drain")
        }
        for i in range(p.reps):
            for target in ("worker", "drain"):
                log(f"latency rep {i + 1}/{p.reps}: {target}")
                label = f"lat-{target}{i}"
                in_t = self.k.topic(label, append_time=True)
                out_t, group = self.k.topic(f"{label}-out"), self.k.group(label)
                if target == "worker":
                    proc: Any = self._worker(m, in_t, out_t, group)
                else:
                    proc = DrainProcess(self.bootstrap, in_t, out_t, group, total, response_bytes)
                producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=0,
                                         max_request_size=MAX_MESSAGE_BYTES)  # fmt: skip
                try:
                    with proc:
                        proc.wait_ready()
                        _paced(producer, in_t, msgs, 200.0, warm, b"warm")
                        producer.flush()
                        self.k.wait_committed(group, {0: warm}, 60, proc.alive)
                        for name, fraction in levels:
                            per_s = fraction * max_rows_per_s / m.rows_per_message
                            _paced(producer, in_t, msgs, per_s, counts[name], name.encode())
                        producer.flush()
                        if not self.k.wait_committed(group, {0: total}, 120, proc.alive):
                            raise RuntimeError(f"{label}: did not finish: {proc.stderr_tail()}")
                finally:
                    producer.close()
                requests = {_header(r, "seq"): r for r in self.k.read(in_t, total)}
                per_level: dict[str, list[float]] = {name: [] for name, _ in levels}
                for r in self.k.read(out_t, total):
                    req = requests.get(_header(r, "seq"))
                    phase = _header(r, "phase")
                    if req is not None and phase in per_level:
                        per_level[phase].append(r.timestamp - req.timestamp)
                for name, values in per_level.items():
                    got[target][name].append(percentiles(values))
        out: dict[str, Any] = {}
        for name, fraction in levels:
            out[name] = {"offered_rows_per_s": fraction * max_rows_per_s,
                         "messages": counts[name]}  # fmt: skip
            for target in ("worker", "drain"):
                reps = got[target][name]
                out[name][target] = {
                    "p50_ms": med([r[0] for r in reps]),
                    "p95_ms": med([r[1] for r in reps]),
                    "p99_ms": med([r[2] for r in reps]),
                    "samples_ms": reps,
                }
        return out

    # -- 1 vs 2 workers ------------------------------------------------------------

    def scaling(self) -> dict[str, Any]:
        m, p = self.models["mlp"], self.plan
        msgs = make_messages(m, p.scale_messages)
        n = p.scale_messages
        ends = {0: (n + 1) // 2, 1: n // 2}  # round-robin; the commit marker is not consumed
        samples: dict[int, list[float]] = {1: [], 2: []}
        for i in range(p.reps):
            for count in (1, 2):
                log(f"scaling rep {i + 1}/{p.reps}: {count} worker(s)")
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
                samples[count].append(rate_from_timestamps(records, lambda r: m.rows_per_message))
        one, two = med(samples[1]), med(samples[2])
        return {
            "messages": n,
            "rows_per_s": {"1": one, "2": two},
            "samples": {str(k): v for k, v in samples.items()},
            "speedup": med([b / a for a, b in zip(samples[1], samples[2], strict=True)]),
        }


def _paced(producer: KafkaProducer, topic: str, msgs: Sequence[tuple[bytes, list]],
           per_s: float, count: int, phase: bytes) -> None:  # fmt: skip
    """Send ``count`` messages at ``per_s`` a second on a fixed schedule (late sends do not
    wait for the next slot, so the offered rate holds); each carries ``phase`` and a ``seq``."""
    start = time.monotonic()
    for j in range(count):
        delay = start + j / per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        value, headers = msgs[j % len(msgs)]
        seq = f"{phase.decode()}-{j}".encode()
        producer.send(topic, value=value, headers=[*headers, ("phase", phase), ("seq", seq)])


def _header(record: Any, name: str) -> str | None:
    for key, value in record.headers or []:
        if key == name:
            return str(value.decode())
    return None


class DrainProcess:
    """``bench/baselines.py drain`` as its own process, shaped like a WorkerProcess."""

    def __init__(self, bootstrap: str, in_topic: str, out_topic: str, group: str, count: int,
                 response_bytes: int) -> None:  # fmt: skip
        self.args = [sys.executable, str(ROOT / "bench" / "baselines.py"), "drain",
                     "--bootstrap-servers", bootstrap, "--input-topic", in_topic,
                     "--output-topic", out_topic, "--group-id", group, "--count", str(count),
                     "--response-bytes", str(response_bytes)]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DrainProcess:
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
        "platform": platform.platform(),
    }


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    mlp, cnn, lat = results["mlp"], results["cnn"], results["latency"]
    ratio = mlp["ratios"]
    rows = [
        ("MLP worker / drain", ratio["worker_vs_drain"], ">=", GOALS["mlp_worker_vs_drain"]),
        ("MLP worker / naive", ratio["worker_vs_naive"], ">=", GOALS["mlp_worker_vs_naive"]),
        ("MLP worker / per-row", mlp["ratios"]["worker_vs_per_row"], ">=",
         GOALS["mlp_worker_vs_per_row"]),
        ("MLP p99 at 50% load (ms)", lat["50%"]["worker"]["p99_ms"], "<=",
         GOALS["mlp_p99_ms_at_50pct"]),
        ("CNN worker / raw ORT", cnn["ratios"]["worker_vs_raw_ort"], ">=",
         GOALS["cnn_worker_vs_raw_ort"]),
    ]  # fmt: skip
    return [
        {"goal": name, "value": value, "op": op, "target": target,
         "met": value >= target if op == ">=" else value <= target}
        for name, value, op, target in rows
    ]  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    mlp, cnn, lat, sc = results["mlp"], results["cnn"], results["latency"], results["scaling"]
    mach = results["machine"]
    r, q, bq = mlp["rows_per_s"], mlp["ratios"], mlp["best_ratios"]
    cq, cb = cnn["ratios"], cnn["best_ratios"]
    lines = [
        f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), onnxruntime {mach['onnxruntime']}, "
        f"kafka-python {mach['kafka_python']}, Python {mach['python']}; "
        f"{results['plan']['reps']} repetitions, medians; `{results['command']}`.",
        "",
        "Ratios: median of the per-repetition ratios; best/best: fastest run over fastest "
        "run (the least disturbed by other load on the machine).",
        "",
        f"| {mlp['model']['name']} ({mlp['model']['rows_per_message']} rows/message) "
        "| rows/s | worker / this | best/best |",
        "| --- | ---: | ---: | ---: |",
        f"| worker (1 process) | {r['worker']:,.0f} | 1.00 | 1.00 |",
        f"| drain (same Kafka clients, no work) | {r['drain']:,.0f} | {q['worker_vs_drain']:.2f} "
        f"| {bq['worker_vs_drain']:.2f} |",
        f"| raw ONNX Runtime (same batches) | {r['raw_ort']:,.0f} | {q['worker_vs_raw_ort']:.3f} "
        f"| {bq['worker_vs_raw_ort']:.3f} |",
        f"| naive loop (Python rows, JSON out per row) | {r['naive']:,.0f} "
        f"| {q['worker_vs_naive']:.1f} | {bq['worker_vs_naive']:.1f} |",
        f"| per-row binary loop (batch-1 runs) | {r['per_row']:,.0f} "
        f"| {q['worker_vs_per_row']:.1f} | {bq['worker_vs_per_row']:.1f} |",
        "",
        f"| {cnn['model']['name']} ({cnn['model']['rows_per_message']} images/message) "
        "| rows/s | worker / this | best/best |",
        "| --- | ---: | ---: | ---: |",
        f"| worker (1 process) | {cnn['rows_per_s']['worker']:.2f} | 1.00 | 1.00 |",
        f"| raw ONNX Runtime (same batches) | {cnn['rows_per_s']['raw_ort']:.2f} "
        f"| {cq['worker_vs_raw_ort']:.2f} | {cb['worker_vs_raw_ort']:.2f} |",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| MLP mean rows per session.run at saturation | {mlp['rows_per_run']:,.0f} |",
        f"| CNN mean rows per session.run at saturation | {cnn['rows_per_run']:,.0f} |",
        f"| MLP worker peak RSS | {mlp['peak_rss_bytes'] / 2**20:,.0f} MiB |",
        f"| CNN worker peak RSS | {cnn['peak_rss_bytes'] / 2**20:,.0f} MiB |",
        f"| MLP 1 worker | {sc['rows_per_s']['1']:,.0f} rows/s |",
        f"| MLP 2 workers, one group | {sc['rows_per_s']['2']:,.0f} rows/s "
        f"({sc['speedup']:.2f}x) |",
        "",
        "| MLP latency, request append to response timestamp | offered rows/s "
        "| p50 ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for name in ("10%", "50%"):
        for target in ("worker", "drain"):
            x = lat[name][target]
            lines.append(
                f"| {target} at {name} of the worker's max "
                f"| {lat[name]['offered_rows_per_s']:,.0f} "
                f"| {x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x['p99_ms']:.0f} |"
            )
    lines += ["", "| goal | value | target | |", "| --- | ---: | ---: | --- |"]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {g['value']:.2f} | {g['op']} {g['target']:g} "
                     f"| {'met' if g['met'] else '**missed**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mlp, cnn, lat = results["mlp"], results["cnn"], results["latency"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = ["worker", "drain", "naive", "per_row", "raw_ort"]
    ax = axes[0]
    values = [mlp["rows_per_s"][n] for n in names]
    ax.bar(names, values, color=["C0", "C7", "C3", "C1", "C2"])
    ax.set_yscale("log")
    ax.set_title(f"{mlp['model']['name']}: rows/s (log)")
    for x, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax = axes[1]
    values = [cnn["rows_per_s"]["worker"], cnn["rows_per_s"]["raw_ort"]]
    ax.bar(["worker", "raw_ort"], values, color=["C0", "C2"])
    ax.set_title(f"{cnn['model']['name']}: images/s")
    for x, v in enumerate(values):
        ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax = axes[2]
    pcts = ["p50_ms", "p95_ms", "p99_ms"]
    series = [(n, t) for n in ("10%", "50%") for t in ("worker", "drain")]
    for j, (name, target) in enumerate(series):
        ax.bar([i + j * 0.2 for i in range(3)], [lat[name][target][p] for p in pcts],
               width=0.2, label=f"{target}, {name} load",
               hatch="//" if target == "drain" else None)  # fmt: skip
    ax.axhline(GOALS["mlp_p99_ms_at_50pct"], color="k", ls="--", lw=0.8, label="p99 goal")
    ax.set_yscale("log")
    ax.set_xticks([i + 0.3 for i in range(3)], ["p50", "p95", "p99"])
    ax.set_title("MLP latency, ms")
    ax.legend()
    fig.suptitle(f"inference-worker bench: {results['machine']['nproc']} CPUs, "
                 f"{results['machine']['cpu']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    bootstrap = bootstrap_servers()
    log(f"broker {bootstrap}; plan {plan}")
    k = Kafka(bootstrap)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
            repo = Path(tmp)
            bench = Bench(plan, repo, k, build_repository(repo))
            results: dict[str, Any] = {
                "command": ".venv/bin/python bench/run.py" + (" --quick" if args.quick else ""),
                "machine": machine(),
                "plan": asdict(plan),
                "broker": bootstrap,
            }
            results["mlp"] = bench.mlp()
            results["cnn"] = bench.cnn()
            results["latency"] = bench.latency(
                results["mlp"]["rows_per_s"]["worker"], results["mlp"]["response_bytes"]
            )
            results["scaling"] = bench.scaling()
    finally:
        k.close()
    results["goals"] = goals(results)
    results["seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (args.out / "latest.md").write_text(table)
    chart(results, args.out / "latest.png")
    print(table)
    log(f"done in {results['seconds']:.0f} s; wrote {args.out}/latest.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
