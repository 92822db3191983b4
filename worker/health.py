"""Liveness and readiness: what ``/healthz`` and ``/readyz`` report.

Pure bookkeeping on a clock, no server (:class:`worker.observability.HealthServer`
serves it), so every rule is tested with a clock moved by hand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Health"]


class Health:
    """What ``/healthz`` and ``/readyz`` report; the loop updates it.

    Live while the loop passes (``beat``) at least every ``stall_after_s``
    and, while records are pending, a commit succeeds (``committed``) at
    least every ``commit_stall_after_s``, counted from when records started
    waiting so an idle worker never looks stuck. Ready once ``broker_ok`` and
    ``preloaded`` are both set. ``clock`` returns monotonic seconds (tests
    inject their own).
    """

    def __init__(
        self,
        stall_after_s: float = 60.0,
        *,
        commit_stall_after_s: float = 45.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._stall_after_s = stall_after_s
        self._commit_stall_after_s = commit_stall_after_s
        now = clock()
        self._last_beat = now
        self._last_commit = now
        self._pending = 0
        self._pending_since = now
        self._lock = threading.Lock()  # committed() may come from pool threads
        self.broker_ok = False
        self.preloaded = False

    def beat(self) -> None:
        """The poll loop made a pass."""
        self._last_beat = self._clock()

    def committed(self) -> None:
        """A commit (or a transaction) succeeded."""
        with self._lock:
            self._last_commit = self._clock()

    def set_pending(self, n: int) -> None:
        """``n`` records are polled and not yet committed."""
        with self._lock:
            if n > 0 and self._pending == 0:
                self._pending_since = self._clock()
            self._pending = n

    def last_commit_age(self) -> float:
        """Seconds since the last successful commit (since start, before the first)."""
        return self._clock() - self._last_commit

    def liveness(self) -> str | None:
        """Why the worker is not live, in one line; ``None`` when it is."""
        now = self._clock()
        idle = now - self._last_beat
        if idle >= self._stall_after_s:
            return f"poll loop stalled: no pass for {idle:.1f} s (limit {self._stall_after_s:g} s)"
        with self._lock:
            pending, since = self._pending, max(self._last_commit, self._pending_since)
        waited = now - since
        if pending and waited >= self._commit_stall_after_s:
            return (
                f"commits stalled: {pending} records pending and no commit succeeded in the "
                f"last {waited:.1f} s (limit {self._commit_stall_after_s:g} s)"
            )
        return None

    def readiness(self) -> str | None:
        """Why the worker is not ready, in one line; ``None`` when it is."""
        if not self.broker_ok:
            return "broker has not answered yet"
        if not self.preloaded:
            return "preloaded models are not loaded yet"
        return None

    @property
    def healthy(self) -> bool:
        return self.liveness() is None

    @property
    def ready(self) -> bool:
        return self.readiness() is None
