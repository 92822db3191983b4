"""What both codecs share: limits, the decoded request, the bound feeds, validation.

A codec turns bytes into a :class:`Request` (no model needed yet) and later,
once the loop knows which model runs, :meth:`Request.bind` checks the tensors
against that model's :class:`~worker.signature.Signature`. Validation lives
here, once, so Arrow and msgpack requests fail with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.errors import SchemaMismatch, TooLarge
from worker.signature import Signature, TensorSpec, format_spec

__all__ = [
    "ARROW",
    "MSGPACK",
    "Bound",
    "Headers",
    "Limits",
    "Request",
    "Response",
    "check_elements",
    "describe",
    "validate_feeds",
]

ARROW = "application/vnd.apache.arrow.stream"
MSGPACK = "application/x-msgpack"

Headers = list[tuple[str, bytes]]
"""kafka-python's header form: ``[(name, value), ...]``; names may repeat."""


@dataclass(frozen=True)
class Limits:
    """Bounds checked before anything large is parsed or allocated."""

    max_bytes: int = 16 * 1024 * 1024
    """Whole record value; checked before parsing."""
    max_rows: int = 1_000_000
    """Axis 0 of any input."""
    max_elements: int = 64 * 1024 * 1024
    """Elements of one tensor, from its declared shape, before allocating."""


@dataclass
class Bound:
    """A request mapped onto one model's inputs, ready for ``session.run``."""

    feeds: dict[str, np.ndarray]
    """Exactly the model's input names."""
    rows: int
    """Axis-0 length shared by every feed."""
    passthrough: object = None
    """Arrow: a ``pa.Table`` of unconsumed columns (or None); msgpack: the body's value."""
    run_rows: int | None = None
    """Rows per ``session.run`` when the model fixes axis 0 (1: row by row); None: all."""

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Feeds cut into the runs the model accepts (one run unless axis 0 is fixed).

        Slicing axis 0 of a C-contiguous array is a view, so this copies nothing.
        """
        step = self.run_rows
        if not step or step >= self.rows:
            yield self.feeds
            return
        for start in range(0, self.rows, step):
            yield {name: arr[start : start + step] for name, arr in self.feeds.items()}


@dataclass
class Request:
    """A decoded envelope, not yet bound to a model."""

    format: str
    """``"arrow"`` or ``"msgpack"``."""
    model: str | None
    """Header ``model`` wins over the body field."""
    model_version: int | None
    """Header ``model-version`` wins over the body field."""
    request_id: str
    """Header, else body ``id``, else the default the loop passed in."""
    headers: Headers
    """As received; copied to the response."""
    _binder: Callable[[Signature], Bound] = field(repr=False, compare=False)

    def bind(self, signature: Signature) -> Bound:
        """Validate against ``signature`` and map to its inputs.

        Raises :class:`SchemaMismatch`, :class:`TooLarge` or :class:`DecodeError`
        (never anything else).
        """
        return self._binder(signature)


@dataclass
class Response:
    """A decoded response (for producer tools and tests)."""

    outputs: dict[str, object]
    """``np.ndarray`` per tensor output; ``list[dict]`` for map outputs."""
    request_id: str | None = None
    model: str | None = None
    model_version: int | None = None
    passthrough: object = None


def describe(arr: np.ndarray) -> str:
    """``float64[32,780]``; object arrays are the protocol's ``string``."""
    dtype: Any = "string" if arr.dtype == object else arr.dtype
    return format_spec(dtype, tuple(arr.shape))


def check_elements(name: str, shape: tuple[int, ...], limits: Limits) -> int:
    """Element count of ``shape``; :class:`TooLarge` before anyone allocates it."""
    count = math.prod(shape)  # Python ints: no overflow on hostile shapes
    if count > limits.max_elements:
        raise TooLarge(
            f"input {name!r}: shape {list(shape)} holds {count} elements, "
            f"over the limit of {limits.max_elements}"
        )
    if shape and shape[0] > limits.max_rows:
        raise TooLarge(f"input {name!r}: {shape[0]} rows, over the limit of {limits.max_rows}")
    return count


def _dtype_ok(spec: TensorSpec, arr: np.ndarray) -> bool:
    assert spec.dtype is not None
    if spec.dtype.kind in "US":
        return arr.dtype == object or arr.dtype.kind in "US"
    return arr.dtype == spec.dtype


def expected_inputs(signature: Signature) -> str:
    """``x float32[?,784], mask bool[?,784]``: appended to missing/unknown-input messages."""
    return ", ".join(f"{s.name} {format_spec(s.dtype, s.shape)}" for s in signature.inputs)


def _mismatch(spec: TensorSpec, arr: np.ndarray) -> SchemaMismatch:
    return SchemaMismatch.for_input(spec.name, format_spec(spec.dtype, spec.shape), describe(arr))


def validate_feeds(signature: Signature, feeds: dict[str, np.ndarray]) -> tuple[int, int | None]:
    """Check dtype, rank and every fixed axis; return ``(rows, run_rows)``.

    No silent casts: an int64 array for a float32 input is a mismatch, because a
    cast would hide a producer bug (and cost a copy on every message).
    """
    rows: int | None = None
    run_rows: int | None = None
    for spec in signature.inputs:
        arr = feeds[spec.name]
        if not spec.is_tensor:
            raise SchemaMismatch(
                f"input {spec.name!r} has type {spec.onnx_type}, which the protocol cannot feed"
            )
        if not _dtype_ok(spec, arr):
            raise _mismatch(spec, arr)
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise _mismatch(spec, arr)
            for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
                if want is None or want == got:
                    continue
                if axis == 0 and want == 1:
                    # Fixed at 1: the loop runs the rows one at a time.
                    run_rows = 1
                    continue
                raise _mismatch(spec, arr)
            if spec.shape and spec.shape[0] not in (None, 1):
                run_rows = run_rows or spec.shape[0]
        n = arr.shape[0] if arr.ndim else 1
        if rows is None:
            rows = n
        elif n != rows:
            raise SchemaMismatch(
                f"inputs disagree on the row count (axis 0): {spec.name!r} has {n}, "
                f"an earlier input has {rows}"
            )
    return rows or 0, run_rows
