"""The one exception tree of the worker.

Errors a record can cause (the ``WorkerError`` branch) map to exactly one
dead-letter ``error-type``, so the loop never has to guess; the others end
the process with the exit status the CLI documents::

    InferenceWorkerError             (root; never raised itself)
    ├── ConfigError                  exit 2: a bad flag, variable or Kafka property
    ├── SampleError                  no inputs can be made up for a model (worker.samples)
    ├── CandidateError, RequestError optimize's own (worker.optimize.errors)
    ├── FatalError                   exit 1: going on could lose a record
    │   └── BrokerAccessError        exit 1: login or certificate refused
    └── WorkerError                  one record's failure -> dead letter
        ├── DecodeError              decode-error      bytes are not a valid request
        ├── TooLarge                 too-large         over the byte/row/element limits
        ├── SchemaMismatch           schema-mismatch   valid bytes, wrong for this model
        ├── ModelNotFound            model-not-found   bad name, no such model/version
        ├── ModelLoadError           model-load-error  the file exists but won't load (*)
        └── InferenceError           inference-error   ONNX Runtime refused the run (*)

(*) ``transient``: retried with backoff (``--retry-attempts``) before the
dead letter, which then carries ``error-attempts``.

Messages are for humans reading the dead-letter topic: they say what was
expected and what arrived. They are cut to 1 KiB when put into a header.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BrokerAccessError",
    "ConfigError",
    "DecodeError",
    "FatalError",
    "InferenceError",
    "InferenceWorkerError",
    "ModelLoadError",
    "ModelNotFound",
    "SchemaMismatch",
    "TooLarge",
    "WorkerError",
]


class InferenceWorkerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(InferenceWorkerError, ValueError):
    """A bad setting; ``flag`` names the flag, variable or property so the CLI prints
    one line and exits 2."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


class FatalError(InferenceWorkerError, RuntimeError):
    """The worker cannot go on without risking loss (e.g. the broker refused an answer)."""


class BrokerAccessError(FatalError):
    """The broker refused us for good (bad credentials, untrusted certificate).

    The message is one line naming the broker and the reason, never a secret.
    """


class WorkerError(InferenceWorkerError):
    """Root of every per-record error; ``error_type`` is the DLQ header value."""

    error_type: ClassVar[str] = "inference-error"
    transient: ClassVar[bool] = False
    """May succeed when tried again (out of memory, a model file still being
    written): retried with backoff before it is dead-lettered."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DecodeError(WorkerError):
    error_type = "decode-error"


class TooLarge(WorkerError):
    """``what`` holds ``actual`` ``unit``, over ``limit``; ``where`` says whose limit."""

    error_type = "too-large"

    def __init__(
        self, what: str, actual: int, limit: int, unit: str = "bytes", where: str = ""
    ) -> None:
        self.what, self.actual, self.limit, self.unit = what, actual, limit, unit
        whose = f" of {where}" if where else ""
        super().__init__(f"{what}: {actual} {unit}, over the limit of {limit}{whose}")


class SchemaMismatch(WorkerError):
    error_type = "schema-mismatch"

    @classmethod
    def for_input(cls, name: str, expected: str, got: str) -> SchemaMismatch:
        return cls(f"input {name!r}: expected {expected}, got {got}")


class ModelNotFound(WorkerError):
    error_type = "model-not-found"


class ModelLoadError(WorkerError):
    error_type = "model-load-error"
    transient = True


class InferenceError(WorkerError):
    error_type = "inference-error"
    transient = True
