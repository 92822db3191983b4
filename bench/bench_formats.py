"""End to end by wire format: the worker's rows/s on the same requests sent as
Arrow, msgpack and Open Inference Protocol V2 JSON, side by side in one run.

The demo MLP; ``--messages`` requests of ``--rows`` rows each on a 2-partition
topic, published before the worker starts (so the worker, not the producer, is
measured); the rate is rows between the first and the last answer's record
timestamps. The formats take turns ``--repeat`` times (interleaved, so a noisy
neighbour hits each alike); medians, and each format's ratio to Arrow. Answers
are in the request's format. For V2 JSON, MLServer 1.7.1's Kafka mode answers
64-row requests of this shape at 7,000-10,500 rows/s on this machine class
(measured when the JSON codec was asked for; MLServer is not a dependency, so
it is not rerun here).

    .venv/bin/python bench/bench_formats.py [--rows 64] [--messages 3000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workloads import MLP, Kafka, WorkerProcess, bootstrap_servers, rate_from_timestamps
from worker.demo import write_demo_model
from worker.protocol import encode_request

__all__ = ["main", "one_run", "requests"]

FORMATS = ("arrow", "msgpack", "json")


def requests(fmt: str, rows: int, count: int, distinct: int = 8) -> list[tuple[bytes, list]]:
    """``count`` requests cycling ``distinct`` payloads (same bytes on the wire, small memory)."""
    rng = np.random.default_rng(1)
    pool = [
        encode_request({MLP.input: rng.random((rows, *MLP.row_shape), dtype=np.float32)},
                       format=fmt, model=MLP.name)
        for _ in range(distinct)
    ]  # fmt: skip
    return [pool[i % distinct] for i in range(count)]


def one_run(k: Kafka, repo: Path, fmt: str, rows: int, count: int, n: int) -> float:
    """Rows/s of one worker process over ``count`` pre-published ``fmt`` requests."""
    label = f"{fmt}-{n}"
    source, out, group = k.topic(f"in-{label}", 2), k.topic(f"out-{label}"), k.group(label)
    k.publish(source, requests(fmt, rows, count), partitions=2)
    ends = k.end_offsets(source)
    with WorkerProcess(k.bootstrap, source, out, repo, MLP.name, group) as w:
        w.wait_ready()
        if not k.wait_committed(group, ends, 300, w.alive):
            raise RuntimeError(f"{label}: the worker did not finish: {w.stderr_tail()}")
    records = k.read(out, count)
    k.drop(source, out)
    if len(records) != count:
        raise RuntimeError(f"{label}: {len(records)} answers for {count} requests")
    return rate_from_timestamps(records, lambda r: rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows per request (64)")
    parser.add_argument("--messages", type=int, default=3000, help="requests per run (3000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per format (5)")
    args = parser.parse_args(argv)

    k = Kafka(bootstrap_servers())
    samples: dict[str, list[float]] = {f: [] for f in FORMATS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp)
            write_demo_model(repo)
            for n in range(args.repeat):
                for fmt in FORMATS:
                    samples[fmt].append(one_run(k, repo, fmt, args.rows, args.messages, n))
                    print(f"run {n + 1}/{args.repeat} {fmt:<8} {samples[fmt][-1]:>10,.0f} rows/s",
                          file=sys.stderr)
    finally:
        k.close()
    arrow = statistics.median(samples["arrow"])
    print(f"demo MLP, {args.messages} requests of {args.rows} rows, median of {args.repeat}")
    print(f"{'format':<8} {'rows/s':>10} {'vs arrow':>9}   runs")
    for fmt in FORMATS:
        med = statistics.median(samples[fmt])
        runs = ", ".join(f"{v:,.0f}" for v in samples[fmt])
        print(f"{fmt:<8} {med:>10,.0f} {med / arrow:>9.2f}   {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
