"""``python -m tests.poison_worker POISON[/SLOW/SECONDS] RUN-FLAGS...``: a worker with a
poisoned model.

Every session it loads aborts the process (SIGABRT, as a crash inside a native
kernel would) when a run's ``x`` holds a row whose every element is ``POISON``,
and sleeps ``SECONDS`` first when one holds a row of ``SLOW`` (a long run);
everything else is the real worker, built as ``Worker(settings, loader=...)``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import numpy as np

from worker.cli import _exit_now_if_stuck, parse_settings
from worker.errors import FatalError
from worker.loop import Worker
from worker.observability import configure_logging
from worker.repository import ModelRef
from worker.runtime import RuntimeOptions, Session, load_session

log = logging.getLogger("tests.poison_worker")


class _Poisoned:
    """A session that dies on the poison row and is the real one otherwise."""

    def __init__(
        self, session: Session, poison: np.float32, slow: np.float32 | None, seconds: float
    ) -> None:
        self._session = session
        self._poison = poison
        self._slow, self._seconds = slow, seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, object]:
        x = feeds.get("x")
        if x is not None and bool(np.any(np.all(x == self._poison, axis=1))):
            log.error("poisoned model: aborting the process")
            logging.shutdown()
            os.abort()
        if (
            x is not None
            and self._slow is not None
            and bool(np.any(np.all(x == self._slow, axis=1)))
        ):
            log.warning("slow row: running %g s", self._seconds)
            time.sleep(self._seconds)
        return self._session.run(feeds)


def main(argv: list[str]) -> int:
    poison_arg, _, slow_arg = argv[0].partition("/")
    poison = np.float32(float(poison_arg))
    slow_value, _, seconds = slow_arg.partition("/")
    slow = np.float32(float(slow_value)) if slow_value else None
    settings = parse_settings(argv[1:])
    configure_logging(settings.log_format, settings.log_level)

    def loader(ref: ModelRef, options: RuntimeOptions) -> Session:
        session = load_session(ref, options)
        return _Poisoned(session, poison, slow, float(seconds or 0))  # type: ignore[return-value]

    try:
        return Worker(settings, loader=loader).run()
    except FatalError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    # Leave as the console script does: without waiting for a model run still busy.
    sys.exit(_exit_now_if_stuck(main(sys.argv[1:])))
