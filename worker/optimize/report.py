"""What ``optimize`` found: the report (a table for people, JSON for machines) and the
provenance written next to an accepted version as ``optimize.json``."""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from worker.optimize.gate import MIN_ARGMAX_AGREEMENT, OutputCheck
from worker.repository import ModelRef
from worker.runtime import file_digest

__all__ = ["PROVENANCE_FILE", "OptimizeReport", "Timing", "provenance"]

PROVENANCE_FILE = "optimize.json"


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


def provenance(report: OptimizeReport, root: Path, candidate: Path) -> dict[str, Any]:
    """``optimize.json``: where the version came from (file and digest), how it was made and
    checked (the report, less what only the run knows), and with which ONNX Runtime."""
    source = report.source
    return {
        "source": {
            "name": source.name,
            "version": source.version,
            "file": os.path.relpath(source.path, root),
            "sha256": file_digest(source.path, "sha256"),
        },
        "sha256": file_digest(candidate, "sha256"),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "onnxruntime": ort.__version__,
        **{
            k: v
            for k, v in report.to_dict().items()
            if k not in ("model", "source_version", "version", "path", "reasons")
        },
    }


def _finite(x: float | None) -> float | str | None:
    # JSON has no Infinity; a string keeps the value readable for machines too.
    return x if x is None or math.isfinite(x) else str(x)


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
