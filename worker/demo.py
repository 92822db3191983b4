"""The demo model: the classic MNIST MLP, trained on real handwritten digits.

784 inputs -> Dense 32 (relu) -> Dropout 0.2 (identity at inference) -> Dense
10 (softmax), exported as ONNX. Axis 0 (the batch) is dynamic.

Two ways to get its weights:

* :func:`build_mlp` / :func:`write_demo_model`: fixed-seed random weights, so
  every machine builds the same bytes in milliseconds (the tests use these);
* :func:`train_mlp` on :func:`load_digits_28x28`: scikit-learn's bundled
  handwritten digits (1,797 scans of 8x8 pixels, no download), upsampled to
  MNIST's 28x28, trained by a few seconds of numpy on a CPU; ``make demo``
  streams the held-out digits through the worker and reports its accuracy.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "DEMO_INPUT",
    "DEMO_MODEL",
    "DEMO_OUTPUT",
    "Digits",
    "Trained",
    "build_mlp",
    "load_digits_28x28",
    "main",
    "predict",
    "train_mlp",
    "write_demo_model",
    "write_held_out",
    "write_trained_model",
]

DEMO_MODEL = "mnist-mlp"
DEMO_INPUT = "x"
DEMO_OUTPUT = "probs"


Weights = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(w1 [784,32], b1 [32], w2 [32,10], b2 [10])``, float32."""


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    # Glorot-uniform, as Keras would initialise the layers.
    lim = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-lim, lim, size=(fan_in, fan_out)).astype(np.float32)


def build_mlp(
    seed: int = 7,
    hidden: int = 32,
    n_in: int = 784,
    n_out: int = 10,
    weights: Weights | None = None,
) -> onnx.ModelProto:
    """The MLP as ONNX; ``weights`` from :func:`train_mlp`, else fixed-seed random ones."""
    if weights is None:
        rng = np.random.default_rng(seed)
        w1, b1 = _glorot(rng, n_in, hidden), rng.normal(0, 0.05, hidden).astype(np.float32)
        w2, b2 = _glorot(rng, hidden, n_out), rng.normal(0, 0.05, n_out).astype(np.float32)
    else:
        w1, b1, w2, b2 = (np.ascontiguousarray(w, dtype=np.float32) for w in weights)
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


# -- real data: scikit-learn's handwritten digits at MNIST's size --------------------------


@dataclass(frozen=True)
class Digits:
    """Train and held-out digits as MNIST-shaped float32 rows in [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    images_test: np.ndarray
    """The held-out digits' original 8x8 scans (0..16), for printing."""


def _to_28x28(images: np.ndarray) -> np.ndarray:
    """8x8 scans -> 28x28: each pixel becomes 3x3 (24x24), centred in a 2-pixel border,
    as MNIST centres its digits in a 20x20 box inside 28x28."""
    big = np.kron(images, np.ones((3, 3), dtype=images.dtype))
    return np.pad(big, ((0, 0), (2, 2), (2, 2)))


def load_digits_28x28(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """scikit-learn's bundled digits (no download), stratified train/held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)
    x = (_to_28x28(images) / 16.0).reshape(len(images), 784).astype(np.float32)
    y = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
    )
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test], images[idx_test])


@dataclass(frozen=True)
class Trained:
    weights: Weights
    epochs: int
    seconds: float
    train_accuracy: float


def predict(weights: Weights, x: np.ndarray) -> np.ndarray:
    """The inference graph in numpy (dropout is the identity): class probabilities."""
    w1, b1, w2, b2 = weights
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def train_mlp(
    x: np.ndarray,
    y: np.ndarray,
    *,
    hidden: int = 32,
    dropout: float = 0.2,
    epochs: int = 40,
    batch: int = 32,
    lr: float = 0.003,
    seed: int = 0,
) -> Trained:
    """Minibatch Adam on softmax cross-entropy, dropout after the hidden relu, as the
    Keras MNIST example trains this network. A few seconds of numpy on one core."""
    start = time.monotonic()
    rng = np.random.default_rng(seed)
    n, n_in = x.shape
    n_out = int(y.max()) + 1
    params = [
        _glorot(rng, n_in, hidden),
        np.zeros(hidden, np.float32),
        _glorot(rng, hidden, n_out),
        np.zeros(n_out, np.float32),
    ]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    onehot = np.eye(n_out, dtype=np.float32)[y]
    beta1, beta2, eps, step = 0.9, 0.999, 1e-7, 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            xb, tb = x[idx], onehot[idx]
            w1, b1, w2, b2 = params
            h = xb @ w1 + b1
            keep = (rng.random(h.shape) >= dropout).astype(np.float32) / (1 - dropout)
            d = np.maximum(h, 0) * keep
            logits = d @ w2 + b2
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            g_logits = (p - tb) / len(idx)
            g_d = g_logits @ w2.T
            g_h = g_d * keep * (h > 0)
            grads = [xb.T @ g_h, g_h.sum(axis=0), d.T @ g_logits, g_logits.sum(axis=0)]
            step += 1
            for j, g in enumerate(grads):
                moments[j] = beta1 * moments[j] + (1 - beta1) * g
                squares[j] = beta2 * squares[j] + (1 - beta2) * g * g
                m_hat = moments[j] / (1 - beta1**step)
                v_hat = squares[j] / (1 - beta2**step)
                params[j] = (params[j] - lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
    weights: Weights = (params[0], params[1], params[2], params[3])
    accuracy = float((predict(weights, x).argmax(axis=1) == y).mean())
    return Trained(weights, epochs, time.monotonic() - start, accuracy)


def write_trained_model(repository: Path, trained: Trained, version: int = 1) -> Path:
    """Write the trained MLP as ``<repository>/mnist-mlp/<version>/model.onnx``."""
    path = Path(repository) / DEMO_MODEL / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_mlp(weights=trained.weights), str(path))
    return path


def write_held_out(path: Path, digits: Digits) -> Path:
    """The held-out digits as a publish source: ``.npy`` (the rows) or ``.parquet``
    (column ``x``, one 784-float row each, beside ``label``)."""
    path = Path(path)
    if path.suffix == ".npy":
        np.save(path, digits.x_test)
        return path
    if path.suffix != ".parquet":
        raise SystemExit(f"--held-out: expected a .npy or .parquet file name, got {str(path)!r}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pa.FixedSizeListArray.from_arrays(pa.array(digits.x_test.ravel()), 784)
    pq.write_table(pa.table({DEMO_INPUT: rows, "label": pa.array(digits.y_test)}), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo MLP into a model repository.")
    parser.add_argument("repository", type=Path, nargs="?", default=Path("models"))
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument(
        "--trained",
        action="store_true",
        help="train it on scikit-learn's digits (a few seconds) instead of fixed-seed weights",
    )
    parser.add_argument(
        "--held-out",
        metavar="FILE",
        type=Path,
        help="with --trained: also write the held-out digits (.npy or .parquet)",
    )
    args = parser.parse_args(argv)
    if args.held_out is not None and not args.trained:
        parser.error("--held-out needs --trained")
    if not args.trained:
        print(write_demo_model(args.repository, args.version))
        return
    digits = load_digits_28x28()
    print(write_trained_model(args.repository, train_mlp(digits.x_train, digits.y_train),
                              args.version))
    if args.held_out is not None:
        print(write_held_out(args.held_out, digits))


if __name__ == "__main__":
    main()
