"""What every codec shares: the :class:`Codec` interface, limits, the decoded
request, the bound feeds, validation.

A codec turns bytes into a :class:`Request` (no model needed yet) and later,
once the loop knows which model runs, :meth:`Request.bind` checks the tensors
against that model's :class:`~worker.signature.Signature`. Validation lives
here, once, so Arrow, msgpack and JSON requests fail with the same words.

Adding a wire format is one new module with one class that satisfies
:class:`Codec`, registered in ``worker/protocol/__init__.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from worker.errors import DecodeError, SchemaMismatch, TooLarge, WorkerError
from worker.signature import FIXED, Signature, TensorSpec, format_spec

__all__ = [
    "ARROW",
    "JSON",
    "MSGPACK",
    "Bound",
    "Codec",
    "Envelope",
    "Headers",
    "HeadersIn",
    "Limits",
    "Outputs",
    "Request",
    "Response",
    "bind_tensors",
    "check_elements",
    "describe",
    "expected_inputs",
    "validate_feeds",
]

ARROW = "application/vnd.apache.arrow.stream"
MSGPACK = "application/x-msgpack"
JSON = "application/json"

Headers = list[tuple[str, bytes | None]]
"""The Kafka clients' header form: ``[(name, value), ...]``; names may repeat,
values may be NULL (None)."""
HeadersIn = Sequence[tuple[str | bytes, bytes | None]]
"""Headers as received: a name the Kafka layer could not decode arrives as bytes."""
Outputs = dict[str, object]
"""Output name -> ``np.ndarray`` (a tensor) or ``list`` (e.g. ZipMap's dicts)."""


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
    """Axis-0 length shared by every feed; 1 for a request that runs ``alone``."""
    passthrough: object = None
    """Arrow: a ``pa.Table`` of unconsumed columns (or None); msgpack: the body's value."""
    run_rows: int | None = None
    """Rows per ``session.run`` when the model fixes axis 0 (1: row by row); None: all."""
    alone: bool = False
    """The inputs share no batch axis (a ``k``, a target shape, a scalar, or axis-0
    lengths that disagree): the feeds run exactly as sent, in a run of their own,
    never coalesced with other requests nor sliced, and the outputs come back whole."""

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


@dataclass(frozen=True)
class Envelope:
    """What the record says outside its body: the headers the worker reads, the key.

    Built once by the facade so that every codec applies the same header
    rules; a codec only adds its body's fallbacks (``id``, ``model``...).
    """

    headers: Headers
    """As received (already checked: every name is a str)."""
    model: str | None = None
    """Header ``model`` (or ``mlserver-model``)."""
    model_version: int | None = None
    """Header ``model-version`` (or ``mlserver-version``)."""
    request_id: str | None = None
    """Header ``request-id``."""
    key: bytes | None = None
    """The record key (the JSON codec's request id when it is UTF-8, as in MLServer)."""
    default_id: str = ""
    """``<topic>/<partition>/<offset>``: the request id of last resort."""


@dataclass
class Request:
    """A decoded envelope, not yet bound to a model."""

    format: str
    """The codec's name: ``"arrow"``, ``"msgpack"`` or ``"json"``."""
    model: str | None
    """Header ``model`` wins over the body field."""
    model_version: int | None
    """Header ``model-version`` wins over the body field."""
    request_id: str
    """Header, else (JSON) the record key, else body ``id``, else the loop's default."""
    headers: Headers
    """As received; copied to the response."""
    _binder: Callable[[Signature], Bound] = field(repr=False, compare=False)
    outputs: tuple[str, ...] | None = None
    """Output names the answer is limited to (JSON ``outputs``); None: all of them."""

    def bind(self, signature: Signature) -> Bound:
        """Validate against ``signature`` and map to its inputs.

        Raises :class:`SchemaMismatch`, :class:`TooLarge` or :class:`DecodeError`
        (never anything else: a codec bug on hostile bytes is still a dead letter).
        """
        try:
            bound = self._binder(signature)
        except WorkerError:
            raise
        except Exception as exc:
            raise DecodeError(
                f"request does not fit the model: {type(exc).__name__}: {exc}"
            ) from exc
        if self.outputs is not None:
            known = {spec.name for spec in signature.outputs}
            for name in self.outputs:
                if name not in known:
                    raise SchemaMismatch(
                        f"requested output {name!r} is not an output of the model; its outputs "
                        f"are: {', '.join(sorted(known)) or 'none'}"
                    )
        return bound

    def select(self, outputs: Mapping[str, object]) -> Outputs:
        """``outputs`` limited to the requested names, in the order they were asked for."""
        if self.outputs is None:
            return dict(outputs)
        return {name: outputs[name] for name in self.outputs if name in outputs}


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
            f"input {name!r} of shape {list(shape)}", count, limits.max_elements, "elements"
        )
    if shape and shape[0] > limits.max_rows:
        raise TooLarge(f"input {name!r}", shape[0], limits.max_rows, "rows")
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


def _check_rank_and_axes(spec: TensorSpec, arr: np.ndarray, *, strict_axis0: bool) -> None:
    """dtype, rank and every fixed axis; axis 0 fixed at 1 may differ unless ``strict_axis0``
    (a batched request then runs row by row)."""
    if not spec.is_tensor:
        raise SchemaMismatch(
            f"input {spec.name!r} has type {spec.onnx_type}, which the protocol cannot feed"
        )
    if not _dtype_ok(spec, arr):
        raise _mismatch(spec, arr)
    if spec.shape is None:
        return
    if arr.ndim != len(spec.shape):
        raise _mismatch(spec, arr)
    for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
        if want is None or want == got or (axis == 0 and want == 1 and not strict_axis0):
            continue
        raise _mismatch(spec, arr)


def validate_feeds(signature: Signature, feeds: dict[str, np.ndarray]) -> Bound:
    """Check dtype, rank and every fixed axis, and decide how the request runs.

    No silent casts: an int64 array for a float32 input is a mismatch, because a
    cast would hide a producer bug (and cost a copy on every message).

    Batched (the common case): every input shares axis 0 (see
    :meth:`Signature.row_axis`) and the request agrees on its length; ``rows``
    is that length. Otherwise the request runs ``alone``, as sent, with
    ``rows = 1`` and every fixed axis checked exactly. Inputs that the model
    says share a named axis (``batch``) but arrive with different lengths are a
    mismatch: ONNX Runtime would not notice and would broadcast them.
    """
    axis = signature.row_axis()
    lengths = {arr.shape[0] if arr.ndim else None for arr in feeds.values()}
    agree = len(lengths) == 1 and None not in lengths
    if axis is not None and not agree and (axis[0] == FIXED or axis[1] is not None):
        first = signature.inputs[0].name
        for spec in signature.inputs[1:]:
            arr, ref = feeds[spec.name], feeds[first]
            n, rows = (arr.shape[0] if arr.ndim else 1), (ref.shape[0] if ref.ndim else 1)
            if n != rows:
                _check_rank_and_axes(spec, arr, strict_axis0=False)
                raise SchemaMismatch(
                    f"inputs disagree on the row count (axis 0): {spec.name!r} has {n}, "
                    f"{first!r} has {rows}"
                )
    alone = axis is None or not agree
    for spec in signature.inputs:
        _check_rank_and_axes(spec, feeds[spec.name], strict_axis0=alone)
    if alone:
        return Bound(feeds=feeds, rows=1, alone=True)
    rows = int(next(iter(lengths)) or 0) if feeds else 0
    assert axis is not None
    run_rows = None
    if axis[0] == FIXED:
        run_rows = 1 if axis[1] == 1 else int(axis[1] or 0) or None
    return Bound(feeds=feeds, rows=rows, run_rows=run_rows)


def bind_tensors(
    tensors: dict[str, np.ndarray], signature: Signature, passthrough: object = None
) -> Bound:
    """Whole named tensors (msgpack, JSON) -> a :class:`Bound` for ``signature``."""
    wanted = {spec.name for spec in signature.inputs}
    for name in tensors:
        if name not in wanted:
            raise SchemaMismatch(
                f"unknown input {name!r}; the model's inputs are: {expected_inputs(signature)}"
            )
    for spec in signature.inputs:
        if spec.name not in tensors:
            raise SchemaMismatch(
                f"missing input {spec.name!r}; the model's inputs are: {expected_inputs(signature)}"
            )
    bound = validate_feeds(signature, {spec.name: tensors[spec.name] for spec in signature.inputs})
    bound.passthrough = passthrough
    return bound


class Codec(Protocol):
    """One wire format, both directions, with the same signatures for every format.

    Decoding needs no model (``Request.bind`` checks against one later);
    encoding a response gets the request (for its id and requested outputs),
    the bound request (passthrough, ``alone``) when there is one, and the
    outputs. A codec raises only :class:`WorkerError` subclasses on bad input
    and on answers it cannot write (the loop dead-letters those).
    """

    name: str
    """``arrow``, ``msgpack``, ``json``: the ``--output-format`` / ``--format`` value."""
    content_type: str
    """The canonical ``content-type`` written on answers and requests."""
    media_types: tuple[str, ...]
    """Every media type accepted on requests (lower case), the canonical one first."""

    def sniff(self, value: bytes) -> bool:
        """Whether a body without ``content-type`` is this format."""
        ...

    def decode_request(self, value: bytes, envelope: Envelope, limits: Limits) -> Request:
        """Bytes -> :class:`Request`; header values in ``envelope`` win over body fields."""
        ...

    def encode_response(
        self,
        request: Request,
        bound: Bound | None,
        outputs: Outputs,
        *,
        model: str,
        model_version: int,
    ) -> bytes:
        """Outputs (already limited to the requested ones) -> the answer's body."""
        ...

    def response_headers(self, request: Request, *, model: str, model_version: int) -> Headers:
        """Headers this format adds to an answer (JSON: MLServer's CloudEvents ones)."""
        ...

    def encode_request(
        self,
        inputs: dict[str, np.ndarray],
        *,
        model: str | None,
        model_version: int | None,
        request_id: str | None,
        passthrough: object,
        form: str,
    ) -> bytes:
        """Build a request body as a producer would; ``form`` picks a tensor layout
        where the format offers a choice (``auto`` everywhere)."""
        ...

    def decode_response(self, value: bytes) -> Response:
        """Parse an answer's body (for producer tools and tests)."""
        ...
