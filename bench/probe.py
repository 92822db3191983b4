"""Quick A/B probes of one worker setting: paced latency, throughput at saturation, or
where a message's time and CPU go at a given offered load (the timeline).

    bench/probe.py latency --rate 315 -- --coalesce-below-rows 1024
    bench/probe.py saturation --messages 5000 -- --coalesce-below-rows 1024
    bench/probe.py saturation --rows 64 --py-spy /tmp/worker.txt -- --kafka-client confluent
    bench/probe.py timeline --rows 16 --rate 228 --py-spy /tmp/spy.txt --py-spy-flag=--gil
    bench/probe.py timeline --rows 16 --rate 228 --app

The timeline, at ``--rate`` messages/s of ``--rows``-row Arrow requests (LogAppendTime
input, a paced librdkafka producer): request append -> answer timestamp p50/p99; the
worker's CPU µs per message (every thread); each ``*_seconds`` histogram of its
/metrics over the paced span (count, mean, p50, p99 from the buckets), by stage
(poll -> run start: ``queue_seconds``, where the worker has it; the run:
``inference_seconds``; record timestamp -> acknowledged: ``end_to_end_seconds``);
and with ``--py-spy``, the worker's Python samples (every thread) per stage, from the
innermost frame a rule of :data:`STAGES` names, as a share and as µs per message.
Without ``--gil`` py-spy counts a thread waiting inside librdkafka or ``select`` as
busy; with it, only time holding the GIL (a run, which releases it, looks small).

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

from bench.run import BaselineProcess, _header, _paced  # noqa: E402
from bench.workloads import (  # noqa: E402
    Kafka,
    WorkerProcess,
    bootstrap_servers,
    minor_faults,
    percentiles,
    process_cpu_seconds,
    thread_cpu_seconds,
    thread_groups,
)
from worker.demo import write_demo_model  # noqa: E402
from worker.protocol import encode_request  # noqa: E402

ROWS = 64
MODEL = "mnist-mlp"
SPY_HZ = 200

# (stage, substrings of a py-spy frame "function (path:line)"): the innermost frame
# that matches names the stage of a sample; the order settles a frame matching two.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("run", ("run (onnxruntime", "worker/runtime.py")),
    ("encode", ("encode_response", "response_headers", "_response (worker/", "_arrow_out (")),
    ("decode", ("decode_request", "read_stream", "_bind (worker/protocol", "envelope (worker/",
                "_arrow_in (")),
    ("acknowledgement", ("done (worker/kafka", "_acked", "_delivered")),
    ("produce", ("send (worker/kafka", "_emit (worker/", "produce")),
    ("commit", ("worker/commit.py", "commit (worker/kafka", "worker/offsets.py",
                "checkpoint (bench/")),
    ("poll", ("poll (worker/kafka", "_poll_records", "consume")),
    ("wait for company / queue for a run", ("worker/batching.py", "worker/inference.py",
                                            "_submit (worker/", "_admit (worker/")),
    ("metrics, health", ("worker/observability.py", "prometheus_client", "http/server.py",
                         "socketserver.py")),
)
# The worker's /metrics histograms per stage (namespace left out); the rest have none yet.
SERIES = {
    "queue_seconds": "poll -> run start (wait for company + queue for a run)",
    "inference_seconds": "run (session.run)",
    "end_to_end_seconds": "record timestamp -> answer acknowledged",
}


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


def _peak_rss(pid: int) -> int | None:
    """The process's VmHWM: the kernel's high-water mark of its resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


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
        # The steady state only: from the first commit on (py-spy, the CPU per thread).
        deadline = time.monotonic() + 120
        while not k.committed(group).get(0) and time.monotonic() < deadline:
            time.sleep(0.05)
        first = k.committed(group).get(0) or 0
        threads, faults = thread_cpu_seconds(worker.pid), minor_faults(worker.pid)
        if args.py_spy is not None:
            exe = Path(sys.executable).with_name("py-spy")
            spy = subprocess.Popen([str(exe) if exe.exists() else "py-spy", "record",
                                    "-p", str(worker.pid), "-r", "200", "-f", "raw",
                                    "--threads", "--nonblocking",
                                    "-o", str(args.py_spy), *args.py_spy_flag])  # fmt: skip
        if not k.wait_committed(group, {0: args.messages}, 600, lambda: worker.poll() is None):
            print("the worker did not finish", file=sys.stderr)
            return 1
        groups = thread_groups(threads, thread_cpu_seconds(worker.pid))
        faults = minor_faults(worker.pid) - faults
        peak = _peak_rss(worker.pid)
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
    n = max(1, args.messages - first)
    print(f"  worker CPU per message over the last {n:,} (from its first commit), per thread:")
    _print_groups(groups, n)
    print(f"    {'all':<44} {sum(groups.values()) / n * 1e6:7,.0f} µs per message")
    print(f"  minor page faults per message: {faults / n:,.1f}")
    if peak is not None:
        print(f"  peak RSS: {peak / 2**20:,.0f} MiB")
    return 0


def _print_groups(groups: dict[str, float], n: int) -> None:
    """CPU per message of each thread group (bench/workloads.py thread_groups), largest first."""
    for name, seconds in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"    {name:<44} {seconds / n * 1e6:7,.0f} µs per message")


def stage_of(frames: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first)."""
    for frame in reversed(frames):
        for stage, marks in STAGES:
            if any(mark in frame for mark in marks):
                return stage
    return "the loop's own bookkeeping" if any("worker/" in f for f in frames) else "other"


def stage_shares(raw: str) -> dict[str, int]:
    """Samples per stage of py-spy's raw (folded) output: ``frame;frame;... count`` lines."""
    out: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stage = stage_of(stack.split(";"))
        out[stage] = out.get(stage, 0) + int(count)
    return out


def histograms(metrics: dict[str, float]) -> dict[str, dict[float, float]]:
    """``name -> {le: cumulative count}`` of every ``*_seconds`` histogram, summed over
    its other labels (models, versions), from WorkerProcess.metrics()'s keys."""
    out: dict[str, dict[float, float]] = {}
    labelled = {k.partition("{")[0] for k in metrics if "," in k.partition("{")[2]}
    for key, value in metrics.items():
        name, _, labels = key.partition("{")
        if not name.endswith("_seconds_bucket"):
            continue
        if name in labelled and "," not in labels:
            continue  # WorkerProcess.metrics()'s own sum per `le`: counted in the series
        le = next((x.split("=", 1)[1].strip('"') for x in labels.rstrip("}").split(",")
                   if x.startswith("le=")), None)  # fmt: skip
        if le is None:
            continue
        buckets = out.setdefault(name.removesuffix("_bucket"), {})
        bound = float("inf") if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + value
    return out


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """The ``q`` quantile of a cumulative histogram, linear within its bucket (as
    Prometheus' histogram_quantile); the last finite bound when it falls in +Inf."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def _series(before: dict[str, float], after: dict[str, float]) -> list[str]:
    lines = []
    old, new = histograms(before), histograms(after)
    sums = {k.partition("{")[0]: 0.0 for k in after}
    for key, value in after.items():
        name = key.partition("{")[0]
        if name.endswith("_seconds_sum"):
            sums[name] = sums.get(name, 0.0) + value - before.get(key, 0.0)
    for name in sorted(new):
        delta = {b: c - old.get(name, {}).get(b, 0.0) for b, c in new[name].items()}
        count = max(delta.values(), default=0.0)
        if count <= 0:
            continue
        short = name.removeprefix("inference_worker_")
        what = SERIES.get(short, "")
        mean = sums.get(f"{name}_sum", float("nan")) / count * 1e3
        lines.append(f"  {short:<24} {what:<52} n {count:>6,.0f}  mean {mean:7.2f}  "
                     f"p50 {bucket_quantile(delta, 0.5) * 1e3:7.2f}  "
                     f"p99 {bucket_quantile(delta, 0.99) * 1e3:7.2f} ms")  # fmt: skip
    missing = [s for s in SERIES if f"inference_worker_{s}" not in new]
    if missing:
        lines.append(f"  not in this worker's /metrics: {', '.join(missing)}")
    return lines


def _timeline(args: argparse.Namespace, bootstrap: str, tin: str, tout: str, repo: Path,
              extra: list[str], message: tuple[bytes, list[Any]]) -> int:  # fmt: skip
    """The worker under ``args.rate`` messages/s: latency, CPU per message, its histograms
    per stage, and (``--py-spy``) where its Python threads spend their CPU."""
    import confluent_kafka as ck


    k = Kafka(bootstrap)
    group, warm = f"g-{tin}", 20
    n = max(1, int(args.rate * args.seconds))
    producer = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                            "message.max.bytes": 16 << 20})  # fmt: skip
    who = "the per-message app" if args.app else "the worker"
    w: WorkerProcess | BaselineProcess
    if args.app:
        # It never reaches its count (it would exit before its CPU is read): stopped below.
        w = BaselineProcess(bootstrap, tin, tout, group, warm + n + 1, "per-message",
                            ["--model", str(repo / MODEL / "1" / "model.onnx")])  # fmt: skip
    else:
        w = WorkerProcess(bootstrap, tin, tout, repo, MODEL, group, extra)

    def answered(count: int, timeout: float) -> bool:
        # The worker's commits follow its acknowledgements; the app commits every 5 s,
        # so for it the answers on the output topic count.
        if not args.app:
            return k.wait_committed(group, {0: count}, timeout, w.alive)
        deadline = time.monotonic() + timeout
        while sum(k.end_offsets(tout).values()) < count:
            if time.monotonic() > deadline or not w.alive():
                return False
            time.sleep(0.05)
        return True

    spy = None
    try:
        with w:
            w.wait_ready()
            _paced(producer, tin, [message], 200.0, warm, b"warm")
            producer.flush(30)
            if not answered(warm, 120):
                print(f"{who} did not answer the warm-up: {w.stderr_tail()}", file=sys.stderr)
                return 1
            pid = w.proc.pid if w.proc else 0
            before, cpu = _own_metrics(w), process_cpu_seconds(pid)
            threads = thread_cpu_seconds(pid)
            if args.py_spy is not None:
                exe = Path(sys.executable).with_name("py-spy")
                spy = subprocess.Popen([str(exe) if exe.exists() else "py-spy", "record",
                                        "-p", str(pid), "-r", str(SPY_HZ),
                                        "-f", "raw", "--threads", "--nonblocking",
                                        "-o", str(args.py_spy), *args.py_spy_flag],
                                       stdout=subprocess.DEVNULL)  # fmt: skip
            _paced(producer, tin, [message], args.rate, n, b"paced")
            producer.flush(60)
            if not answered(warm + n, 300):
                print(f"{who} did not finish: {w.stderr_tail()}", file=sys.stderr)
                return 1
            cpu = process_cpu_seconds(pid) - cpu
            groups = thread_groups(threads, thread_cpu_seconds(pid))
            after = _own_metrics(w)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
        sent = {_header(r, "seq"): r.timestamp for r in k.read(tin, warm + n)}
        lat = [r.timestamp - sent[seq] for r in k.read(tout, warm + n)
               if _header(r, "phase") == "paced" and (seq := _header(r, "seq")) in sent]
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        k.close()
    p50, _, p99 = percentiles(lat)
    print(f"timeline of {who}: {args.rate:g} messages/s of {args.rows} rows "
          f"({args.rate * args.rows:,.0f} rows/s) for {args.seconds:g} s, {extra}")
    print(f"  request append -> answer timestamp: p50 {p50:.0f} ms, p99 {p99:.0f} ms "
          f"over {len(lat)} answers")
    print(f"  CPU (every thread): {cpu / n * 1e6:,.0f} µs per message, "
          f"{cpu / args.seconds:.0%} of a core")
    _print_groups(groups, n)
    if not args.app:
        print("  /metrics over the paced span:")
        print("\n".join(_series(before, after)))
    if args.py_spy is not None and args.py_spy.exists():
        shares = stage_shares(args.py_spy.read_text())
        total = sum(shares.values()) or 1
        print(f"  py-spy {' '.join(args.py_spy_flag)}: {total:,} samples at {SPY_HZ} Hz of "
              f"{who}'s Python threads (librdkafka's own threads are not sampled), per stage:")
        for stage, samples in sorted(shares.items(), key=lambda x: -x[1]):
            print(f"    {stage:<36} {samples / total:6.1%}  "
                  f"{samples / SPY_HZ / n * 1e6:6,.0f} µs/message")
    return 0


def _own_metrics(w: WorkerProcess | BaselineProcess) -> dict[str, float]:
    """The worker's /metrics; the per-message app has none."""
    return w.metrics() if isinstance(w, WorkerProcess) else {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["latency", "saturation", "timeline"])
    parser.add_argument("--rate", type=float, default=315.0,
                        help="messages/s (latency, timeline)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="paced span (latency, timeline)")
    parser.add_argument("--messages", type=int, default=5000, help="pre-published (saturation)")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows per message")
    parser.add_argument("--format", choices=["arrow", "msgpack", "json"], default=None,
                        help="request format (default: arrow for the timeline, else msgpack)")
    parser.add_argument("--py-spy", metavar="FILE", type=Path, default=None,
                        help="profile the worker with py-spy (raw folded stacks, all threads, "
                        "200 Hz) into FILE: at saturation, or over the timeline's paced span")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="S",
                        help="run the worker with sys.setswitchinterval(S) (an A/B experiment "
                        "on GIL hand-offs; Python's default is 0.005)")  # fmt: skip
    parser.add_argument("--app", action="store_true",
                        help="timeline: the per-message app (bench/baselines.py per-message, "
                        "the Quix Streams shape) instead of the worker, under the same load")
    parser.add_argument("--py-spy-flag", action="append", default=[], metavar="FLAG",
                        help="extra py-spy record flag, e.g. --py-spy-flag=--gil (repeatable)")
    args = parser.parse_args(own)
    if args.format is None:
        args.format = "arrow" if args.mode == "timeline" else "msgpack"
    if args.app and (args.mode != "timeline" or args.format != "arrow" or extra):
        parser.error("--app: the timeline only, of Arrow requests, with no worker flags")

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
        if args.mode == "timeline":
            return _timeline(args, bootstrap, tin, tout, repo, extra, (value, headers))
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
