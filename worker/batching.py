"""Coalesce requests into one run, and split the results back.

Requests for the same (model, version) whose inputs share dtype and per-row
shape, on a model whose axis 0 is dynamic, are concatenated up to
``max_rows`` rows or until the oldest has waited ``max_delay_s``. A model with
a fixed axis 0 is never coalesced: fixed at 1 it runs row by row, fixed at k
it runs the request as it came (the protocol layer checked it has k rows).

A request whose inputs share no batch axis (``Bound.alone``: a ``k``, a target
shape, a scalar, axis-0 lengths that disagree) runs exactly as sent, in a run
of its own, never sliced: its outputs need not have a row axis at all.

A coalescing group waits only while there is something to wait for:
:meth:`Batcher.take` hands out the oldest waiting group whose model has a free
run slot at once, so a request that finds the runs idle never waits for
company; what arrives while every slot is busy coalesces until one frees or
the delay passes (:meth:`Batcher.due`), the rule of Triton's dynamic batcher.

Each model may carry its own settings (:mod:`worker.model_config`), looked up
per request through ``settings_for`` so that a changed file applies from the
next batch: ``max_batch_rows`` and ``max_batch_delay_s`` replace the
Batcher's own, a model without a batch axis runs every request alone, one
without coalescing runs each request as its own batch (sliced at its max
rows), and a coalesced batch that reaches a preferred size runs at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.errors import InferenceError, WorkerError
from worker.model_config import DEFAULT_SETTINGS, ModelSettings
from worker.signature import DYNAMIC, FIXED, Signature

__all__ = ["ALONE_ROWS", "Batch", "Batcher", "Job", "RunMode", "run_batch", "run_mode"]

Feeds = dict[str, np.ndarray]
Outputs = dict[str, Any]
RunFn = Callable[[Feeds], Outputs]


class RunMode:
    COALESCE = "coalesce"  # axis 0 dynamic: may share a run with others
    ROWS = "rows"  # axis 0 fixed at 1: one run per row
    WHOLE = "whole"  # axis 0 fixed at k, or no shared axis: the request as it came, alone


def run_mode(signature: Signature, *, alone: bool = False) -> str:
    """How a request for ``signature`` runs; ``alone`` (``Bound.alone``) forces WHOLE."""
    axis = signature.row_axis()
    if alone or axis is None:
        return RunMode.WHOLE
    if axis[0] == DYNAMIC and all(spec.shape for spec in signature.inputs):
        return RunMode.COALESCE
    if axis == (FIXED, 1):
        return RunMode.ROWS
    return RunMode.WHOLE


def _share_axis0(feeds: Feeds) -> bool:
    lengths = {a.shape[0] if a.ndim else None for a in feeds.values()}
    return len(lengths) == 1 and None not in lengths


@dataclass(eq=False)
class Job:
    """One bound request waiting for its run; ``token`` is the loop's own handle."""

    token: Any
    model: str
    version: int
    mode: str
    feeds: Feeds
    rows: int
    arrived: float = field(default_factory=time.monotonic)
    guarded: bool = False
    """Never on the polling thread: a record that may hang or crash the process (careful
    mode), whose run must leave the loop free to answer a stop signal."""

    def __post_init__(self) -> None:
        # Feeds without one shared axis 0 cannot be concatenated or sliced,
        # whatever the caller said: run them as sent.
        if self.mode != RunMode.WHOLE and not _share_axis0(self.feeds):
            self.mode = RunMode.WHOLE

    @classmethod
    def for_request(
        cls, token: Any, model: str, version: int, signature: Signature, bound: Any
    ) -> Job:
        """The job for a bound request (``bound``: a ``worker.protocol.Bound``)."""
        mode = run_mode(signature, alone=bool(getattr(bound, "alone", False)))
        return cls(token, model, version, mode, bound.feeds, bound.rows)

    @property
    def key(self) -> Hashable:
        if self.mode != RunMode.COALESCE:
            return ("alone", id(self))
        shapes = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in self.feeds.items()))
        return (self.model, self.version, shapes)


@dataclass(eq=False)
class Batch:
    model: str
    version: int
    jobs: list[Job]
    max_rows: int | None = None
    """Rows per run for this batch's model (``None``: the caller's ``max_rows``)."""

    @property
    def rows(self) -> int:
        return sum(j.rows for j in self.jobs)

    @property
    def guarded(self) -> bool:
        return any(j.guarded for j in self.jobs)


@dataclass(eq=False)
class _Group:
    jobs: list[Job]
    max_rows: int
    delay_s: float
    preferred: tuple[int, ...]
    instances: int | None = None
    rows: int = 0


# ``--coalesce-below-rows``'s default: requests of at least this many rows run alone.
ALONE_ROWS = 256


class Batcher:
    """Groups jobs by coalescing key; hands out batches when full or due."""

    def __init__(
        self,
        max_rows: int,
        max_delay_s: float,
        alone_rows: int = ALONE_ROWS,
        settings_for: Callable[[str], ModelSettings] | None = None,
    ) -> None:
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        # A request this large already amortizes a run's fixed cost; copying it
        # into a bigger batch costs more than the run it saves, so it runs alone
        # on the decoder's zero-copy view.
        self.alone_rows = alone_rows
        self.settings_for = settings_for
        """A model's settings (the repository's, re-read on rescan); ``None``: flags only."""
        self._groups: dict[Hashable, _Group] = {}

    def __len__(self) -> int:
        return sum(len(g.jobs) for g in self._groups.values())

    def _settings(self, model: str) -> ModelSettings:
        if self.settings_for is None:
            return DEFAULT_SETTINGS
        try:
            return self.settings_for(model)
        except WorkerError:
            # The file broke after this request's model loaded: the request was
            # admitted under the flags' batching; the next resolve dead-letters.
            return DEFAULT_SETTINGS

    def add(self, job: Job) -> list[Batch]:
        """Queue ``job``; returns the batches it completed (full ones)."""
        settings = self._settings(job.model)
        max_rows = settings.max_batch_rows or self.max_rows
        if not settings.batch_axis:
            job.mode = RunMode.WHOLE  # max_batch_size 0: the model has no batch axis
        if (
            job.mode != RunMode.COALESCE
            or job.rows >= self.alone_rows
            or not settings.coalesce
            or job.guarded  # a careful record runs alone: a crash then charges it only
        ):
            return [Batch(job.model, job.version, [job], max_rows)]
        key = job.key
        group = self._groups.get(key)
        full: list[Batch] = []
        if group is not None and group.rows + job.rows > group.max_rows:
            full.append(self._pop(key))
            group = None
        if group is None:
            delay = settings.max_batch_delay_s
            group = self._groups[key] = _Group(
                [],
                max_rows,
                self.max_delay_s if delay is None else delay,
                settings.preferred_batch_rows,
                settings.instances,
            )
        group.jobs.append(job)
        group.rows += job.rows
        if group.rows >= group.max_rows or group.rows in group.preferred:
            full.append(self._pop(key))
        return full

    def _pop(self, key: Hashable) -> Batch:
        group = self._groups.pop(key)
        first = group.jobs[0]
        return Batch(first.model, first.version, group.jobs, group.max_rows)

    def due(self, now: float | None = None, *, force: bool = False) -> list[Batch]:
        """Batches whose oldest job has waited long enough (all of them with ``force``)."""
        now = time.monotonic() if now is None else now
        ready = [
            k
            for k, g in self._groups.items()
            if force or now - g.jobs[0].arrived >= g.delay_s
        ]
        return [self._pop(k) for k in ready]

    def take(self, free: Callable[[str, int, int | None], bool]) -> Batch | None:
        """The oldest waiting group whose model has a run slot free now, or ``None``.

        ``free(model, version, instances)`` says whether a run of that model
        could start at once; a group found so runs without waiting out its delay.
        """
        for key, g in self._groups.items():
            first = g.jobs[0]
            if free(first.model, first.version, g.instances):
                return self._pop(key)
        return None

    def clear(self) -> None:
        """Drop every queued job (their records are being re-read from Kafka)."""
        self._groups.clear()

    def next_deadline(self) -> float | None:
        if not self._groups:
            return None
        return min(g.jobs[0].arrived + g.delay_s for g in self._groups.values())


def _concat(jobs: list[Job]) -> Feeds:
    if len(jobs) == 1:
        return jobs[0].feeds  # no copy: the decoder's zero-copy view goes straight to ORT
    return {name: np.concatenate([j.feeds[name] for j in jobs]) for name in jobs[0].feeds}


def _split(outputs: Outputs, sizes: list[int]) -> list[Outputs] | None:
    """Cut every output along axis 0; ``None`` if some output is not row-aligned."""
    total = sum(sizes)
    for value in outputs.values():
        if (
            len(value) != total
            if isinstance(value, list)
            else (np.ndim(value) == 0 or np.shape(value)[0] != total)
        ):
            return None
    bounds = np.cumsum([0, *sizes])
    return [
        {name: value[a:b] for name, value in outputs.items()} for a, b in itertools.pairwise(bounds)
    ]


def _join(parts: list[Outputs]) -> Outputs:
    if len(parts) == 1:
        return parts[0]
    joined: Outputs = {}
    for name, first in parts[0].items():
        if isinstance(first, list):
            joined[name] = [item for p in parts for item in p[name]]
        else:
            joined[name] = np.concatenate([p[name] for p in parts])
    return joined


def _run_sliced(run: RunFn, feeds: Feeds, rows: int, step: int) -> Outputs:
    """Run ``feeds`` ``step`` rows at a time and reassemble (views, no input copies)."""
    if rows <= step:
        return run(feeds)
    parts = [run({n: a[i : i + step] for n, a in feeds.items()}) for i in range(0, rows, step)]
    return _join(parts)


def _run_job(run: RunFn, job: Job, max_rows: int) -> Outputs:
    if job.mode == RunMode.WHOLE:
        return run(job.feeds)  # as sent: never sliced
    step = 1 if job.mode == RunMode.ROWS else max_rows
    return _run_sliced(run, job.feeds, job.rows, max(step, 1))


def run_batch(
    run: RunFn, batch: Batch, max_rows: int, on_run: Callable[[int], None] | None = None
) -> list[Outputs | WorkerError]:
    """Run a batch; one result per job, in order: its outputs or the error it caused.

    A coalesced run that fails, or whose outputs are not row-aligned, is
    retried one job at a time so that one bad request does not sink its
    neighbours.
    """

    def counted(feeds: Feeds) -> Outputs:
        out = run(feeds)
        if on_run is not None:
            first = next(iter(feeds.values()), None)
            # A scalar feed (a request run alone) has no rows: it is one sample.
            on_run(int(first.shape[0]) if first is not None and first.ndim else 1)
        return out

    max_rows = batch.max_rows or max_rows
    if len(batch.jobs) > 1:
        try:
            split = _split(counted(_concat(batch.jobs)), [j.rows for j in batch.jobs])
            if split is not None:
                return list(split)
        except WorkerError:
            pass  # fall through: find out which request is to blame
    results: list[Outputs | WorkerError] = []
    for job in batch.jobs:
        try:
            results.append(_run_job(counted, job, max_rows))
        except WorkerError as exc:
            results.append(exc)
        except Exception as exc:
            results.append(InferenceError(f"{type(exc).__name__}: {exc}"))
    return results
