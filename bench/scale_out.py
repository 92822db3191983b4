"""Scale-out check for the capacity model in docs/deploy.md.

1, 2 and 3 worker processes in one consumer group on a 6-partition topic,
for the demo MLP (I/O-bound) and ResNet-50 (compute-bound): aggregate rows/s
and per-worker rows/s against the single-worker figure, the way replicas add
up in a Deployment. Then 3 workers on a 2-partition topic, to show the member
beyond the partition count getting nothing.

Every run publishes inside an open transaction and commits it once the group
is stable with every member assigned, so all workers start at once (the
worker reads ``read_committed``); throughput comes from the output records'
timestamps, as in ``bench/run.py``.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python bench/scale_out.py

Writes ``bench/results/scale_out.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import (
    ROOT,
    Kafka,
    Model,
    bootstrap_servers,
    build_repository,
    log,
    make_messages,
    rate_from_timestamps,
    workers,
)

__all__ = ["idle_members", "main", "scale_run"]

PARTITIONS = 6
RESULTS = ROOT / "bench" / "results" / "scale_out.json"


def _ends(total: int, partitions: int) -> dict[int, int]:
    """End offsets after round-robin publishing (a transaction marker is not consumed)."""
    return {p: total // partitions + (1 if p < total % partitions else 0)
            for p in range(partitions)}  # fmt: skip


def scale_run(k: Kafka, repo: Path, m: Model, count: int, messages: int, label: str,
              extra: list[str]) -> dict[str, Any]:  # fmt: skip
    """``count`` workers drain ``messages`` requests on a 6-partition topic."""
    msgs = make_messages(m, messages)
    in_t, out_t, group = k.topic(label, PARTITIONS), k.topic(f"{label}-out"), k.group(label)
    producer = k.publish_gated(in_t, msgs, partitions=PARTITIONS)
    load = os.getloadavg()[0]
    try:
        with workers(count, bootstrap=k.bootstrap, input_topic=in_t, output_topic=out_t,
                     repository=repo, model=m.name, group=group, extra=extra) as ws:  # fmt: skip
            for w in ws:
                w.wait_ready(120)
            k.wait_assigned(group, count, PARTITIONS, 120)
            cpu0, t0 = [w.cpu_seconds() for w in ws], time.monotonic()
            producer.commit_transaction()
            if not k.wait_committed(group, _ends(messages, PARTITIONS), 900):
                raise RuntimeError(f"{label}: workers did not finish")
            wall = time.monotonic() - t0
            cpu = [w.cpu_seconds() - c for w, c in zip(ws, cpu0, strict=True)]
            per_worker = [w.metrics().get('inference_worker_messages_total{status="ok"}', 0.0)
                          for w in ws]  # fmt: skip
    finally:
        producer.close()
    records = k.read(out_t, messages)
    k.drop(in_t, out_t)  # an MLP run writes ~500 MB
    if len(records) != messages:
        raise RuntimeError(f"{label}: {len(records)} answers for {messages} requests")
    return {
        "rows_per_s": rate_from_timestamps(records, lambda r: m.rows_per_message),
        "messages_per_worker": per_worker,
        # CPU the workers burnt while draining, over the wall time: the cores
        # they kept busy (2 is all this machine has, broker included).
        "worker_cores": round(sum(cpu) / wall, 2),
        "load_before": round(load, 2),
    }


def idle_members(k: Kafka, repo: Path, m: Model, members: int, partitions: int) -> list[int]:
    """Partitions each member owns once the group is stable."""
    in_t, out_t, group = k.topic("idle", partitions), k.topic("idle-out"), k.group("idle")
    with workers(members, bootstrap=k.bootstrap, input_topic=in_t, output_topic=out_t,
                 repository=repo, model=m.name, group=group) as ws:  # fmt: skip
        for w in ws:
            w.wait_ready(120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = k._admin.describe_groups([group]).get(group, {})
            owned = [
                sum(len(a["partitions"]) for a in mem["member_assignment"]["assigned_partitions"])
                if mem.get("member_assignment") else 0
                for mem in info.get("members", [])
            ]
            if info.get("group_state") == "Stable" and len(owned) == members \
                    and sum(owned) == partitions:  # fmt: skip
                return sorted(owned, reverse=True)
            time.sleep(0.5)
    raise RuntimeError(f"group {group} never stable with {members} members")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"| model | workers | rows/s (median of {results['reps']}) | × one worker "
        "| rows/s per worker | messages per worker | cores the workers used |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results["models"].items():
        one = runs["1"]["rows_per_s"]
        for count, run in runs.items():
            rate = run["rows_per_s"]
            lines.append(
                f"| {name} | {count} | {rate:,.0f} | {rate / one:.2f} "
                f"| {rate / int(count):,.0f} | {run['messages_per_worker']} "
                f"| {run['worker_cores']} |"
            )
    idle = results["idle"]
    lines.append("")
    lines.append(f"{idle['members']} workers on a {idle['partitions']}-partition topic: "
                 f"partitions per member {idle['owned']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mlp-messages", type=int, default=2400)
    ap.add_argument("--cnn-messages", type=int, default=24)
    ap.add_argument("--workers", default="1,2,3")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",")]

    k = Kafka(bootstrap_servers())
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python bench/scale_out.py",
        "nproc": os.cpu_count(), "partitions": PARTITIONS, "reps": args.reps, "models": {},
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp)
            models = build_repository(repo)
            plan = [
                ("mlp", models["mlp"], args.mlp_messages, []),
                # One batch per message, as in bench/run.py's CNN run.
                ("resnet50", models["cnn"], args.cnn_messages, ["--max-batch-rows", "4"]),
            ]
            for name, m, messages, extra in plan:
                runs: dict[str, Any] = {}
                for count in counts:
                    samples = []
                    for rep in range(args.reps):
                        log(f"{name}: {count} worker(s), rep {rep + 1}/{args.reps}", force=True)
                        samples.append(scale_run(k, repo, m, count, messages,
                                                 f"so-{name}-{count}-{rep}", extra))
                    rates = [s["rows_per_s"] for s in samples]
                    median = statistics.median(rates)
                    typical = min(samples, key=lambda s: abs(s["rows_per_s"] - median))
                    runs[str(count)] = {
                        "rows_per_s": median,
                        "samples": rates,
                        "messages_per_worker": typical["messages_per_worker"],
                        "worker_cores": typical["worker_cores"],
                        "load_before": [s["load_before"] for s in samples],
                    }
                results["models"][f"{name} ({m.rows_per_message} rows/message)"] = runs
            owned = idle_members(k, repo, models["mlp"], 3, 2)
            results["idle"] = {"members": 3, "partitions": 2, "owned": owned}
    finally:
        k.close()
    results["seconds"] = round(time.monotonic() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
