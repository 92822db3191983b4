"""GPU: raw ONNX Runtime CUDA vs the worker's compute path, for a compute-bound model.

The worker's path is everything between ``poll()`` and ``send()`` but fed
from memory: decode the Arrow request, bind it, batch it, run it through
:mod:`worker.runtime` (a CUDA session with I/O binding) and encode the
response. Raw is ``InferenceSession.run`` on the same arrays, with the same
CUDA provider options. Batch 1, 8 and 64 rows; medians of repeated runs;
prints the device name.

Fails loudly: exit 1 when CUDA is not usable here, or when either session's
first provider is not CUDA (a CPU fallback must never be reported as GPU
figures). ``--device cpu`` runs the same comparison on the CPU (a smoke test).

    .venv/bin/python bench/gpu.py [--repeat 30] [--json]

Also the building blocks of ``bench/gpu_check.py``: the ResNet-50 builder,
large models for the eviction check, and the side-by-side timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from worker.batching import Batch, Job, run_batch, run_mode  # noqa: E402
from worker.protocol import decode_request, encode_request, encode_response  # noqa: E402
from worker.protocol.base import Limits  # noqa: E402
from worker.repository import ModelRef, ModelRepository  # noqa: E402
from worker.runtime import (  # noqa: E402
    TF32_TOLERANCE,
    RuntimeOptions,
    Session,
    _providers,
    cuda_probe,
    load_session,
)

__all__ = [
    "CNN_NAME",
    "CnnModel",
    "CudaUnusable",
    "compare_paths",
    "device_name",
    "main",
    "raw_session",
    "timed",
    "write_big_model",
    "write_resnet50",
]

CNN_NAME = "resnet50-light"
_CUDA = "CUDAExecutionProvider"


class CudaUnusable(RuntimeError):
    """CUDA cannot be used, or a session ended up elsewhere: no GPU figure may be reported."""


@dataclass(frozen=True)
class CnnModel:
    name: str
    input: str
    output: str
    row_shape: tuple[int, ...]
    source: str
    """``light_resnet50`` (the onnx wheel's test data) or the built fallback."""


def device_name(device_id: int = 0) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader",
             "-i", str(device_id)],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return f"CUDA device {device_id}"


def timed(fn: Callable[[], object], repeat: int, warmup: int = 5) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls (first-run allocations, algorithm picks)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# -- models --------------------------------------------------------------------


def _light_resnet50() -> Path | None:
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    return path if path.exists() else None


def write_resnet50(repo: Path, name: str = CNN_NAME) -> CnnModel:
    """ResNet-50 at 224x224 with a dynamic batch axis, as ``repo/name/1/model.onnx``.

    ``light_resnet50`` from the onnx wheel (weights from ConstantOfShape: an
    80 KB file, a full ResNet-50's compute) when present, else a VGG-ish CNN
    of similar cost. Same recipe as ``bench/workloads.py``, which needs the
    Kafka clients; this one must import on a bare GPU machine.
    """
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    src = _light_resnet50()
    if src is None:
        return _write_big_cnn(path, name)
    m = onnx.load(str(src))
    inits = {i.name for i in m.graph.initializer}
    used = {n for node in m.graph.node for n in node.input}
    # IR 3 lists initializers as graph inputs; the worker would take them for model inputs.
    keep_inputs = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep_inputs)
    keep_inits = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep_inits)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    for init in m.graph.initializer:
        if init.name == "OC2_DUMMY_1":  # the Reshape before the classifier: [1, 2048]
            init.CopyFrom(numpy_helper.from_array(np.array([-1, 2048], np.int64), init.name))
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return CnnModel(name, m.graph.input[0].name, m.graph.output[0].name, (3, 224, 224),
                    "light_resnet50 (onnx wheel), batch axis made dynamic")  # fmt: skip


def _write_big_cnn(path: Path, name: str) -> CnnModel:
    rng = np.random.default_rng(50)
    nodes, inits, prev, ch = [], {}, "image", 3
    for i, out_ch in enumerate((64, 128, 256, 256, 512)):
        inits[f"w{i}"] = rng.normal(0, 0.05, (out_ch, ch, 3, 3)).astype(np.float32)
        inits[f"b{i}"] = np.zeros(out_ch, np.float32)
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        prev, ch = f"p{i}", out_ch
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"]),
    ]
    inits["fw"] = rng.normal(0, 0.05, (ch, 1000)).astype(np.float32)
    inits["fb"] = np.zeros(1000, np.float32)
    graph = helper.make_graph(
        nodes, "big_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return CnnModel(name, "image", "logits", (3, 224, 224), "built VGG-ish CNN (no light models)")


def write_big_model(repo: Path, name: str, mib: int, seed: int = 0) -> Path:
    """``x[batch, K] @ W[K, 1024]`` with ``W`` of ``mib`` MiB: device memory that must come back.

    Constant-filled weights (cheap to write, not compressible by anything in
    the path), a different constant per ``seed`` so files differ.
    """
    k = mib * (1 << 20) // (4 * 1024)
    w = np.full((k, 1024), 1e-3 * (seed + 1), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
        initializer=[numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path


# -- the comparison ---------------------------------------------------------------


def raw_session(path: Path, options: RuntimeOptions, device: str) -> ort.InferenceSession:
    """Plain ``InferenceSession``, the worker's provider options; CudaUnusable unless on CUDA."""
    if device == "cpu":
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = ort.InferenceSession(str(path), providers=_providers(device, options))
    if raw.get_providers()[0] != _CUDA:
        raise CudaUnusable(f"raw ONNX Runtime session runs on {raw.get_providers()[0]}, not CUDA")
    return raw


def compare_paths(
    model: CnnModel,
    ref: ModelRef,
    session: Session,
    raw: ort.InferenceSession,
    sizes: list[int],
    repeat: int,
) -> list[dict[str, Any]]:
    """Per batch size: median ms of raw ``run`` and of decode -> batch -> run -> encode."""
    signature, mode = session.signature, run_mode(session.signature)
    rng = np.random.default_rng(0)
    rows_out: list[dict[str, Any]] = []
    for rows in sizes:
        x = rng.random((rows, *model.row_shape), dtype=np.float32)
        value, headers = encode_request({model.input: x}, format="arrow", model=model.name)

        def raw_run(x: np.ndarray = x) -> object:
            return raw.run(None, {model.input: x})

        def worker_path(value: bytes = value, headers: list = headers) -> object:
            # ResNet-50 at batch 64 is 38 MB, over the default record limit (16 MiB):
            # one such request measures the compute path, not what Kafka would carry.
            request = decode_request(value, headers, default_id="gpu/0/0",
                                     limits=Limits(max_bytes=max(len(value), Limits.max_bytes)))
            bound = request.bind(signature)
            job = Job(None, model.name, ref.version, mode, bound.feeds, bound.rows)
            (outputs,) = run_batch(session.run, Batch(model.name, ref.version, [job]), 1024)
            assert isinstance(outputs, dict), outputs
            return encode_response(request, bound, outputs, model=model.name,
                                   model_version=ref.version)  # fmt: skip

        # Both answer the same: a worker path that computes something else is no comparison.
        want = np.asarray(raw_run()[0])
        got = session.run({model.input: x})[model.output]
        tol = TF32_TOLERANCE  # two sessions may pick different TF32 kernels
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))
        t_raw, t_worker = timed(raw_run, repeat), timed(worker_path, repeat)
        rows_out.append({
            "rows": rows,
            "raw_ms": round(t_raw * 1e3, 3),
            "worker_ms": round(t_worker * 1e3, 3),
            "raw_rows_per_s": round(rows / t_raw, 1),
            "worker_rows_per_s": round(rows / t_worker, 1),
            "worker_over_raw": round(t_raw / t_worker, 3),
        })
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rows", default="1,8,64", help="batch sizes, comma-separated")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the same comparison on the CPU (a smoke test of this script)")
    parser.add_argument("--cudnn-conv-algo-search", default="HEURISTIC")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]

    device = "cpu"
    if args.device == "cuda":
        problem = cuda_probe(0)
        if problem:
            print(f"bench/gpu.py: no GPU figures: CUDA is not usable here: {problem}",
                  file=sys.stderr)  # fmt: skip
            return 1
        device = "cuda:0"
    options = RuntimeOptions(device=device, cudnn_conv_algo_search=args.cudnn_conv_algo_search)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model = write_resnet50(Path(tmp))
        ref = ModelRepository(tmp).resolve(model.name)
        try:
            session = load_session(ref, options)
            if device != "cpu" and session.providers[:1] != [_CUDA]:
                raise CudaUnusable(f"worker session runs on {session.providers}, not CUDA")
            raw = raw_session(ref.path, options, device)
        except Exception as exc:  # CudaUnusable, ModelLoadError: either way no figures
            print(f"bench/gpu.py: no GPU figures: {exc}", file=sys.stderr)
            return 1
        name = device_name() if device != "cpu" else "CPU (smoke test)"
        results = compare_paths(model, ref, session, raw, sizes, args.repeat)
        session.close()
    if args.json:
        print(json.dumps({"device": name, "onnxruntime": ort.__version__, "model": model.source,
                          "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
                          "repeat": args.repeat, "results": results}, indent=2))  # fmt: skip
        return 0
    print(f"device: {name}; onnxruntime {ort.__version__}; {model.source} "
          f"(float32[?,{','.join(map(str, model.row_shape))}]); median of {args.repeat}; "
          f"cudnn_conv_algo_search {options.cudnn_conv_algo_search}")  # fmt: skip
    header = (f"{'rows':>5} {'raw ORT ms':>11} {'worker ms':>10} {'raw img/s':>10} "
              f"{'worker img/s':>13} {'worker/raw':>11}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['rows']:>5} {r['raw_ms']:>11.2f} {r['worker_ms']:>10.2f} "
              f"{r['raw_rows_per_s']:>10.1f} {r['worker_rows_per_s']:>13.1f} "
              f"{r['worker_over_raw']:>11.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
