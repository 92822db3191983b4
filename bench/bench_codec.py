"""Codec cost relative to inference: is the wire format ever the bottleneck?

For the demo MLP at 64, 256 and 1024 rows, times decode_request + bind +
encode_response (+ response_headers) against ``session.run`` on the same
batch, for Arrow, msgpack and V2 JSON, as medians of repeated runs. The goal
is codec time <= 5% of the ONNX Runtime time for Arrow; for JSON, the
``codec rows/s`` column is what one core can decode and encode (MLServer's Kafka mode
answers 64-row V2 JSON requests of this shape at 7,000-10,500 rows/s).

    .venv/bin/python bench/bench_codec.py [--repeat 200] [--threads 1]
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


def timings(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, best) seconds: the median is the figure asked for; the best run
    shows the cost without noise from other processes on a shared machine."""
    for _ in range(min(20, repeat)):  # warm caches and allocator pools
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (0: its default)")
    args = parser.parse_args(argv)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(build_mlp().SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    signature = Signature.from_session(session)
    rng = np.random.default_rng(0)

    print(f"onnxruntime {ort.__version__}, intra-op threads {args.threads}, "
          f"median of {args.repeat} runs")
    header = (f"{'format':<8} {'rows':>5} {'bytes':>9} {'decode+bind':>12} {'encode':>9} "
              f"{'codec':>9} {'ort run':>9} {'codec/ort':>9} {'best/best':>9} "
              f"{'codec rows/s':>13}")
    print(header)
    print("-" * len(header))
    for rows in (64, 256, 1024):
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
                body, ctype = encode_response(request, bound, outputs,  # type: ignore[arg-type]
                                              model="mnist-mlp", model_version=1)
                return body, response_headers(request,  # type: ignore[arg-type]
                                              content_type=ctype, model="mnist-mlp",
                                              model_version=1, topic="in", partition=0, offset=0)

            decode_time, decode_best = timings(decode, args.repeat)
            encode_time, encode_best = timings(encode, args.repeat)
            codec = decode_time + encode_time
            print(f"{fmt:<8} {rows:>5} {len(value):>9} {decode_time * 1e6:>10.1f}us "
                  f"{encode_time * 1e6:>7.1f}us {codec * 1e6:>7.1f}us {run_time * 1e6:>7.1f}us "
                  f"{codec / run_time:>9.1%} {(decode_best + encode_best) / run_best:>9.1%} "
                  f"{rows / codec:>13,.0f}")


if __name__ == "__main__":
    main()
