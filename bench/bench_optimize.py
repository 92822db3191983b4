"""What ``inference-worker optimize`` buys: int8 on CPU, fp16 on CUDA (where there is one).

    .venv/bin/python bench/bench_optimize.py [--threads 1] [--repeats 10] [--json OUT]

Each model goes through :func:`worker.optimize.optimize` in a scratch
repository (gate on, speed gate off), so the figures are the command's own:
median of alternating runs, same inputs, same threads, both sides loaded the
way the worker loads them.

Models:

- ``slow``: tests.modelzoo's compute-bound MatMul chain (the benchmarks'
  compute-bound model, ~20 ms a run on one core);
- ``resnet50``: ``light_resnet50`` from the onnx wheel's test data with
  random He-initialized weights in place of its constant ones, batch axis made
  dynamic, opset 13 (skipped if the wheel lacks it); int8 as the command does
  it (Conv kept float) and, for contrast, with Conv quantized too;
- ``small-cnn`` and ``mnist-mlp``: the test models.

fp16 runs only where :func:`worker.runtime.cuda_probe` finds a usable GPU;
elsewhere it prints why and carries on (exit 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, version_converter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.modelzoo import write_cnn, write_mlp, write_slow
from worker.optimize import OptimizeReport, OptimizeRequest, optimize
from worker.runtime import cuda_probe

__all__ = ["main", "write_resnet50"]

_LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"


def write_resnet50(repo: Path, name: str = "resnet50") -> Path | None:
    """light_resnet50 with real-looking weights and a dynamic batch; None when absent."""
    if not _LIGHT.is_file():
        return None
    model = onnx.load(str(_LIGHT))
    graph = model.graph
    rng = np.random.default_rng(50)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # Which BatchNormalization slot a tensor feeds decides its sensible values.
    bn_slot = {
        name: i for n in graph.node if n.op_type == "BatchNormalization"
        for i, name in enumerate(n.input)
    }
    weights: dict[str, np.ndarray] = {}
    kept = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept.append(node)
            continue
        out = node.output[0]
        shape = tuple(int(d) for d in consts[node.input[0]])
        if len(shape) == 4:  # conv: He init
            w = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif len(shape) == 2:  # fully connected
            w = rng.normal(0, np.sqrt(1 / shape[1]), shape)
        elif bn_slot.get(out) == 1 and "branch2c" in out:
            # Small last scale in each residual branch, or the activations
            # double per block and the softmax saturates to one-hot.
            w = 0.1 * (1 + 0.1 * rng.normal(size=shape))
        elif bn_slot.get(out) == 1:  # scale
            w = 1 + 0.1 * rng.normal(size=shape)
        elif bn_slot.get(out) == 4:  # running variance
            w = 1 + 0.1 * np.abs(rng.normal(size=shape))
        else:  # bias, running mean
            w = 0.1 * rng.normal(size=shape)
        weights[out] = w.astype(np.float32)
    used = {i for n in kept for i in n.input}
    for key, value in consts.items():
        if key not in used:  # the ConstantOfShape shapes and one stray blob
            continue
        # The flatten before Gemm hard-codes batch 1.
        fixed = value.shape == (2,) and value.tolist() == [1, 2048]
        weights[key] = np.array([-1, 2048], np.int64) if fixed else value
    data = graph.input[0]
    x = helper.make_tensor_value_info(data.name, onnx.TensorProto.FLOAT, ["batch", 3, 224, 224])
    y = helper.make_tensor_value_info(graph.output[0].name, onnx.TensorProto.FLOAT, ["batch", 1000])
    new = helper.make_graph(
        kept, "resnet50", [x], [y],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    out_model = helper.make_model(new, opset_imports=[helper.make_opsetid("", 9)])
    out_model.ir_version = 8
    out_model = version_converter.convert_version(out_model, 13)
    onnx.checker.check_model(out_model)
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(out_model, str(path))
    return path


def _int8_with_conv(source: Path, dest: Path) -> None:
    """What quantize_dynamic does by default (Conv -> ConvInteger), for contrast."""
    from onnxruntime.quantization import quant_pre_process, quantize_dynamic

    pre = dest.with_name("pre.onnx")
    quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(dest))
    pre.unlink()


def _row(label: str, report: OptimizeReport) -> dict[str, Any]:
    t = report.timing
    worst = max((c.max_abs_diff or 0.0 for c in report.checks), default=0.0)
    agreement = min((c.agreement for c in report.checks if c.agreement is not None), default=None)
    return {
        "model": label, "mode": report.mode, "target": report.target, "rows": t.rows,
        "threads": t.threads, "original_ms": round(t.original_ms, 3),
        "candidate_ms": round(t.candidate_ms, 3), "speedup": round(t.speedup, 2),
        "max_abs_diff": float(f"{worst:.3g}"), "agreement": agreement,
        "accepted": report.accepted,
        "bytes": [t.original_bytes, t.candidate_bytes],
    }


def _print(rows: list[dict[str, Any]]) -> None:
    head = ("model", "mode", "target", "rows", "thr", "orig ms", "cand ms", "speedup",
            "max diff", "agree", "gate")
    table = [head] + [
        (r["model"], r["mode"], r["target"], str(r["rows"]), str(r["threads"]),
         f"{r['original_ms']:.2f}", f"{r['candidate_ms']:.2f}", f"{r['speedup']:.2f}x",
         f"{r['max_abs_diff']:.3g}",
         "-" if r["agreement"] is None else f"{r['agreement']:.1%}",
         {True: "pass", False: "refused", None: "-"}[r["accepted"]])
        for r in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {args.threads}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        write_slow(repo)
        write_cnn(repo)
        write_mlp(repo)
        resnet = write_resnet50(repo)
        models: list[tuple[str, int]] = [("slow", 256), ("small-cnn", 256), ("mnist-mlp", 256)]
        if resnet is not None:
            models.insert(1, ("resnet50", 8))
        else:
            print(f"resnet50: skipped ({_LIGHT} not in this onnx wheel)")

        def run(name: str, mode: str, target: str, rows_n: int) -> OptimizeReport:
            return optimize(OptimizeRequest(
                repository=repo, model=name, version=1, target=target, mode=mode,
                rows=rows_n, threads=args.threads, repeats=args.repeats, min_speedup=0,
            ))

        for name, rows_n in models:
            rows.append(_row(name, run(name, "int8", "cpu", rows_n)))
        if resnet is not None:
            # Conv quantized as well: the reason the command keeps Conv in float.
            rows.append(_time_with_conv(resnet, args.threads, args.repeats, 8))

        reason = cuda_probe(0)
        if reason is None:
            for name, rows_n in models:
                rows.append(_row(name, run(name, "fp16", "cuda", rows_n)))
        else:
            print(f"fp16 on CUDA: skipped ({reason})")
    _print(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _time_with_conv(source: Path, threads: int, repeats: int, rows_n: int) -> dict[str, Any]:
    """Timing and worst diff of the Conv-quantized resnet, measured as the command measures."""
    from worker.optimize.candidates import optimize_graph
    from worker.optimize.gate import time_pairs
    from worker.repository import ModelRef
    from worker.runtime import RuntimeOptions, load_session

    quantized = source.with_name("conv-int8.onnx")
    candidate = source.with_name("conv-int8-opt.onnx")
    _int8_with_conv(source, quantized)
    optimize_graph(quantized, candidate, "cpu")
    options = RuntimeOptions(device="cpu", intra_op_threads=threads, optimized_dir=None,
                             warmup=False)
    a = load_session(ModelRef("resnet50", 1, source), options)
    b = load_session(ModelRef("resnet50", 0, candidate), options)
    x = np.random.default_rng(0).normal(size=(rows_n, 3, 224, 224)).astype(np.float32)
    want, got = a.run({a.signature.inputs[0].name: x}), b.run({b.signature.inputs[0].name: x})
    key = a.signature.outputs[0].name
    diff = float(np.abs(np.asarray(want[key]) - np.asarray(got[key])).max())
    classes = np.argmax(np.asarray(want[key]), 1), np.argmax(np.asarray(got[key]), 1)
    agree = float(np.mean(classes[0] == classes[1]))
    a_ms, b_ms = time_pairs(a, b, {a.signature.inputs[0].name: x}, repeats)
    return {
        "model": "resnet50 (+Conv)", "mode": "int8", "target": "cpu", "rows": rows_n,
        "threads": threads, "original_ms": round(a_ms, 3), "candidate_ms": round(b_ms, 3),
        "speedup": round(a_ms / b_ms, 2), "max_abs_diff": float(f"{diff:.3g}"),
        "agreement": agree, "accepted": None,
        "bytes": [source.stat().st_size, candidate.stat().st_size],
    }


if __name__ == "__main__":
    sys.exit(main())
