"""Compare two collections of the same requests, e.g. model version 1 against 2.

Rows are joined by ``(request_id, row)``; the first occurrence wins when a
collection holds a response twice (at-least-once delivery). ``.npy``
collections carry no ids and are joined by position.

Per output present in both: max and mean absolute difference, mean signed
difference (B - A), and for class scores (float outputs with more than one
value per row, or maps of label -> score) the share of rows whose argmax
agrees. The request ids that disagree most are ranked by their largest
absolute difference over all outputs and rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from producers.collect import META_COLUMNS, OUTPUTS_METADATA
from producers.errors import ProducerError, UsageError

__all__ = ["PLOT_EXTRA", "Loaded", "compare", "format_table", "load_collection", "plot"]

PLOT_EXTRA = "inference-worker[plot]"


@dataclass
class Loaded:
    """A collection as ``ids`` (one per row) plus output name -> ``[rows, ...]`` float array."""

    path: Path
    ids: list[tuple[str, int]]
    outputs: dict[str, np.ndarray]
    labels: str

    def index(self) -> dict[tuple[str, int], int]:
        first: dict[tuple[str, int], int] = {}
        for i, key in enumerate(self.ids):
            first.setdefault(key, i)
        return first


def load_collection(path: Path) -> Loaded:
    suffix = path.suffix.lower()
    if suffix not in (".arrow", ".parquet", ".npy"):
        raise UsageError(f"{str(path)!r}: a collection is .arrow, .parquet or .npy")
    if not path.is_file():
        raise UsageError(f"{str(path)!r}: no such file")
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
            if data.ndim == 0:
                raise UsageError(f"{str(path)!r}: a scalar, expected rows on axis 0")
            ids = [(str(i), 0) for i in range(data.shape[0])]
            return Loaded(path, ids, {"output": data.astype(np.float64)}, path.name)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.ipc as ipc

            with ipc.open_file(str(path)) as reader:
                table = reader.read_all()
    except UsageError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UsageError(f"{str(path)!r}: cannot read it ({exc})") from exc
    if "request_id" not in table.column_names:
        raise UsageError(f"{str(path)!r}: not a collection (no request_id column)")
    meta = (table.schema.metadata or {}).get(OUTPUTS_METADATA)
    names = json.loads(meta) if meta else [n for n in table.column_names
                                          if n not in META_COLUMNS]
    rows = table.column("row").to_pylist() if "row" in table.column_names else [0] * len(table)
    ids = list(zip(table.column("request_id").to_pylist(), rows, strict=True))
    outputs = {}
    for name in names:
        values = _as_matrix(table.column(name))
        if values is not None:
            outputs[name] = values
    models = sorted({f"{m} v{v}" for m, v in zip(
        table.column("model").to_pylist() if "model" in table.column_names else [None],
        table.column("model_version").to_pylist()
        if "model_version" in table.column_names else [None], strict=False)})
    return Loaded(path, ids, outputs, ", ".join(models[:3]) or path.name)


def _as_matrix(column: pa.ChunkedArray) -> np.ndarray | None:
    """A float64 ``[rows, k]`` (or ``[rows]``) view of an output column; None if not numeric."""
    kind = column.type
    if pa.types.is_map(kind):
        maps = [dict(v) if v is not None else {} for v in column.to_pylist()]
        labels = sorted({k for m in maps for k in m})
        return np.array([[m.get(k, np.nan) for k in labels] for m in maps], dtype=np.float64)
    shape = []
    array: Any = column.combine_chunks()
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)
            or pa.types.is_boolean(array.type)):
        return None
    values = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)
    return values.reshape(len(column), int(np.prod(shape))) if shape else values


def compare(a_path: Path, b_path: Path, *, top: int = 10) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (also what the table and plot are drawn from)."""
    if top < 0:
        raise UsageError(f"--top must be >= 0, got {top}")
    a, b = load_collection(a_path), load_collection(b_path)
    a_index, b_index = a.index(), b.index()
    joined = [k for k in a_index if k in b_index]
    if not joined:
        raise ProducerError(f"no request id is in both {str(a_path)!r} and {str(b_path)!r}")
    ai = np.array([a_index[k] for k in joined])
    bi = np.array([b_index[k] for k in joined])
    worst = np.zeros(len(joined))
    flips = np.zeros(len(joined), dtype=np.int64)
    outputs: dict[str, Any] = {}
    diffs: dict[str, list[float]] = {}
    for name in [n for n in a.outputs if n in b.outputs]:
        va, vb = a.outputs[name][ai], b.outputs[name][bi]
        if va.shape != vb.shape:
            outputs[name] = {"error": f"shapes differ: {list(va.shape[1:])} vs "
                                      f"{list(vb.shape[1:])}"}
            continue
        delta = vb - va
        absd = np.abs(delta).reshape(len(joined), -1)
        per_row = np.nanmax(absd, axis=1) if absd.shape[1] else np.zeros(len(joined))
        worst = np.maximum(worst, per_row)
        entry: dict[str, Any] = {
            "rows": len(joined),
            "max_abs_diff": float(np.nanmax(absd)) if absd.size else 0.0,
            "mean_abs_diff": float(np.nanmean(absd)) if absd.size else 0.0,
            "mean_diff": float(np.nanmean(delta)) if delta.size else 0.0,
            "argmax_agreement": None,
        }
        if va.ndim == 2 and va.shape[1] > 1:
            agree = np.argmax(np.nan_to_num(va, nan=-np.inf), axis=1) == np.argmax(
                np.nan_to_num(vb, nan=-np.inf), axis=1)
            entry["argmax_agreement"] = float(agree.mean())
            flips += ~agree
        outputs[name] = entry
        diffs[name] = per_row.tolist()
    per_request: dict[str, tuple[float, int]] = {}
    for (rid, _), w, f in zip(joined, worst.tolist(), flips.tolist(), strict=True):
        old = per_request.get(rid, (0.0, 0))
        per_request[rid] = (max(old[0], w), old[1] + f)
    ranked = sorted(per_request.items(), key=lambda kv: -kv[1][0])
    return {
        "a": {"path": str(a_path), "rows": len(a_index), "models": a.labels},
        "b": {"path": str(b_path), "rows": len(b_index), "models": b.labels},
        "joined_rows": len(joined),
        "only_in_a": len(a_index) - len(joined),
        "only_in_b": sum(1 for k in b_index if k not in a_index),
        "outputs": outputs,
        "worst_requests": [
            {"request_id": rid, "max_abs_diff": d, "argmax_disagreements": f}
            for rid, (d, f) in ranked[:top] if d > 0 or f > 0
        ],
        "_per_row_max_abs_diff": diffs,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"A: {report['a']['path']} ({report['a']['rows']} rows; {report['a']['models']})",
        f"B: {report['b']['path']} ({report['b']['rows']} rows; {report['b']['models']})",
        f"joined {report['joined_rows']} rows by request id "
        f"(only in A: {report['only_in_a']}, only in B: {report['only_in_b']})",
        "",
        f"{'output':<20} {'max |B-A|':>12} {'mean |B-A|':>12} {'mean B-A':>12} "
        f"{'argmax agree':>13}",
    ]
    for name, entry in report["outputs"].items():
        if "error" in entry:
            lines.append(f"{name:<20} {entry['error']}")
            continue
        agree = entry["argmax_agreement"]
        agree_s = "-" if agree is None else f"{agree:.2%}"
        lines.append(f"{name:<20} {entry['max_abs_diff']:>12.4g} {entry['mean_abs_diff']:>12.4g} "
                     f"{entry['mean_diff']:>12.4g} {agree_s:>13}")
    if report["worst_requests"]:
        lines += ["", "requests that disagree most:",
                  f"  {'request_id':<40} {'max |B-A|':>12} {'argmax flips':>13}"]
        lines += [f"  {w['request_id']:<40} {w['max_abs_diff']:>12.4g} "
                  f"{w['argmax_disagreements']:>13}" for w in report["worst_requests"]]
    else:
        lines += ["", "no differences"]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """PNG histogram, per output, of each row's largest absolute difference."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UsageError(f"--plot needs matplotlib: pip install '{PLOT_EXTRA}'") from None

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    diffs = report["_per_row_max_abs_diff"]
    names = list(diffs) or ["(no outputs)"]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
    try:
        for ax, name in zip(axes[:, 0], names, strict=True):
            values = np.asarray(diffs.get(name, []), dtype=np.float64)
            ax.hist(values, bins=50)
            ax.set_title(f"{name}: per-row max |B - A| ({len(values)} rows)")
            ax.set_xlabel("absolute difference")
            ax.set_ylabel("rows")
        fig.tight_layout()
        try:
            fig.savefig(path, format="png")
        except OSError as exc:
            raise UsageError(f"--plot {str(path)!r}: cannot write it: {exc.strerror or exc}"
                             ) from exc
    finally:
        plt.close(fig)
