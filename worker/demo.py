"""The demo model: the MNIST-style MLP the project started from.

784 inputs -> Dense 32 (relu) -> Dropout (identity at inference) -> Dense 10
(softmax), built directly as ONNX with fixed-seed weights so every machine
builds the same bytes. Axis 0 (the batch) is dynamic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["DEMO_INPUT", "DEMO_MODEL", "DEMO_OUTPUT", "build_mlp", "write_demo_model"]

DEMO_MODEL = "mnist-mlp"
DEMO_INPUT = "x"
DEMO_OUTPUT = "probs"


def build_mlp(seed: int = 7, hidden: int = 32, n_in: int = 784, n_out: int = 10) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    # Glorot-uniform, as Keras would initialise the layers.
    def dense(fan_in: int, fan_out: int) -> np.ndarray:
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-lim, lim, size=(fan_in, fan_out)).astype(np.float32)

    w1, b1 = dense(n_in, hidden), rng.normal(0, 0.05, hidden).astype(np.float32)
    w2, b2 = dense(hidden, n_out), rng.normal(0, 0.05, n_out).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", [DEMO_INPUT, "w1", "b1"], ["h"], name="dense_1"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("Dropout", ["h_relu"], ["h_drop"], name="dropout"),
        helper.make_node("Gemm", ["h_drop", "w2", "b2"], ["logits"], name="dense_2"),
        helper.make_node("Softmax", ["logits"], [DEMO_OUTPUT], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "mnist_mlp",
        [helper.make_tensor_value_info(DEMO_INPUT, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(DEMO_OUTPUT, TensorProto.FLOAT, ["batch", n_out])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inference-worker"
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def write_demo_model(repository: Path, version: int = 1, seed: int = 7) -> Path:
    """Write ``<repository>/mnist-mlp/<version>/model.onnx`` and return its path."""
    path = Path(repository) / DEMO_MODEL / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_mlp(seed=seed), str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo MLP into a model repository.")
    parser.add_argument("repository", type=Path, nargs="?", default=Path("models"))
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    print(write_demo_model(args.repository, args.version))


if __name__ == "__main__":
    main()
