"""The producer tools' branch of the package's one exception tree
(:class:`worker.errors.InferenceWorkerError`); the CLI maps each class to an
exit status::

    InferenceWorkerError       (the root, in worker.errors)
    └── ProducerError          exit 1  a runtime failure (broker unreachable, send failed)
        └── UsageError         exit 2  a bad argument or an unreadable input file

Messages are one line and say what was wrong, so the CLI prints them as they are.
"""

from __future__ import annotations

from worker.errors import InferenceWorkerError

__all__ = ["ProducerError", "UsageError"]


class ProducerError(InferenceWorkerError):
    """Root of every error the producer tools raise on purpose."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(ProducerError):
    """The user asked for something impossible; nothing was (or will be) sent."""

    exit_code = 2
