"""Where the gate's sample comes from: arrays, a recording of real traffic, a publish source.

``--sample FILE`` takes

* ``.npy`` (one input) or ``.npz`` (arrays by input name);
* an ``inference-producer record`` file (Arrow IPC, one row per Kafka record):
  each record is decoded by the worker's own codecs
  (:func:`worker.protocol.decode_request` and :meth:`Request.bind`), exactly
  as a running worker would, and the requests for this model are joined
  along the row axis; records another model was asked for, records that
  would be dead letters and requests that run alone are left out and counted;
* any file ``inference-producer publish --from`` reads (``.npy``,
  ``.parquet``, ``.arrow``/``.feather``, ``.csv``), read as publish reads it,
  for a model with one input.

Every fault is a :class:`~worker.optimize.errors.RequestError` on ``sample``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from worker.errors import WorkerError
from worker.optimize.errors import RequestError, one_line
from worker.protocol import decode_request
from worker.signature import Signature

__all__ = ["SAMPLE_TYPES", "Sample", "read_sample"]

SAMPLE_TYPES = (".npy", ".npz", ".arrow", ".feather", ".parquet", ".csv")
"""File suffixes ``--sample`` reads."""

_RECORDING_COLUMNS = {"key", "value", "headers", "topic", "partition", "offset"}


@dataclass(frozen=True)
class Sample:
    """Arrays by input name, before the gate casts them to the model's dtypes."""

    arrays: dict[str, np.ndarray]
    description: str
    """What the report says the sample was."""


def read_sample(path: Path, signature: Signature, model: str | None = None) -> Sample:
    """The sample in ``path`` for a model with ``signature`` (called ``model``)."""
    suffix = path.suffix.lower()
    if suffix not in SAMPLE_TYPES:
        raise RequestError(
            "sample",
            f"{path}: expected .npy, .npz, an inference-producer record file (.arrow) or a "
            f"publish source (.parquet, .arrow, .feather, .csv), got {suffix or 'no suffix'}",
        )
    names = [s.name for s in signature.inputs]
    if suffix in (".npy", ".npz"):
        return Sample(_numpy(path, names), str(path))
    table = _table(path)
    if set(table.column_names) >= _RECORDING_COLUMNS:
        return _recording(path, table, signature, model)
    return _publish_source(path, table, signature)


def _numpy(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {names[0] if names else "": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError) as exc:
        raise RequestError("sample", f"cannot read {path}: {one_line(exc)}") from None
    if isinstance(loaded, np.ndarray) and len(names) != 1:
        raise RequestError(
            "sample", f"a .npy holds one array; the model has inputs {names}: use .npz"
        )
    return arrays


def _table(path: Path) -> pa.Table:
    from producers.sources import read_table

    try:
        return read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise RequestError("sample", f"cannot read {path}: {one_line(exc)}") from None


def _recording(path: Path, table: pa.Table, signature: Signature, model: str | None) -> Sample:
    """Decode each recorded request as the worker would; join the ones for ``model``."""
    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in signature.inputs}
    used = other_model = alone = 0
    failures: list[str] = []
    columns = {name: table.column(name).to_pylist() for name in _RECORDING_COLUMNS}
    for i, value in enumerate(columns["value"]):
        headers = [(h["key"], h["value"]) for h in columns["headers"][i] or []]
        default_id = f"{columns['topic'][i]}/{columns['partition'][i]}/{columns['offset'][i]}"
        try:
            request = decode_request(value, headers, default_id=default_id, key=columns["key"][i])
            if model is not None and request.model not in (None, model):
                other_model += 1
                continue
            bound = request.bind(signature)
        except WorkerError as exc:
            failures.append(f"{default_id}: {exc.error_type}: {one_line(exc)}")
            continue
        if bound.alone:
            alone += 1
            continue
        for name, array in bound.feeds.items():
            parts[name].append(array)
        used += 1
    skipped = []
    if other_model:
        skipped.append(f"{other_model} for other models")
    if failures:
        skipped.append(f"{len(failures)} that would be dead letters")
    if alone:
        skipped.append(f"{alone} that run alone")
    if not used:
        first = f" (first: {failures[0]})" if failures else ""
        raise RequestError(
            "sample",
            f"{path}: none of its {table.num_rows} recorded records is a request "
            f"for {model or 'this model'}: {', '.join(skipped) or 'it is empty'}{first}",
        )
    try:
        arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    except ValueError as exc:  # row shapes that differ between requests
        raise RequestError("sample", f"{path}: the requests do not stack: {exc}") from None
    description = f"{path} ({used} recorded requests"
    description += f"; left out {', '.join(skipped)})" if skipped else ")"
    return Sample(arrays, description)


def _publish_source(path: Path, table: pa.Table, signature: Signature) -> Sample:
    """Rows taken as ``inference-producer publish --from`` takes them (one input)."""
    from producers.errors import UsageError
    from producers.sources import InputSpec, table_source

    if len(signature.inputs) != 1:
        names = [s.name for s in signature.inputs]
        raise RequestError(
            "sample",
            f"{path} is a table of rows for one input; the model has inputs {names}: "
            "use .npz or a recording",
        )
    spec = signature.inputs[0]
    try:
        source = table_source(table, InputSpec(spec.name, spec.dtype, spec.row_shape), str(path))
    except UsageError as exc:
        raise RequestError("sample", str(exc).removeprefix("--from ")) from None
    return Sample({spec.name: source.data}, str(path))
