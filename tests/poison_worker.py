"""``python -m tests.poison_worker POISON RUN-FLAGS...``: a worker with a poisoned model.

Every session it loads aborts the process (SIGABRT, as a crash inside a native
kernel would) when a run's ``x`` holds a row whose every element is ``POISON``;
everything else is the real worker, built as ``Worker(settings, loader=...)``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import numpy as np

from worker.cli import parse_settings
from worker.errors import FatalError
from worker.loop import Worker
from worker.observability import configure_logging
from worker.repository import ModelRef
from worker.runtime import RuntimeOptions, Session, load_session

log = logging.getLogger("tests.poison_worker")


class _Poisoned:
    """A session that dies on the poison row and is the real one otherwise."""

    def __init__(self, session: Session, poison: np.float32) -> None:
        self._session = session
        self._poison = poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, object]:
        x = feeds.get("x")
        if x is not None and bool(np.any(np.all(x == self._poison, axis=1))):
            log.error("poisoned model: aborting the process")
            logging.shutdown()
            os.abort()
        return self._session.run(feeds)


def main(argv: list[str]) -> int:
    poison = np.float32(float(argv[0]))
    settings = parse_settings(argv[1:])
    configure_logging(settings.log_format, settings.log_level)

    def loader(ref: ModelRef, options: RuntimeOptions) -> Session:
        return _Poisoned(load_session(ref, options), poison)  # type: ignore[return-value]

    try:
        return Worker(settings, loader=loader).run()
    except FatalError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
