"""One optimize pass, top to bottom: :class:`OptimizeRequest` in, :class:`OptimizeReport` out.

The only module of the package that touches the repository: it reads the
source version and, when the gate accepts, publishes the candidate through
:meth:`~worker.repository.ModelRepository.publish_version`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import ConfigError, InferenceError, ModelLoadError, ModelNotFound
from worker.optimize import gate
from worker.optimize.candidates import MODES, TARGETS, build_candidate, check_mode
from worker.optimize.errors import CandidateError, RequestError, one_line
from worker.optimize.report import PROVENANCE_FILE, OptimizeReport, Timing, provenance
from worker.repository import MODEL_FILE, ModelRef, ModelRepository
from worker.runtime import RuntimeOptions, Session, load_session, resolve_device

__all__ = ["OptimizeRequest", "optimize"]


@dataclass(frozen=True)
class OptimizeRequest:
    repository: Path
    """Root of the model repository."""
    model: str
    """Model name."""
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


def _check_request(request: OptimizeRequest) -> tuple[str, float]:
    """Device and tolerance; :class:`RequestError` for impossible combinations."""
    if request.target not in TARGETS:
        raise RequestError("target", f"expected cpu or cuda, got {request.target!r}")
    if request.mode not in MODES:
        raise RequestError("mode", f"mode must be one of {', '.join(MODES)}")
    check_mode(request.mode, request.target)
    tolerance, _ = gate.gate_tolerance(request.mode, request.target, request.tolerance)
    if not tolerance >= 0:
        raise RequestError("tolerance", f"must be >= 0, got {tolerance!r}")
    try:
        device = resolve_device(request.target)
    except ConfigError as exc:  # "cuda: <why>": the why is ours to report
        raise RequestError("target", exc.reason.removeprefix(f"{request.target}: ")) from None
    return device, tolerance


def optimize(request: OptimizeRequest) -> OptimizeReport:
    """Build, gate, time and (when accepted) publish the candidate.

    1. resolve the source version in the repository;
    2. build the candidate in a staging directory of the model
       (:meth:`~worker.repository.ModelRepository.staging`);
    3. run source and candidate on the same sample through the worker's own
       :func:`~worker.runtime.load_session` and compare every output (the gate);
    4. time both side by side, alternating, same inputs and threads;
    5. accepted: write ``optimize.json`` and publish the staging directory as
       the next version in one rename; refused: delete it, write nothing.

    The source file is only ever read. Raises :class:`RequestError` for the
    request's own faults, :class:`CandidateError` when the model cannot be
    converted, run or published. A refusal by the gate is a report with
    ``accepted=False``.
    """
    device, tolerance = _check_request(request)
    try:
        repo = ModelRepository(request.repository)
    except ValueError as exc:
        raise RequestError("repository", str(exc)) from None
    try:
        source = repo.resolve(request.model, request.version)
    except ModelNotFound as exc:
        known = request.version is not None and bool(repo.versions(request.model))
        raise RequestError("version" if known else "model", exc.message) from None

    try:
        with repo.staging(source.name, tag="optimize") as work:
            candidate = work / MODEL_FILE
            report = _build_and_gate(request, source, candidate, device, tolerance)
            if report.accepted:
                # Provenance, then one rename: the version appears whole or not at all.
                record = provenance(report, repo.root, candidate)
                (work / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
                published = repo.publish_version(source.name, work)
                report.version, report.path = published.version, published.path
            return report
    except OSError as exc:  # the staging directory, a full disk, no free version number
        raise CandidateError(one_line(exc)) from exc


def _build_and_gate(
    request: OptimizeRequest, source: ModelRef, candidate_path: Path, device: str, tolerance: float
) -> OptimizeReport:
    """Steps 2 to 4 of :func:`optimize`: the candidate at ``candidate_path``, its report."""
    # Build first: it also pays ONNX Runtime's one-time start-up, which would
    # otherwise be charged to the original's load time below.
    stages = build_candidate(source.path, candidate_path, request.mode, request.target)

    # Load both the way the worker does (ALL-level at load, same threads).
    _, tf32 = gate.gate_tolerance(request.mode, request.target, tolerance)
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

    # The gate: every output, on every row of the sample.
    if request.sample is not None:
        feeds, sample = gate.load_sample(request.sample, original.signature, source.name)
    else:
        feeds = gate.generated_sample(original.signature, request.rows)
        sample = f"generated (seed {gate.SEED})"
    batches = gate.split_batches(feeds, original.signature)
    expected = _run_checked(original, batches, "the original")
    got = _run_checked(candidate, batches, "the candidate")
    checks = [gate.compare(n, expected[n], got[n], tolerance) for n in expected if n in got]
    reasons = gate.signature_changes(original.signature, candidate.signature)
    reasons += [gate.reason(c) for c in checks if not c.ok]

    # Side by side on the first batch: same inputs, same threads.
    pairs = max(1, request.repeats)
    original_ms, candidate_ms = gate.time_pairs(original, candidate, batches[0], pairs)
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
        # The command's own words: the report prints this reason as it is.
        reasons.append(f"speedup {timing.speedup:.2f}x < --min-speedup {request.min_speedup:g}")
    return OptimizeReport(
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


def _load(ref: ModelRef, options: RuntimeOptions) -> tuple[Session, float]:
    start = time.monotonic()
    session = load_session(ref, options)
    return session, (time.monotonic() - start) * 1e3


def _rows(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values()))) if feeds else 0


def _run_checked(
    session: Session, batches: list[dict[str, np.ndarray]], who: str
) -> dict[str, Any]:
    try:
        return gate.run_all(session, batches)
    except InferenceError as exc:
        raise CandidateError(f"{who} fails on the sample: {exc.message}") from exc
