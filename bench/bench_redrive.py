"""Redrive throughput: ``inference-producer redrive`` over the same dead-letter
topic with each Kafka client, at-least-once and ``--exactly-once``, side by side.

``--letters`` dead letters of the demo MLP's 64-row msgpack requests (25 kB
values), each with the headers the worker appends (``error-type``
model-not-found, ``source-topic``/``-partition``/``-offset``), on a 2-partition
topic. Each run is a fresh group reading the whole topic; records/s is what
``redrive`` handled over its wall time, from the call to its return (clients
opened, offsets read, everything acknowledged and committed). The variants
take turns ``--repeat`` times; medians, and each one's ratio to the default
(confluent, at-least-once).

    .venv/bin/python bench/bench_redrive.py [--letters 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import MLP, Kafka, bootstrap_servers
from producers.clients import KafkaSettings
from producers.redrive import redrive
from worker.protocol import encode_request

__all__ = ["dead_letters", "main"]

VARIANTS = (("confluent", False), ("confluent", True), ("kafka-python", False))


def dead_letters(source: str, count: int, partitions: int) -> list[tuple[bytes, list]]:
    """``count`` dead letters as the worker writes them (a request plus its error block)."""
    x = np.random.default_rng(2).random((64, *MLP.row_shape), dtype=np.float32)
    value, headers = encode_request({MLP.input: x}, format="msgpack", model="no-such-model")
    out = []
    for i in range(count):
        block = [("error-type", b"model-not-found"), ("error-message", b"no model no-such-model"),
                 ("source-topic", source.encode()),
                 ("source-partition", str(i % partitions).encode()),
                 ("source-offset", str(i // partitions).encode())]  # fmt: skip
        out.append((value, [*headers, ("request-id", f"r-{i}".encode()), *block]))
    return out


def one_run(k: Kafka, dlq: str, backend: str, exactly_once: bool, count: int, n: int) -> float:
    source = k.topic(f"source-{backend}-{exactly_once}-{n}", 2)
    started = time.perf_counter()
    stats = redrive(KafkaSettings(k.bootstrap, backend=backend), dlq, to=source,
                    exactly_once=exactly_once, group_id=k.group("redrive"), progress=False)
    took = time.perf_counter() - started
    k.drop(source)
    if stats.sent != count:
        raise RuntimeError(f"{backend}: {stats.sent} sent of {count}")
    return count / took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--letters", type=int, default=5000, help="dead letters (5000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (3)")
    args = parser.parse_args(argv)

    k = Kafka(bootstrap_servers())
    samples: dict[tuple[str, bool], list[float]] = {v: [] for v in VARIANTS}
    try:
        dlq = k.topic("dlq", 2)
        k.publish(dlq, dead_letters("requests", args.letters, 2), partitions=2)
        for n in range(args.repeat):
            for backend, eos in VARIANTS:
                samples[(backend, eos)].append(one_run(k, dlq, backend, eos, args.letters, n))
                print(f"run {n + 1}/{args.repeat} {backend:<13} exactly-once={eos!s:<5} "
                      f"{samples[(backend, eos)][-1]:>8,.0f} records/s", file=sys.stderr)
    finally:
        k.close()
    base = statistics.median(samples[VARIANTS[0]])
    print(f"redrive of {args.letters} dead letters (25 kB), median of {args.repeat}")
    print(f"{'client':<13} {'delivery':<13} {'records/s':>10} {'ratio':>6}   runs")
    for backend, eos in VARIANTS:
        med = statistics.median(samples[(backend, eos)])
        runs = ", ".join(f"{v:,.0f}" for v in samples[(backend, eos)])
        mode = "exactly-once" if eos else "at-least-once"
        print(f"{backend:<13} {mode:<13} {med:>10,.0f} {med / base:>6.2f}   {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
