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

Nothing falls back silently: a session asked for on CUDA is created without
ONNX Runtime's CPU retry and the load fails unless CUDA is its first
provider; the probe behind ``--device auto`` runs a Conv and a MatMul, so
cuDNN and cuBLAS have both loaded before CUDA is chosen; a CUDA failure during
warm-up fails the load; and an optimized graph holding ``Memcpy*`` nodes
(an artefact of a CUDA session, unloadable on CPU) is never cached.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
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

from worker.errors import ConfigError, InferenceError, ModelLoadError
from worker.model_config import ModelSettings, check_signature
from worker.repository import ModelRef
from worker.samples import SampleError, sample_feeds
from worker.signature import Signature

__all__ = [
    "CUDNN_CONV_ALGO_SEARCH",
    "DEFAULT_CUDNN_CONV_ALGO_SEARCH",
    "TF32_TOLERANCE",
    "RuntimeOptions",
    "Session",
    "create_session",
    "cuda_probe",
    "device_memory",
    "file_digest",
    "load_session",
    "memcpy_nodes",
    "optimized_cache_key",
    "parse_cuda_mem_limit",
    "parse_cudnn_conv_algo_search",
    "preload_cuda_libraries",
    "provider_names",
    "resolve_device",
    "warmup_feeds",
]

log = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"(auto|cpu|cuda)(?::(\d{1,3}))?")
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


CUDNN_CONV_ALGO_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
"""Values of ``--cudnn-conv-algo-search`` (the CUDA provider's ``cudnn_conv_algo_search``)."""

DEFAULT_CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"
"""cuDNN's heuristic pick per Conv shape, not ONNX Runtime's default EXHAUSTIVE.

EXHAUSTIVE benchmarks every algorithm of every Conv for each new input shape,
hundreds of ms per shape upstream (microsoft/onnxruntime#19838; PaddleX#5057
measured 634 ms per new shape against 1.9 ms for HEURISTIC, with steady-state
runs no slower), and the batcher hands a model any batch size from 1 to
``--max-batch-rows``. Since 1.20 HEURISTIC is cuDNN frontend's mode A and
EXHAUSTIVE its mode B (microsoft/onnxruntime#22705). DEFAULT uses one fixed
algorithm and is several times slower there, so it is never a good default."""

TF32_TOLERANCE = 5e-3
"""Relative tolerance for CUDA float32 results with TF32 on (ONNX Runtime's default).

TF32 keeps 10 mantissa bits (unit round-off 2**-11, about 4.9e-4) in cuBLAS
GEMMs and cuDNN convolutions; a few layers accumulate to ~1e-3 of the output's
scale. Comparisons that need fp32 exactness run with ``cuda_tf32=False``."""


def parse_cudnn_conv_algo_search(text: str) -> str:
    """``HEURISTIC`` | ``EXHAUSTIVE`` | ``DEFAULT`` (any case); ValueError naming the flag."""
    value = text.strip().upper() if isinstance(text, str) else ""
    if value not in CUDNN_CONV_ALGO_SEARCH:
        raise ValueError(
            "--cudnn-conv-algo-search: expected one of "
            f"{', '.join(CUDNN_CONV_ALGO_SEARCH)}, got {text!r}"
        )
    return value


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?", re.IGNORECASE)


def parse_cuda_mem_limit(text: str) -> int | None:
    """Bytes for ``--cuda-mem-limit``: ``8589934592``, ``8GiB``, ``512MiB``, ``8GB``; ``none``.

    Binary suffixes (KiB, MiB, GiB, TiB) count in 1024s, decimal ones (kB, MB,
    GB, TB) in 1000s. ``none`` (or ``0``) means no limit. Raises
    ``ValueError("--cuda-mem-limit: ...")``.
    """
    value = text.strip() if isinstance(text, str) else ""
    if value.lower() in ("none", "0"):
        return None
    match = _SIZE_RE.fullmatch(value)
    if match is None or (match.group(3) and not match.group(2)):
        raise ValueError(
            f"--cuda-mem-limit: expected bytes such as 8GiB, 512MiB or 8589934592, got {text!r}"
        )
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    scale = base ** "_kmgt".index(unit.lower()) if unit else 1
    nbytes = int(float(number) * scale)
    if nbytes < 1 << 20:
        raise ValueError(f"--cuda-mem-limit: {text!r} is under 1 MiB; no model fits in it")
    return nbytes


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; see :func:`resolve_device`."""
    intra_op_threads: int = 1
    """Threads one run may use; small so Kafka I/O threads keep a core."""
    optimized_dir: Path | None = None
    """Where optimized graphs are saved; ``None`` disables the disk cache."""
    cuda_mem_limit: int | None = None
    """Per-session CUDA arena limit in bytes (``gpu_mem_limit``); ``--cuda-mem-limit``."""
    warmup: bool = True
    """Run once at load with zeros so the first request does not pay first-run costs."""
    cudnn_conv_algo_search: str = DEFAULT_CUDNN_CONV_ALGO_SEARCH
    """cuDNN's Conv algorithm search; ``--cudnn-conv-algo-search``."""
    cuda_tf32: bool = True
    """TF32 in cuBLAS/cuDNN float32 math (the provider's ``use_tf32``); off for exactness."""
    warmup_max_rows: int | None = None
    """The largest batch the worker runs (``--max-batch-rows``). On CUDA the warm-up
    also runs at this many rows, so the arena reaches its working size before the
    session's device memory is measured and the first large batch is not an
    out-of-memory surprise. ``None``: batch 1 only."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "cudnn_conv_algo_search",
            parse_cudnn_conv_algo_search(self.cudnn_conv_algo_search),
        )
        if self.cuda_mem_limit is not None and self.cuda_mem_limit < 1:
            raise ValueError(f"--cuda-mem-limit: must be positive, got {self.cuda_mem_limit}")
        if self.warmup_max_rows is not None and self.warmup_max_rows < 1:
            raise ValueError(f"--max-batch-rows: must be positive, got {self.warmup_max_rows}")


# -- device ------------------------------------------------------------------

_preload_lock = threading.Lock()
_preloaded: list[str] = []


def preload_cuda_libraries() -> str | None:
    """Load CUDA/cuDNN from the ``nvidia-*`` wheels once (``onnxruntime.preload_dlls``).

    onnxruntime-gpu's provider library finds ``libcublasLt.so.13`` and friends
    only on the loader path; ``preload_dlls`` (1.21+) loads them from the
    ``[cuda,cudnn]`` extras' wheels first. Returns what it reported (it prints
    its failures), ``None`` when it had nothing to say or does not exist.
    """
    with _preload_lock:
        if _preloaded:
            return _preloaded[0] or None
        preload = getattr(ort, "preload_dlls", None)
        text = ""
        if preload is not None and _CUDA_EP in ort.get_available_providers():
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    preload()
            except Exception as exc:  # missing wheels are reported by the probe
                buf.write(f"{type(exc).__name__}: {exc}")
            text = " ".join(buf.getvalue().split())[:500]
            if text:
                log.info("onnxruntime.preload_dlls: %s", text)
        _preloaded.append(text)
        return text or None


_PROBE_MODEL: bytes | None = None


def _probe_model() -> bytes:
    """Conv -> Flatten -> MatMul, built once: cuDNN (Conv) and cuBLAS (MatMul) must both work.

    An Identity model proves nothing: since 1.31 cuDNN loads on first use, so a
    missing or mismatched cuDNN surfaces only when a Conv runs.
    """
    global _PROBE_MODEL
    if _PROBE_MODEL is None:
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(15)
        w = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
        m = rng.normal(0, 0.5, (4 * 8 * 8, 8)).astype(np.float32)
        graph = helper.make_graph(
            [
                helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                helper.make_node("Flatten", ["c"], ["f"], axis=1),
                helper.make_node("MatMul", ["f", "m"], ["y"]),
            ],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
            initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(m, "m")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        _PROBE_MODEL = model.SerializeToString()
    return _PROBE_MODEL


def _probe_input() -> np.ndarray:
    return np.random.default_rng(16).normal(0, 1, (2, 1, 8, 8)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def cuda_probe(device_id: int = 0) -> str | None:
    """``None`` when CUDA really works on ``device_id``, else why not.

    Listing providers is not enough (onnxruntime-gpu without a driver still
    lists CUDA), so this creates a session of a Conv and a MatMul on the device
    the way the worker creates its sessions (no CPU fallback), runs it with
    TF32 off and compares the result with the CPU's. It also makes the CUDA
    context and loads cuDNN/cuBLAS once, in this process, so those one-off
    costs are not charged to the first model's device memory.
    """
    if _CUDA_EP not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    preload_cuda_libraries()
    x = _probe_input()
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # the probe's failure is reported by us, once
        cuda = {"device_id": device_id, "use_tf32": "0",
                "cudnn_conv_algo_search": DEFAULT_CUDNN_CONV_ALGO_SEARCH}  # fmt: skip
        sess = create_session(_probe_model(), opts, [(_CUDA_EP, cuda), _CPU_EP])
        (got,) = sess.run(None, {"x": x})
        del sess
    except Exception as exc:  # any failure means "not usable", with the reason
        return f"CUDA device {device_id} unusable: {_ort_message(exc)}".strip()[:300]
    cpu = ort.InferenceSession(_probe_model(), providers=[_CPU_EP])
    (want,) = cpu.run(None, {"x": x})
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        worst = float(np.max(np.abs(np.asarray(got) - want)))
        return f"CUDA device {device_id} computes wrong results (Conv+MatMul off by {worst:.3g})"
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
    :class:`~worker.errors.ConfigError` (a ``ValueError``) naming ``--device`` for a
    malformed or unusable spec; its ``reason`` starts with the spec when unusable.
    """
    spec = device.strip().lower() if isinstance(device, str) else ""
    match = _DEVICE_RE.fullmatch(spec)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError("--device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cpu":
        _log_once(spec, "device: cpu (requested)")
        return "cpu"
    reason = cuda_probe(index)
    if kind == "cuda":
        if reason is not None:
            raise ConfigError("--device", f"{device}: {reason}")
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


def provider_names(device: str) -> list[str]:
    """Execution providers for ``device`` (``cpu``, ``cuda``, ``cuda:N``), first choice first."""
    return [_CPU_EP] if device == "cpu" else [_CUDA_EP, _CPU_EP]


def _providers(device: str, options: RuntimeOptions) -> list[Any]:
    if device == "cpu":
        return provider_names(device)
    cuda: dict[str, Any] = {
        "device_id": _device_id(device),
        # Grow by what is asked, so the arena is no bigger than the model needs
        # and is released with the session.
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
        "use_tf32": "1" if options.cuda_tf32 else "0",
    }
    if options.cuda_mem_limit:
        cuda["gpu_mem_limit"] = int(options.cuda_mem_limit)
    # CPU second: nodes CUDA has no kernel for (strings, ZipMap) run there. That
    # is a partition of the graph, not a fallback; create_session refuses those.
    return [(_CUDA_EP, cuda), _CPU_EP]


def _device_id(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _provider_name(provider: Any) -> str:
    return str(provider[0] if isinstance(provider, tuple) else provider)


def create_session(
    source: str | bytes, opts: ort.SessionOptions, providers: list[Any]
) -> ort.InferenceSession:
    """An ``InferenceSession`` whose first provider is ``providers[0]``, or an exception.

    ONNX Runtime's Python class retries on CPU when the first provider fails
    to initialise ("EP Error ... Falling back"), and the C++ side only logs
    "Failed to create CUDAExecutionProvider" when the provider library cannot
    load, then carries on without it. Either way a worker asked for CUDA would
    report ``cuda:0`` while running on CPU. So: the provider must be available,
    the Python retry is off (``enable_fallback=0``, ``disable_fallback()``),
    and the created session's first provider is checked.
    """
    wanted = _provider_name(providers[0])
    available = ort.get_available_providers()
    if wanted not in available:
        raise RuntimeError(
            f"{wanted} is not available in onnxruntime {ort.__version__} "
            f"(it has {', '.join(available)})"
        )
    session = ort.InferenceSession(source, opts, providers=providers, enable_fallback=0)
    session.disable_fallback()  # no CPU retry of a failed run either
    got = session.get_providers()
    if not got or got[0] != wanted:
        raise RuntimeError(
            f"asked for {wanted}, onnxruntime created the session on "
            f"{', '.join(got) or 'nothing'} (no fallback is allowed: check the CUDA and "
            "cuDNN libraries)"
        )
    return session


def file_digest(path: Path, algorithm: str = "blake2b") -> str:
    """Hex digest of a file, read 1 MiB at a time: blake2b at 160 bits (the cache
    keys) or any other ``hashlib`` algorithm by name (``sha256`` for provenance)."""
    h = hashlib.blake2b(digest_size=20) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimized_cache_key(path: Path, device: str) -> str:
    """Key of the optimized graph: model bytes + ORT version + device."""
    h = hashlib.blake2b(digest_size=16)
    h.update(file_digest(path).encode())
    h.update(f"\0ort={ort.__version__}\0device={device}\0level=all".encode())
    return h.hexdigest()


def memcpy_nodes(model: str | Path | Any) -> list[str]:
    """``op_type(name)`` of every ``Memcpy*`` node, subgraphs included.

    A CUDA session inserts ``MemcpyToHost``/``MemcpyFromHost`` where the graph
    crosses between CUDA and CPU nodes, and saves them with the optimized
    graph. They encode that one session's partition: ONNX Runtime releases
    without a CPU kernel for them refuse the graph (NOT_IMPLEMENTED, upstream
    microsoft/onnxruntime#11348, #17837), and a CUDA session that partitions
    differently copies twice or fails. So such a graph is never cached or
    published.
    """
    import onnx

    proto = (
        model
        if isinstance(model, onnx.ModelProto)
        else onnx.load(str(model), load_external_data=False)
    )
    found: list[str] = []
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.op_type.startswith("Memcpy"):
                found.append(f"{node.op_type}({node.name})")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    return found


def warmup_feeds(signature: Signature, rows: int = 1) -> dict[str, np.ndarray] | None:
    """Zero inputs shaped from ``signature``; None if not buildable.

    A dynamic first axis (the batch) gets ``rows``, any other dynamic axis 1;
    fixed axes are kept. A 0-d input stays 0-d.
    """
    try:
        return sample_feeds(signature, rows, zeros=True)
    except SampleError:
        return None  # sequences/maps: nothing sensible to fabricate


def _batch_axis_dynamic(signature: Signature) -> bool:
    return any(
        s.shape is not None and len(s.shape) > 0 and s.shape[0] is None for s in signature.inputs
    )


# -- device memory -----------------------------------------------------------


class _GpuMemory:
    """Device memory in bytes via NVML (``pynvml``) or ``nvidia-smi``; None when unmeasurable.

    CUDA numbers devices after ``CUDA_VISIBLE_DEVICES`` (and by default fastest
    first), NVML and nvidia-smi by PCI bus; the two are matched through the PCI
    bus id that the CUDA runtime reports for the CUDA device, else through
    ``CUDA_VISIBLE_DEVICES``.
    """

    lock = threading.Lock()  # loads on one GPU are measured one at a time

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def bus_id(device_id: int) -> str | None:
        """PCI bus id of CUDA device ``device_id`` (``0000:3B:00.0``); None if unknown."""
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                cudart = ctypes.CDLL(name)
            except OSError:
                continue
            buf = ctypes.create_string_buffer(64)
            if cudart.cudaDeviceGetPCIBusId(buf, 64, ctypes.c_int(device_id)) == 0:
                return buf.value.decode()
            return None
        return None

    @staticmethod
    def nvml_selector(device_id: int) -> str:
        """What nvidia-smi's ``-i`` takes for CUDA device ``device_id``."""
        bus = _GpuMemory.bus_id(device_id)
        if bus:
            return bus
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        if visible != [""] and device_id < len(visible):
            return visible[device_id]  # an index or a GPU-/MIG- UUID
        return str(device_id)

    @staticmethod
    def _nvml_handle(device_id: int) -> Any:
        import pynvml

        pynvml.nvmlInit()
        selector = _GpuMemory.nvml_selector(device_id)
        if selector.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(selector))
        if selector.startswith(("GPU-", "MIG-")):
            return pynvml.nvmlDeviceGetHandleByUUID(selector)
        return pynvml.nvmlDeviceGetHandleByPciBusId(selector)

    @staticmethod
    def process_used(device_id: int) -> int | None:
        """This process's device memory (NVML's per-process figure); None if not listed.

        Inside a container with its own PID namespace NVML reports host PIDs,
        so this process is not found and callers fall back to :meth:`used`.
        """
        pid = os.getpid()
        try:
            import pynvml

            handle = _GpuMemory._nvml_handle(device_id)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            mine = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory]
            return int(sum(mine)) if mine else None
        except Exception:  # optional package; fall through to nvidia-smi
            pass
        out = _nvidia_smi(
            "--query-compute-apps=pid,used_memory", _GpuMemory.nvml_selector(device_id)
        )
        if out is None:
            return None
        for line in out:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
                return int(fields[1]) * 1024 * 1024
        return None

    @staticmethod
    def used(device_id: int) -> int | None:
        """Device-wide used memory (every process on the GPU)."""
        try:
            import pynvml

            handle = _GpuMemory._nvml_handle(device_id)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # optional package; fall through to nvidia-smi
            pass
        out = _nvidia_smi("--query-gpu=memory.used", _GpuMemory.nvml_selector(device_id))
        try:
            return int(out[0]) * 1024 * 1024 if out else None
        except ValueError:
            return None


def _nvidia_smi(query: str, selector: str) -> list[str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits", "-i", selector],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line for line in out.stdout.splitlines() if line.strip()]


def device_memory(device: str) -> tuple[int | None, str]:
    """(bytes, scope) of device memory in use on ``device``: ``(None, "cpu")`` on CPU.

    ``scope`` is ``process`` when NVML lists this process (the figure counts
    only this worker), else ``device`` (everything on the GPU, other
    processes included), or ``none`` when nothing answers.
    """
    if not device.startswith("cuda"):
        return None, "cpu"
    dev = _device_id(device)
    mine = _GpuMemory.process_used(dev)
    if mine is not None:
        return mine, "process"
    total = _GpuMemory.used(dev)
    return total, "device" if total is not None else "none"


# -- sessions ----------------------------------------------------------------


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
        instances: int | None = None,
    ) -> None:
        self.ref = ref
        self.device = device
        self.nbytes = nbytes
        self.signature = Signature.from_session(inner)
        self.optimized_path = optimized_path
        self.loaded_optimized = loaded_optimized
        self.warmed_up = False
        self.warmup_seconds = 0.0
        self.warmup_rows: list[int] = []
        """Batch sizes the warm-up ran (first axis), in order."""
        self._inner: ort.InferenceSession | None = inner
        self._output_names = [o.name for o in self.signature.outputs]
        # I/O binding needs device tensors both ways; strings and seq/map
        # outputs stay on the host, so such models use the plain path.
        self._bind = device.startswith("cuda") and _all_tensors(self.signature)
        self._device_id = _device_id(device) if device.startswith("cuda") else 0
        self._output_device = "cuda" if device.startswith("cuda") else "cpu"
        self.instances = instances
        """Runs at once at most (a model's ``instances``); ``None``: as many as call."""
        self._instances = threading.BoundedSemaphore(instances) if instances else None

    def __repr__(self) -> str:
        return f"Session({self.ref}, device={self.device}, nbytes={self.nbytes})"

    @property
    def providers(self) -> list[str]:
        """The ORT session's providers, first the one that runs it; [] once closed."""
        inner = self._inner
        return list(inner.get_providers()) if inner is not None else []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, object]:
        """Output name -> ndarray (or list[dict] for seq(map) outputs).

        Raises :class:`InferenceError` carrying ONNX Runtime's message.
        """
        inner = self._inner
        if inner is None:
            raise InferenceError(f"model {self.ref}: session is closed")
        if self._instances is None:
            return self._run(inner, feeds)
        with self._instances:
            return self._run(inner, feeds)

    def _run(self, inner: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, object]:
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
            binding.bind_cpu_input(name, _host_array(array))
        for name in self._output_names:
            binding.bind_output(name, self._output_device, self._device_id)
        inner.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        return list(values)

    def warmup(self, rows: int | None = None) -> None:
        """Run zeros at batch 1, then at ``rows`` when larger and the batch axis is dynamic.

        A model that rejects such inputs is logged and served anyway; on CUDA a
        failure of the device itself (a CUDA, cuDNN or cuBLAS error, out of
        memory) is a :class:`ModelLoadError`: every request would fail the same way.
        """
        sizes = [1]
        if rows is not None and rows > 1 and _batch_axis_dynamic(self.signature):
            sizes.append(rows)
        start = time.monotonic()
        for size in sizes:
            feeds = warmup_feeds(self.signature, size)
            if feeds is None:
                log.info("model %s: no warm-up (non-tensor inputs)", self.ref)
                return
            try:
                self.run(feeds)
            except InferenceError as exc:
                if self.device.startswith("cuda") and _device_failure(exc):
                    raise ModelLoadError(
                        f"model {self.ref}: warm-up at {size} row(s) failed on {self.device}: "
                        f"{exc.message.split(': ', 1)[-1]}"
                    ) from exc
                # Some graphs reject zeros/size-1 axes; real requests may still work.
                log.warning("model %s: warm-up run failed, serving anyway: %s", self.ref, exc)
                return
            self.warmup_rows.append(size)
        self.warmup_seconds = time.monotonic() - start
        self.warmed_up = True

    def close(self) -> None:
        """Drop the ORT session; its memory (CUDA arena included) goes with it."""
        self._inner = None


def _host_array(array: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray returns at least 1-d: a scalar input would be bound as
    # shape (1,) and rejected (or broadcast) by the model. asarray keeps 0-d.
    out = np.asarray(array)
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)


_DEVICE_FAILURE_RE = re.compile(
    # ORT's CUDA_CALL/CUDNN_CALL/CUBLAS_CALL messages and allocation failures;
    # source paths in messages are lower case ("providers/cuda/..."): not matched.
    r"\bCUDA\b|CUDNN|cuDNN|CUBLAS|cuBLAS|CUFFT|out of memory|Failed to allocate memory"
)


def _device_failure(exc: BaseException) -> bool:
    """True for a failure of the GPU stack rather than of the inputs."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    ep_fail = getattr(getattr(ort, "capi", None), "onnxruntime_pybind11_state", None)
    ep_fail_type = getattr(ep_fail, "EPFail", None)
    if ep_fail_type is not None and isinstance(cause, ep_fail_type):
        return True
    return _DEVICE_FAILURE_RE.search(str(exc)) is not None


def _all_tensors(signature: Signature) -> bool:
    specs = signature.inputs + signature.outputs
    return all(s.dtype is not None and s.dtype.kind not in "USO" for s in specs)


def _ort_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # ORT prefixes "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : "; keep what follows.
    return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)


@contextlib.contextmanager
def _measure_gpu(device: str) -> Iterator[list[int | None]]:
    """Yields a 1-slot list filled with this process's device-memory growth across the block.

    Per process where NVML lists this process, else device-wide (which counts
    other processes' changes too). Loads on one GPU are measured one at a time.
    """
    result: list[int | None] = [None]
    if not device.startswith("cuda"):
        yield result
        return
    with _GpuMemory.lock:
        before, scope = device_memory(device)
        yield result
        after, scope_after = device_memory(device)
    if before is not None and after is not None and scope == scope_after and after > before:
        result[0] = after - before


def _create(source: str, opts: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    return create_session(source, opts, providers)


def _refuse_memcpy(ref: ModelRef, path: Path) -> bool:
    """True (and logged) when the freshly saved optimized graph must not be cached."""
    try:
        found = memcpy_nodes(path)
    except Exception as exc:  # unreadable: not cacheable either
        log.warning("model %s: optimized graph not saved: cannot read it back: %s", ref, exc)
        return True
    if found:
        log.warning(
            "model %s: optimized graph not saved: it holds %d Memcpy node(s) (%s), which "
            "tie it to this session's CPU/CUDA partition",
            ref,
            len(found),
            ", ".join(found[:3]),
        )
        return True
    return False


def _warmup_rows(device: str, settings: ModelSettings, options: RuntimeOptions) -> int | None:
    """The largest batch to warm up at: on CUDA, the model's own max rows, else the flag's."""
    if not device.startswith("cuda") or not settings.batch_axis:
        return None
    return settings.max_batch_rows or options.warmup_max_rows


def load_session(ref: ModelRef, options: RuntimeOptions) -> Session:
    """Load, optimize (or reuse the optimized graph) and warm up ``ref``.

    The model's own settings (``ref.settings``) choose its device and how
    many runs it takes at once, and their declared inputs and outputs are
    checked against the file.

    Raises :class:`ModelLoadError` when the file is missing, corrupt or uses
    operators this ONNX Runtime cannot run, when a CUDA session could only be
    made on CPU, when the CUDA warm-up fails, when the model's device is not
    usable, or when the file does not match its declarations.
    """
    settings = ref.settings
    try:
        device = resolve_device(settings.device or options.device)
    except ValueError as exc:
        where = f" ({settings.source})" if settings.device else ""
        raise ModelLoadError(f"model {ref}: device{where}: {exc}") from None
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
                    log.warning(
                        "model %s: optimized graph %s unusable (%s); rebuilding",
                        ref,
                        optimized.name,
                        _ort_message(exc),
                    )
                    with contextlib.suppress(OSError):
                        optimized.unlink()  # or every later load tries it again
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
            if tmp is not None and optimized is not None and _refuse_memcpy(ref, tmp):
                tmp.unlink(missing_ok=True)
                tmp, optimized = None, None
            if tmp is not None and optimized is not None:
                try:
                    os.replace(tmp, optimized)
                except OSError as exc:
                    tmp.unlink(missing_ok=True)
                    optimized = None
                    log.warning("model %s: optimized graph not saved: %s", ref, exc)
        session = Session(
            ref,
            inner,
            device,
            file_size,
            optimized_path=optimized,
            loaded_optimized=loaded_optimized,
            instances=settings.instances,
        )
        try:
            check_signature(settings, session.signature, str(ref))
        except ModelLoadError:
            session.close()
            raise
        if options.warmup:
            try:
                session.warmup(_warmup_rows(device, settings, options))
            except ModelLoadError:
                session.close()
                raise
    if growth[0] is not None:
        session.nbytes = growth[0]
    return session
