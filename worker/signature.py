"""What a model accepts and returns, independent of ONNX Runtime objects.

The protocol layer validates requests against a :class:`Signature`; the
runtime builds one from a session. Keeping it here lets both sides (and the
producer tools) share it without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DYNAMIC", "FIXED", "Signature", "TensorSpec", "format_spec"]

DYNAMIC = "dynamic"
"""``Signature.row_axis()`` kind: every input has the same dynamic axis 0."""
FIXED = "fixed"
"""``Signature.row_axis()`` kind: every input fixes axis 0 at the same size."""

# ONNX Runtime type strings ("tensor(float)") -> numpy dtypes.
_ORT_TENSOR_DTYPES: dict[str, Any] = {
    "float": np.float32,
    "float16": np.float16,
    "double": np.float64,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "string": np.str_,
}
_TENSOR_RE = re.compile(r"^tensor\((\w+)\)$")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``shape`` holds ``None`` for every dynamic (symbolic or unknown) axis.
    ``dtype`` is ``None`` for non-tensor values (sequences, maps); ``onnx_type``
    always keeps ONNX Runtime's own type string for messages.
    """

    name: str
    onnx_type: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None
    axis0_symbol: str | None = None
    """The symbolic name of a dynamic axis 0 (``"batch"``), None when unnamed or fixed.
    Two inputs that name the same symbol promise the same length."""

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None

    @property
    def row_shape(self) -> tuple[int | None, ...]:
        """Shape of one sample: everything after axis 0."""
        return tuple(self.shape[1:]) if self.shape else ()

    @property
    def batch_axis(self) -> int | None:
        """Size of axis 0 when fixed, ``None`` when dynamic (or rank 0)."""
        return self.shape[0] if self.shape else None

    @classmethod
    def from_ort(cls, node: Any) -> TensorSpec:
        """Build from an ``onnxruntime.NodeArg``."""
        match = _TENSOR_RE.match(node.type or "")
        dtype = np.dtype(_ORT_TENSOR_DTYPES[match.group(1)]) if match else None
        shape = None
        symbol = None
        if match and node.shape is not None:
            shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
            if node.shape and isinstance(node.shape[0], str) and node.shape[0]:
                symbol = node.shape[0]
        return cls(
            name=node.name, onnx_type=node.type, dtype=dtype, shape=shape, axis0_symbol=symbol
        )


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Asked several times per request: worked out once from the (frozen) inputs.
    _row_axis: tuple[str, int | str | None] | None = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row_axis", _row_axis(self.inputs))

    @classmethod
    def from_session(cls, session: Any) -> Signature:
        """Build from an ``onnxruntime.InferenceSession``."""
        return cls(
            inputs=tuple(TensorSpec.from_ort(n) for n in session.get_inputs()),
            outputs=tuple(TensorSpec.from_ort(n) for n in session.get_outputs()),
        )

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def row_axis(self) -> tuple[str, int | str | None] | None:
        """The batch axis every input shares, or None when the inputs share none.

        ``(DYNAMIC, symbol)``: every input has a dynamic axis 0, all unnamed
        (symbol None) or all named alike; ``(FIXED, k)``: every input fixes
        axis 0 at k. None: a scalar input, a parameter-like input (a ``k``, a
        target shape) beside batched ones, or differently named dynamic axes:
        such a model's requests run alone, as sent. An input of unknown rank
        counts as an unnamed dynamic axis.
        """
        return self._row_axis


def _row_axis(inputs: tuple[TensorSpec, ...]) -> tuple[str, int | str | None] | None:
    """:meth:`Signature.row_axis` of these inputs."""
    kinds: set[tuple[str, int | str | None]] = set()
    for spec in inputs:
        if spec.shape is None:
            kinds.add((DYNAMIC, None))
        elif not spec.shape:
            return None  # a scalar has no axis 0 at all
        elif spec.shape[0] is None:
            kinds.add((DYNAMIC, spec.axis0_symbol))
        else:
            kinds.add((FIXED, spec.shape[0]))
    if len(kinds) != 1:
        return None
    return kinds.pop()


def format_spec(dtype: np.dtype | str | None, shape: tuple[int | None, ...] | None) -> str:
    """``float32[?,784]``: the notation every schema-mismatch message uses."""
    if dtype is None:
        name = "?"  # a non-tensor value
    elif isinstance(dtype, str) and dtype == "string":  # the protocol's name, not numpy's
        name = "string"
    else:
        name = "string" if np.dtype(dtype).kind in "USO" else str(np.dtype(dtype))
    dims = "" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{name}[{dims}]"
