"""What the session cache costs: per-request overhead of a hit, and cold-load time.

    .venv/bin/python bench/bench_cache.py [--iterations 20000] [--json OUT]

1. Hit overhead: ``with cache.acquire(name) as s: s.run(x)`` against
   ``session.run(x)`` on the same session, interleaved in rounds, medians
   reported; plus ``acquire`` alone (no run), which is the cleaner number.
2. Load time: a plain ``ort.InferenceSession(path)`` (default options) against
   ``load_session`` the first time (hash, optimize, save the optimized graph),
   without an optimized dir, and with the optimized graph already on disk;
   warm-up excluded from those and shown on its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.modelzoo import sample_feeds, write_cnn, write_iris_logreg, write_mlp, write_slow
from worker.cache import SessionCache
from worker.observability import Metrics
from worker.repository import ModelRef, ModelRepository
from worker.runtime import RuntimeOptions, load_session

__all__ = ["main"]


def write_deep(repo: Path, name: str = "deep-mlp", layers: int = 150, width: int = 64) -> Path:
    """Many MatMul+Add+Relu layers: lots of work for the graph optimizer, little per run."""
    rng = np.random.default_rng(5)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        w = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - start) / n / 1000


def bench_hit(repo: ModelRepository, iterations: int, rounds: int = 9) -> dict[str, float]:
    options = RuntimeOptions(device="cpu")
    cache = SessionCache(repo, lambda ref: load_session(ref, options), metrics=Metrics())
    with cache.acquire("mnist-mlp") as session:
        feeds = sample_feeds(session.signature, rows=1)

    def direct() -> object:
        return session.run(feeds)

    def cached() -> object:
        with cache.acquire("mnist-mlp") as s:
            return s.run(feeds)

    def acquire_only() -> object:
        with cache.acquire("mnist-mlp") as s:
            return s

    for fn in (direct, cached, acquire_only):
        _per_call_us(fn, iterations // 10)  # warm
    d, c, a = [], [], []
    for _ in range(rounds):  # interleaved so drift hits all three alike
        d.append(_per_call_us(direct, iterations))
        c.append(_per_call_us(cached, iterations))
        a.append(_per_call_us(acquire_only, iterations))
    cache.close()
    return {
        "direct_run_us": statistics.median(d),
        "cached_run_us": statistics.median(c),
        "hit_overhead_us": statistics.median(c) - statistics.median(d),
        "acquire_release_us": statistics.median(a),
    }


def _seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_one(ref: ModelRef, repeat: int) -> dict[str, float]:
    # Warm-up off in the timed loads so they compare with a bare InferenceSession;
    # the warm-up run is reported on its own.
    with tempfile.TemporaryDirectory() as opt:
        options = RuntimeOptions(device="cpu", optimized_dir=Path(opt), warmup=False)

        def first() -> object:
            for f in Path(opt).glob("*.onnx"):
                f.unlink()  # every repeat is a first load
            return load_session(ref, options)

        first_s = _seconds(first, repeat)
        load_session(ref, options)  # leaves the optimized graph on disk
        reuse_s = _seconds(lambda: load_session(ref, options), repeat)
    bare = RuntimeOptions(device="cpu", warmup=False)
    no_dir_s = _seconds(lambda: load_session(ref, bare), repeat)
    plain_s = _seconds(lambda: ort.InferenceSession(str(ref.path)), repeat)
    warm = load_session(ref, RuntimeOptions(device="cpu")).warmup_seconds
    return {
        "file_bytes": ref.path.stat().st_size,
        "plain_ms": plain_s * 1e3,
        "first_load_ms": first_s * 1e3,
        "no_optimized_dir_ms": no_dir_s * 1e3,
        "reuse_optimized_ms": reuse_s * 1e3,
        "warmup_run_ms": warm * 1e3,
    }


def bench_load(root: Path, names: list[str], repeat: int = 7) -> dict[str, dict[str, float]]:
    repo = ModelRepository(root)
    return {name: _bench_one(repo.resolve(name), repeat) for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_mlp(root)
        write_cnn(root)
        write_iris_logreg(root)
        write_slow(root, ms_per_run=5)
        write_deep(root)
        hit = bench_hit(ModelRepository(root), args.iterations)
        load = bench_load(root, ["mnist-mlp", "small-cnn", "iris-logreg", "slow", "deep-mlp"])

    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print("\n1. cache hit, mnist-mlp, 1 row (median per request)")
    for key, value in hit.items():
        print(f"   {key:<22} {value:8.2f} µs")
    print("\n2. load time (median ms)")
    cols = ["plain_ms", "first_load_ms", "no_optimized_dir_ms", "reuse_optimized_ms",
            "warmup_run_ms"]
    print(f"   {'model':<12} {'bytes':>8} " + " ".join(f"{c[:-3]:>19}" for c in cols))
    for name, row in load.items():
        print(f"   {name:<12} {int(row['file_bytes']):>8} "
              + " ".join(f"{row[c]:>19.2f}" for c in cols))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"hit": hit, "load": load}, indent=2))


if __name__ == "__main__":
    main()
