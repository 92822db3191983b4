"""The JSON body: the Open Inference Protocol (V2) of KServe, MLServer and Triton.

Request: a V2 ``InferenceRequest``
``{"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "data", "parameters"?}],
"outputs"?: [{"name"}]}``; answer: a V2 ``InferenceResponse``
``{"model_name", "model_version", "id", "parameters"?, "outputs": [{"name", "shape",
"datatype", "data"}]}``. This is what MLServer's Kafka mode reads and writes,
so its producers and consumers work unchanged; :meth:`JsonCodec.response_headers`
adds the CloudEvents headers MLServer puts on its answers.

Speed: a request whose ``data`` arrays are all flat and numeric (what every
V2 client writes by default) is parsed by simdjson, whose numbers go straight
into a numpy buffer without a Python float each: twice as fast as the general
path for the demo MLP's 64-row request. Anything else, and every request that
is wrong, takes the general path, which gives the errors: ``orjson`` parses
the body; flat numeric ``data`` then becomes numpy with one C-level pass to
type-check it (``sum`` refuses text, null and nested lists) and one
``np.fromiter`` into the declared dtype, with no per-element Python code.
Answers are written by ``orjson`` straight from numpy buffers.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Literal

import numpy as np
import orjson
import simdjson

from worker.errors import DecodeError, InferenceError

from .arrow import passthrough_as_python
from .base import (
    JSON,
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

__all__ = [
    "CLOUDEVENTS_SOURCE",
    "CLOUDEVENTS_SPECVERSION",
    "CLOUDEVENTS_TYPE",
    "DATATYPES",
    "MAX_RANK",
    "JsonCodec",
]

DATATYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": None,
}
"""V2 datatype -> numpy dtype; ``BYTES`` (None) is a tensor of strings."""
_V2_NAMES = {dtype: name for name, dtype in DATATYPES.items() if dtype is not None}
MAX_RANK = 32

# What MLServer writes on its answers (mlserver/cloudevents.py, CloudEventsMiddleware):
# spec version 0.3, type ...inference.response, source io.seldon.serving.deployment.<server>.
CLOUDEVENTS_SPECVERSION = b"0.3"
CLOUDEVENTS_TYPE = b"io.seldon.serving.inference.response"
CLOUDEVENTS_SOURCE = b"io.seldon.serving.deployment.inference-worker"
_SERVER_NAME = b"inference-worker"

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_PASSTHROUGH_KEY = "passthrough"
"""Request/response ``parameters`` key carrying a value returned unchanged."""


def _fail(name: str, why: str) -> DecodeError:
    return DecodeError(f"input {name!r}: {why}")


def _shape_of(name: str, raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise _fail(name, f"'shape' must be a list of integers, got {raw!r:.80}")
    if len(raw) > MAX_RANK:
        raise _fail(name, f"rank {len(raw)} is over the limit of {MAX_RANK}")
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise _fail(name, f"shape {raw!r:.80} holds a non-integer {dim!r:.20}")
        if dim < 0:
            raise _fail(name, f"shape {raw!r:.80} has a negative dimension")
    return tuple(raw)


def _flatten(name: str, data: list[Any], shape: tuple[int, ...]) -> list[Any]:
    """Nested ``data`` -> its leaves in row-major order, each level checked to be
    rectangular (the work is per sub-list, not per element)."""
    level: list[Any] = data
    depth = 0
    while level and type(level[0]) is list:
        if not all(type(item) is list for item in level):
            raise _fail(name, f"ragged nested data: lists and scalars mixed at depth {depth + 1}")
        lengths = set(map(len, level))
        if len(lengths) != 1:
            raise _fail(
                name, f"ragged nested data: lengths {sorted(lengths)[:4]} at depth {depth + 1}"
            )
        depth += 1
        if depth > len(shape):
            raise _fail(name, f"data nests deeper than its shape {list(shape)}")
        level = list(itertools.chain.from_iterable(level))
    return level


def _numeric(name: str, flat: list[Any], dtype: np.dtype, datatype: str) -> np.ndarray:
    """Flat JSON numbers -> ``dtype``, refusing text, null, lists, objects and overflow."""
    try:
        total = sum(flat)  # C speed; TypeError on anything that is not a number (or a bool)
    except TypeError:
        kinds = sorted({type(v).__name__ for v in flat} - {"int", "float", "bool"})
        raise _fail(name, f"{datatype} data holds {', '.join(kinds)} values") from None
    if dtype.kind in "iu" and type(total) is float:
        arr = np.array(flat)  # a float somewhere: integral floats (1.0) are fine
        if not np.all(np.mod(arr, 1) == 0):
            raise _fail(name, f"{datatype} data holds non-integer numbers")
        flat = arr.astype(np.int64 if dtype.kind == "i" else np.uint64).tolist()
    try:
        with np.errstate(all="raise"):  # 1e300 into FP32 is an error, not inf
            return np.fromiter(flat, dtype=dtype, count=len(flat))
    except (OverflowError, FloatingPointError, ValueError, TypeError) as exc:
        raise _fail(name, f"data does not fit {datatype}: {exc}") from exc


def _tensor(name: str, obj: dict[str, Any], limits: Limits) -> np.ndarray:
    datatype = obj.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise _fail(
            name, f"unknown datatype {datatype!r:.40}; expected one of {', '.join(DATATYPES)}"
        )
    shape = _shape_of(name, obj.get("shape"))
    count = check_elements(name, shape, limits)
    data = obj.get("data")
    if isinstance(data, np.ndarray):  # checked and typed by _fast_body
        return data.reshape(shape)
    if not isinstance(data, list):
        # A scalar is accepted for a shape of one element (``"data": 3`` for shape [1] or []).
        if isinstance(data, (int, float, str)) and count == 1:
            data = [data]
        else:
            raise _fail(name, f"'data' must be a list, got {type(data).__name__}")
    flat = _flatten(name, data, shape)
    if len(flat) != count:
        raise _fail(name, f"shape {list(shape)} needs {count} values, data has {len(flat)}")
    dtype = DATATYPES[datatype]
    if dtype is None:
        if not all(type(v) is str for v in flat):
            raise _fail(name, "BYTES data must be strings")
        out = np.empty(count, dtype=object)
        out[:] = flat
        return out.reshape(shape)
    if dtype.kind == "b":
        if not all(type(v) is bool for v in flat):
            raise _fail(name, "BOOL data must be true or false")
        return np.array(flat, dtype=np.bool_).reshape(shape)
    return _numeric(name, flat, dtype, datatype).reshape(shape)


def _plain(value: object) -> object:
    """A simdjson value as the Python value ``orjson.loads`` gives."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


# simdjson's buffer types by numpy kind: double, int64, uint64
_BUFFER_TYPES: dict[str, tuple[Literal["d", "i", "u"], type[np.generic]]] = {
    "f": ("d", np.float64),
    "i": ("i", np.int64),
    "u": ("u", np.uint64),
}


def _flat_numbers(data: object, dtype: np.dtype | None, shape: object) -> np.ndarray | None:
    """``data`` as a flat array of ``dtype`` when it is exactly that (numbers that fit,
    as many as ``shape`` holds); None for the general path to decide and explain."""
    if dtype is None or dtype.kind not in _BUFFER_TYPES or not isinstance(data, simdjson.Array):
        return None
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return None
    of_type, wide = _BUFFER_TYPES[dtype.kind]
    try:
        # Nested arrays would be flattened here: the caller has proved there are none.
        numbers = np.frombuffer(data.as_buffer(of_type=of_type), dtype=wide)
    except (TypeError, ValueError):  # text, null, true, a float for an int type, 1e400
        return None
    if numbers.size != math.prod(shape):
        return None
    if dtype.kind in "iu" and numbers.size:
        info = np.iinfo(dtype)
        if numbers.min() < info.min or numbers.max() > info.max:
            return None
    try:
        # 1e300 into FP32 is an error, not inf; 1e-5 into FP16 is a subnormal, as
        # the general path makes it
        with np.errstate(over="raise", invalid="raise", under="ignore"):
            return numbers.astype(dtype, copy=False)
    except FloatingPointError:
        return None


_PARSERS = threading.local()


def _parse(value: bytes) -> Any:
    """Parse with this thread's parser: reusing its buffers halves the time of a fresh one."""
    parser = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = _PARSERS.parser = simdjson.Parser()
    try:
        return parser.parse(value)
    except RuntimeError:  # a view into its last document is still alive (a traceback)
        parser = _PARSERS.parser = simdjson.Parser()
        return parser.parse(value)


def _members(obj: Any) -> dict[str, Any] | None:
    """A simdjson object's members, "inputs" and "data" left lazy (``items()`` would
    build Python lists of them); None for a key given twice (orjson keeps the last)."""
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):
        return None
    return {k: obj[k] if k in ("inputs", "data") else _plain(obj[k]) for k in keys}


def _fast_body(value: bytes) -> dict[str, Any] | None:
    """The body as ``orjson.loads`` gives it, but every input's ``data`` already a flat
    numpy array; None unless every input is flat numeric data (see the module docstring)."""
    try:
        doc = _parse(value)
    except (ValueError, TypeError):
        return None
    if not isinstance(doc, simdjson.Object):
        return None
    body = _members(doc)
    raw_inputs = body.pop("inputs", None) if body is not None else None
    if body is None or not isinstance(raw_inputs, simdjson.Array):
        return None
    inputs = []
    for raw in raw_inputs:
        obj = _members(raw) if isinstance(raw, simdjson.Object) else None
        if obj is None:
            return None
        data = obj.pop("data", None)
        datatype = obj.get("datatype")
        flat = _flat_numbers(
            data, DATATYPES.get(datatype) if isinstance(datatype, str) else None, obj.get("shape")
        )
        if flat is None:
            return None
        obj["data"] = flat
        inputs.append(obj)
    # Flat for sure: the '[' of "inputs", of each "shape" and "data", and of
    # "outputs" are the only ones in the body (a '[' in a string only adds one).
    outputs = 1 if isinstance(body.get("outputs"), list) else 0
    if value.count(b"[") != 1 + 2 * len(inputs) + outputs:
        return None
    body["inputs"] = inputs
    return body


def _requested_outputs(raw: object) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw
    ):
        raise DecodeError("V2 request: 'outputs' must be a list of {\"name\": str}")
    return tuple(o["name"] for o in raw)


def _key_id(key: bytes | None) -> str | None:
    if not key:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None  # an opaque binary key is no id: fall back to the body's


def _datatype(arr: np.ndarray) -> str:
    if arr.dtype == object or arr.dtype.kind in "US":
        return "BYTES"
    name = _V2_NAMES.get(arr.dtype.newbyteorder("="))
    if name is None:
        raise InferenceError(f"an output of dtype {arr.dtype} has no V2 datatype")
    return name


def _wire_output(name: str, value: object) -> dict[str, object]:
    if isinstance(value, np.ndarray):
        datatype = _datatype(value)
        if datatype == "BYTES":
            data: object = [v if isinstance(v, str) else _text(v) for v in value.ravel().tolist()]
        else:
            data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")).reshape(-1)
        return {"name": name, "shape": list(value.shape), "datatype": datatype, "data": data}
    if isinstance(value, list):  # non-tensor outputs, e.g. ZipMap's one dict per row
        return {"name": name, "shape": [len(value)], "datatype": "BYTES", "data": value}
    raise InferenceError(f"output {name!r} of type {type(value).__name__} has no V2 form")


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return str(obj)


def _array_from_response(name: str, obj: dict[str, Any]) -> object:
    data = obj.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data  # a list of maps (keys are strings in JSON)
    return _tensor(name, obj, _UNLIMITED)


_UNLIMITED = Limits(max_bytes=2**62, max_rows=2**62, max_elements=2**62)


class JsonCodec:
    """``application/json``: the Open Inference Protocol's InferenceRequest/Response."""

    name: str = "json"
    content_type: str = JSON
    media_types: tuple[str, ...] = (JSON,)

    def sniff(self, value: bytes) -> bool:
        return value.lstrip(b" \t\r\n")[:1] == b"{"

    def decode_request(self, value: bytes, envelope: Envelope, limits: Limits) -> Request:
        body = _fast_body(value)
        if body is None:
            try:
                body = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise DecodeError(f"not a valid JSON body: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise DecodeError(
                "V2 request: expected an object with 'inputs', a list of "
                "{name, shape, datatype, data}"
            )
        tensors: dict[str, np.ndarray] = {}
        for obj in body["inputs"]:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise DecodeError("V2 request: every input needs a string 'name'")
            name = obj["name"]
            if name in tensors:
                raise _fail(name, "given twice")
            tensors[name] = _tensor(name, obj, limits)
        body_id = body.get("id")
        if body_id is not None and not isinstance(body_id, str):
            raise DecodeError(f"V2 request: 'id' must be a string, got {type(body_id).__name__}")
        parameters = body.get("parameters")
        passthrough = parameters.get(_PASSTHROUGH_KEY) if isinstance(parameters, dict) else None
        request_id = envelope.request_id or _key_id(envelope.key) or body_id or envelope.default_id
        return Request(
            format=self.name,
            model=envelope.model,
            model_version=envelope.model_version,
            request_id=request_id,
            headers=envelope.headers,
            _binder=lambda signature: bind_tensors(tensors, signature, passthrough),
            outputs=_requested_outputs(body.get("outputs")),
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
            "model_name": model,
            "model_version": str(model_version),  # a string in V2
            "id": request.request_id,
        }
        passthrough = bound.passthrough if bound is not None else None
        if passthrough is not None:
            body["parameters"] = {_PASSTHROUGH_KEY: passthrough_as_python(passthrough)}
        body["outputs"] = [_wire_output(name, value) for name, value in outputs.items()]
        try:
            return orjson.dumps(body, default=_default, option=_DUMPS_OPTIONS)
        except orjson.JSONEncodeError as exc:
            raise InferenceError(f"the answer cannot be written as JSON: {exc}") from exc

    def response_headers(self, request: Request, *, model: str, model_version: int) -> Headers:
        """The CloudEvents headers of MLServer's answers, spelled (and ordered) as MLServer
        does; Kafka header names are case-sensitive."""
        rid, name = request.request_id.encode(), model.encode()
        return [
            ("Ce-Specversion", CLOUDEVENTS_SPECVERSION),
            ("Ce-Source", CLOUDEVENTS_SOURCE),
            ("Ce-Type", CLOUDEVENTS_TYPE),
            ("Ce-Modelid", name),
            ("Ce-Inferenceservicename", _SERVER_NAME),
            ("Ce-Endpoint", name),
            ("Ce-Id", rid),
            ("Ce-Requestid", rid),
        ]

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
        """``form``: ``auto``/``flat`` (row-major ``data``) or ``nested`` (lists like the shape)."""
        if form not in ("auto", "flat", "nested"):
            raise ValueError(f"unknown JSON form {form!r}; expected flat or nested")
        wire = []
        for name, arr in inputs.items():
            entry = _wire_output(name, arr)
            if form == "nested" and arr.ndim > 1:
                flat = np.asarray(entry["data"], dtype=object if arr.dtype == object else None)
                entry["data"] = flat.reshape(arr.shape).tolist()
            wire.append(entry)
        body: dict[str, object] = {}
        if request_id is not None:
            body["id"] = request_id
        if passthrough is not None:
            body["parameters"] = {_PASSTHROUGH_KEY: passthrough_as_python(passthrough)}
        body["inputs"] = wire
        return orjson.dumps(body, default=_default, option=_DUMPS_OPTIONS)

    def decode_response(self, value: bytes) -> Response:
        try:
            body = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"not a valid JSON body: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("outputs"), list):
            raise DecodeError("V2 response: expected an object with 'outputs'")
        outputs: dict[str, object] = {}
        for obj in body["outputs"]:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise DecodeError("V2 response: every output needs a string 'name'")
            outputs[obj["name"]] = _array_from_response(obj["name"], obj)
        version = body.get("model_version")
        parameters = body.get("parameters")
        return Response(
            outputs=outputs,
            request_id=body.get("id") if isinstance(body.get("id"), str) else None,
            model=body.get("model_name") if isinstance(body.get("model_name"), str) else None,
            model_version=int(version) if isinstance(version, str) and version.isdigit() else None,
            passthrough=parameters.get(_PASSTHROUGH_KEY) if isinstance(parameters, dict) else None,
        )
