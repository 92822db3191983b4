"""Codec cost relative to inference: is the wire format ever the bottleneck?

For the demo MLP at 16, 64, 256 and 1024 rows, times decode_request + bind,
encode_response and response_headers against ``session.run`` on the same
batch, for Arrow, msgpack and V2 JSON, as medians of repeated runs of the CPU
time of this thread (``--clock wall`` for elapsed time), so other load on a
shared machine moves them less than wall time. The goal
is codec time <= 5% of the ONNX Runtime time for Arrow; for JSON, the
``codec rows/s`` column is what one core can decode and encode (MLServer's Kafka mode
answers 64-row V2 JSON requests of this shape at 7,000-10,500 rows/s).

    .venv/bin/python bench/bench_codec.py [--repeat 200] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from worker.demo import build_mlp
from worker.protocol import decode_request, encode_request, encode_response, response_headers
from worker.signature import Signature

CLOCKS: dict[str, Callable[[], int]] = {"cpu": time.thread_time_ns, "wall": time.perf_counter_ns}
_clock = CLOCKS["cpu"]


def timings(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, best) seconds: the median is the figure asked for; the best run
    shows the cost without noise from other processes on a shared machine."""
    for _ in range(min(20, repeat)):  # warm caches and allocator pools
        fn()
    samples = []
    for _ in range(repeat):
        start = _clock()
        fn()
        samples.append((_clock() - start) / 1e9)
    return statistics.median(samples), min(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: this thread's CPU time (default); wall: elapsed time")
    parser.add_argument("--rows", default="16,64,256,1024", help="comma-separated batch sizes")
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(build_mlp().SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    signature = Signature.from_session(session)
    rng = np.random.default_rng(0)

    print(f"onnxruntime {ort.__version__}, intra-op threads {args.threads}, "
          f"median of {args.repeat} runs, {args.clock} time, µs per message")
    header = (f"{'format':<8} {'rows':>5} {'bytes':>9} {'decode+bind':>12} {'encode':>9} "
              f"{'headers':>9} {'codec':>9} {'ort run':>9} {'codec/ort':>9} {'best/best':>9} "
              f"{'codec rows/s':>13}")
    print(header)
    print("-" * len(header))
    for rows in (int(r) for r in args.rows.split(",")):
        x = rng.random((rows, 784), dtype=np.float32)
        run_time, run_best = timings(lambda x=x: session.run(None, {"x": x}), args.repeat)
        for fmt in ("arrow", "msgpack", "json"):
            value, headers = encode_request({"x": x}, format=fmt, model="mnist-mlp",
                                            passthrough=None)
            request = decode_request(value, headers, default_id="t/0/0")
            bound = request.bind(signature)
            (probs,) = session.run(None, bound.feeds)
            outputs = {"probs": probs}

            def decode(value: bytes = value, headers: list = headers) -> object:
                return decode_request(value, headers, default_id="t/0/0").bind(signature)

            def encode(request: object = request, bound: object = bound,
                       outputs: dict = outputs) -> object:
                return encode_response(request, bound, outputs,  # type: ignore[arg-type]
                                       model="mnist-mlp", model_version=1)

            ctype = encode()[1]  # type: ignore[index]

            def headers_of(request: object = request, ctype: str = ctype) -> object:
                return response_headers(request,  # type: ignore[arg-type]
                                        content_type=ctype, model="mnist-mlp", model_version=1,
                                        topic="in", partition=0, offset=0)  # fmt: skip

            decode_time, decode_best = timings(decode, args.repeat)
            encode_time, encode_best = timings(encode, args.repeat)
            head_time, head_best = timings(headers_of, args.repeat)
            codec = decode_time + encode_time + head_time
            best = decode_best + encode_best + head_best
            print(f"{fmt:<8} {rows:>5} {len(value):>9} {decode_time * 1e6:>12.1f} "
                  f"{encode_time * 1e6:>9.1f} {head_time * 1e6:>9.1f} {codec * 1e6:>9.1f} "
                  f"{run_time * 1e6:>9.1f} {codec / run_time:>9.1%} {best / run_best:>9.1%} "
                  f"{rows / codec:>13,.0f}")


if __name__ == "__main__":
    main()
