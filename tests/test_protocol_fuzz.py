"""Seeded fuzzing: whatever the bytes, only WorkerError subclasses leave the decoder."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from worker.errors import WorkerError
from worker.protocol import Limits, decode_request, encode_request
from worker.signature import Signature, TensorSpec

SIGNATURES = [
    Signature(inputs=(TensorSpec(name="x", onnx_type="tensor(float)", dtype=np.dtype("float32"),
                                 shape=(None, 4)),), outputs=()),
    Signature(inputs=(
        TensorSpec(name="x", onnx_type="tensor(float)", dtype=np.dtype("float32"),
                   shape=(None, 4)),
        TensorSpec(name="s", onnx_type="tensor(string)", dtype=np.dtype(np.str_), shape=(None,)),
    ), outputs=()),
]
LIMITS = Limits(max_bytes=1 << 20, max_rows=10_000, max_elements=1 << 20)
CONTENT_TYPES = [[], [("content-type", b"application/vnd.apache.arrow.stream")],
                 [("content-type", b"application/x-msgpack")],
                 [("content-type", b"application/json")]]


def seeds() -> list[bytes]:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = np.array(["a", "bb", "ccc"], dtype=object)
    out = []
    for form in ("auto", "tensor", "fixed_size_list", "primitive"):
        value, _ = encode_request({"x": x}, format="arrow", arrow_form=form,
                                  passthrough=pa.table({"k": [1, 2, 3]}))
        out.append(value)
    out.append(encode_request({"x": x, "s": s}, format="arrow")[0])
    out.append(encode_request({"x": x, "s": s}, format="msgpack", model="m", model_version=1,
                              request_id="r", passthrough={"a": [1, {"b": None}]})[0])
    for form in ("flat", "nested"):
        out.append(encode_request({"x": x, "s": s}, format="json", form=form, request_id="r",
                                  passthrough={"a": [1]})[0])
    out.append(b'{"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": '
               + str(x.tolist()).encode() + b'}], "outputs": [{"name": "y"}]}')
    import msgpack

    out.append(msgpack.packb({"inputs": {"x": {"dtype": "float32", "shape": [3, 4],
                                               "data": x.tolist()}}}))
    return out


def mutate(rng: random.Random, value: bytes) -> bytes:
    data = bytearray(value)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[pos] = rng.randrange(256)  # flip a byte
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del data[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            data = data[: rng.randrange(len(data) + 1)]  # truncate
        elif data:
            # Overwrite with a "large" 32-bit value: lengths and counts are where bugs hide.
            data[pos:pos + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
                                            b"\xff\xff\xff\xff"])
    return bytes(data)


def exercise(value: bytes, headers: list, signature: Signature) -> str:
    try:
        request = decode_request(value, headers, default_id="t/0/0", limits=LIMITS)
        request.bind(signature)
    except WorkerError as exc:
        return type(exc).__name__
    return "ok"


def test_fuzz_random_and_mutated_messages() -> None:
    rng = random.Random(20240611)
    valid = seeds()
    outcomes: dict[str, int] = {}
    for i in range(3000):
        if i % 4 == 0:
            prefix = b"\xff\xff\xff\xff" if rng.random() < 0.5 else b""
            value = prefix + rng.randbytes(rng.randrange(64))
        else:
            value = mutate(rng, rng.choice(valid))
        outcome = exercise(value, rng.choice(CONTENT_TYPES), rng.choice(SIGNATURES))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("DecodeError", 0) > 1000, outcomes  # the fuzzer reaches the decoder
    assert set(outcomes) <= {"ok", "DecodeError", "SchemaMismatch", "TooLarge"}, outcomes
