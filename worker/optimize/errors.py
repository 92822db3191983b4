"""What can go wrong in ``optimize`` besides a refusal by the gate (a refusal is a report).

::

    InferenceWorkerError            (worker.errors)
    ├── CandidateError              exit 1: the candidate cannot be built, run or published
    └── RequestError                exit 2: the request itself is wrong; ``field`` names
        └── ModeTargetError                 the OptimizeRequest field, the CLI maps it to a flag

Neither knows a flag name: :mod:`worker.optimize.cli` turns fields into flags.
"""

from __future__ import annotations

from worker.errors import InferenceWorkerError

__all__ = ["CandidateError", "ModeTargetError", "RequestError", "one_line"]


class CandidateError(InferenceWorkerError):
    """The candidate could not be built, run or published: a fact about the model, not the
    request."""


class RequestError(InferenceWorkerError, ValueError):
    """The request cannot be served as asked; ``field`` is the :class:`OptimizeRequest` field
    at fault (``target``, ``mode``, ``tolerance``, ``repository``, ``model``, ``version``,
    ``sample``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ModeTargetError(RequestError):
    """``mode`` only makes sense on device ``target``; ``why`` says what it would cost."""

    def __init__(self, mode: str, target: str, why: str) -> None:
        super().__init__("mode", f"{mode} needs target {target} ({why})")
        self.mode = mode
        self.target = target
        self.why = why


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line, at most 300 characters (converters write pages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
