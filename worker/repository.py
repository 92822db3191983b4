"""Model name/version -> file, safely (spec §2).

Two layouts, freely mixed in one directory::

    DIR/<name>/<version>/model.onnx     # version: a positive integer
    DIR/<name>.onnx                     # version 1

When both give a version 1 for the same name, the directory layout wins.

Names come straight from untrusted Kafka headers, so the name rule is checked
before any file-system call, and every path that passes is realpath'd and
must stay inside the repository (a symlink pointing outside is refused). All
refusals are :class:`~worker.errors.ModelNotFound`.

Answers are cached per (name, version) for at most ``rescan_s`` seconds: a
cached answer costs one ``stat`` (so a deleted version is noticed at once and
"newest" falls back to the next), and a version directory added while the
worker runs is served within ``rescan_s``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ModelNotFound

__all__ = ["NAME_PATTERN", "ModelRef", "ModelRepository", "valid_name"]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")  # canonical only: "01" would alias "1"
_MODEL_FILE = "model.onnx"
_SUFFIX = ".onnx"


def valid_name(name: object) -> bool:
    """True when ``name`` obeys the model-name rule; touches nothing on disk."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class ModelRef:
    """One model version on disk; ``path`` is the realpath of its ``.onnx`` file."""

    name: str
    version: int
    path: Path

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class ModelRepository:
    """Resolves ``(name, version)`` to a file under ``root``; thread-safe."""

    def __init__(self, root: Path, *, rescan_s: float = 5.0) -> None:
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise ValueError(f"--model-repository: {root} is not a directory")
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        # (name, version or None for "newest") -> (valid until, ref)
        self._resolved: dict[tuple[str, int | None], tuple[float, ModelRef]] = {}

    # -- public API ---------------------------------------------------------

    def resolve(self, name: str, version: int | None = None, *, verify: bool = True) -> ModelRef:
        """The file for ``name`` at ``version`` (newest when ``None``).

        Raises :class:`ModelNotFound` for a bad name, an unknown model or a
        missing version, with a message saying what exists. ``verify=False``
        skips the ``stat`` of a cached answer (a few µs): the session cache
        uses it on its hit path, where the session is already in memory, and
        verifies before it loads.
        """
        self._check_name(name)
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 1
        ):
            raise ModelNotFound(
                f"model {name!r}: version must be a positive integer, got {version!r}"
            )
        key = (name, version)
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(key)
        # The stat keeps a deleted version from being served out of the cache.
        if (
            cached is not None
            and cached[0] > now
            and (not verify or os.path.isfile(cached[1].path))
        ):
            return cached[1]
        ref = self._resolve_fresh(name, version)
        with self._lock:
            self._resolved[key] = (now + self.rescan_s, ref)
        return ref

    def versions(self, name: str) -> list[int]:
        """Every version of ``name`` present now, ascending ([] if none)."""
        self._check_name(name)
        return sorted(self._scan(name))

    def names(self) -> list[str]:
        """Every model name with at least one loadable version, sorted."""
        found: set[str] = set()
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            stem = entry.name[: -len(_SUFFIX)] if entry.name.endswith(_SUFFIX) else entry.name
            if valid_name(stem) and stem not in found and self._scan(stem):
                found.add(stem)
        return sorted(found)

    # -- internals ----------------------------------------------------------

    @staticmethod
    def _check_name(name: object) -> None:
        if not valid_name(name):
            shown = repr(name)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ModelNotFound(f"invalid model name {shown}: expected {NAME_PATTERN}")

    def _inside(self, path: str) -> Path | None:
        """Realpath of ``path`` when it is a regular file inside the root, else None."""
        real = os.path.realpath(path)
        root = str(self.root)
        if not real.startswith(root + os.sep) or not os.path.isfile(real):
            return None
        return Path(real)

    def _scan(self, name: str) -> dict[int, Path]:
        """version -> realpath for ``name``; ``name`` is already validated."""
        found: dict[int, Path] = {}
        single = self._inside(os.path.join(self.root, name + _SUFFIX))
        if single is not None:
            found[1] = single
        base = os.path.join(self.root, name)
        try:
            entries = list(os.scandir(base))
        except OSError:  # no such directory, or not a directory
            return found
        for entry in entries:
            if _VERSION_RE.fullmatch(entry.name):
                path = self._inside(os.path.join(base, entry.name, _MODEL_FILE))
                if path is not None:
                    found[int(entry.name)] = path  # the directory layout wins for v1
        return found

    def _resolve_fresh(self, name: str, version: int | None) -> ModelRef:
        available = self._scan(name)
        if not available:
            raise ModelNotFound(
                f"model {name!r} not found in the model repository "
                f"(expected {name}/<version>/{_MODEL_FILE} or {name}{_SUFFIX})"
            )
        if version is None:
            version = max(available)
        elif version not in available:
            listed = ", ".join(str(v) for v in sorted(available)[-10:])
            raise ModelNotFound(f"model {name!r} has no version {version} (available: {listed})")
        return ModelRef(name=name, version=version, path=available[version])
