"""Deadlines around a client's blocking calls: past one, the caller moves on, or the
process ends.

:class:`WaitLimit` runs a call on a thread of its own and waits for it a
bounded time: a call still running then is left to finish there (its result
dropped) and the caller gets :class:`CallPending`, so it can go back to what
the call was waiting for. librdkafka's synchronous commit has no timeout, and
while the group is rebalancing it may wait for the application to serve the
rebalance callback, which only ``poll()`` on the blocked thread does: the
librdkafka backend commits through one (:mod:`worker.kafka.confluent`).

A call into a Kafka client that ignores its own timeout holds the loop's
thread, and nothing in Python can interrupt it. :class:`CallDeadline` watches
one call at a time from a thread of its own: when a call is still running
``seconds`` after it began, the process ends with status 1 through
:func:`worker.lifecycle.exit_stuck`, the stop watchdog's own ending, as safe
as kill -9 (offsets are committed only after their answers, so a restart
answers again what was not committed). The librdkafka backend puts one around
its transactional calls (:mod:`worker.kafka.confluent`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, TypeVar

from worker.lifecycle import Deadline, exit_stuck

__all__ = ["CallDeadline", "CallPending", "WaitLimit"]

T = TypeVar("T")

log = logging.getLogger("worker.kafka")


class CallDeadline:
    """Ends the process when a call made under :meth:`watch` outlives ``seconds``.

    One daemon thread per instance, asleep while no call runs; ``why`` ends the
    log line (the reason the call may hang and what exiting costs).
    """

    def __init__(
        self, seconds: float, why: str, *, exit_now: Callable[[int], object] = os._exit
    ) -> None:
        self.seconds, self._why, self._exit_now = seconds, why, exit_now
        self._changed = threading.Condition()
        self._call: tuple[str, Deadline] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="call-deadline", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, call: str) -> Iterator[None]:
        """Run the body as ``call`` (its name in the log line) under the deadline."""
        with self._changed:
            self._call = (call, Deadline(self.seconds))
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._call = None

    def close(self) -> None:
        """Stop the thread (no call may run under :meth:`watch` after this)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(5)

    def _run(self) -> None:
        with self._changed:
            while True:
                if self._closed:
                    return
                if self._call is None:
                    self._changed.wait()
                    continue
                call, deadline = self._call
                if deadline.passed:
                    break
                self._changed.wait(deadline.left())
        exit_stuck(
            f"{call} still blocked {self.seconds:g} s after it was called: {self._why}",
            logger=log,
            exit_now=self._exit_now,
        )


class CallPending(Exception):
    """A call under a :class:`WaitLimit` did not return in time, or an earlier one has
    not returned yet; it goes on on the limit's thread."""


class WaitLimit:
    """Runs calls one at a time on a daemon thread of its own and waits ``seconds`` for
    each: past that, :meth:`call` raises :class:`CallPending` while the call goes on.
    Until it returns, every further call is refused at once with :class:`CallPending`,
    so calls keep their order (a late commit never lands after a newer one)."""

    def __init__(self, seconds: float, name: str) -> None:
        self.seconds, self.name = seconds, name
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]]
        self._calls = queue.SimpleQueue()
        self._running: Future[Any] | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``'s result (or its exception), if it comes within the limit."""
        running = self._running
        if running is not None and not running.done():
            raise CallPending(f"{self.name}: the call before is still running")
        future: Future[T] = Future()
        self._running = future
        self._calls.put((fn, args, future))
        try:
            return future.result(timeout=self.seconds)
        except FutureTimeout:
            raise CallPending(
                f"{self.name}: no answer within {self.seconds:g} s; the call goes on"
            ) from None
        except KeyboardInterrupt:
            # Ctrl-C while waiting: the call goes on regardless, so give it the rest
            # of its limit before the interrupt leaves. The caller's way out (a tool's
            # last commit) then finds it returned instead of refused as pending.
            with contextlib.suppress(FutureTimeout):
                future.exception(timeout=self.seconds)
            raise

    def close(self) -> None:
        """End the thread once the call under way (if any) returns."""
        self._calls.put((_stop, (), Future()))

    def _serve(self) -> None:
        while True:
            fn, args, future = self._calls.get()
            if fn is _stop:
                return
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)


def _stop() -> None:
    """The sentinel that ends a :class:`WaitLimit`'s thread."""
