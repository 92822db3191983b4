"""Where published rows come from: files, synthetic data, and the model they are for.

Every source becomes one array ``[rows, *row_shape]`` for one model input plus
optional per-row keys. Files are read whole: the tools are for test streams
and replays, not for terabytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from producers.errors import UsageError

__all__ = [
    "FILE_TYPES",
    "InputSpec",
    "Source",
    "model_input",
    "parse_shape",
    "read_file",
    "read_table",
    "synthetic",
    "table_source",
]

FILE_TYPES = (".npy", ".parquet", ".arrow", ".feather", ".csv")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class InputSpec:
    """The model input that publish feeds.

    ``dtype`` and ``row_shape`` are ``None`` when no model was read: then
    files keep their own dtype (tables become float32) and any shape goes.
    ``row_shape`` holds ``None`` for dynamic axes.
    """

    name: str = "x"
    dtype: np.dtype | None = None
    row_shape: tuple[int | None, ...] | None = None


@dataclass(frozen=True)
class Source:
    data: np.ndarray
    keys: list[bytes | None] | None
    description: str

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])


# --- the model ----------------------------------------------------------------


def _model_file(repository: Path, model: str, version: int | None) -> Path:
    # Same layouts and name rule as the worker (docs/models.md), so a name that the
    # worker would refuse is refused here before anything is sent.
    if not _MODEL_NAME.match(model):
        raise UsageError(f"--model {model!r} is not a valid model name")
    if not repository.is_dir():
        raise UsageError(f"--model-repository {str(repository)!r} is not a directory")
    versions: dict[int, Path] = {}
    flat = repository / f"{model}.onnx"
    if flat.is_file():
        versions[1] = flat
    model_dir = repository / model
    if model_dir.is_dir():
        for sub in model_dir.iterdir():
            if sub.name.isdigit() and int(sub.name) > 0 and (sub / "model.onnx").is_file():
                versions[int(sub.name)] = sub / "model.onnx"
    if not versions:
        raise UsageError(f"--model {model!r}: no such model in {str(repository)!r}")
    if version is None:
        return versions[max(versions)]
    if version not in versions:
        have = ", ".join(str(v) for v in sorted(versions))
        raise UsageError(f"--model {model!r} has no version {version} (has {have})")
    return versions[version]


def model_input(
    repository: Path, model: str, version: int | None, input_name: str | None
) -> InputSpec:
    """Read the input's name, dtype and per-row shape from the model file.

    Uses the ``onnx`` graph (no ONNX Runtime session): cheap, and the same
    declared signature the worker validates against.
    """
    import onnx
    from onnx import helper

    path = _model_file(repository, model, version)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # any parse failure means "unreadable"
        raise UsageError(f"cannot read model file {str(path)!r}: {exc}") from exc
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    if input_name is None:
        if len(inputs) != 1:
            raise UsageError(
                f"model {model!r} has inputs {names}; publish feeds one, pick it with --input"
            )
        chosen = inputs[0]
    else:
        match = [i for i in inputs if i.name == input_name]
        if not match:
            raise UsageError(f"--input {input_name!r}: model {model!r} has inputs {names}")
        chosen = match[0]
    tensor = chosen.type.tensor_type
    if not chosen.type.HasField("tensor_type"):
        raise UsageError(f"input {chosen.name!r} of model {model!r} is not a tensor")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor.shape.dim]
    return InputSpec(name=chosen.name, dtype=dtype, row_shape=tuple(dims[1:]))


# --- synthetic data -----------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"784"`` -> ``(784,)``; ``"1,28,28"`` -> ``(1, 28, 28)``; ``""`` -> ``()``."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--synthetic {text!r}: expected a per-row shape like 784 or 1,28,28"
                         ) from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"--synthetic {text!r}: every dimension must be positive")
    return shape


def synthetic(shape_text: str, rows: int, seed: int, spec: InputSpec) -> Source:
    """Random rows in [0, 1) (floats) or [0, 100) (integers), reproducible by ``seed``.

    ``shape_text`` ``auto`` takes the per-row shape from the model.
    """
    if rows <= 0:
        raise UsageError(f"--rows must be positive, got {rows}")
    if shape_text == "auto":
        if spec.row_shape is None or any(d is None for d in spec.row_shape):
            raise UsageError("--synthetic auto needs --model-repository and a model "
                             "whose per-row shape is fixed")
        shape = tuple(int(d) for d in spec.row_shape if d is not None)
    else:
        shape = parse_shape(shape_text)
    dtype = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
    rng = np.random.default_rng(seed)
    full = (rows, *shape)
    if dtype.kind == "f":
        data = rng.random(full).astype(dtype)
    elif dtype.kind in "iu":
        data = rng.integers(0, 100, size=full).astype(dtype)
    elif dtype.kind == "b":
        data = rng.random(full) < 0.5
    else:
        raise UsageError(f"--synthetic cannot make {dtype} data for input {spec.name!r}")
    return _fit(Source(data, None, f"synthetic {list(full)}"), spec)


# --- files --------------------------------------------------------------------


def read_file(path: Path, spec: InputSpec, key_column: str | None = None) -> Source:
    """Read ``path`` into rows for ``spec``; one-line :class:`UsageError` on anything wrong."""
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise UsageError(
            f"--from {str(path)!r}: unsupported file type {suffix or '(none)'!r} "
            f"(expected {', '.join(FILE_TYPES)})"
        )
    if not path.is_file():
        raise UsageError(f"--from {str(path)!r}: no such file")
    try:
        if suffix == ".npy":
            if key_column is not None:
                raise UsageError("--key-column needs a table (.parquet, .arrow, .feather, .csv)")
            data = np.load(path, allow_pickle=False)
            if data.ndim == 0:
                raise UsageError(f"--from {str(path)!r}: a scalar, expected rows on axis 0")
            return _fit(Source(data, None, str(path)), spec)
        table = read_table(path)
    except UsageError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--from {str(path)!r}: cannot read it: {first}") from exc
    return table_source(table, spec, str(path), key_column)


def table_source(
    table: pa.Table, spec: InputSpec, desc: str, key_column: str | None = None
) -> Source:
    """The rows of a table read by :func:`read_table`, shaped for ``spec``."""
    return _fit(_from_table(table, spec, key_column, desc), spec)


def read_table(path: Path) -> pa.Table:
    """A .parquet, .csv, .feather or .arrow file (IPC file or stream format) as a table."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if suffix == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path)
    if suffix == ".feather":
        import pyarrow.feather as feather

        return feather.read_table(path)
    import pyarrow.ipc as ipc

    # .arrow is either the IPC file or the IPC stream format; accept both.
    try:
        with ipc.open_file(path) as reader:
            return reader.read_all()
    except pa.ArrowInvalid:
        with ipc.open_stream(path) as reader:
            return reader.read_all()


def _from_table(table: pa.Table, spec: InputSpec, key_column: str | None, desc: str) -> Source:
    keys: list[bytes | None] | None = None
    if key_column is not None:
        if key_column not in table.column_names:
            raise UsageError(f"--key-column {key_column!r}: no such column in {desc!r} "
                             f"(columns: {', '.join(table.column_names)})")
        keys = [None if v is None else (v if isinstance(v, bytes) else str(v).encode())
                for v in table.column(key_column).to_pylist()]
    if spec.name in table.column_names:
        # A column named like the input carries whole rows (fixed-size list or tensor).
        data = _column_to_numpy(table.column(spec.name), spec.name, desc)
        return Source(data, keys, desc)
    columns = [n for n in table.column_names if n != key_column]
    if not columns:
        raise UsageError(f"--from {desc!r}: no feature columns")
    arrays = []
    for name in columns:
        column = table.column(name)
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)):
            raise UsageError(
                f"--from {desc!r}: column {name!r} is {kind}, not numeric; input {spec.name!r} "
                "takes numeric columns only (name an id column with --key-column)"
            )
        if column.null_count:
            raise UsageError(f"--from {desc!r}: column {name!r} has {column.null_count} "
                             "empty values")
        arrays.append(column.to_numpy())
    dtype = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
    return Source(np.stack(arrays, axis=1).astype(dtype), keys, desc)


def _column_to_numpy(column: pa.ChunkedArray, name: str, desc: str) -> np.ndarray:
    array: Any = column.combine_chunks()
    if isinstance(array, pa.ExtensionArray) and isinstance(array.type, pa.FixedShapeTensorType):
        return np.asarray(array.to_numpy_ndarray())
    shape = [len(array)]
    values = array
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
            or pa.types.is_boolean(values.type)):
        raise UsageError(f"--from {desc!r}: column {name!r} is {column.type}, not a numeric "
                         "fixed-size list or tensor")
    if values.null_count:
        raise UsageError(f"--from {desc!r}: column {name!r} has empty values")
    return np.asarray(values.to_numpy(zero_copy_only=False)).reshape(shape)


def _fit(source: Source, spec: InputSpec) -> Source:
    """Cast to the model's dtype and check (or reshape to) its per-row shape."""
    data = source.data
    if spec.dtype is not None and data.dtype != spec.dtype:
        data = data.astype(spec.dtype)
    if spec.row_shape is not None:
        want = spec.row_shape
        got = data.shape[1:]
        if not _shape_matches(got, want):
            fixed = all(d is not None for d in want)
            size = int(np.prod([d for d in want if d is not None])) if want else 1
            if fixed and int(np.prod(got)) == size:
                # 28x28 images into a 784-wide input: same numbers, same order.
                data = data.reshape((data.shape[0], *[int(d) for d in want if d is not None]))
            else:
                from worker.signature import format_spec

                raise UsageError(
                    f"input {spec.name!r} expects rows of {format_spec(spec.dtype, want)}, "
                    f"{source.description} has rows of shape {list(got)}"
                )
    return Source(data, source.keys, source.description)


def _shape_matches(got: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    if len(got) != len(want):
        return False
    return all(w is None or w == g for g, w in zip(got, want, strict=True))
