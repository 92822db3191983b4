"""The one exception tree of the worker.

Every error a record can cause maps to exactly one dead-letter ``error-type``
(spec §3), so the loop never has to guess::

    WorkerError                      (root; never raised itself)
    ├── DecodeError                  decode-error      bytes are not a valid request
    ├── TooLarge                     too-large         over the byte/row/element limits
    ├── SchemaMismatch               schema-mismatch   valid bytes, wrong for this model
    ├── ModelNotFound                model-not-found   bad name, no such model/version
    ├── ModelLoadError               model-load-error  the file exists but won't load
    └── InferenceError               inference-error   ONNX Runtime refused the run

Messages are for humans reading the dead-letter topic: they say what was
expected and what arrived. They are cut to 1 KiB when put into a header.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "DecodeError",
    "InferenceError",
    "ModelLoadError",
    "ModelNotFound",
    "SchemaMismatch",
    "TooLarge",
    "WorkerError",
]


class WorkerError(Exception):
    """Root of every per-record error; ``error_type`` is the DLQ header value."""

    error_type: ClassVar[str] = "inference-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DecodeError(WorkerError):
    error_type = "decode-error"


class TooLarge(WorkerError):
    error_type = "too-large"


class SchemaMismatch(WorkerError):
    error_type = "schema-mismatch"

    @classmethod
    def for_input(cls, name: str, expected: str, got: str) -> SchemaMismatch:
        return cls(f"input {name!r}: expected {expected}, got {got}")


class ModelNotFound(WorkerError):
    error_type = "model-not-found"


class ModelLoadError(WorkerError):
    error_type = "model-load-error"


class InferenceError(WorkerError):
    error_type = "inference-error"
