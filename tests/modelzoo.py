"""Small, deterministic ONNX models for tests, written into a model repository.

Every builder has the shape ``write_X(repo, name=..., version=1) -> Path`` and
writes ``repo/<name>/<version>/model.onnx``. Weights come from fixed seeds, so
two runs produce the same bytes. :data:`ZOO` lists them all and
:func:`sample_feeds` makes valid inputs for any of them from its signature.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker import samples
from worker.demo import build_mlp
from worker.signature import Signature

__all__ = [
    "STRING_VOCAB",
    "UNBATCHED_ZOO",
    "ZOO",
    "sample_feeds",
    "write_cnn",
    "write_corrupt",
    "write_diabetes_regressor",
    "write_double",
    "write_fixed_batch1",
    "write_fixed_batch4",
    "write_float16",
    "write_int64",
    "write_iris_logreg",
    "write_mlp",
    "write_pairwise",
    "write_reshape",
    "write_scale_by_scalar",
    "write_slow",
    "write_split",
    "write_string_labels",
    "write_topk",
    "write_two_io",
]

_OPSET = 17
STRING_VOCAB = ("cat", "dog", "bird")


def _path(repo: Path, name: str, version: int) -> Path:
    path = Path(repo) / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(model: onnx.ModelProto, repo: Path, name: str, version: int) -> Path:
    model.ir_version = 8  # loadable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    path = _path(repo, name, version)
    onnx.save(model, str(path))
    return path


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    *,
    ml: bool = False,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "zoo", inputs, outputs,
        initializer=[numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    opsets = [helper.make_opsetid("", _OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 3))
    return helper.make_model(graph, opset_imports=opsets, producer_name="tests.modelzoo")


def _vi(name: str, elem: int, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def write_mlp(repo: Path, name: str = "mnist-mlp", version: int = 1, seed: int = 7) -> Path:
    """The demo MLP: x float32[?,784] -> probs float32[?,10]."""
    model = build_mlp(seed=seed)
    path = _path(repo, name, version)
    onnx.save(model, str(path))
    return path


def write_two_io(repo: Path, name: str = "two-io", version: int = 1) -> Path:
    """a, b float32[?,3] -> sum, prod float32[?,3]."""
    model = _model(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["prod"]),
        ],
        [_vi("a", TensorProto.FLOAT, ["batch", 3]), _vi("b", TensorProto.FLOAT, ["batch", 3])],
        [_vi("sum", TensorProto.FLOAT, ["batch", 3]), _vi("prod", TensorProto.FLOAT, ["batch", 3])],
    )
    return _save(model, repo, name, version)


def write_int64(repo: Path, name: str = "int64-affine", version: int = 1) -> Path:
    """x int64[?,4] -> y int64[?,4] = 3x + 1."""
    model = _model(
        [
            helper.make_node("Mul", ["x", "three"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["y"]),
        ],
        [_vi("x", TensorProto.INT64, ["batch", 4])],
        [_vi("y", TensorProto.INT64, ["batch", 4])],
        {"three": np.array(3, np.int64), "one": np.array(1, np.int64)},
    )
    return _save(model, repo, name, version)


def write_float16(repo: Path, name: str = "fp16-linear", version: int = 1) -> Path:
    """x float16[?,8] -> y float16[?,4]; computed in float32 (CPU kernels), cast at the edges."""
    rng = np.random.default_rng(16)
    model = _model(
        [
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x32", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT16),
        ],
        [_vi("x", TensorProto.FLOAT16, ["batch", 8])],
        [_vi("y", TensorProto.FLOAT16, ["batch", 4])],
        {"w": rng.normal(0, 0.5, (8, 4)).astype(np.float32)},
    )
    return _save(model, repo, name, version)


def write_double(repo: Path, name: str = "double-linear", version: int = 1) -> Path:
    """x float64[?,5] -> y float64[?,2]."""
    rng = np.random.default_rng(64)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [_vi("x", TensorProto.DOUBLE, ["batch", 5])],
        [_vi("y", TensorProto.DOUBLE, ["batch", 2])],
        {"w": rng.normal(size=(5, 2)), "b": rng.normal(size=2)},
    )
    return _save(model, repo, name, version)


def _fixed_batch(repo: Path, name: str, version: int, batch: int) -> Path:
    rng = np.random.default_rng(batch)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_vi("x", TensorProto.FLOAT, [batch, 4])],
        [_vi("y", TensorProto.FLOAT, [batch, 2])],
        {"w": rng.normal(size=(4, 2)).astype(np.float32)},
    )
    return _save(model, repo, name, version)


def write_fixed_batch1(repo: Path, name: str = "fixed-batch1", version: int = 1) -> Path:
    """x float32[1,4] -> y float32[1,2]: the worker must run it row by row."""
    return _fixed_batch(repo, name, version, 1)


def write_fixed_batch4(repo: Path, name: str = "fixed-batch4", version: int = 1) -> Path:
    """x float32[4,4] -> y float32[4,2]: a message must hold exactly 4 rows."""
    return _fixed_batch(repo, name, version, 4)


def write_string_labels(repo: Path, name: str = "string-labels", version: int = 1) -> Path:
    """word string[?,1] -> label int64[?,1]: cat 0, dog 1, bird 2, anything else -1."""
    model = _model(
        [
            helper.make_node(
                "LabelEncoder", ["word"], ["label"], domain="ai.onnx.ml",
                keys_strings=list(STRING_VOCAB), values_int64s=list(range(len(STRING_VOCAB))),
                default_int64=-1,
            )
        ],
        [_vi("word", TensorProto.STRING, ["batch", 1])],
        [_vi("label", TensorProto.INT64, ["batch", 1])],
        ml=True,
    )
    return _save(model, repo, name, version)


def _convert_sklearn(estimator: Any, n_features: int, **kwargs: Any) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with warnings.catch_warnings():  # converter deprecation chatter is not ours
        warnings.simplefilter("ignore")
        model = convert_sklearn(
            estimator, initial_types=[("float_input", FloatTensorType([None, n_features]))],
            target_opset={"": _OPSET, "ai.onnx.ml": 3}, **kwargs,
        )
    return model


def write_iris_logreg(repo: Path, name: str = "iris-logreg", version: int = 1) -> Path:
    """scikit-learn LogisticRegression on iris.

    float_input float32[?,4] -> output_label int64[?],
    output_probability seq(map(int64, float)) (the ZipMap a classifier gets by default).
    """
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500).fit(x, y)
    model = _convert_sklearn(clf, 4)
    path = _path(repo, name, version)
    onnx.save(model, str(path))
    return path


def write_diabetes_regressor(repo: Path, name: str = "diabetes-forest", version: int = 1) -> Path:
    """scikit-learn RandomForestRegressor (5 shallow trees) on diabetes.

    float_input float32[?,10] -> variable float32[?,1] (a TreeEnsembleRegressor).
    """
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import RandomForestRegressor

    x, y = load_diabetes(return_X_y=True)
    reg = RandomForestRegressor(n_estimators=5, max_depth=4, random_state=0).fit(x, y)
    model = _convert_sklearn(reg, 10)
    path = _path(repo, name, version)
    onnx.save(model, str(path))
    return path


def write_cnn(repo: Path, name: str = "small-cnn", version: int = 1) -> Path:
    """image float32[?,1,28,28] -> Conv 4@3x3, Relu, MaxPool 2 -> Gemm -> logits float32[?,10]."""
    rng = np.random.default_rng(28)
    model = _model(
        [
            helper.make_node("Conv", ["image", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "gw", "gb"], ["logits"]),
        ],
        [_vi("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [_vi("logits", TensorProto.FLOAT, ["batch", 10])],
        {
            "cw": rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32),
            "cb": np.zeros(4, np.float32),
            "gw": rng.normal(0, 0.05, (4 * 14 * 14, 10)).astype(np.float32),
            "gb": np.zeros(10, np.float32),
        },
    )
    return _save(model, repo, name, version)


def write_slow(
    repo: Path, name: str = "slow", version: int = 1, ms_per_run: float = 20.0
) -> Path:
    """x float32[?,16] -> y float32[?,4], taking roughly ``ms_per_run`` ms on one core.

    The cost is a chain of 256x256 MatMul+Tanh links whose first operand
    depends on the input (so constant folding cannot remove it) and does not
    grow with the batch: about 0.33 ms per link on one current x86 core, so
    three links per requested ms (slower CPUs run it slower). One shared
    weight keeps the file small (~0.5 MB).
    """
    n, links = 256, max(1, round(ms_per_run * 3))
    rng = np.random.default_rng(256)
    w = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Add", ["base", "m"], ["h0"]),
    ]
    for i in range(links):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"mm{i}"]))
        nodes.append(helper.make_node("Tanh", [f"mm{i}"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"h{links}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "tiny"], ["ts"]),
        helper.make_node("MatMul", ["x", "wx"], ["xw"]),
        helper.make_node("Add", ["xw", "ts"], ["y"]),
    ]
    model = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, ["batch", 16])],
        [_vi("y", TensorProto.FLOAT, ["batch", 4])],
        {
            "base": rng.normal(size=(n, n)).astype(np.float32),
            "w": w,
            "tiny": np.array(1e-3, np.float32),
            "wx": rng.normal(size=(16, 4)).astype(np.float32),
        },
    )
    return _save(model, repo, name, version)


def write_corrupt(repo: Path, name: str = "corrupt", version: int = 1) -> Path:
    """Garbage bytes named model.onnx: loading it must fail as model-load-error."""
    path = _path(repo, name, version)
    path.write_bytes(b"this is not an ONNX model\x00\xff\xfe" * 8)
    return path


# -- models whose inputs share no batch axis (requests run alone, as sent) -----


def write_reshape(repo: Path, name: str = "reshape", version: int = 1) -> Path:
    """x float32[batch,6], shape int64[2] (a target shape) -> y float32[?,?] = reshape(x)."""
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [_vi("x", TensorProto.FLOAT, ["batch", 6]), _vi("shape", TensorProto.INT64, [2])],
        [_vi("y", TensorProto.FLOAT, [None, None])],
    )
    return _save(model, repo, name, version)


def write_topk(repo: Path, name: str = "topk", version: int = 1) -> Path:
    """x float32[batch,10], k int64[1] -> values float32[batch,k], indices int64[batch,k]."""
    model = _model(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)],
        [_vi("x", TensorProto.FLOAT, ["batch", 10]), _vi("k", TensorProto.INT64, [1])],
        [_vi("values", TensorProto.FLOAT, ["batch", None]),
         _vi("indices", TensorProto.INT64, ["batch", None])],
    )
    return _save(model, repo, name, version)


def write_split(repo: Path, name: str = "split", version: int = 1) -> Path:
    """x float32[n], split int64[2] -> head float32[split0], tail float32[split1]:
    two outputs of different leading sizes."""
    model = _model(
        [helper.make_node("Split", ["x", "split"], ["head", "tail"], axis=0)],
        [_vi("x", TensorProto.FLOAT, ["n"]), _vi("split", TensorProto.INT64, [2])],
        [_vi("head", TensorProto.FLOAT, [None]), _vi("tail", TensorProto.FLOAT, [None])],
    )
    return _save(model, repo, name, version)


def write_scale_by_scalar(repo: Path, name: str = "scale-by-scalar", version: int = 1) -> Path:
    """x float32[batch,3], scale float32[] (a 0-d scalar) -> y float32[batch,3] = x * scale,
    total float32[] = sum(y)."""
    model = _model(
        [
            helper.make_node("Mul", ["x", "scale"], ["y"]),
            helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0),
        ],
        [_vi("x", TensorProto.FLOAT, ["batch", 3]), _vi("scale", TensorProto.FLOAT, [])],
        [_vi("y", TensorProto.FLOAT, ["batch", 3]), _vi("total", TensorProto.FLOAT, [])],
    )
    return _save(model, repo, name, version)


def write_pairwise(repo: Path, name: str = "pairwise", version: int = 1) -> Path:
    """queries float32[n,4], corpus float32[m,4] (differently named dynamic axes) ->
    scores float32[n,m] = queries @ corpus.T, centroid float32[4] = mean(corpus):
    coalescing two requests would mix their corpora."""
    model = _model(
        [
            helper.make_node("Transpose", ["corpus"], ["ct"], perm=[1, 0]),
            helper.make_node("MatMul", ["queries", "ct"], ["scores"]),
            helper.make_node("ReduceMean", ["corpus"], ["centroid"], axes=[0], keepdims=0),
        ],
        [_vi("queries", TensorProto.FLOAT, ["n", 4]), _vi("corpus", TensorProto.FLOAT, ["m", 4])],
        [_vi("scores", TensorProto.FLOAT, ["n", "m"]), _vi("centroid", TensorProto.FLOAT, [4])],
    )
    return _save(model, repo, name, version)


ZOO: dict[str, Callable[..., Path]] = {
    "mnist-mlp": write_mlp,
    "two-io": write_two_io,
    "int64-affine": write_int64,
    "fp16-linear": write_float16,
    "double-linear": write_double,
    "fixed-batch1": write_fixed_batch1,
    "fixed-batch4": write_fixed_batch4,
    "string-labels": write_string_labels,
    "iris-logreg": write_iris_logreg,
    "diabetes-forest": write_diabetes_regressor,
    "small-cnn": write_cnn,
    "slow": write_slow,
}
"""Default name -> builder, for every loadable batched model above."""

UNBATCHED_ZOO: dict[str, Callable[..., Path]] = {
    "reshape": write_reshape,
    "topk": write_topk,
    "split": write_split,
    "scale-by-scalar": write_scale_by_scalar,
    "pairwise": write_pairwise,
}
"""Default name -> builder, for the models whose inputs share no batch axis."""


# Parameter-like inputs of the models above: values that make a valid run.
_PARAMETERS: dict[str, Callable[[int], np.ndarray]] = {
    "shape": lambda rows: np.array([rows * 3, 2], np.int64),
    "k": lambda rows: np.array([3], np.int64),
    "split": lambda rows: np.array([1, rows - 1], np.int64),
    "scale": lambda rows: np.array(2.0, np.float32),
}


def sample_feeds(signature: Signature, rows: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid inputs for ``signature``; a fixed batch axis overrides ``rows``."""
    return samples.sample_feeds(
        signature, rows, seed=seed, ints=(0, 100), strings=(*STRING_VOCAB, "unknown"),
        values=_PARAMETERS,
    )
