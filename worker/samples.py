"""Inputs made up from a model's signature: one generator for every caller.

Three callers, three sets of rules, all parameters of :func:`sample_feeds`:

- warm-up (:func:`worker.runtime.warmup_feeds`): zeros and empty strings,
  ``zeros=True``; it exercises the kernels and needs no data;
- the default sample of ``inference-worker optimize``'s gate: seeded random
  values, whole fixed batches that cover ``rows`` (``whole_batches=True``),
  no string inputs (random words would not be the model's vocabulary);
- the test model zoo: seeded random values, strings from a vocabulary,
  parameter-like inputs (a ``k``, a target shape) given by name (``values``).

The shape rule is the same for all: a dynamic axis 0 (the batch) gets
``rows``, any other dynamic axis 1, fixed axes are kept, and a 0-d input
stays 0-d.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from worker.errors import InferenceWorkerError
from worker.signature import Signature, TensorSpec

__all__ = ["SampleError", "sample_feeds", "sample_shape"]


class SampleError(InferenceWorkerError, ValueError):
    """No value can be made up for input ``input_name`` (a sequence, a map, or strings
    without a vocabulary); the message names the input and its ONNX type."""

    def __init__(self, input_name: str, onnx_type: str) -> None:
        super().__init__(f"input {input_name!r} is {onnx_type}")
        self.input_name = input_name
        self.onnx_type = onnx_type


def sample_shape(spec: TensorSpec, rows: int, *, whole_batches: bool = False) -> tuple[int, ...]:
    """The shape :func:`sample_feeds` gives ``spec`` (which must have a known rank).

    ``whole_batches``: a fixed axis 0 of size ``b`` becomes ``b * ceil(rows / b)``,
    as many whole batches as cover ``rows``; otherwise it stays ``b``.
    """
    if spec.shape is None:
        raise SampleError(spec.name, spec.onnx_type)
    dims = [1 if d is None else d for d in spec.shape]
    if dims and spec.shape[0] is None:
        dims[0] = rows
    elif dims and whole_batches:
        dims[0] *= max(1, math.ceil(rows / max(1, dims[0])))
    return tuple(dims)


def sample_feeds(
    signature: Signature,
    rows: int = 1,
    *,
    zeros: bool = False,
    seed: int = 0,
    ints: tuple[int, int] = (0, 10),
    strings: Sequence[str] | None = None,
    whole_batches: bool = False,
    values: Mapping[str, Callable[[int], np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """One array per input of ``signature``, shaped by the module's rule.

    ``zeros``: every value is its dtype's zero (``""`` for strings) and nothing
    is random. Otherwise, from ``numpy.random.default_rng(seed)``, input by
    input: standard-normal floats, integers in ``[ints[0], ints[1])``, random
    bools, and words drawn from ``strings`` (``None``: a string input raises).
    ``values`` maps an input name to ``f(rows)`` giving its exact value, for
    inputs that are parameters rather than data. ``whole_batches``: see
    :func:`sample_shape`.

    Raises :class:`SampleError` for an input that is not a tensor of known
    rank, or a string input when there is no ``strings`` to draw from.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        if spec.dtype is None or spec.shape is None:
            raise SampleError(spec.name, spec.onnx_type)
        shape = sample_shape(spec, rows, whole_batches=whole_batches)
        text = spec.dtype.kind in "USO"
        if values is not None and spec.name in values:
            feeds[spec.name] = values[spec.name](rows)
        elif zeros:
            feeds[spec.name] = (
                np.full(shape, "", dtype=object) if text else np.zeros(shape, dtype=spec.dtype)
            )
        elif text:
            if not strings:
                raise SampleError(spec.name, spec.onnx_type)
            picks = rng.integers(0, len(strings), math.prod(shape))
            feeds[spec.name] = np.array([strings[i] for i in picks], dtype=object).reshape(shape)
        elif spec.dtype.kind in "iu":
            feeds[spec.name] = rng.integers(ints[0], ints[1], shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.normal(size=shape).astype(spec.dtype)
    return feeds
