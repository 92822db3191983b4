"""``inference-worker optimize``: write a faster version of a model, behind an accuracy gate.

One pass, top to bottom (:func:`optimize`):

1. resolve the source version in the repository (spec §2);
2. build the candidate in a hidden work directory next to the versions
   (``DIR/NAME/.optimize-<hex>/``, ignored by the repository's scan):
   ``plain`` graph optimization, ``fp16`` conversion or ``int8`` dynamic
   quantization, each ending in ONNX Runtime's offline graph optimization;
3. run source and candidate on the same sample through the worker's own
   :func:`~worker.runtime.load_session` and compare every output (the gate);
4. time both side by side, alternating, same inputs and threads;
5. accepted: write ``optimize.json`` (provenance) and rename the work
   directory to ``DIR/NAME/<max+1>`` in one step, so a running worker never
   sees a half-written version; refused: delete it, write nothing.

The source file is only ever read. A flat ``DIR/NAME.onnx`` (version 1) gets
its next version as ``DIR/NAME/2/model.onnx``.

Why EXTENDED and not ALL for the saved graph: ORT_ENABLE_ALL adds layout
transforms (NCHWc blocking) tuned to the CPU that ran the optimizer, so a
saved ALL-level model may be slower or wrong elsewhere. The worker applies
ALL at load anyway, on the machine that serves (and caches that graph per
device), so the repository keeps the portable EXTENDED-level graph, built
with the target's execution provider so its fusions are the ones that
provider runs.

Exit status of :func:`main`: 0 written; 1 refused by the gate or the
candidate could not be built; 2 bad flags, unknown model or version,
unusable sample or target (one line naming the flag).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort

from worker.config import ConfigError
from worker.errors import InferenceError, ModelLoadError, ModelNotFound
from worker.repository import ModelRef, ModelRepository
from worker.runtime import (
    TF32_TOLERANCE,
    RuntimeOptions,
    Session,
    load_session,
    memcpy_nodes,
    resolve_device,
)
from worker.signature import Signature, format_spec

__all__ = [
    "DEFAULT_TOLERANCE",
    "MIN_ARGMAX_AGREEMENT",
    "MODES",
    "CandidateError",
    "OptimizeReport",
    "OptimizeRequest",
    "OutputCheck",
    "Timing",
    "build_candidate",
    "gate_tolerance",
    "main",
    "optimize",
]

PROG = "inference-worker optimize"
MODES = ("plain", "fp16", "int8")

DEFAULT_TOLERANCE: dict[str, float] = {
    # fp32 re-association by fusions: ~1e-6 of the output's scale in practice.
    "plain": 1e-4,
    # float16 keeps ~3 significant digits; a few layers accumulate to ~1e-3.
    "fp16": 1e-2,
    # 8-bit weights and activations: ~1-2% of the output's scale is normal.
    "int8": 5e-2,
}
"""Per mode; the gate allows ``tolerance * max(1, max|original|)`` per output.

On ``--target cuda`` the default is at least :data:`~worker.runtime.TF32_TOLERANCE`:
both sides run with TF32 on (the CUDA provider's default, as the worker
serves), and two graphs that fuse differently pick different TF32 kernels. An
explicit ``--tolerance`` below it turns TF32 off for the check, so an exact
comparison stays exact."""

MIN_ARGMAX_AGREEMENT = 0.99
"""Share of rows whose class (argmax, or the exact label) must not change."""

_MODEL_FILE = "model.onnx"
_PROVENANCE_FILE = "optimize.json"
_SEED = 0


class CandidateError(Exception):
    """The candidate could not be built or run (exit 1): a fact about the model, not the flags."""


# -- request and report --------------------------------------------------------


@dataclass(frozen=True)
class OptimizeRequest:
    repository: Path
    """Root of the model repository."""
    model: str
    """Model name (spec §2 rule)."""
    target: str
    """``cpu`` or ``cuda``: where the candidate is built, checked and timed."""
    mode: str = "plain"
    """``plain`` | ``fp16`` (cuda only) | ``int8`` (cpu only)."""
    version: int | None = None
    """Source version; newest when ``None``."""
    sample: Path | None = None
    """``.npy`` (single-input models) or ``.npz`` keyed by input name; else generated."""
    tolerance: float | None = None
    """Per-output allowance, scaled by ``max(1, max|original|)``; ``None``: the mode's default."""
    rows: int = 256
    """Rows generated when there is no ``sample``."""
    threads: int = 1
    """Intra-op threads for both sides (the worker's default is 1)."""
    repeats: int = 20
    """Timed A/B pairs."""
    min_speedup: float = 0.9
    """Refuse a candidate slower than this (a worker would serve it at once); 0: off."""


@dataclass(frozen=True)
class OutputCheck:
    """How one output of the candidate compares with the original on the sample."""

    name: str
    max_abs_diff: float | None
    """Largest absolute difference (float outputs); ``inf`` for NaN mismatches."""
    limit: float | None
    """``tolerance * max(1, max|original|)``: what ``max_abs_diff`` may reach."""
    agreement: float | None
    """Rows whose argmax (2-D float scores) or exact value (labels) did not change."""
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Timing:
    original_ms: float
    """Median wall time of one run of the original."""
    candidate_ms: float
    runs: int
    """Runs of each side (alternating A B B A ...)."""
    rows: int
    """Rows in one timed run."""
    threads: int
    original_load_ms: float
    candidate_load_ms: float
    original_bytes: int
    candidate_bytes: int

    @property
    def speedup(self) -> float:
        return self.original_ms / self.candidate_ms if self.candidate_ms > 0 else math.inf


@dataclass
class OptimizeReport:
    source: ModelRef
    mode: str
    target: str
    tolerance: float
    min_speedup: float
    sample: str
    """``generated (seed S)`` or the sample file's path."""
    sample_rows: int
    stages: list[str]
    """What was applied to the source, in order."""
    checks: list[OutputCheck]
    timing: Timing
    accepted: bool
    tf32: bool | None = None
    """CUDA: whether TF32 was on for both sides; ``None`` on CPU."""
    version: int | None = None
    """The version written; ``None`` when refused."""
    path: Path | None = None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.source.name,
            "source_version": self.source.version,
            "version": self.version,
            "path": None if self.path is None else str(self.path),
            "accepted": self.accepted,
            "reasons": self.reasons,
            "mode": self.mode,
            "target": self.target,
            "tolerance": self.tolerance,
            "tf32": self.tf32,
            "min_argmax_agreement": MIN_ARGMAX_AGREEMENT,
            "min_speedup": self.min_speedup,
            "sample": self.sample,
            "sample_rows": self.sample_rows,
            "stages": self.stages,
            "outputs": [
                {**asdict(c), "max_abs_diff": _finite(c.max_abs_diff)} for c in self.checks
            ],
            "timing": {**asdict(self.timing), "speedup": _finite(self.timing.speedup)},
        }

    def table(self) -> str:
        """The human report: verdict, one row per output, then timings."""
        lines = [
            f"{self.source} -> {self.mode} for {self.target}: "
            + (f"ACCEPTED, written as version {self.version}" if self.accepted else "REFUSED"),
            f"sample: {self.sample}, {self.sample_rows} rows; tolerance {self.tolerance:g} "
            f"x max(1, max|original|); class agreement >= {MIN_ARGMAX_AGREEMENT:.0%}"
            + ("" if self.tf32 is None else f"; TF32 {'on' if self.tf32 else 'off'}"),
            "",
        ]
        rows = [("output", "max-abs-diff", "limit", "agreement", "ok")]
        for c in self.checks:
            rows.append(
                (
                    c.name,
                    "-" if c.max_abs_diff is None else f"{c.max_abs_diff:.3g}",
                    "-" if c.limit is None else f"{c.limit:.3g}",
                    "-" if c.agreement is None else f"{c.agreement:.2%}",
                    ("yes" if c.ok else "NO") + (f"  {c.note}" if c.note else ""),
                )
            )
        lines += _columns(rows)
        t = self.timing
        lines += [
            "",
            f"timing: {t.rows} rows per run, {t.threads} thread(s), median of {t.runs} runs "
            f"each, alternating; minimum speedup {self.min_speedup:g}x",
            *_columns(
                [
                    ("", "original", "candidate", "speedup"),
                    (
                        "run ms",
                        f"{t.original_ms:.3f}",
                        f"{t.candidate_ms:.3f}",
                        f"{t.speedup:.2f}x",
                    ),
                    ("load ms", f"{t.original_load_ms:.1f}", f"{t.candidate_load_ms:.1f}", ""),
                    (
                        "file MB",
                        f"{t.original_bytes / 1e6:.2f}",
                        f"{t.candidate_bytes / 1e6:.2f}",
                        "",
                    ),
                ]
            ),
        ]
        if self.reasons:
            lines += ["", *(f"refused: {r}" for r in self.reasons)]
        if self.path is not None:
            lines += ["", f"written: {self.path}"]
        return "\n".join(lines)


def _finite(x: float | None) -> float | str | None:
    # JSON has no Infinity; a string keeps the value readable for machines too.
    return x if x is None or math.isfinite(x) else str(x)


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# -- building the candidate ------------------------------------------------------


def _providers(target: str) -> list[str]:
    if target == "cpu":
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _ort_optimize(source: Path, dest: Path, target: str) -> None:
    """ONNX Runtime's EXTENDED-level graph, saved (see the module docstring for why not ALL)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dest)
    opts.log_severity_level = 3
    ort.InferenceSession(str(source), opts, providers=_providers(target))


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence the converters' own chatter (INFO logs, DeprecationWarnings from their deps)."""
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"onnx.*")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def build_candidate(source: Path, dest: Path, mode: str, target: str) -> list[str]:
    """Write the candidate for ``source`` to ``dest``; returns the stages applied, in order.

    Scratch files go next to ``dest`` and are removed. Raises
    :class:`CandidateError` when a converter or ONNX Runtime refuses the model.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    scratch = dest.parent / f".scratch-{uuid.uuid4().hex}"
    scratch.mkdir()
    stages: list[str] = []
    try:
        current = source
        if mode == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            with _quiet("onnxruntime.transformers.float16"):
                model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
            current = scratch / "fp16.onnx"
            onnx.save(model, str(current))
            stages.append("float16 (keep_io_types)")
        elif mode == "int8":
            import onnx
            from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
            from onnxruntime.quantization.registry import IntegerOpsRegistry

            pre, quantized = scratch / "pre.onnx", scratch / "int8.onnx"
            with _quiet("onnxruntime.quantization", "root"):
                # Shape inference + BASIC-level folding first, as ORT recommends;
                # symbolic shape inference needs sympy, which onnx shape inference
                # replaces well enough for dynamic quantization.
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
                stages.append("quant_pre_process")
                quantize_dynamic(
                    str(pre),
                    str(quantized),
                    weight_type=QuantType.QInt8,
                    # Conv stays float: ConvInteger is slower than float Conv on
                    # CPU (0.3x on tests.modelzoo's CNN); CNNs want static,
                    # calibrated quantization, which needs data we do not have.
                    op_types_to_quantize=sorted(set(IntegerOpsRegistry) - {"Conv"}),
                    # Tensors typed only by contrib ops (an already optimized
                    # version as the source) are float in every model we serve.
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
            current = quantized
            stages.append("quantize_dynamic (int8 weights, uint8 activations; Conv kept float)")
        _ort_optimize(current, dest, target)
        stages.append(f"onnxruntime ORT_ENABLE_EXTENDED ({_providers(target)[0]})")
        if target != "cpu" and memcpy_nodes(dest):
            # A CUDA session saves Memcpy nodes where its partition crosses to CPU;
            # they tie the graph to that partition. The CPU provider's graph is
            # portable, and the worker applies CUDA's own fusions at load anyway.
            _ort_optimize(current, dest, "cpu")
            stages.append("rebuilt with CPUExecutionProvider: the CUDA graph held Memcpy nodes")
    except Exception as exc:  # converters raise anything from ValueError to ORT's types
        raise CandidateError(f"{mode} candidate could not be built: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = memcpy_nodes(dest)
    if found:  # never published: see worker.runtime.memcpy_nodes
        raise CandidateError(
            f"{mode} candidate holds {len(found)} Memcpy node(s) ({', '.join(found[:3])}): "
            "a graph tied to one CUDA/CPU partition is not published"
        )
    return stages


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -- sample inputs ---------------------------------------------------------------


def _load_sample(path: Path, signature: Signature) -> dict[str, np.ndarray]:
    """Feeds from ``.npy`` (one input) or ``.npz`` (by input name); ConfigError('--sample')."""
    names = [s.name for s in signature.inputs]
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {names[0] if names else "": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError) as exc:
        raise ConfigError("--sample", f"cannot read {path}: {_one_line(exc)}") from None
    if isinstance(loaded, np.ndarray) and len(names) != 1:
        raise ConfigError(
            "--sample", f"a .npy holds one array; the model has inputs {names}: use .npz"
        )
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ConfigError("--sample", f"{path} lacks input(s) {missing}; it has {sorted(arrays)}")
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        array = arrays[spec.name]
        if spec.dtype is not None and array.dtype != spec.dtype:
            if spec.dtype.kind != array.dtype.kind:
                raise ConfigError(
                    "--sample",
                    f"input {spec.name!r}: expected {format_spec(spec.dtype, spec.shape)}, "
                    f"got {format_spec(array.dtype, array.shape)}",
                )
            array = array.astype(spec.dtype)  # float64 -> float32 and the like
        feeds[spec.name] = array
    return feeds


def _generated_sample(signature: Signature, rows: int) -> dict[str, np.ndarray]:
    """Standard-normal floats, small non-negative ints, random bools: the shapes a model accepts."""
    rng = np.random.default_rng(_SEED)
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        if spec.dtype is None or spec.shape is None or spec.dtype.kind in "USO":
            raise ConfigError(
                "--sample", f"input {spec.name!r} is {spec.onnx_type}: pass real inputs"
            )
        dims = [1 if d is None else d for d in spec.shape]
        if dims and spec.shape[0] is None:
            dims[0] = rows
        elif dims:  # a fixed batch axis: as many whole batches as cover ``rows``
            dims[0] *= max(1, math.ceil(rows / max(1, dims[0])))
        shape = tuple(dims)
        if spec.dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.normal(size=shape).astype(spec.dtype)
    return feeds


def _batches(feeds: dict[str, np.ndarray], signature: Signature) -> list[dict[str, np.ndarray]]:
    """Split along axis 0 when the model's batch axis is fixed; else one batch."""
    fixed = {s.batch_axis for s in signature.inputs if s.batch_axis is not None}
    if not fixed or len(fixed) > 1 or not feeds:
        return [feeds]
    size = fixed.pop()
    total = len(next(iter(feeds.values())))
    if total == size:
        return [feeds]
    if total % size:
        raise ConfigError("--sample", f"the model takes batches of {size} rows; got {total} rows")
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, total, size)]


# -- the gate ----------------------------------------------------------------------


def _run_all(session: Session, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [session.run(b) for b in batches]
    joined: dict[str, Any] = {}
    for name in parts[0]:
        values = [p[name] for p in parts]
        if all(isinstance(v, np.ndarray) and v.ndim > 0 for v in values):
            joined[name] = np.concatenate(values) if len(values) > 1 else values[0]
        else:
            joined[name] = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return joined


def _as_scores(value: Any) -> np.ndarray | None:
    """ZipMap output (list of {class: score}) -> 2-D float array; else None."""
    if isinstance(value, list) and value and all(isinstance(d, dict) for d in value):
        keys = sorted(value[0])
        return np.array([[d[k] for k in keys] for d in value], dtype=np.float64)
    return None


def _compare(name: str, a: Any, b: Any, tolerance: float) -> OutputCheck:
    a = a if isinstance(a, np.ndarray) else (_as_scores(a) if _as_scores(a) is not None else a)
    b = b if isinstance(b, np.ndarray) else (_as_scores(b) if _as_scores(b) is not None else b)
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        same = a == b
        return OutputCheck(name, None, None, 1.0 if same else 0.0, bool(same), "compared whole")
    if a.shape != b.shape:
        return OutputCheck(name, None, None, None, False, f"shape {b.shape} != {a.shape}")
    if a.dtype.kind != "f":
        rows = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)
        other = b.reshape(rows.shape)
        same = float(np.mean(np.all(rows == other, axis=1))) if len(rows) else 1.0
        return OutputCheck(name, None, None, same, same >= MIN_ARGMAX_AGREEMENT)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - b64))
    max_diff = float(np.nan_to_num(diff, nan=math.inf).max()) if diff.size else 0.0
    finite = np.abs(a64[np.isfinite(a64)])
    limit = tolerance * max(1.0, float(finite.max()) if finite.size else 1.0)
    ok = max_diff <= limit
    agreement: float | None = None
    if a.ndim == 2 and a.shape[1] >= 2 and len(a):
        agreement = float(np.mean(np.argmax(a64, axis=1) == np.argmax(b64, axis=1)))
        ok = ok and agreement >= MIN_ARGMAX_AGREEMENT
    return OutputCheck(name, max_diff, limit, agreement, ok)


def _signature_changes(before: Signature, after: Signature) -> list[str]:
    def view(specs: Sequence[Any]) -> list[tuple[str, str]]:
        return [(s.name, s.onnx_type) for s in specs]

    changes = []
    if view(before.inputs) != view(after.inputs):
        changes.append(f"inputs changed: {view(after.inputs)} != {view(before.inputs)}")
    if view(before.outputs) != view(after.outputs):
        changes.append(f"outputs changed: {view(after.outputs)} != {view(before.outputs)}")
    return changes


# -- timing ------------------------------------------------------------------------


def _time_pairs(
    a: Session, b: Session, feeds: dict[str, np.ndarray], pairs: int
) -> tuple[float, float]:
    """Median ms per run of each, alternating A B / B A so drift hits both equally."""
    times: dict[int, list[float]] = {0: [], 1: []}
    sessions = (a, b)
    for i in range(pairs):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.monotonic()
            sessions[side].run(feeds)
            times[side].append((time.monotonic() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def _load(ref: ModelRef, options: RuntimeOptions) -> tuple[Session, float]:
    start = time.monotonic()
    session = load_session(ref, options)
    return session, (time.monotonic() - start) * 1e3


# -- writing -----------------------------------------------------------------------


def _next_version(model_dir: Path, present: list[int]) -> int:
    # Numeric directories without a model.onnx count too: renaming onto an
    # empty one would silently replace it.
    numeric = (
        [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max([*present, *numeric, 0]) + 1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(work: Path, model_dir: Path, first: int) -> tuple[int, Path]:
    """Rename ``work`` to the first free ``model_dir/<v>`` from ``first``: one atomic step."""
    for version in range(first, first + 100):
        target = model_dir / str(version)
        if target.exists():
            continue
        try:
            os.rename(work, target)  # fails (ENOTEMPTY/EEXIST) if someone took it meanwhile
        except OSError:
            if target.exists():
                continue
            raise
        _fsync(model_dir)
        return version, target
    raise CandidateError(f"no free version directory under {model_dir}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- the command -------------------------------------------------------------------


def gate_tolerance(mode: str, target: str, tolerance: float | None) -> tuple[float, bool]:
    """(tolerance, TF32 on) for the gate: TF32-sized by default on CUDA, exact when asked.

    ``tolerance`` is ``--tolerance`` (``None``: the mode's default). On CPU the
    second value is meaningless and True.
    """
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE[mode]
        if target == "cuda":
            tolerance = max(tolerance, TF32_TOLERANCE)
    return tolerance, not (target == "cuda" and tolerance < TF32_TOLERANCE)


def _check_request(request: OptimizeRequest) -> tuple[str, float]:
    """Device and tolerance; ConfigError naming the flag for impossible combinations."""
    if request.target not in ("cpu", "cuda"):
        raise ConfigError("--target", f"expected cpu or cuda, got {request.target!r}")
    if request.mode not in MODES:
        raise ConfigError("--fp16/--int8", f"mode must be one of {', '.join(MODES)}")
    if request.mode == "fp16" and request.target != "cuda":
        # ORT's CPU kernels mostly lack float16: casts around them make it slower.
        raise ConfigError("--fp16", "needs --target cuda (float16 does not speed up CPU kernels)")
    if request.mode == "int8" and request.target != "cpu":
        # MatMulInteger/ConvInteger have no fast CUDA kernels; they would fall back to the CPU.
        raise ConfigError("--int8", "needs --target cpu (dynamic int8 kernels are CPU kernels)")
    tolerance, _ = gate_tolerance(request.mode, request.target, request.tolerance)
    if not tolerance >= 0:
        raise ConfigError("--tolerance", f"must be >= 0, got {tolerance!r}")
    try:
        device = resolve_device(request.target)
    except ValueError as exc:
        raise ConfigError("--target", str(exc).split(": ", 1)[-1]) from None
    return device, tolerance


def optimize(request: OptimizeRequest) -> OptimizeReport:
    """Build, gate, time and (when accepted) publish the candidate; see the module docstring.

    Raises :class:`~worker.config.ConfigError` (exit 2) for the request's own
    faults, :class:`CandidateError` (exit 1) when the model cannot be
    converted or run. A refusal by the gate is a report with ``accepted=False``.
    """
    device, tolerance = _check_request(request)
    try:
        repo = ModelRepository(request.repository)
    except ValueError as exc:
        raise ConfigError("--model-repository", str(exc).split(": ", 1)[-1]) from None
    try:
        source = repo.resolve(request.model, request.version)
    except ModelNotFound as exc:
        known = request.version is not None and bool(repo.versions(request.model))
        raise ConfigError("--version" if known else "--model", exc.message) from None

    model_dir = repo.root / source.name
    if model_dir.exists() and not model_dir.is_dir():
        raise CandidateError(f"{model_dir} exists and is not a directory")
    model_dir.mkdir(exist_ok=True)  # a flat NAME.onnx gets its first directory here
    work = model_dir / f".optimize-{uuid.uuid4().hex}"
    work.mkdir()
    try:
        # 1. Build first: it also pays ONNX Runtime's one-time start-up, which
        #    would otherwise be charged to the original's load time below.
        candidate_path = work / _MODEL_FILE
        stages = build_candidate(source.path, candidate_path, request.mode, request.target)

        # 2. Load both the way the worker does (ALL-level at load, same threads).
        _, tf32 = gate_tolerance(request.mode, request.target, tolerance)
        options = RuntimeOptions(
            device=device,
            intra_op_threads=request.threads,
            optimized_dir=None,
            warmup=False,
            cuda_tf32=tf32,
        )
        try:
            original, original_load_ms = _load(source, options)
        except ModelLoadError as exc:
            raise CandidateError(exc.message) from exc
        try:  # version 0: not a version yet
            candidate, candidate_load_ms = _load(ModelRef(source.name, 0, candidate_path), options)
        except ModelLoadError as exc:
            raise CandidateError(f"the candidate does not load: {exc.message}") from exc

        # 3. The gate: every output, on every row of the sample.
        if request.sample is not None:
            feeds = _load_sample(request.sample, original.signature)
            sample = str(request.sample)
        else:
            feeds = _generated_sample(original.signature, request.rows)
            sample = f"generated (seed {_SEED})"
        batches = _batches(feeds, original.signature)
        expected = _run_checked(original, batches, "the original")
        got = _run_checked(candidate, batches, "the candidate")
        checks = [_compare(n, expected[n], got[n], tolerance) for n in expected if n in got]
        reasons = _signature_changes(original.signature, candidate.signature)
        reasons += [_reason(c) for c in checks if not c.ok]

        # 4. Side by side on the first batch: same inputs, same threads.
        pairs = max(1, request.repeats)
        original_ms, candidate_ms = _time_pairs(original, candidate, batches[0], pairs)
        original.close()
        candidate.close()
        timing = Timing(
            original_ms=original_ms,
            candidate_ms=candidate_ms,
            runs=pairs,
            rows=_rows(batches[0]),
            threads=request.threads,
            original_load_ms=original_load_ms,
            candidate_load_ms=candidate_load_ms,
            original_bytes=source.path.stat().st_size,
            candidate_bytes=candidate_path.stat().st_size,
        )
        if timing.speedup < request.min_speedup:
            reasons.append(f"speedup {timing.speedup:.2f}x < --min-speedup {request.min_speedup:g}")
        report = OptimizeReport(
            source=source,
            mode=request.mode,
            target=request.target,
            tolerance=tolerance,
            min_speedup=request.min_speedup,
            sample=sample,
            sample_rows=sum(_rows(b) for b in batches),
            stages=stages,
            checks=checks,
            timing=timing,
            accepted=not reasons,
            reasons=reasons,
            tf32=tf32 if device.startswith("cuda") else None,
        )
        if not report.accepted:
            return report

        # 5. Provenance, then one rename: the version appears whole or not at all.
        provenance = {
            "source": {
                "name": source.name,
                "version": source.version,
                "file": os.path.relpath(source.path, repo.root),
                "sha256": _sha256(source.path),
            },
            "sha256": _sha256(candidate_path),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "onnxruntime": ort.__version__,
            **{
                k: v
                for k, v in report.to_dict().items()
                if k not in ("model", "source_version", "version", "path", "reasons")
            },
        }
        (work / _PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _fsync(candidate_path)
        _fsync(work / _PROVENANCE_FILE)
        first = _next_version(model_dir, repo.versions(source.name))
        version, published = _publish(work, model_dir, first)
        report.version, report.path = version, published / _MODEL_FILE
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)  # already gone when published


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values()))) if feeds else 0


def _run_checked(
    session: Session, batches: list[dict[str, np.ndarray]], who: str
) -> dict[str, Any]:
    try:
        return _run_all(session, batches)
    except InferenceError as exc:
        raise CandidateError(f"{who} fails on the sample: {exc.message}") from exc


def _reason(check: OutputCheck) -> str:
    if check.note:
        return f"output {check.name}: {check.note}"
    if (
        check.max_abs_diff is not None
        and check.limit is not None
        and not (check.max_abs_diff <= check.limit)
    ):
        return f"output {check.name}: max abs diff {check.max_abs_diff:.3g} > {check.limit:.3g}"
    return f"output {check.name}: agreement {check.agreement or 0:.2%} < {MIN_ARGMAX_AGREEMENT:.0%}"


# -- command line ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every configuration error: the flag and why.
        self.exit(2, f"{self.prog}: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Write a faster version of a model as the next version, "
        "only if its outputs agree with the original.",
    )
    p.add_argument("--model-repository", metavar="DIR", required=True, help="model repository")
    p.add_argument("--model", metavar="NAME", required=True, help="model name")
    p.add_argument("--version", metavar="V", help="source version (default: newest)")
    p.add_argument(
        "--target",
        metavar="cpu|cuda",
        required=True,
        help="device the candidate is built, checked and timed on",
    )
    p.add_argument("--fp16", action="store_true", help="float16 weights, float32 I/O (cuda)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantization (cpu)")
    p.add_argument(
        "--sample",
        metavar="FILE",
        type=Path,
        help=".npy (one input) or .npz (by input name); default: generated",
    )
    p.add_argument(
        "--tolerance",
        metavar="T",
        help="allowed max abs diff x max(1, max|original|) (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE.items())
        + f"; cuda at least {TF32_TOLERANCE:g}, TF32; below that TF32 is off)",
    )
    p.add_argument("--rows", metavar="N", default="256", help="generated rows (default 256)")
    p.add_argument(
        "--threads",
        metavar="N",
        default="1",
        help="intra-op threads, both sides (default 1, as the worker)",
    )
    p.add_argument("--repeats", metavar="N", default="20", help="timed runs per side (default 20)")
    p.add_argument(
        "--min-speedup",
        metavar="S",
        default="0.9",
        help="refuse a candidate whose median run is slower than S x the "
        "original's (default 0.9; 0: off)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _positive_int(flag: str, text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(flag, f"must be a positive integer, got {text!r}")
    return n


def _non_negative_float(flag: str, text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 <= x < math.inf:
        raise ConfigError(flag, f"must be a number >= 0, got {text!r}")
    return x


def _request(argv: Sequence[str]) -> tuple[OptimizeRequest, bool]:
    args = _build_parser().parse_args(list(argv))
    if args.fp16 and args.int8:
        raise ConfigError("--fp16", "and --int8 exclude each other")
    tolerance = None
    if args.tolerance is not None:
        tolerance = _non_negative_float("--tolerance", args.tolerance)
    min_speedup = _non_negative_float("--min-speedup", args.min_speedup)
    repository = Path(args.model_repository)
    if not repository.is_dir():
        raise ConfigError("--model-repository", f"{args.model_repository!r} is not a directory")
    if args.sample is not None and not args.sample.is_file():
        raise ConfigError("--sample", f"{str(args.sample)!r} is not a file")
    request = OptimizeRequest(
        repository=repository,
        model=args.model,
        target=args.target,
        mode="fp16" if args.fp16 else "int8" if args.int8 else "plain",
        version=None if args.version is None else _positive_int("--version", args.version),
        sample=args.sample,
        tolerance=tolerance,
        rows=_positive_int("--rows", args.rows),
        threads=_positive_int("--threads", args.threads),
        repeats=_positive_int("--repeats", args.repeats),
        min_speedup=min_speedup,
    )
    return request, bool(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """``inference-worker optimize ...``: 0 written, 1 refused or failed, 2 bad request."""
    try:
        request, as_json = _request(sys.argv[1:] if argv is None else argv)
        report = optimize(request)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except CandidateError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
    return 0 if report.accepted else 1


if __name__ == "__main__":
    sys.exit(main())
