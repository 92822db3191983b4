"""The demo model trained on real digits: data shape, accuracy, and an ONNX export that
computes what numpy computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from worker.demo import (
    DEMO_INPUT,
    Digits,
    Trained,
    build_mlp,
    load_digits_28x28,
    predict,
    train_mlp,
    write_trained_model,
)
from worker.signature import Signature


@pytest.fixture(scope="module")
def digits() -> Digits:
    return load_digits_28x28()


@pytest.fixture(scope="module")
def trained(digits: Digits) -> Trained:
    return train_mlp(digits.x_train, digits.y_train)


def test_digits_are_mnist_shaped_and_held_out(digits: Digits) -> None:
    assert digits.x_train.shape[1:] == digits.x_test.shape[1:] == (784,)
    assert digits.x_train.dtype == np.float32
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert set(digits.y_test.tolist()) == set(range(10))  # stratified: every class held out
    # The 28x28 frame keeps MNIST's empty border around the digit.
    frames = digits.x_test.reshape(-1, 28, 28)
    assert frames[:, :2, :].max() == 0 and frames[:, :, -2:].max() == 0
    assert digits.images_test.shape == (len(digits.y_test), 8, 8)


def test_training_takes_seconds_and_generalises(digits: Digits, trained: Trained) -> None:
    assert trained.seconds < 60
    held_out = (predict(trained.weights, digits.x_test).argmax(axis=1) == digits.y_test).mean()
    assert held_out > 0.9
    assert trained.train_accuracy >= held_out - 0.01


def test_onnx_export_matches_numpy(tmp_path: Path, digits: Digits, trained: Trained) -> None:
    path = write_trained_model(tmp_path, trained)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    signature = Signature.from_session(session)
    assert [(s.name, s.shape) for s in signature.inputs] == [(DEMO_INPUT, (None, 784))]
    (probs,) = session.run(None, {DEMO_INPUT: digits.x_test})
    np.testing.assert_allclose(probs, predict(trained.weights, digits.x_test), atol=1e-5)
    ops = [n.op_type for n in build_mlp(weights=trained.weights).graph.node]
    assert ops == ["Gemm", "Relu", "Dropout", "Gemm", "Softmax"]
