"""GPU: raw ONNX Runtime CUDA vs the worker's compute path, for the compute-bound model.

The worker's path is everything between ``poll()`` and ``send()`` but fed
from memory: decode the Arrow request, bind it, batch it, run it through
:mod:`worker.runtime` (a CUDA session with I/O binding) and encode the
response. Raw is ``InferenceSession.run`` on the same arrays. Batch 1, 8 and
64 rows; medians of repeated runs; prints the device name. Exits 0 with a
message where no CUDA device is usable.

    .venv/bin/python bench/gpu.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench.workloads import build_repository  # noqa: E402
from worker.batching import Batch, Job, run_batch, run_mode  # noqa: E402
from worker.protocol import decode_request, encode_request, encode_response  # noqa: E402
from worker.repository import ModelRepository  # noqa: E402
from worker.runtime import RuntimeOptions, cuda_probe, load_session  # noqa: E402


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "CUDA device 0"


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn`` after a few warm-up calls (cuDNN picks its algorithms)."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rows", default="1,8,64", help="batch sizes, comma-separated")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the same comparison on the CPU (a smoke test of this script)")
    args = parser.parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]

    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"no GPU benchmark: this onnxruntime ({ort.__version__}) has no CUDA provider "
              "(install the gpu extra on a CUDA machine)")  # fmt: skip
        return 0
    problem = cuda_probe(0) if args.device == "cuda" else None
    if problem:
        print(f"no GPU benchmark: CUDA is not usable here: {problem}")
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        repo = Path(tmp)
        model = build_repository(repo)["cnn"]
        ref = ModelRepository(repo).resolve(model.name)
        session = load_session(ref, RuntimeOptions(device=args.device))
        providers: list = ["CPUExecutionProvider"]
        if args.device == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
        raw = ort.InferenceSession(str(ref.path), providers=providers)
        signature, mode = session.signature, run_mode(session.signature)
        name = device_name() if args.device == "cuda" else "CPU (smoke test)"
        print(f"device: {name}; onnxruntime {ort.__version__}; model {model.name} "
              f"(float32[?,{','.join(map(str, model.row_shape))}]); median of {args.repeat}")
        header = (f"{'rows':>5} {'raw ORT ms':>11} {'worker ms':>10} {'raw img/s':>10} "
                  f"{'worker img/s':>13} {'worker/raw':>11}")  # fmt: skip
        print(header)
        print("-" * len(header))
        rng = np.random.default_rng(0)
        for rows in sizes:
            x = rng.random((rows, *model.row_shape), dtype=np.float32)
            value, headers = encode_request({model.input: x}, format="arrow", model=model.name)

            def raw_run(x: np.ndarray = x) -> object:
                return raw.run(None, {model.input: x})

            def worker_path(value: bytes = value, headers: list = headers) -> object:
                request = decode_request(value, headers, default_id="gpu/0/0")
                bound = request.bind(signature)
                job = Job(None, model.name, ref.version, mode, bound.feeds, bound.rows)
                (outputs,) = run_batch(session.run, Batch(model.name, ref.version, [job]), 1024)
                assert isinstance(outputs, dict)
                return encode_response(request, bound, outputs, model=model.name,
                                       model_version=ref.version)  # fmt: skip

            t_raw, t_worker = timed(raw_run, args.repeat), timed(worker_path, args.repeat)
            print(f"{rows:>5} {t_raw * 1e3:>11.2f} {t_worker * 1e3:>10.2f} "
                  f"{rows / t_raw:>10.1f} {rows / t_worker:>13.1f} {t_raw / t_worker:>11.2f}")
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
