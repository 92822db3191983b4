"""Per-model settings: Triton's ``config.pbtxt`` or a small ``model.toml`` (spec §2).

Either file sits in ``DIR/<name>/``; when both do, ``config.pbtxt`` wins (the
repository logs it). Both become one :class:`ModelSettings`; a field left
``None`` falls back to the ``run`` flag of the same meaning, so a model
without a file is served exactly as the flags say.

``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` message, which
the ``tritonclient`` package ships (the ``triton`` extra). What the worker
cannot honour is refused with a :class:`~worker.errors.ModelLoadError` that
says so (another backend, an ensemble, sequence batching, a decoupled model,
several instance groups), never silently ignored.

``model.toml`` keys::

    max_batch_rows = 64          # 0: no batch axis, every request runs alone
    max_batch_delay_ms = 2.5
    instances = 2                # runs of this model at once
    device = "cpu"               # auto | cpu | cuda | cuda:N
    versions = "all"             # or { latest = 2 }, or [1, 3]
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import ModelLoadError
from worker.signature import Signature, TensorSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CONFIG_PBTXT",
    "DEFAULT_SETTINGS",
    "MODEL_TOML",
    "ModelSettings",
    "TensorDecl",
    "VersionPolicy",
    "check_signature",
    "parse_config_pbtxt",
    "parse_model_toml",
    "protocol_datatype",
]

CONFIG_PBTXT = "config.pbtxt"
MODEL_TOML = "model.toml"
_TRITON_EXTRA = "pip install 'inference-worker[triton]'"
_PLATFORM = "onnxruntime_onnx"
_BACKEND = "onnxruntime"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served: ``all``, the ``latest`` n, or ``specific`` ones."""

    kind: str = "all"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> set[int]:
        """The versions served out of those present."""
        present = set(available)
        if self.kind == "latest":
            return set(sorted(present)[-self.num_versions :])
        if self.kind == "specific":
            return present & set(self.versions)
        return present

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return "specific " + ", ".join(str(v) for v in self.versions)
        return "all"


@dataclass(frozen=True)
class TensorDecl:
    """One ``input``/``output`` of a ``config.pbtxt``, checked against the ONNX file."""

    name: str
    data_type: str
    """The protocol's spelling (``FP32``, ``INT64``, ``BYTES``)."""
    dims: tuple[int, ...]
    """As the model sees it (``reshape`` when given), without the batch axis; -1: any size."""


@dataclass(frozen=True)
class ModelSettings:
    """One model's settings; ``None`` means "the run flag's value"."""

    source: str | None = None
    """The file they came from, ``None`` for the flags."""
    max_batch_rows: int | None = None
    max_batch_delay_s: float | None = None
    batch_axis: bool = True
    """False (``max_batch_size: 0``): the model has no batch axis; requests run alone."""
    coalesce: bool = True
    """False (a config.pbtxt without ``dynamic_batching``): requests are not coalesced."""
    preferred_batch_rows: tuple[int, ...] = ()
    """A coalesced batch reaching one of these sizes runs at once."""
    instances: int | None = None
    device: str | None = None
    versions: VersionPolicy = field(default_factory=VersionPolicy)
    inputs: tuple[TensorDecl, ...] = ()
    outputs: tuple[TensorDecl, ...] = ()

    @functools.cached_property
    def session_key(self) -> tuple[Any, ...]:
        """What a loaded session depends on: when it changes, the session is reloaded."""
        return (self.device, self.instances, self.batch_axis, self.inputs, self.outputs)


DEFAULT_SETTINGS = ModelSettings()


# -- config.pbtxt --------------------------------------------------------------------


def _config_class() -> Any:
    """Triton's ``inference.ModelConfig`` message class, or a load error naming the extra."""
    try:
        import tritonclient
    except ImportError:
        raise ModelLoadError(
            f"{CONFIG_PBTXT} needs Triton's model configuration schema: {_TRITON_EXTRA}"
        ) from None
    return _load_pb2(str(Path(tritonclient.__file__).parent)).ModelConfig


@functools.lru_cache(maxsize=1)
def _load_pb2(package_dir: str) -> Any:
    # tritonclient.grpc's __init__ needs grpcio; the generated message module does not.
    loaded = sys.modules.get("tritonclient.grpc.model_config_pb2")
    if loaded is not None:
        return loaded
    path = Path(package_dir) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ModelLoadError(f"tritonclient has no {path.name}: reinstall it ({_TRITON_EXTRA})")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config_pbtxt(text: str, name: str, where: str) -> ModelSettings:
    """Settings from a ``config.pbtxt``'s text; ``where`` names the file in errors."""
    from google.protobuf import text_format

    message = _config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{where}: not a valid Triton model configuration: {exc}") from None
    _refuse_unsupported(message, name, where)
    batch_axis = message.max_batch_size > 0
    if message.max_batch_size < 0:
        raise ModelLoadError(f"{where}: max_batch_size must be >= 0, got {message.max_batch_size}")
    coalesce = batch_axis and message.HasField("dynamic_batching")
    delay_s: float | None = None
    preferred: tuple[int, ...] = ()
    if coalesce:
        batching = message.dynamic_batching
        delay_s = batching.max_queue_delay_microseconds / 1e6
        preferred = tuple(sorted(set(batching.preferred_batch_size)))
        bad = [p for p in preferred if not 0 < p <= message.max_batch_size]
        if bad:
            raise ModelLoadError(
                f"{where}: preferred_batch_size {bad[0]} is outside 1..max_batch_size "
                f"({message.max_batch_size})"
            )
    instances, device = _instance_group(message, where)
    return ModelSettings(
        source=where,
        max_batch_rows=message.max_batch_size if batch_axis else None,
        max_batch_delay_s=delay_s,
        batch_axis=batch_axis,
        coalesce=coalesce,
        preferred_batch_rows=preferred,
        instances=instances,
        device=device,
        versions=_version_policy(message, where),
        inputs=tuple(_decl(t, where) for t in message.input),
        outputs=tuple(_decl(t, where) for t in message.output),
    )


def _refuse_unsupported(message: Any, name: str, where: str) -> None:
    if message.name and message.name != name:
        raise ModelLoadError(
            f"{where}: name {message.name!r} differs from its directory {name!r} "
            "(Triton requires them to match)"
        )
    platform, backend = message.platform, message.backend
    if (platform and platform != _PLATFORM) or (backend and backend != _BACKEND):
        raise ModelLoadError(
            f"{where}: platform {platform!r} / backend {backend!r}: this worker runs ONNX "
            f'models only (platform: "{_PLATFORM}" or backend: "{_BACKEND}")'
        )
    if message.HasField("ensemble_scheduling") or platform == "ensemble":
        raise ModelLoadError(f"{where}: ensembles are not supported; serve each model on its own")
    if message.HasField("sequence_batching"):
        raise ModelLoadError(
            f"{where}: sequence_batching is not supported (stateful models need a sequence "
            "scheduler); use dynamic_batching or none"
        )
    if message.model_transaction_policy.decoupled:
        raise ModelLoadError(f"{where}: decoupled models are not supported (one answer per record)")
    if message.batch_input or message.batch_output:
        raise ModelLoadError(
            f"{where}: batch_input/batch_output are not supported (the worker feeds the "
            "model's inputs as requests carry them)"
        )
    for tensor in message.input:
        if tensor.allow_ragged_batch or tensor.is_shape_tensor:
            raise ModelLoadError(
                f"{where}: input {tensor.name!r}: allow_ragged_batch and is_shape_tensor are "
                "not supported"
            )
    if message.default_model_filename not in ("", "model.onnx"):
        raise ModelLoadError(
            f"{where}: default_model_filename {message.default_model_filename!r} is not "
            "supported: each version's file is model.onnx"
        )


def _instance_group(message: Any, where: str) -> tuple[int | None, str | None]:
    groups = list(message.instance_group)
    if not groups:
        return None, None
    if len(groups) > 1:
        raise ModelLoadError(
            f"{where}: {len(groups)} instance_group entries; this worker takes one (count and kind)"
        )
    group = groups[0]
    kinds = type(group).Kind
    count = group.count if group.count > 0 else None
    if group.count < 0:
        raise ModelLoadError(f"{where}: instance_group count must be positive, got {group.count}")
    if group.kind == kinds.Value("KIND_CPU"):
        return count, "cpu"
    if group.kind == kinds.Value("KIND_GPU"):
        if len(group.gpus) > 1:
            raise ModelLoadError(
                f"{where}: instance_group gpus {list(group.gpus)}: one GPU per model here"
            )
        return count, f"cuda:{group.gpus[0]}" if group.gpus else "cuda"
    if group.kind == kinds.Value("KIND_AUTO"):
        return count, None
    raise ModelLoadError(
        f"{where}: instance_group kind {kinds.Name(group.kind)} is not supported "
        "(KIND_CPU, KIND_GPU or KIND_AUTO)"
    )


def _version_policy(message: Any, where: str) -> VersionPolicy:
    if not message.HasField("version_policy"):
        return VersionPolicy("latest", 1)  # Triton's default
    policy = message.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        versions = tuple(sorted(set(policy.specific.versions)))
        if not versions or versions[0] < 1:
            raise ModelLoadError(
                f"{where}: version_policy specific needs positive versions, got {list(versions)}"
            )
        return VersionPolicy("specific", versions=versions)
    count = policy.latest.num_versions
    if count < 1:
        raise ModelLoadError(f"{where}: version_policy latest num_versions must be at least 1")
    return VersionPolicy("latest", count)


# Triton's TYPE_* -> the protocol's datatype names.
_TRITON_TYPES = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}


def _decl(tensor: Any, where: str) -> TensorDecl:
    enum = tensor.DESCRIPTOR.fields_by_name["data_type"].enum_type
    type_name = enum.values_by_number[tensor.data_type].name
    if type_name not in _TRITON_TYPES:
        raise ModelLoadError(f"{where}: {tensor.name!r} has no data_type ({type_name})")
    dims = tuple(tensor.reshape.shape) if tensor.HasField("reshape") else tuple(tensor.dims)
    return TensorDecl(tensor.name, _TRITON_TYPES[type_name], dims)


# -- model.toml ----------------------------------------------------------------------

_TOML_KEYS = ("max_batch_rows", "max_batch_delay_ms", "instances", "device", "versions")


def parse_model_toml(text: str, where: str) -> ModelSettings:
    """Settings from a ``model.toml``'s text; ``where`` names the file in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_TOML_KEYS))
    if unknown:
        raise ModelLoadError(
            f"{where}: unknown key {unknown[0]!r} (expected {', '.join(_TOML_KEYS)})"
        )
    rows = data.get("max_batch_rows")
    if rows is not None and (not _is_int(rows) or rows < 0):
        raise ModelLoadError(f"{where}: max_batch_rows must be an integer >= 0, got {rows!r}")
    delay = data.get("max_batch_delay_ms")
    if delay is not None and (not _is_number(delay) or delay < 0):
        raise ModelLoadError(f"{where}: max_batch_delay_ms must be a number >= 0, got {delay!r}")
    instances = data.get("instances")
    if instances is not None and (not _is_int(instances) or instances < 1):
        raise ModelLoadError(f"{where}: instances must be an integer >= 1, got {instances!r}")
    device = data.get("device")
    if device is not None and not _valid_device(device):
        raise ModelLoadError(f"{where}: device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return ModelSettings(
        source=where,
        max_batch_rows=rows or None,
        max_batch_delay_s=None if delay is None else float(delay) / 1000,
        batch_axis=rows != 0,
        instances=instances,
        device=None if device in (None, "auto") else device,
        versions=_toml_versions(data.get("versions", "all"), where),
    )


def _toml_versions(value: object, where: str) -> VersionPolicy:
    if value == "all":
        return VersionPolicy("all")
    if isinstance(value, dict) and set(value) == {"latest"}:
        count = value["latest"]
        if _is_int(count) and count >= 1:
            return VersionPolicy("latest", count)
    if isinstance(value, list) and value and all(_is_int(v) and v >= 1 for v in value):
        return VersionPolicy("specific", versions=tuple(sorted(set(value))))
    raise ModelLoadError(
        f'{where}: versions must be "all", {{ latest = N }} (N >= 1) or a list of '
        f"positive versions, got {value!r}"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _valid_device(value: object) -> bool:
    if not isinstance(value, str):
        return False
    kind, _, index = value.partition(":")
    return (kind in ("auto", "cpu", "cuda") and not index) or (kind == "cuda" and index.isdigit())


# -- checking the declarations against the ONNX file ----------------------------------

_NUMPY_TO_PROTOCOL = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


def protocol_datatype(spec: TensorSpec) -> str:
    """The protocol's datatype for a tensor spec (``BYTES`` for strings and non-tensors)."""
    if spec.dtype is None or spec.dtype.kind in "USO":
        return "BYTES"
    return _NUMPY_TO_PROTOCOL.get(spec.dtype.name, spec.dtype.name.upper())


def check_signature(settings: ModelSettings, signature: Signature, model: str) -> None:
    """Raise :class:`ModelLoadError` when a declared input/output disagrees with the model."""
    for kind, decls, specs in (
        ("input", settings.inputs, signature.inputs),
        ("output", settings.outputs, signature.outputs),
    ):
        by_name = {s.name: s for s in specs}
        for decl in decls:
            spec = by_name.get(decl.name)
            if spec is None:
                raise ModelLoadError(
                    f"model {model}: {settings.source} declares {kind} {decl.name!r}; the ONNX "
                    f"file's {kind}s are {', '.join(sorted(by_name)) or 'none'}"
                )
            problem = _mismatch(decl, spec, settings.batch_axis)
            if problem:
                raise ModelLoadError(
                    f"model {model}: {kind} {decl.name!r}: {settings.source} says "
                    f"{decl.data_type}{list(decl.dims)}"
                    f"{' after the batch axis' if settings.batch_axis else ''}, the ONNX file "
                    f"has {protocol_datatype(spec)}{_dims(spec)} ({problem})"
                )


def _dims(spec: TensorSpec) -> list[int] | str:
    return "[?]" if spec.shape is None else [-1 if d is None else d for d in spec.shape]


def _mismatch(decl: TensorDecl, spec: TensorSpec, batch_axis: bool) -> str | None:
    if protocol_datatype(spec) != decl.data_type:
        return "data types differ"
    if spec.shape is None:
        return None  # unknown rank: nothing to compare
    shape = list(spec.shape)
    if batch_axis:
        if not shape:
            return "a scalar has no batch axis (max_batch_size 0 says so)"
        if shape[0] is not None:
            return f"axis 0 is fixed at {shape[0]}, not a batch axis"
        shape = shape[1:]
    if len(shape) != len(decl.dims):
        return "ranks differ"
    for got, want in zip(shape, decl.dims, strict=True):
        if got is not None and want != -1 and got != want:
            return "dimensions differ"
    return None
