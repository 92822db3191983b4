"""ONNX Runtime sessions: device choice, session options, warm-up, run.

One :class:`Session` per model version. The options suit a worker that shares
its cores with Kafka clients: a configurable, small intra-op pool, no thread
spinning (spinning threads burn the cores the consumer needs), full graph
optimization, and the optimized graph kept on disk under a key that changes
with the model bytes, the ONNX Runtime version and the device, so a reload
skips the optimizer.

On CUDA the arena grows only by what is requested (``kSameAsRequested``) and
belongs to the session, so dropping an evicted session gives its memory back;
runs go through I/O binding (inputs copied from host once, outputs allocated
on the device then copied back).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from worker.errors import InferenceError, ModelLoadError
from worker.repository import ModelRef
from worker.signature import Signature

__all__ = [
    "RuntimeOptions",
    "Session",
    "cuda_probe",
    "load_session",
    "optimized_cache_key",
    "resolve_device",
    "warmup_feeds",
]

log = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"(auto|cpu|cuda)(?::(\d{1,3}))?")
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; see :func:`resolve_device`."""
    intra_op_threads: int = 1
    """Threads one run may use; small so Kafka I/O threads keep a core."""
    optimized_dir: Path | None = None
    """Where optimized graphs are saved; ``None`` disables the disk cache."""
    cuda_mem_limit: int | None = None
    """Per-session CUDA arena limit in bytes (``gpu_mem_limit``)."""
    warmup: bool = True
    """Run once at load with zeros so the first request does not pay first-run costs."""


# -- device ------------------------------------------------------------------

_TINY_MODEL: bytes | None = None


def _tiny_model() -> bytes:
    """A one-node Identity model, built once, for the CUDA probe."""
    global _TINY_MODEL
    if _TINY_MODEL is None:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        _TINY_MODEL = model.SerializeToString()
    return _TINY_MODEL


@functools.lru_cache(maxsize=8)
def cuda_probe(device_id: int = 0) -> str | None:
    """``None`` when CUDA really works on ``device_id``, else why not.

    Listing providers is not enough (onnxruntime-gpu without a driver still
    lists CUDA), so this creates a tiny session on the device and runs it.
    """
    if _CUDA_EP not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # the probe's failure is reported by us, once
        sess = ort.InferenceSession(
            _tiny_model(), opts, providers=[(_CUDA_EP, {"device_id": device_id})]
        )
        if sess.get_providers()[0] != _CUDA_EP:
            return f"CUDA session on device {device_id} fell back to {sess.get_providers()[0]}"
        sess.run(None, {"x": np.zeros(1, np.float32)})
    except Exception as exc:  # any failure means "not usable", with the reason
        return f"CUDA device {device_id} unusable: {exc}".strip()[:300]
    return None


_logged_choice: set[str] = set()
_log_lock = threading.Lock()


def _log_once(spec: str, message: str) -> None:
    with _log_lock:
        if spec in _logged_choice:
            return
        _logged_choice.add(spec)
    log.info(message)


def resolve_device(device: str) -> str:
    """``"cpu"`` or ``"cuda:N"`` for a ``--device`` value.

    ``auto`` picks CUDA device 0 only when :func:`cuda_probe` succeeds; an
    explicit ``cuda[:N]`` that is not usable is a configuration error. Raises
    ``ValueError("--device: ...")`` for a malformed or unusable spec.
    """
    spec = device.strip().lower() if isinstance(device, str) else ""
    match = _DEVICE_RE.fullmatch(spec)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cpu":
        _log_once(spec, "device: cpu (requested)")
        return "cpu"
    reason = cuda_probe(index)
    if kind == "cuda":
        if reason is not None:
            raise ValueError(f"--device {device}: {reason}")
        _log_once(spec, f"device: cuda:{index} (requested)")
        return f"cuda:{index}"
    if reason is None:
        _log_once(spec, "device: cuda:0 (auto: CUDA session created and run)")
        return "cuda:0"
    _log_once(spec, f"device: cpu (auto: {reason})")
    return "cpu"


# -- session -----------------------------------------------------------------


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, options.intra_op_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads would keep cores busy between runs, starving Kafka I/O.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; optimizer chatter is not actionable
    return opts


def _providers(device: str, options: RuntimeOptions) -> list[Any]:
    if device == "cpu":
        return [_CPU_EP]
    cuda: dict[str, Any] = {
        "device_id": _device_id(device),
        # Grow by what is asked, so the arena is no bigger than the model needs
        # and is released with the session.
        "arena_extend_strategy": "kSameAsRequested",
    }
    if options.cuda_mem_limit:
        cuda["gpu_mem_limit"] = int(options.cuda_mem_limit)
    return [(_CUDA_EP, cuda), _CPU_EP]


def _device_id(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimized_cache_key(path: Path, device: str) -> str:
    """Key of the optimized graph: model bytes + ORT version + device."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_file_digest(path).encode())
    h.update(f"\0ort={ort.__version__}\0device={device}\0level=all".encode())
    return h.hexdigest()


def warmup_feeds(signature: Signature) -> dict[str, np.ndarray] | None:
    """Zero inputs shaped from ``signature`` (dynamic axes -> 1); None if not buildable."""
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        if spec.dtype is None or spec.shape is None:
            return None  # sequences/maps: nothing sensible to fabricate
        shape = tuple(1 if d is None else d for d in spec.shape)
        if spec.dtype.kind in "US":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


class _GpuMemory:
    """Used device memory in bytes, via NVML or nvidia-smi; None when unmeasurable."""

    lock = threading.Lock()  # loads on one GPU are measured one at a time

    @staticmethod
    def used(device_id: int) -> int | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # optional package; fall through to nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-i", str(device_id)],
                capture_output=True, text=True, timeout=10, check=True,
            )
            return int(out.stdout.strip().splitlines()[0]) * 1024 * 1024
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None


class Session:
    """A loaded model version; :meth:`run` is thread-safe (ORT releases the GIL)."""

    def __init__(
        self,
        ref: ModelRef,
        inner: ort.InferenceSession,
        device: str,
        nbytes: int,
        *,
        optimized_path: Path | None = None,
        loaded_optimized: bool = False,
    ) -> None:
        self.ref = ref
        self.device = device
        self.nbytes = nbytes
        self.signature = Signature.from_session(inner)
        self.optimized_path = optimized_path
        self.loaded_optimized = loaded_optimized
        self.warmed_up = False
        self.warmup_seconds = 0.0
        self._inner: ort.InferenceSession | None = inner
        self._output_names = [o.name for o in self.signature.outputs]
        # I/O binding needs device tensors both ways; strings and seq/map
        # outputs stay on the host, so such models use the plain path.
        self._bind = device.startswith("cuda") and _all_tensors(self.signature)
        self._device_id = _device_id(device) if device.startswith("cuda") else 0

    def __repr__(self) -> str:
        return f"Session({self.ref}, device={self.device}, nbytes={self.nbytes})"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, object]:
        """Output name -> ndarray (or list[dict] for seq(map) outputs).

        Raises :class:`InferenceError` carrying ONNX Runtime's message.
        """
        inner = self._inner
        if inner is None:
            raise InferenceError(f"model {self.ref}: session is closed")
        try:
            if self._bind:
                values = self._run_bound(inner, feeds)
            else:
                values = inner.run(self._output_names, feeds)
        except Exception as exc:  # ORT raises several unrelated types
            raise InferenceError(f"model {self.ref}: {_ort_message(exc)}") from exc
        return dict(zip(self._output_names, values, strict=True))

    def _run_bound(self, inner: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[Any]:
        # One binding per call: IOBinding objects are not shareable across threads.
        binding = inner.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._output_names:
            binding.bind_output(name, "cuda", self._device_id)
        inner.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        return list(values)

    def warmup(self) -> None:
        feeds = warmup_feeds(self.signature)
        if feeds is None:
            log.info("model %s: no warm-up (non-tensor inputs)", self.ref)
            return
        start = time.monotonic()
        try:
            self.run(feeds)
        except InferenceError as exc:
            # Some graphs reject zeros/size-1 axes; real requests may still work.
            log.warning("model %s: warm-up run failed, serving anyway: %s", self.ref, exc)
            return
        self.warmup_seconds = time.monotonic() - start
        self.warmed_up = True

    def close(self) -> None:
        """Drop the ORT session; its memory (CUDA arena included) goes with it."""
        self._inner = None


def _all_tensors(signature: Signature) -> bool:
    specs = signature.inputs + signature.outputs
    return all(s.dtype is not None and s.dtype.kind not in "USO" for s in specs)


def _ort_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # ORT prefixes "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : "; keep what follows.
    return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)


@contextlib.contextmanager
def _measure_gpu(device: str) -> Iterator[list[int | None]]:
    """Yields a 1-slot list filled with device-memory growth across the block."""
    result: list[int | None] = [None]
    if not device.startswith("cuda"):
        yield result
        return
    dev = _device_id(device)
    with _GpuMemory.lock:
        before = _GpuMemory.used(dev)
        yield result
        after = _GpuMemory.used(dev)
    if before is not None and after is not None and after > before:
        result[0] = after - before


def _create(
    source: str, opts: ort.SessionOptions, providers: list[Any]
) -> ort.InferenceSession:
    return ort.InferenceSession(source, opts, providers=providers)


def load_session(ref: ModelRef, options: RuntimeOptions) -> Session:
    """Load, optimize (or reuse the optimized graph) and warm up ``ref``.

    Raises :class:`ModelLoadError` when the file is missing, corrupt or uses
    operators this ONNX Runtime cannot run.
    """
    device = resolve_device(options.device)
    providers = _providers(device, options)
    try:
        file_size = os.path.getsize(ref.path)
    except OSError as exc:
        raise ModelLoadError(f"model {ref}: cannot read {ref.path.name}: {exc.strerror}") from exc

    optimized: Path | None = None
    loaded_optimized = False
    inner: ort.InferenceSession | None = None
    with _measure_gpu(device) as growth:
        if options.optimized_dir is not None:
            try:
                key = optimized_cache_key(ref.path, device)
                optimized = Path(options.optimized_dir) / f"{key}.onnx"
            except OSError as exc:
                raise ModelLoadError(f"model {ref}: cannot read {ref.path.name}: {exc}") from exc
            if optimized.is_file():
                opts = _session_options(options)
                # Already optimized: running the optimizer again is the cost we skip.
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    inner = _create(str(optimized), opts, providers)
                    loaded_optimized = True
                except Exception as exc:  # a bad cache file is rebuilt below
                    log.warning("model %s: optimized graph %s unusable (%s); rebuilding",
                                ref, optimized.name, _ort_message(exc))
        if inner is None:
            opts = _session_options(options)
            tmp: Path | None = None
            if optimized is not None:
                try:
                    optimized.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    log.warning("model %s: optimized graph not saved: %s", ref, exc)
                    optimized = None
            if optimized is not None:
                # Written under a unique name, then renamed: concurrent loaders
                # never read a half-written graph.
                tmp = optimized.with_name(f".{optimized.stem}.{uuid.uuid4().hex}.tmp.onnx")
                opts.optimized_model_filepath = str(tmp)
            try:
                inner = _create(str(ref.path), opts, providers)
            except Exception as exc:  # every ORT load failure is a load error
                error = ModelLoadError(
                    f"model {ref}: {ref.path.name} could not be loaded: {_ort_message(exc)}"
                )
                if tmp is None:
                    raise error from exc
                tmp.unlink(missing_ok=True)
                tmp, optimized = None, None
                # Saving the optimized graph can fail on its own (e.g. > 2 GiB);
                # that must not make a good model unloadable.
                try:
                    inner = _create(str(ref.path), _session_options(options), providers)
                except Exception:
                    raise error from exc
                log.warning("model %s: optimized graph not saved: %s", ref, _ort_message(exc))
            if tmp is not None and optimized is not None:
                try:
                    os.replace(tmp, optimized)
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    optimized = None
                    log.warning("model %s: optimized graph not saved: %s", ref, exc)
        session = Session(
            ref, inner, device, file_size,
            optimized_path=optimized, loaded_optimized=loaded_optimized,
        )
        if options.warmup:
            session.warmup()
    if growth[0] is not None:
        session.nbytes = growth[0]
    return session
