"""The gate: the sample both sides run on, how their outputs compare, how fast each runs.

Nothing here writes a file. Sample faults raise
:class:`~worker.optimize.errors.RequestError` with field ``sample``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.optimize.errors import RequestError
from worker.optimize.sources import read_sample
from worker.runtime import TF32_TOLERANCE, Session
from worker.samples import SampleError, sample_feeds
from worker.signature import Signature, format_spec

__all__ = [
    "DEFAULT_TOLERANCE",
    "MIN_ARGMAX_AGREEMENT",
    "SEED",
    "OutputCheck",
    "compare",
    "gate_tolerance",
    "generated_sample",
    "load_sample",
    "reason",
    "run_all",
    "signature_changes",
    "split_batches",
    "time_pairs",
]

DEFAULT_TOLERANCE: dict[str, float] = {
    # fp32 re-association by fusions: ~1e-6 of the output's scale in practice.
    "plain": 1e-4,
    # float16 keeps ~3 significant digits; a few layers accumulate to ~1e-3.
    "fp16": 1e-2,
    # 8-bit weights and activations: ~1-2% of the output's scale is normal.
    "int8": 5e-2,
}
"""Per mode; the gate allows ``tolerance * max(1, max|original|)`` per output.

On the ``cuda`` target the default is at least :data:`~worker.runtime.TF32_TOLERANCE`:
both sides run with TF32 on (the CUDA provider's default, as the worker
serves), and two graphs that fuse differently pick different TF32 kernels. An
explicit tolerance below it turns TF32 off for the check, so an exact
comparison stays exact."""

MIN_ARGMAX_AGREEMENT = 0.99
"""Share of rows whose class (argmax, or the exact label) must not change."""

SEED = 0
"""Seed of the generated sample."""


def gate_tolerance(mode: str, target: str, tolerance: float | None) -> tuple[float, bool]:
    """(tolerance, TF32 on) for the gate: TF32-sized by default on CUDA, exact when asked.

    ``tolerance`` is the one asked for (``None``: the mode's default). On CPU
    the second value is meaningless and True.
    """
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE[mode]
        if target == "cuda":
            tolerance = max(tolerance, TF32_TOLERANCE)
    return tolerance, not (target == "cuda" and tolerance < TF32_TOLERANCE)


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


# -- the sample ----------------------------------------------------------------------


def load_sample(
    path: Path, signature: Signature, model: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Feeds from ``path`` (:func:`worker.optimize.sources.read_sample`: ``.npy``/``.npz``,
    a recording, a publish source) and what the report calls it; floats of another width
    are cast, another kind is refused."""
    names = [s.name for s in signature.inputs]
    sample = read_sample(path, signature, model)
    arrays = sample.arrays
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RequestError("sample", f"{path} lacks input(s) {missing}; it has {sorted(arrays)}")
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        array = arrays[spec.name]
        if spec.dtype is not None and array.dtype != spec.dtype:
            if spec.dtype.kind != array.dtype.kind:
                raise RequestError(
                    "sample",
                    f"input {spec.name!r}: expected {format_spec(spec.dtype, spec.shape)}, "
                    f"got {format_spec(array.dtype, array.shape)}",
                )
            array = array.astype(spec.dtype)  # float64 -> float32 and the like
        feeds[spec.name] = array
    return feeds, sample.description


def generated_sample(signature: Signature, rows: int) -> dict[str, np.ndarray]:
    """Standard-normal floats, ints in [0, 10), random bools, whole fixed batches (seed
    :data:`SEED`); string and non-tensor inputs need a real sample."""
    try:
        return sample_feeds(signature, rows, seed=SEED, whole_batches=True)
    except SampleError as exc:
        raise RequestError("sample", f"{exc}: pass real inputs") from None


def split_batches(
    feeds: dict[str, np.ndarray], signature: Signature
) -> list[dict[str, np.ndarray]]:
    """Split along axis 0 when the model's batch axis is fixed; else one batch."""
    fixed = {s.batch_axis for s in signature.inputs if s.batch_axis is not None}
    if not fixed or len(fixed) > 1 or not feeds:
        return [feeds]
    size = fixed.pop()
    total = len(next(iter(feeds.values())))
    if total == size:
        return [feeds]
    if total % size:
        raise RequestError("sample", f"the model takes batches of {size} rows; got {total} rows")
    return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, total, size)]


# -- comparing -----------------------------------------------------------------------


def run_all(session: Session, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Every batch through ``session``, outputs joined along axis 0 (lists for non-tensors)."""
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


def compare(name: str, a: Any, b: Any, tolerance: float) -> OutputCheck:
    """Original output ``a`` against candidate output ``b`` (see docs/optimize.md, "The gate")."""
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


def signature_changes(before: Signature, after: Signature) -> list[str]:
    """Refusal reasons when input or output names or types differ."""

    def view(specs: Sequence[Any]) -> list[tuple[str, str]]:
        return [(s.name, s.onnx_type) for s in specs]

    changes = []
    if view(before.inputs) != view(after.inputs):
        changes.append(f"inputs changed: {view(after.inputs)} != {view(before.inputs)}")
    if view(before.outputs) != view(after.outputs):
        changes.append(f"outputs changed: {view(after.outputs)} != {view(before.outputs)}")
    return changes


def reason(check: OutputCheck) -> str:
    """The refusal reason for a failed check, one line."""
    if check.note:
        return f"output {check.name}: {check.note}"
    if (
        check.max_abs_diff is not None
        and check.limit is not None
        and not (check.max_abs_diff <= check.limit)
    ):
        return f"output {check.name}: max abs diff {check.max_abs_diff:.3g} > {check.limit:.3g}"
    return f"output {check.name}: agreement {check.agreement or 0:.2%} < {MIN_ARGMAX_AGREEMENT:.0%}"


# -- timing --------------------------------------------------------------------------


def time_pairs(
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
