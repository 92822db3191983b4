"""The msgpack body: a map of named tensors, for producers without Arrow.

Request ``{"inputs": {NAME: TENSOR}, "id"?, "model"?, "model_version"?, "passthrough"?}``,
response ``{"outputs": {NAME: TENSOR}, "id", "model", "model_version", "passthrough"?}``,
``TENSOR = {"dtype": D, "shape": [...], "data": bin | list}``. ``bin`` data
becomes a read-only numpy view of the unpacked ``bytes`` (no copy); list data
(flat or nested) is checked against the shape before it is converted.
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack as _mp
import numpy as np

from worker.errors import DecodeError, InferenceError

from .arrow import passthrough_as_python
from .base import (
    MSGPACK,
    Bound,
    Envelope,
    Headers,
    Limits,
    Outputs,
    Request,
    Response,
    bind_tensors,
    check_elements,
)
from .headers import parse_version

__all__ = [
    "DTYPES",
    "MAX_RANK",
    "MsgpackCodec",
    "tensor_from_wire",
    "tensor_to_wire",
]

# Wire dtype name -> numpy dtype (little-endian on the wire); None: "string".
DTYPES: dict[str, np.dtype | None] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
DTYPES["string"] = None
MAX_RANK = 32
"""Deeper declared shapes are refused before any list is walked (numpy allows 64)."""
_PASSTHROUGH_DEPTH = 64
"""The packer's own recursion limit is 511; refuse deep passthrough at decode, not at encode."""
_NATIVE_LE = sys.byteorder == "little"


def _dtype_list() -> str:
    return ", ".join(DTYPES)


def _unpack(value: bytes) -> Any:
    # unpackb bounds every declared str/bin/array/map length by len(value), so a
    # tiny record cannot announce a huge allocation; the C unpacker's fixed
    # nesting stack turns deep nesting into StackError, not a RecursionError.
    return _mp.unpackb(value, raw=False, strict_map_key=False, use_list=True)


def _shape_of(name: str, raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise DecodeError(f"input {name!r}: 'shape' must be a list of integers, got {raw!r:.80}")
    if len(raw) > MAX_RANK:
        raise DecodeError(f"input {name!r}: rank {len(raw)} is over the limit of {MAX_RANK}")
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise DecodeError(f"input {name!r}: shape {raw!r:.80} holds a non-integer {dim!r:.20}")
        if dim < 0:
            raise DecodeError(f"input {name!r}: shape {raw!r:.80} has a negative dimension")
    return tuple(raw)


def _flatten(name: str, data: list[Any], shape: tuple[int, ...], count: int) -> list[Any]:
    """Leaves of a flat or nested list, checked against ``shape`` level by level."""
    if not shape:
        if len(data) != 1:
            raise DecodeError(f"input {name!r}: shape [] needs 1 value, data has {len(data)}")
        return data
    if not data or not isinstance(data[0], list):
        if len(data) != count:
            raise DecodeError(
                f"input {name!r}: shape {list(shape)} needs {count} values, data has {len(data)}"
            )
        return data
    level: list[Any] = [data]
    for depth, dim in enumerate(shape):
        nxt: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != dim:
                got = f"length {len(item)}" if isinstance(item, list) else "a scalar"
                raise DecodeError(
                    f"input {name!r}: ragged nested list: at depth {depth} expected a list "
                    f"of length {dim} (shape {list(shape)}), got {got}"
                )
            nxt.extend(item)
        level = nxt
    return level


def tensor_from_wire(name: str, obj: object, limits: Limits) -> np.ndarray:
    """One TENSOR map -> numpy, validating dtype, shape and data length first."""
    if not isinstance(obj, dict):
        raise DecodeError(
            f"input {name!r}: expected a tensor map {{dtype, shape, data}}, "
            f"got {type(obj).__name__}"
        )
    dtype_name = obj.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise DecodeError(
            f"input {name!r}: unknown dtype {dtype_name!r:.40}; expected one of {_dtype_list()}"
        )
    shape = _shape_of(name, obj.get("shape"))
    count = check_elements(name, shape, limits)
    dtype = DTYPES[dtype_name]
    data = obj.get("data")
    if isinstance(data, (bytes, bytearray)):
        if dtype is None:
            raise DecodeError(f"input {name!r}: dtype 'string' needs a list of str, got bin data")
        need = count * dtype.itemsize
        if len(data) != need:
            raise DecodeError(
                f"input {name!r}: shape {list(shape)} of {dtype_name} needs {need} bytes, "
                f"data has {len(data)}"
            )
        arr = np.frombuffer(data, dtype=dtype).reshape(shape)
        # A view on little-endian hosts; big-endian hosts pay one byte-swapping copy.
        return arr if _NATIVE_LE else arr.astype(dtype.newbyteorder("="))
    if isinstance(data, list):
        flat = _flatten(name, data, shape, count)
        if dtype is None:
            if not all(isinstance(s, str) for s in flat):
                raise DecodeError(f"input {name!r}: dtype 'string' needs every value to be a str")
            out = np.empty(count, dtype=object)
            out[:] = flat
            return out.reshape(shape)
        if any(isinstance(v, (str, bytes)) for v in flat):
            # numpy would parse "1.5" into a float; text in a numeric tensor is a producer bug.
            raise DecodeError(f"input {name!r}: data list for {dtype_name} holds text")
        try:
            with np.errstate(all="raise"):  # 1e300 into float32 is an error, not inf
                arr = np.array(flat, dtype=dtype.newbyteorder("="))
        except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
            raise DecodeError(
                f"input {name!r}: data list does not fit {dtype_name}: {exc}"
            ) from exc
        if arr.shape != (count,):
            raise DecodeError(
                f"input {name!r}: ragged or over-nested data list for shape {list(shape)}"
            )
        return arr.reshape(shape)
    raise DecodeError(f"input {name!r}: 'data' must be bin or a list, got {type(data).__name__}")


def tensor_to_wire(arr: np.ndarray) -> dict[str, Any]:
    """numpy -> TENSOR map with bin data (a buffer view: packb copies it once, into the body)."""
    if arr.dtype == object or arr.dtype.kind in "US":
        flat = [s if isinstance(s, str) else _text(s) for s in arr.ravel().tolist()]
        return {"dtype": "string", "shape": list(arr.shape), "data": flat}
    name = "bool" if arr.dtype.kind == "b" else arr.dtype.name
    if name not in DTYPES:
        raise TypeError(f"dtype {arr.dtype} has no msgpack wire name")
    wire = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    data = wire.reshape(-1).view(np.uint8).data  # a memoryview: packed as bin without tobytes()
    return {"dtype": name, "shape": list(arr.shape), "data": data}


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _default(obj: object) -> object:
    """Pack numpy scalars/arrays that turn up inside map outputs or passthrough values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _depth_ok(value: object, limit: int) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _optional_str(body: dict[Any, Any], key: str) -> str | None:
    raw = body.get(key)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise DecodeError(f"msgpack body: {key!r} must be a string, got {type(raw).__name__}")
    return str(raw)


_RESPONSE_LIMITS = Limits(max_bytes=2**62, max_rows=2**62, max_elements=2**62)


def _output_to_wire(value: object) -> object:
    return tensor_to_wire(value) if isinstance(value, np.ndarray) else value


class MsgpackCodec:
    """``application/x-msgpack``: a map of named whole tensors; the sniffing fallback."""

    name: str = "msgpack"
    content_type: str = MSGPACK
    media_types: tuple[str, ...] = (MSGPACK, "application/msgpack", "application/vnd.msgpack")

    def sniff(self, value: bytes) -> bool:
        return True  # anything that is neither Arrow nor JSON

    def decode_request(self, value: bytes, envelope: Envelope, limits: Limits) -> Request:
        try:
            body = _unpack(value)
        except Exception as exc:  # every unpacker failure (ExtraData, StackError...) is bad bytes
            raise DecodeError(f"not a valid msgpack body: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict):
            raise DecodeError(
                f"msgpack body: expected a map with 'inputs', got {type(body).__name__}"
            )
        raw_inputs = body.get("inputs")
        if not isinstance(raw_inputs, dict):
            raise DecodeError(
                "msgpack body: expected 'inputs' to be a map of name -> tensor, got "
                f"{type(raw_inputs).__name__}"
            )
        tensors: dict[str, np.ndarray] = {}
        for name, obj in raw_inputs.items():
            if not isinstance(name, str):
                raise DecodeError(f"msgpack body: input names must be strings, got {name!r:.40}")
            tensors[name] = tensor_from_wire(name, obj, limits)
        passthrough = body.get("passthrough")
        if passthrough is not None and not _depth_ok(passthrough, _PASSTHROUGH_DEPTH):
            raise DecodeError(f"msgpack body: 'passthrough' nests deeper than {_PASSTHROUGH_DEPTH}")
        version = envelope.model_version
        if version is None and body.get("model_version") is not None:
            version = parse_version(body["model_version"], "msgpack body 'model_version'")
        return Request(
            format=self.name,
            model=envelope.model or _optional_str(body, "model"),
            model_version=version,
            request_id=envelope.request_id or _optional_str(body, "id") or envelope.default_id,
            headers=envelope.headers,
            _binder=lambda signature: bind_tensors(tensors, signature, passthrough),
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
        body: dict[str, object] = {
            "outputs": {name: _output_to_wire(v) for name, v in outputs.items()},
            "id": request.request_id,
            "model": model,
            "model_version": model_version,
        }
        passthrough = bound.passthrough if bound is not None else None
        if passthrough is not None:
            body["passthrough"] = passthrough_as_python(passthrough)
        try:
            return _mp.packb(body, default=_default, use_bin_type=True)
        except Exception as exc:  # e.g. an integer over 64 bits in a map output
            raise InferenceError(
                f"the answer cannot be written as msgpack: {type(exc).__name__}: {exc}"
            ) from exc

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
        body: dict[str, object] = {"inputs": {n: tensor_to_wire(a) for n, a in inputs.items()}}
        if request_id is not None:
            body["id"] = request_id
        if model is not None:
            body["model"] = model
        if model_version is not None:
            body["model_version"] = model_version
        if passthrough is not None:
            body["passthrough"] = passthrough_as_python(passthrough)
        return _mp.packb(body, default=_default, use_bin_type=True)

    def decode_response(self, value: bytes) -> Response:
        try:
            body = _unpack(value)
        except Exception as exc:
            raise DecodeError(f"not a valid msgpack body: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("outputs"), dict):
            raise DecodeError("msgpack response: expected a map with 'outputs'")
        outputs: dict[str, object] = {}
        for name, obj in body["outputs"].items():
            is_tensor = isinstance(obj, dict) and "dtype" in obj
            outputs[name] = tensor_from_wire(name, obj, _RESPONSE_LIMITS) if is_tensor else obj
        version = body.get("model_version")
        return Response(
            outputs=outputs,
            request_id=_optional_str(body, "id"),
            model=_optional_str(body, "model"),
            model_version=version if isinstance(version, int) else None,
            passthrough=body.get("passthrough"),
        )
