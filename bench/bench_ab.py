"""A/B on one stream: the default worker against the same worker with other flags,
against the worker of another commit, or against this worker with an optional
extra's packages hidden, side by side in one run.

The demo MLP; ``--messages`` Arrow requests of ``--rows`` rows on a 2-partition
topic, published before each worker starts; rows/s between the first and the
last answer's timestamps, CPU µs per message of the worker process, and the
share of batches run on the polling thread. The two take turns ``--repeat``
times; medians, and B / A.

    .venv/bin/python bench/bench_ab.py --rows 64 -- --inline-below-ms 0
    .venv/bin/python bench/bench_ab.py --rows 64 --rev HEAD~3   # a worktree of that commit
    .venv/bin/python bench/bench_ab.py --rows 64 --b-without otel  # B: as if not installed

``--b-without otel``: B imports a stand-in ``opentelemetry`` package (first on its
``PYTHONPATH``) that raises ImportError, as where the ``otel`` extra is not
installed; A has the extra's packages as installed. Neither sets an exporter.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.workloads as workloads
from bench.bench_formats import requests
from bench.workloads import MLP, ROOT, Kafka, WorkerProcess, bootstrap_servers, rate_from_timestamps
from worker.demo import write_demo_model

__all__ = ["main"]


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached git worktree of ``rev``, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(path), rev],
                       cwd=ROOT, check=True)  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT)


# Optional extras --b-without can hide: the top-level package each one brings.
HIDEABLE = {"otel": "opentelemetry"}


@contextlib.contextmanager
def hidden(package: str) -> Iterator[dict[str, str]]:
    """An environment in which ``import <package>`` raises ImportError."""
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = Path(tmp) / package
        stand_in.mkdir()
        (stand_in / "__init__.py").write_text(
            f"raise ImportError('{package} hidden by bench_ab --b-without')\n")
        yield {"PYTHONPATH": tmp}


def one_run(k: Kafka, repo: Path, root: Path, flags: list[str], msgs: list, rows: int,
            label: str, env: dict[str, str]) -> tuple[float, float, float]:  # fmt: skip
    """(rows/s, CPU µs/message, inline share) of one worker from ``root`` with ``flags``."""
    source, out, group = k.topic(f"in-{label}", 2), k.topic(f"out-{label}"), k.group(label)
    k.publish(source, msgs, partitions=2)
    ends = k.end_offsets(source)
    workloads.ROOT = root  # the checkout WorkerProcess runs `python -m worker.cli` in
    try:
        with WorkerProcess(k.bootstrap, source, out, repo, MLP.name, group, flags, env) as w:
            w.wait_ready()
            cpu = w.cpu_seconds()
            if not k.wait_committed(group, ends, 300, w.alive):
                raise RuntimeError(f"{label}: the worker did not finish: {w.stderr_tail()}")
            cpu = w.cpu_seconds() - cpu
            m = w.metrics()
    finally:
        workloads.ROOT = ROOT
    records = k.read(out, len(msgs))
    k.drop(source, out)
    if len(records) != len(msgs):
        raise RuntimeError(f"{label}: {len(records)} answers for {len(msgs)} requests")
    runs = m.get("inference_worker_batch_rows_count", 0.0)
    inline = m.get("inference_worker_inline_batches_total", 0.0) / runs if runs else 0.0
    return rate_from_timestamps(records, lambda r: rows), cpu / len(msgs) * 1e6, inline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows per request (64)")
    parser.add_argument("--messages", type=int, default=4000, help="requests per run (4000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (3)")
    parser.add_argument("--rev", help="B is the worker of this commit, default flags")
    parser.add_argument("--b-without", choices=sorted(HIDEABLE),
                        help="B is this worker with that extra's packages hidden")
    parser.add_argument("flags", nargs="*", help="B's worker flags (after --)")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.rev, args.flags, args.b_without))) != 1:
        parser.error("give one of --rev, --b-without, or B's flags after --")

    k = Kafka(bootstrap_servers())
    samples: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            repo = Path(tmp)
            write_demo_model(repo)
            b_root = stack.enter_context(worktree(args.rev)) if args.rev else ROOT
            b_env = stack.enter_context(hidden(HIDEABLE[args.b_without])) if args.b_without else {}
            setups = {"A": (ROOT, [], {}), "B": (b_root, args.flags, b_env)}
            msgs = requests("arrow", args.rows, args.messages)
            for n in range(args.repeat):
                for name, (root, flags, env) in setups.items():
                    samples[name].append(one_run(k, repo, root, flags, msgs, args.rows,
                                                 f"{name}{n}", env))  # fmt: skip
                    print(f"run {n + 1}/{args.repeat} {name} {samples[name][-1][0]:>10,.0f} "
                          "rows/s", file=sys.stderr)
    finally:
        k.close()
    b_label = (f"commit {args.rev}" if args.rev
               else f"the {args.b_without} extra hidden" if args.b_without
               else " ".join(args.flags))  # fmt: skip
    print(f"demo MLP, {args.messages} Arrow requests of {args.rows} rows, "
          f"median of {args.repeat}; A: this checkout, default flags; B: {b_label}")
    print(f"{'':<3} {'rows/s':>10} {'CPU µs/msg':>11} {'inline':>7}   runs")
    for name in ("A", "B"):
        rate, cpu, inline = (statistics.median(v[i] for v in samples[name]) for i in range(3))
        runs = ", ".join(f"{v[0]:,.0f}" for v in samples[name])
        print(f"{name:<3} {rate:>10,.0f} {cpu:>11,.0f} {inline:>7.0%}   {runs}")
    ratio = statistics.median(b[0] / a[0] for a, b in zip(samples["A"], samples["B"], strict=True))
    print(f"B / A: {ratio:.2f} (median of the per-repetition ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
