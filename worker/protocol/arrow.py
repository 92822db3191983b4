"""The Arrow body: an IPC stream whose rows are samples.

A column named like a model input feeds it (primitive, nested FixedSizeList
or ``arrow.fixed_shape_tensor``); a single-input model with no such column
gets every numeric column stacked into ``[rows, F]``; all other columns pass
through to the response, row-aligned.

Zero copy: ``pa.BufferReader`` over the record value makes every Arrow buffer
a slice of that value, and a single-batch, null-free column becomes a numpy
view of it. A stream of several batches is concatenated (one copy per input).

A model whose inputs share no batch axis (a ``k``, a target shape, a scalar)
is fed by a one-row table whose cells are whole tensors; its answer is one row
holding each output whole, marked by the schema metadata key
:data:`WHOLE_METADATA_KEY`. Dictionary-encoded columns (a pandas categorical)
feed an input with their values and pass through as dictionaries.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgpack as _mp
import numpy as np
import pyarrow as pa

from worker.errors import DecodeError, InferenceError, SchemaMismatch, TooLarge, WorkerError
from worker.signature import Signature, TensorSpec, format_spec

from .base import (
    ARROW,
    Bound,
    Envelope,
    Headers,
    Limits,
    Outputs,
    Request,
    Response,
    check_elements,
    expected_inputs,
)
from .base import validate_feeds as _validate

__all__ = [
    "OUTPUTS_METADATA_KEY",
    "PASSTHROUGH_METADATA_KEY",
    "PASSTHROUGH_PREFIX",
    "WHOLE_METADATA_KEY",
    "ArrowCodec",
    "passthrough_as_python",
    "read_stream",
    "tensor_array",
    "write_stream",
]

OUTPUTS_METADATA_KEY = b"inference-worker.outputs"
"""Response schema metadata: JSON list of the output column names (the rest pass through)."""
PASSTHROUGH_METADATA_KEY = b"inference-worker.passthrough.msgpack"
"""Response schema metadata: a msgpack request's passthrough that is not column-shaped."""
PASSTHROUGH_PREFIX = "passthrough."
"""Prepended to a passthrough column whose name an output already uses."""
WHOLE_METADATA_KEY = b"inference-worker.whole"
"""Response schema metadata (value ``true``): one row whose cells are whole outputs."""

# Copy only when a buffer is too misaligned for numpy (never for IPC we wrote:
# the format pads to 8 bytes); threads cost more than they save on one record.
_READ_OPTIONS = pa.ipc.IpcReadOptions(
    ensure_alignment=pa.ipc.Alignment.DataTypeSpecific, use_threads=False
)


def read_stream(value: bytes) -> pa.Table:
    """Bytes -> Table (zero copy), fully validated so later reads cannot overrun."""
    table = _read_known(value)
    if table is not None:
        return table
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(value), options=_READ_OPTIONS)
        table = reader.read_all()
        table.validate(full=True)
    except Exception as exc:  # ArrowInvalid, ArrowIOError, OSError, ...: all bad bytes
        raise DecodeError(f"not a valid Arrow IPC stream: {type(exc).__name__}: {exc}") from exc
    return table


# A producer sends the same schema message before every batch: parsed once, kept by its
# bytes (at most _SCHEMAS_KEPT distinct ones; all dropped when full).
_SCHEMAS: dict[bytes, pa.Schema] = {}
_SCHEMAS_KEPT = 64


def _read_known(value: bytes) -> pa.Table | None:
    """The stream's record batches read against its schema message's parsed schema,
    skipping the stream reader's set-up and the schema's parsing (``bench/bench_codec.py``
    times decode + bind); None for anything else (a dictionary batch, a buffer that is
    not 8-byte aligned, bad bytes): ``read_stream``'s reader decides those, and writes
    the error of bad bytes (parsed twice then: a cost on bad input only)."""
    try:
        reader = pa.BufferReader(value)
        first = pa.ipc.read_message(reader)
        if first.type != "schema":
            return None
        key = first.metadata.to_pybytes()
        schema = _SCHEMAS.get(key)
        if schema is None:
            if len(_SCHEMAS) >= _SCHEMAS_KEPT:
                _SCHEMAS.clear()
            schema = _SCHEMAS[key] = pa.ipc.read_schema(first)
        batches = []
        while True:
            at = reader.tell()
            # The end-of-stream marker (or the pre-1.0 one, or the end of the bytes): seen
            # here, because read_message's EOFError costs more than reading a batch.
            if _ends_at(value, at):
                break
            message = pa.ipc.read_message(reader)
            if message.type != "record batch":
                return None
            batch = pa.ipc.read_record_batch(message, schema)
            if not all(b is None or b.address % 8 == 0 for c in batch.columns for b in c.buffers()):
                return None  # the reader's alignment option copies it
            batch.validate(full=True)  # each batch: what Table.validate(full=True) checks
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema)
    except Exception:  # bad bytes: the full reader says what is wrong
        return None
    return table


_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_EOS_OLD = b"\x00\x00\x00\x00"  # the end-of-stream marker before format 1.0 (no continuation)


def _ends_at(value: bytes, at: int) -> bool:
    """The stream ends at ``at``: the end of the bytes, or an end-of-stream marker
    (either form; what follows it is ignored, as the stream reader does)."""
    return (
        at >= len(value)
        or value[at : at + 8] == _END_OF_STREAM
        or value[at : at + 4] == _EOS_OLD
    )


# -- repeated layouts ----------------------------------------------------------
#
# A producer of one model's requests sends the same schema and, for the same row count,
# the same record batch header on every message: only the body's values change. For a
# stream of exactly one batch whose columns are all fixed-width numbers (primitives,
# fixed-size lists, identity-ordered tensors), what the reader and the binding make of it
# depends on those header bytes and nothing else: every buffer's offset and length, the
# row count and the null counts are in them, and full validation of such columns reads
# no values. The first message of a layout goes the whole way (read, full validation,
# bind) and, where every feed came out a zero-copy view of the record, its offsets are
# kept; later messages with the same header bytes are views at those offsets.


class _Feed(NamedTuple):
    name: str
    dtype: np.dtype[Any]
    offset: int
    """Bytes from the start of the record value."""
    size: int
    """Elements."""
    shape: tuple[int, ...]


class _Binding(NamedTuple):
    signature: Signature
    limits: Limits
    feeds: tuple[_Feed, ...] | None
    """None: this layout's feeds for this model are not views of the record (a copy,
    a stacked table): every message is read and bound the whole way."""
    rows: int
    run_rows: int | None
    alone: bool


class _Plan:
    """One stream layout: where its body ends, its rows, and its feeds per model."""

    __slots__ = ("bindings", "end", "rows")

    def __init__(self, end: int, rows: int) -> None:
        self.end = end
        self.rows = rows
        self.bindings: dict[int, _Binding] = {}

    def fits(self, value: bytes) -> bool:
        """The record ends where this layout's body does (end of stream marker or bytes)."""
        return self.end <= len(value) and _ends_at(value, self.end)

    def bind(
        self, value: bytes, signature: Signature, limits: Limits, table: pa.Table | None = None
    ) -> Bound:
        """``value`` bound to ``signature``: views at the kept offsets, or (the first
        time for this model, or where they do not apply) the whole way."""
        known = self.bindings.get(id(signature))
        if known is not None and (known.signature is not signature or known.limits is not limits):
            known = None
        if known is not None and known.feeds is not None:
            feeds = {
                f.name: np.frombuffer(value, f.dtype, f.size, f.offset).reshape(f.shape)
                for f in known.feeds
            }
            if all(a.flags.aligned for a in feeds.values()):
                return Bound(feeds=feeds, rows=known.rows, run_rows=known.run_rows,
                             alone=known.alone)  # fmt: skip
        bound = _bind(read_stream(value) if table is None else table, signature, limits)
        if known is None:
            if len(self.bindings) >= _BINDINGS_KEPT:
                self.bindings.clear()
            self.bindings[id(signature)] = _Binding(
                signature, limits, _views(value, bound), bound.rows, bound.run_rows, bound.alone
            )
        return bound


_PLANS: dict[bytes, _Plan | None] = {}
"""Stream layouts by their header bytes (schema and record batch messages up to the
body); None: a layout that is not one fixed-width batch (read the whole way)."""
_PLANS_KEPT = 64
_BINDINGS_KEPT = 16
_CONTINUATION = b"\xff\xff\xff\xff"


def _head(value: bytes) -> bytes | None:
    """The bytes before the second message's body (schema, then a batch header), or None
    where the record does not start with two framed messages."""
    at = 0
    for _ in range(2):
        if value[at : at + 4] != _CONTINUATION:
            return None
        size = int.from_bytes(value[at + 4 : at + 8], "little", signed=True)
        if size <= 0 or size % 8:
            return None
        at += 8 + size
    return value[:at] if at <= len(value) else None


def _new_plan(value: bytes, head: bytes, table: pa.Table) -> _Plan | None:
    """The plan of ``value``'s layout, or None where it does not qualify."""
    if table.num_columns == 0 or not all(_fixed_width(f.type) for f in table.schema):
        return None
    try:
        reader = pa.BufferReader(value)
        first = pa.ipc.read_message(reader)
        if first.type != "schema" or (first.body is not None and first.body.size):
            return None
        second = pa.ipc.read_message(reader)
        if second.type != "record batch" or second.body is None:
            return None
    except Exception:  # read_stream accepted it; anything odd here: no plan
        return None
    end = reader.tell()
    if end - second.body.size != len(head):
        return None
    plan = _Plan(end, table.num_rows)
    return plan if plan.fits(value) else None


def _fixed_width(typ: pa.DataType) -> bool:
    """A column whose layout its header fixes: numbers, fixed-size lists of them, or
    identity-ordered tensors of them."""
    if _is_fixed_shape_tensor(typ):
        if _permuted(typ):
            return False
        typ = typ.storage_type
    while pa.types.is_fixed_size_list(typ):
        typ = typ.value_type
    return _is_numeric(typ)


def _views(value: bytes, bound: Bound) -> tuple[_Feed, ...] | None:
    """Where each of ``bound``'s feeds lies in ``value``; None unless every one is a
    contiguous view of it and nothing passes through."""
    if bound.passthrough is not None:
        return None
    base = np.frombuffer(value, np.uint8).__array_interface__["data"][0]
    feeds = []
    for name, arr in bound.feeds.items():
        if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
            return None
        offset = arr.__array_interface__["data"][0] - base
        if offset < 0 or offset + arr.nbytes > len(value) or arr.dtype.kind not in "iuf":
            return None
        feeds.append(_Feed(name, arr.dtype, offset, arr.size, arr.shape))
    return tuple(feeds)


def _planned(value: bytes) -> tuple[bytes | None, _Plan | None]:
    """``value``'s header bytes and the plan kept for them (None: none yet, or none fits)."""
    head = _head(value)
    if head is None:
        return None, None
    plan = _PLANS.get(head)
    return head, (plan if plan is not None and plan.fits(value) else None)


def _remember(value: bytes, head: bytes, table: pa.Table) -> _Plan | None:
    if head in _PLANS:
        return None  # known not to qualify (or not this record: it did not fit)
    if len(_PLANS) >= _PLANS_KEPT:
        _PLANS.clear()
    plan = _PLANS[head] = _new_plan(value, head, table)
    return plan


def _has_dictionary(typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        return True
    return any(_has_dictionary(typ.field(i).type) for i in range(typ.num_fields))


def write_stream(batch: pa.RecordBatch) -> bytes:
    """One batch as an IPC stream: schema, dictionary batches, the batch, end of stream.

    Without dictionary columns, ``schema + batch + EOS`` joined by hand: the
    very bytes pyarrow's writer produces, for about half its cost (a few µs per
    answer). With any (even nested), pyarrow's own writer, because only it
    writes the dictionary batches a reader needs before the first record batch.
    """
    if not any(_has_dictionary(field.type) for field in batch.schema):
        return b"".join((batch.schema.serialize(), batch.serialize(), _END_OF_STREAM))
    sink = pa.BufferOutputStream()
    writer = pa.ipc.RecordBatchStreamWriter(sink, batch.schema)
    writer.write_batch(batch)
    writer.close()
    return sink.getvalue().to_pybytes()


# -- decoding -----------------------------------------------------------------


def _is_fixed_shape_tensor(typ: pa.DataType) -> bool:
    return isinstance(typ, pa.BaseExtensionType) and (
        typ.extension_name == "arrow.fixed_shape_tensor"
    )


def _permuted(typ: pa.BaseExtensionType) -> bool:
    """An ``arrow.fixed_shape_tensor`` whose values are not stored in row-major order."""
    perm = typ.permutation
    return perm is not None and list(perm) != list(range(len(typ.shape)))


def _is_numeric(typ: pa.DataType) -> bool:
    return bool(pa.types.is_integer(typ) or pa.types.is_floating(typ))


def _leaf_numpy(name: str, leaf: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(leaf.type):
        leaf = leaf.dictionary_decode()  # a categorical feeds its values (one copy)
    typ = leaf.type
    if _is_numeric(typ):
        return leaf.to_numpy(zero_copy_only=True)  # honours the slice offset
    if pa.types.is_boolean(typ):
        return leaf.to_numpy(zero_copy_only=False)  # Arrow packs bits: one unavoidable copy
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return leaf.to_numpy(zero_copy_only=False)  # object array of str, what ORT wants
    raise SchemaMismatch(
        f"input {name!r}: column values of type {typ} cannot feed a tensor; expected a number, "
        "bool or string"
    )


def _no_nulls(name: str, arr: pa.Array) -> None:
    if arr.null_count:
        raise SchemaMismatch(f"input {name!r}: the column holds {arr.null_count} null value(s)")


def _array_tensor(name: str, arr: pa.Array, limits: Limits) -> np.ndarray:
    """One chunk -> ``[len(arr), *row_shape]`` numpy, a view whenever the layout allows.

    Rows may be (nested) fixed-size lists, ``arrow.fixed_shape_tensor`` values,
    or variable lists (pandas' form for a column of arrays) of equal lengths.
    """
    typ = arr.type
    rows = len(arr)
    _no_nulls(name, arr)
    dims: list[int] = []
    if _is_fixed_shape_tensor(typ):
        dims = list(typ.shape)
        if _permuted(typ):
            check_elements(name, (rows, *dims), limits)
            return np.ascontiguousarray(arr.to_numpy_ndarray())  # permuted layout: copy
        leaf = _fsl_values(arr.storage)  # storage: fixed_size_list<value>[prod(shape)]
    elif pa.types.is_fixed_size_list(typ) or _is_var_list(typ):
        leaf = arr
        while pa.types.is_fixed_size_list(leaf.type) or _is_var_list(leaf.type):
            if len(dims) >= 32:
                raise SchemaMismatch(f"input {name!r}: the column nests deeper than 32 lists")
            if pa.types.is_fixed_size_list(leaf.type):
                dims.append(leaf.type.list_size)
                leaf = _fsl_values(leaf)
            else:
                dims.append(_equal_length(name, leaf, len(dims)))
                leaf = leaf.flatten()  # honours the slice offset
            _no_nulls(name, leaf)
    elif _is_flat(typ):
        leaf = arr
    else:
        raise SchemaMismatch(
            f"input {name!r}: a column of type {typ} cannot feed a tensor; expected a primitive, "
            "list, fixed_size_list or arrow.fixed_shape_tensor column"
        )
    _no_nulls(name, leaf)
    check_elements(name, (rows, *dims), limits)
    if not _is_flat(leaf.type):
        raise SchemaMismatch(
            f"input {name!r}: values of type {leaf.type} cannot feed a tensor; expected a "
            "number, bool or string"
        )
    return _leaf_numpy(name, leaf).reshape((rows, *dims))


def _equal_length(name: str, arr: pa.Array, depth: int) -> int:
    """The one length of every list in ``arr``: a tensor cannot be ragged."""
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
    size = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and (lengths != size).any():
        raise SchemaMismatch(
            f"input {name!r}: a ragged list (lengths {sorted(set(lengths.tolist()))[:4]} at "
            f"depth {depth + 1}); a tensor needs equal lengths"
        )
    return size


def _is_flat(typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        return _is_flat(typ.value_type)
    return bool(
        pa.types.is_primitive(typ)
        or pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or pa.types.is_string_view(typ)
    )


def _is_var_list(typ: pa.DataType) -> bool:
    return bool(pa.types.is_list(typ) or pa.types.is_large_list(typ))


def _cell_tensor(
    name: str, column: pa.ChunkedArray, spec: TensorSpec, limits: Limits
) -> np.ndarray:
    """The one cell of a one-row column, as the whole tensor it holds (a scalar, a
    list, a fixed-size list or an ``arrow.fixed_shape_tensor`` value)."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    tensor = _array_tensor(name, arr, limits)
    cell: np.ndarray = tensor.reshape(tensor.shape[1:])  # drop the row; an ndarray even if 0-d
    shape = spec.shape
    if cell.ndim == 0 and shape is not None and len(shape) == 1 and shape[0] in (1, None):
        cell = cell.reshape(1)  # a scalar cell feeds a one-element input (TopK's k)
    return cell


def _fsl_values(arr: pa.Array) -> pa.Array:
    """The child values under ``arr``'s rows: ``.values`` sliced by hand, because
    ``flatten()`` goes through the compute layer (several µs per call)."""
    size = arr.type.list_size
    return arr.values.slice(arr.offset * size, len(arr) * size)


def _column_tensor(
    name: str, column: pa.ChunkedArray, spec: TensorSpec, limits: Limits
) -> np.ndarray:
    chunks = column.chunks
    if len(chunks) == 1:
        tensor = _array_tensor(name, chunks[0], limits)
    elif not chunks:
        tensor = _array_tensor(name, pa.array([], type=column.type), limits)
    else:
        tensor = np.concatenate([_array_tensor(name, c, limits) for c in chunks])
    shape = spec.shape
    if tensor.ndim == 1 and shape is not None and len(shape) == 2 and shape[1] == 1:
        tensor = tensor.reshape(-1, 1)  # a scalar column feeds a per-row shape (1,) input
    return tensor


def _tabular(table: pa.Table, spec: TensorSpec, limits: Limits) -> tuple[np.ndarray, set[int]]:
    """The single-input rule: numeric columns in schema order -> ``[rows, F]`` (one copy)."""
    picked = [i for i, f in enumerate(table.schema) if _is_numeric(f.type)]
    if not picked:
        raise SchemaMismatch(
            f"missing input {spec.name!r}: no column of that name and no numeric columns to "
            f"stack into it; expected {format_spec(spec.dtype, spec.shape)}, the message has "
            f"columns: {_columns(table)}"
        )
    types = [table.schema.field(i).type.to_pandas_dtype() for i in picked]
    rows, features = table.num_rows, len(picked)
    if spec.dtype is not None and any(np.dtype(t) != spec.dtype for t in types):
        if len(set(types)) == 1:
            got = format_spec(np.dtype(types[0]), (rows, features))
        else:
            got = "columns of mixed types (" + _columns(table, picked) + ")"
        raise SchemaMismatch.for_input(
            spec.name, format_spec(spec.dtype, spec.shape), got + " stacked from numeric columns"
        )
    check_elements(spec.name, (rows, features), limits)
    out = np.empty((rows, features), dtype=np.dtype(types[0]))
    for j, i in enumerate(picked):
        column = table.column(i)
        if column.null_count:
            raise SchemaMismatch(
                f"input {spec.name!r}: column {table.schema.field(i).name!r} holds null values"
            )
        out[:, j] = column.to_numpy()
    return out, set(picked)


def _columns(table: pa.Table, indices: Iterable[int] | None = None) -> str:
    schema = table.schema
    picked = range(len(schema)) if indices is None else indices
    return ", ".join(f"{schema.field(i).name}: {schema.field(i).type}" for i in picked) or "none"


def _bind(table: pa.Table, signature: Signature, limits: Limits) -> Bound:
    names = table.column_names
    consumed: set[int] = set()
    feeds: dict[str, np.ndarray] = {}
    cells = signature.row_axis() is None
    if cells and table.num_rows != 1:
        raise SchemaMismatch(
            f"the model's inputs share no batch axis ({expected_inputs(signature)}): send a "
            f"one-row table whose cells are whole tensors; the message has {table.num_rows} rows"
        )
    only = signature.inputs[0] if len(signature.inputs) == 1 and not cells else None
    if only is not None and only.name not in names:
        feeds[only.name], consumed = _tabular(table, only, limits)
    else:
        for spec in signature.inputs:
            where = [i for i, n in enumerate(names) if n == spec.name]
            if not where:
                raise SchemaMismatch(
                    f"missing input {spec.name!r}: no column of that name; the model's inputs "
                    f"are: {expected_inputs(signature)}; the message has columns: "
                    f"{_columns(table)}"
                )
            if len(where) > 1:
                raise SchemaMismatch(f"input {spec.name!r}: {len(where)} columns carry that name")
            column = table.column(where[0])
            feeds[spec.name] = (
                _cell_tensor(spec.name, column, spec, limits)
                if cells
                else _column_tensor(spec.name, column, spec, limits)
            )
            consumed.add(where[0])
    bound = _validate(signature, feeds)
    rest = [i for i in range(len(names)) if i not in consumed]
    bound.passthrough = table.select(rest) if rest else None
    if not bound.alone:
        bound.rows = table.num_rows
    return bound


# -- encoding -----------------------------------------------------------------


def _nested_fsl(values: pa.Array, dims: tuple[int, ...]) -> pa.Array:
    for size in reversed(dims):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def _flat_values(arr: np.ndarray) -> pa.Array:
    flat = arr.reshape(-1)
    if arr.dtype == object or arr.dtype.kind in "US":
        return pa.array(flat, type=pa.string())
    return pa.array(flat)  # numeric: wraps the numpy buffer, no copy


@functools.lru_cache(maxsize=256)
def _tensor_type(value_type: pa.DataType, row_shape: tuple[int, ...]) -> pa.DataType:
    return pa.fixed_shape_tensor(value_type, row_shape)


def tensor_array(arr: np.ndarray, form: str = "auto") -> pa.Array:
    """numpy ``[rows, ...]`` -> one Arrow column (primitive, tensor or fixed_size_list)."""
    if arr.ndim == 0:
        raise ValueError("a rank-0 array has no row axis")
    if arr.ndim == 1:
        return _flat_values(arr)
    if 0 in arr.shape[1:]:
        raise ValueError(f"Arrow cannot hold a per-row shape with a zero dimension: {arr.shape}")
    # Arrow's tensor type (and every reader's to_numpy_ndarray) is numeric-only:
    # bool and string tensors travel as nested FixedSizeList.
    numeric = arr.dtype.kind in "iuf"
    flat = _flat_values(np.ascontiguousarray(arr))
    if form == "tensor" or (form == "auto" and numeric):
        # from_storage, not from_numpy_ndarray: the latter refuses zero rows.
        row_shape = tuple(arr.shape[1:])
        storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(row_shape))
        return pa.ExtensionArray.from_storage(_tensor_type(flat.type, row_shape), storage)
    if form in ("auto", "fixed_size_list"):
        return _nested_fsl(flat, tuple(arr.shape[1:]))
    raise ValueError(f"cannot write a {arr.dtype}{list(arr.shape)} tensor in Arrow form {form!r}")


def _map_array(rows: list[Any]) -> pa.Array:
    """ZipMap-style list of dicts -> ``map<key, value>`` with inferred key/value types."""
    offsets: list[int] = [0]
    keys: list[object] = []
    values: list[object] = []
    for row in rows:
        if not isinstance(row, dict):
            raise TypeError(f"expected a dict per row, got {type(row).__name__}")
        keys.extend(_py(k) for k in row)
        values.extend(_py(v) for v in row.values())
        offsets.append(len(keys))
    key_arr = pa.array(keys) if keys else pa.array([], type=pa.string())
    value_arr = pa.array(values) if values else pa.array([], type=pa.float32())
    return pa.MapArray.from_arrays(pa.array(offsets, type=pa.int32()), key_arr, value_arr)


def _py(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def _output_array(name: str, value: object, rows: int, whole: bool) -> pa.Array:
    try:
        if isinstance(value, np.ndarray):
            if whole:
                column = tensor_array(value[np.newaxis] if value.ndim else value.reshape(1))
            else:
                column = tensor_array(value if value.ndim else value.reshape(1))
        elif isinstance(value, list) and all(isinstance(r, dict) for r in value) and not whole:
            column = _map_array(value)
        elif whole:
            column = pa.array([[_py(v) for v in value]])  # type: ignore[attr-defined]
        else:
            column = pa.array([_py(v) for v in value])  # type: ignore[attr-defined]
    except Exception as exc:
        raise InferenceError(
            f"output {name!r} cannot be written as an Arrow column: {exc}"
        ) from exc
    if len(column) != rows:
        raise InferenceError(
            f"output {name!r} has {len(column)} rows but the request has {rows}; an Arrow "
            "response needs row-aligned outputs (use --output-format msgpack)"
        )
    return column


@functools.lru_cache(maxsize=256)
def _names_json(names: tuple[str, ...]) -> bytes:
    return json.dumps(list(names)).encode()


def _passthrough_table(
    passthrough: object, rows: int
) -> tuple[pa.Table | None, dict[bytes, bytes] | None]:
    """A msgpack/JSON request's passthrough in an Arrow answer: columns when it is a
    map of row-length lists, else msgpack bytes in the schema metadata."""
    if passthrough is None or isinstance(passthrough, pa.Table):
        return passthrough, None
    if isinstance(passthrough, dict) and all(
        isinstance(v, list) and len(v) == rows for v in passthrough.values()
    ):
        try:
            return pa.table({str(k): v for k, v in passthrough.items()}), None
        except (pa.ArrowException, TypeError, ValueError):
            pass  # not column-shaped after all: fall through to metadata
    packed = _mp.packb(passthrough, default=str, use_bin_type=True)
    return None, {PASSTHROUGH_METADATA_KEY: packed}


class _Layout(NamedTuple):
    """An answer's schema, written once: its IPC message and the storage types of its
    columns (an IPC record batch carries only storage; the schema names the tensor type)."""

    schema_message: bytes
    storage: pa.Schema
    row_sizes: tuple[int | None, ...]
    """Values per row of each column (None: a flat column)."""
    headers: dict[int, bytes | None]
    """Rows -> the record batch message up to its body (None: pyarrow's bytes are not the
    header plus the raw buffers, so each answer of that size is serialized whole)."""


_MAX_HEADERS = 64
"""Row counts whose record batch header a layout keeps (a batch's answers repeat a few)."""
_PAD = bytes(8)


@functools.lru_cache(maxsize=256)
def _layout(
    columns: tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...], whole: bool
) -> _Layout | None:
    """The schema of an answer whose outputs are numeric arrays of these names, dtypes and
    row shapes (the same for every answer of a model version); None: no such schema."""
    try:
        fields: list[pa.Field] = []
        storage: list[pa.Field] = []
        sizes: list[int | None] = []
        for name, dtype, row_shape in columns:
            value_type = pa.from_numpy_dtype(dtype)
            if not row_shape:
                fields.append(pa.field(name, value_type))
                storage.append(pa.field(name, value_type))
                sizes.append(None)
                continue
            size = math.prod(row_shape)
            fields.append(pa.field(name, _tensor_type(value_type, row_shape)))
            storage.append(pa.field(name, pa.list_(value_type, size)))
            sizes.append(size)
        metadata = {OUTPUTS_METADATA_KEY: _names_json(tuple(c[0] for c in columns))}
        if whole:
            metadata[WHOLE_METADATA_KEY] = b"true"
        schema = pa.schema(fields, metadata=metadata)
        return _Layout(schema.serialize().to_pybytes(), pa.schema(storage), tuple(sizes), {})
    except (pa.ArrowException, TypeError, ValueError):
        return None


def _encode_numeric(outputs: Outputs, rows: int, whole: bool) -> bytes | None:
    """The common answer (numeric tensors, no passthrough) without building its schema:
    the cached schema message, then this answer's record batch, then end of stream; the
    very bytes pyarrow's stream writer produces. None: not that answer (the general path
    writes it, or says what is wrong with it)."""
    arrays: list[np.ndarray] = []
    for value in outputs.values():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
            return None
        if whole or value.ndim == 0:
            value = value[np.newaxis] if whole and value.ndim else value.reshape(1)
        if value.shape[0] != rows or 0 in value.shape[1:]:
            return None
        arrays.append(value)
    layout = _layout(
        tuple((n, a.dtype, a.shape[1:]) for n, a in zip(outputs, arrays, strict=True)), whole
    )
    if layout is None:
        return None
    flats = [np.ascontiguousarray(arr).reshape(-1) for arr in arrays]
    # No nulls, no compression: a record batch message is a header that depends only on
    # the row count, then each column's values padded to 8 bytes. The header is taken
    # from pyarrow's own message the first time a size is seen, and kept only if the
    # rest of that message is exactly those values (else that size always goes through
    # pyarrow); later answers of that size are the header and their raw buffers.
    body: list[Any] = []
    for flat in flats:
        data = flat.data.cast("B")
        body.append(data)
        if data.nbytes % 8:
            body.append(_PAD[: 8 - data.nbytes % 8])
    header = layout.headers.get(rows)
    if header is not None:
        return b"".join((layout.schema_message, header, *body, _END_OF_STREAM))
    columns = []
    for flat, size in zip(flats, layout.row_sizes, strict=True):
        values = pa.array(flat)  # wraps the buffer, no copy
        columns.append(values if size is None else pa.FixedSizeListArray.from_arrays(values, size))
    message = pa.RecordBatch.from_arrays(columns, schema=layout.storage).serialize().to_pybytes()
    if rows not in layout.headers and len(layout.headers) < _MAX_HEADERS:
        raw = b"".join(body)
        fits = len(message) > len(raw) and message.endswith(raw)
        layout.headers[rows] = message[: len(message) - len(raw)] if fits else None
    return b"".join((layout.schema_message, message, _END_OF_STREAM))


def _encode_response(outputs: Outputs, rows: int, whole: bool, passthrough: object) -> bytes:
    if passthrough is None:
        fast = _encode_numeric(outputs, rows, whole)
        if fast is not None:
            return fast
    table, extra_metadata = _passthrough_table(passthrough, rows)
    arrays = [_output_array(name, value, rows, whole) for name, value in outputs.items()]
    names = list(outputs)
    if table is not None:
        for name, column in zip(table.column_names, table.columns, strict=True):
            names.append(PASSTHROUGH_PREFIX + name if name in outputs else name)
            arrays.append(column.combine_chunks() if column.num_chunks != 1 else column.chunk(0))
    metadata = {OUTPUTS_METADATA_KEY: _names_json(tuple(outputs)), **(extra_metadata or {})}
    if whole:
        metadata[WHOLE_METADATA_KEY] = b"true"
    try:
        batch = pa.RecordBatch.from_arrays(arrays, names=names, metadata=metadata)
        return write_stream(batch)
    except WorkerError:
        raise
    except Exception as exc:  # never an unreadable record: a dead letter says why
        raise InferenceError(
            f"the answer cannot be written as an Arrow stream: {type(exc).__name__}: {exc}"
        ) from exc


def _encode_request(inputs: dict[str, np.ndarray], *, passthrough: object, form: str) -> bytes:
    if form not in ("auto", "fixed_size_list", "tensor", "primitive"):
        raise ValueError(f"unknown arrow_form {form!r}")
    names: list[str] = []
    arrays: list[pa.Array] = []
    for name, arr in inputs.items():
        if form == "primitive" and arr.ndim == 2:
            if arr.shape[1] == 1:
                names.append(name)
                arrays.append(_flat_values(np.ascontiguousarray(arr[:, 0])))
            else:
                # The tabular form: one column per feature, stacked back by the worker.
                names.extend(f"{name}_{j}" for j in range(arr.shape[1]))
                arrays.extend(
                    _flat_values(np.ascontiguousarray(arr[:, j])) for j in range(arr.shape[1])
                )
            continue
        if form == "primitive" and arr.ndim != 1:
            raise ValueError(f"input {name!r}: the primitive form needs rank 1 or 2")
        names.append(name)
        arrays.append(tensor_array(arr, form))
    for name, column in _passthrough_columns(passthrough):
        names.append(name)
        arrays.append(column)
    return write_stream(pa.RecordBatch.from_arrays(arrays, names=names))


def _passthrough_columns(passthrough: object) -> list[tuple[str, pa.Array]]:
    if passthrough is None:
        return []
    if isinstance(passthrough, (pa.Table, pa.RecordBatch)):
        return [
            (n, c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c)
            for n, c in zip(passthrough.column_names, passthrough.columns, strict=True)
        ]
    if isinstance(passthrough, dict):
        return [
            (str(n), c if isinstance(c, pa.Array) else pa.array(c)) for n, c in passthrough.items()
        ]
    raise TypeError("Arrow passthrough must be a pa.Table, pa.RecordBatch or dict of columns")


def _response_value(column: pa.ChunkedArray) -> object:
    typ = column.type
    if pa.types.is_map(typ):
        return [dict(row) if row is not None else None for row in column.to_pylist()]
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    try:
        return _array_tensor("output", arr, _UNLIMITED)
    except SchemaMismatch:  # not tensor-shaped (lists, structs...): plain Python values
        return column.to_pylist()


def passthrough_as_python(passthrough: object) -> object:
    """An Arrow request's passthrough table as ``{"column": [values...]}`` for a msgpack
    or JSON answer; anything else unchanged.

    Python has no value for a nanosecond timestamp or duration that is not a
    whole microsecond: such a column becomes Arrow's text form of each value
    rather than making the answer unwritable.
    """
    if not isinstance(passthrough, (pa.Table, pa.RecordBatch)):
        return passthrough
    columns: dict[str, object] = {}
    for name, column in zip(passthrough.column_names, passthrough.columns, strict=True):
        try:
            columns[name] = column.to_pylist()
        except (ValueError, OverflowError, pa.ArrowException):
            columns[name] = column.cast(pa.string()).to_pylist()
    return columns


def _unwrap(value: object) -> object:
    """The cell of a one-row (whole) answer column."""
    if isinstance(value, np.ndarray):
        return value.reshape(value.shape[1:])
    return value[0] if isinstance(value, list) and value else value


_UNLIMITED = Limits(max_bytes=2**62, max_rows=2**62, max_elements=2**62)


def _unpack_any(raw: bytes) -> object:
    return _mp.unpackb(raw, raw=False, strict_map_key=False)


class ArrowCodec:
    """``application/vnd.apache.arrow.stream``: an IPC stream, one sample per row."""

    name: str = "arrow"
    content_type: str = ARROW
    media_types: tuple[str, ...] = (ARROW,)

    def sniff(self, value: bytes) -> bool:
        return value[:4] == b"\xff\xff\xff\xff"  # the IPC continuation marker

    def decode_request(self, value: bytes, envelope: Envelope, limits: Limits) -> Request:
        head, plan = _planned(value)
        table = None
        if plan is None:
            table = read_stream(value)
            if head is not None:
                plan = _remember(value, head, table)
        rows = plan.rows if plan is not None else table.num_rows  # type: ignore[union-attr]
        if rows > limits.max_rows:
            raise TooLarge("the Arrow table", rows, limits.max_rows, "rows")
        if plan is not None:
            binder = functools.partial(plan.bind, value, limits=limits, table=table)
        else:
            binder = functools.partial(_bind, table, limits=limits)
        return Request(
            format=self.name,
            model=envelope.model,
            model_version=envelope.model_version,
            request_id=envelope.request_id or envelope.default_id,
            headers=envelope.headers,
            _binder=binder,
        )

    def encode_response(
        self,
        request: Request,
        bound: Bound | None,
        outputs: Outputs,
        *,
        model: str,
        model_version: int,
    ) -> bytes:
        whole = bound is not None and bound.alone
        if whole:
            rows = 1
        elif bound is not None:
            rows = bound.rows
        else:
            rows = _rows_of(outputs)
        passthrough = bound.passthrough if bound is not None else None
        return _encode_response(outputs, rows, whole, passthrough)

    def response_headers(self, request: Request, *, model: str, model_version: int) -> Headers:
        return []

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
        return _encode_request(inputs, passthrough=passthrough, form=form)

    def decode_response(self, value: bytes) -> Response:
        table = read_stream(value)
        metadata = table.schema.metadata or {}
        names = table.column_names
        if OUTPUTS_METADATA_KEY in metadata:
            wanted = set(json.loads(metadata[OUTPUTS_METADATA_KEY]))
        else:
            wanted = set(names)
        columns = zip(names, table.columns, strict=True)
        outputs = {n: _response_value(c) for n, c in columns if n in wanted}
        if metadata.get(WHOLE_METADATA_KEY) == b"true":
            outputs = {n: _unwrap(v) for n, v in outputs.items()}
        rest = [i for i, n in enumerate(names) if n not in wanted]
        passthrough: object = table.select(rest) if rest else None
        if PASSTHROUGH_METADATA_KEY in metadata:
            passthrough = _unpack_any(metadata[PASSTHROUGH_METADATA_KEY])
        return Response(outputs=outputs, passthrough=passthrough)


def _rows_of(outputs: Outputs) -> int:
    for value in outputs.values():
        if isinstance(value, np.ndarray):
            return int(value.shape[0]) if value.ndim else 1
        if isinstance(value, list):
            return len(value)
    return 0
