"""The Open Inference Protocol's REST health and metadata, on the metrics port.

    GET /v2                                   server metadata
    GET /v2/health/live                       as /healthz
    GET /v2/health/ready                      as /readyz
    GET /v2/models/{m}[/versions/{v}]         model metadata
    GET /v2/models/{m}[/versions/{v}]/ready   the version is served and loadable

Metadata comes from the repository's files, never from a session: asking
what a model takes must not load it (and evict another). The ONNX graph's
inputs and outputs are read with ``onnx`` and kept per file until its
modification time changes. "Loadable" means the version is served under the
model's version policy, its settings file is usable, and its graph reads and
matches what that file declares; a load failure of ONNX Runtime itself shows
up on the request, not here.

Every model name goes through the repository's name rule before any file is
touched. Errors are JSON ``{"error": "..."}`` with 404 for an unknown model,
version or path and 400 for a version that is not a number.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from worker.errors import ModelLoadError, ModelNotFound, WorkerError
from worker.model_config import check_signature, protocol_datatype
from worker.repository import ModelRef, ModelRepository
from worker.signature import Signature, TensorSpec

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from worker.health import Health

__all__ = ["PLATFORM", "SignatureReader", "oip_app"]

PLATFORM = "onnxruntime_onnx"
"""Triton's platform name for an ONNX Runtime model."""


class SignatureReader:
    """ONNX inputs and outputs read from a file's graph, cached by (path, mtime, size)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], Signature]] = {}

    def read(self, ref: ModelRef) -> Signature:
        """The signature of ``ref``'s file; :class:`ModelLoadError` when it does not parse."""
        try:
            st = os.stat(ref.path)
        except OSError as exc:
            raise ModelNotFound(f"model {ref}: {ref.path.name} is gone: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(ref.path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        signature = _read_graph(ref)
        with self._lock:
            self._cache[ref.path] = (stamp, signature)
        return signature


def _read_graph(ref: ModelRef) -> Signature:
    import onnx

    try:
        model = onnx.load(str(ref.path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise ModelLoadError(f"model {ref}: {ref.path.name} is not an ONNX model: {exc}") from None
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    return Signature(
        inputs=tuple(_spec(v) for v in graph.input if v.name not in weights),
        outputs=tuple(_spec(v) for v in graph.output),
    )


def _spec(value: Any) -> TensorSpec:
    import numpy as np
    from onnx import helper

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(value.name, kind or "unknown", None, None)
    tensor = value.type.tensor_type
    elem = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    dtype = np.dtype(np.str_) if np.dtype(elem).kind == "O" else np.dtype(elem)
    shape: tuple[int | None, ...] | None = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
            for d in tensor.shape.dim
        )
    return TensorSpec(value.name, f"tensor({dtype.name})", dtype, shape)


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    shape = [-1] if spec.shape is None else [-1 if d is None else d for d in spec.shape]
    return {"name": spec.name, "datatype": protocol_datatype(spec), "shape": shape}


def _json(start_response: StartResponse, status: str, body: object) -> Iterable[bytes]:
    data = orjson.dumps(body)
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _error(start_response: StartResponse, status: str, message: str) -> Iterable[bytes]:
    return _json(start_response, status, {"error": message})


def _health(start_response: StartResponse, why: str | None) -> Iterable[bytes]:
    # The protocol: the status says it; a 200 has an empty body.
    if why is None:
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    return _error(start_response, "503 Service Unavailable", why)


def oip_app(
    repository: ModelRepository,
    health: Health,
    *,
    name: str = "inference-worker",
    version: str | None = None,
    reader: SignatureReader | None = None,
) -> WSGIApplication:
    """The ``/v2`` routes as a WSGI app (the metrics server hands it every ``/v2`` path)."""
    if version is None:
        from worker import __version__

        version = __version__
    server = {"name": name, "version": version, "extensions": []}
    signatures = reader or SignatureReader()

    def model_route(parts: list[str], start_response: StartResponse) -> Iterable[bytes]:
        ready = parts[-1] == "ready"
        if ready:
            parts = parts[:-1]
        if len(parts) not in (1, 3) or (len(parts) == 3 and parts[1] != "versions"):
            return _error(start_response, "404 Not Found", "not found: see /v2/models/{m}")
        model, wanted = parts[0], None
        if len(parts) == 3:
            if not (parts[2].isascii() and parts[2].isdigit()):
                return _error(
                    start_response,
                    "400 Bad Request",
                    f"version must be a positive integer, got {parts[2][:40]!r}",
                )
            wanted = int(parts[2])
        try:
            ref = repository.resolve(model, wanted)  # the name rule comes first
            served = repository.served_versions(model)
            signature = signatures.read(ref)
            check_signature(ref.settings, signature, str(ref))
        except ModelNotFound as exc:
            return _error(start_response, "404 Not Found", exc.message)
        except WorkerError as exc:  # a settings file or graph that cannot be served
            return _error(start_response, "503 Service Unavailable", exc.message)
        if ready:
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        return _json(
            start_response,
            "200 OK",
            {
                "name": ref.name,
                "versions": [str(v) for v in served],
                "platform": PLATFORM,
                "inputs": [_tensor_metadata(s) for s in signature.inputs],
                "outputs": [_tensor_metadata(s) for s in signature.outputs],
            },
        )

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/").rstrip("/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _error(
                start_response, "405 Method Not Allowed", "only health and metadata (GET) here"
            )
        if path == "/v2":
            return _json(start_response, "200 OK", server)
        if path == "/v2/health/live":
            return _health(start_response, health.liveness())
        if path == "/v2/health/ready":
            return _health(start_response, health.readiness())
        parts = path.split("/")[3:]
        if path.startswith("/v2/models/") and parts and parts[0]:
            return model_route(parts, start_response)
        return _error(
            start_response,
            "404 Not Found",
            f"not found: {path[:80]!r} (try /v2, /v2/health/live, /v2/health/ready, "
            "/v2/models/{m})",
        )

    return app
