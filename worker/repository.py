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

Per-model settings (:mod:`worker.model_config`) come from
``DIR/<name>/config.pbtxt`` or ``DIR/<name>/model.toml`` and are read again
when they change, at most every ``rescan_s`` (a ``stat`` of each file per
rescan). Their version policy decides which versions exist for
:meth:`ModelRepository.resolve`: one outside it is ``model-not-found``, and
"newest" is the newest inside it. A file that cannot be used makes every
version of its model a :class:`~worker.errors.ModelLoadError`.

Writing is one method, :meth:`ModelRepository.publish_version`: a version is
built in a hidden directory next to the versions (:meth:`~ModelRepository.staging`,
ignored by the scan, on the same file system) and renamed to ``<max+1>`` in
one step, so a running worker sees the whole version or none of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ModelLoadError, ModelNotFound, WorkerError
from worker.model_config import (
    CONFIG_PBTXT,
    DEFAULT_SETTINGS,
    MODEL_TOML,
    ModelSettings,
    parse_config_pbtxt,
    parse_model_toml,
)

__all__ = ["MODEL_FILE", "NAME_PATTERN", "ModelRef", "ModelRepository", "valid_name"]

log = logging.getLogger(__name__)

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")  # canonical only: "01" would alias "1"
MODEL_FILE = "model.onnx"
"""The file name of a version in the directory layout: ``DIR/<name>/<version>/model.onnx``."""
_SUFFIX = ".onnx"
_PUBLISH_TRIES = 100


def valid_name(name: object) -> bool:
    """True when ``name`` obeys the model-name rule; touches nothing on disk."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class ModelRef:
    """One model version on disk; ``path`` is the realpath of its ``.onnx`` file."""

    name: str
    version: int
    path: Path
    settings: ModelSettings = field(default=DEFAULT_SETTINGS, compare=False)
    """The model's settings when it was resolved (the flags' when it has no file)."""

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class ModelRepository:
    """Resolves ``(name, version)`` to a file under ``root``; thread-safe."""

    def __init__(self, root: Path, *, rescan_s: float = 5.0) -> None:
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise ValueError(f"model repository {root} is not a directory")
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        # (name, version or None for "newest") -> (valid until, ref)
        self._resolved: dict[tuple[str, int | None], tuple[float, ModelRef]] = {}
        # name -> (valid until, the files' (mtime, size) stamp, settings or the error)
        self._settings: dict[str, tuple[float, tuple[object, ...], ModelSettings | WorkerError]]
        self._settings = {}

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

    def served_versions(self, name: str) -> list[int]:
        """The versions of ``name`` its version policy serves, ascending.

        Raises :class:`ModelLoadError` when its settings file cannot be used.
        """
        return sorted(self.settings(name).versions.select(self.versions(name)))

    def settings(self, name: str) -> ModelSettings:
        """``name``'s settings, read again when its files change (checked every ``rescan_s``).

        Raises :class:`ModelNotFound` for a bad name, :class:`ModelLoadError`
        for a settings file that cannot be used (the same error until it changes).
        """
        # On every request's path: a cached answer costs a dict read and a clock read
        # (only valid names are ever stored, so the name rule runs on a miss).
        cached = self._settings.get(name) if isinstance(name, str) else None
        now = time.monotonic()
        if cached is None or cached[0] <= now:
            self._check_name(name)
            stamp = self._settings_stamp(name)
            if cached is None or cached[1] != stamp:
                value: ModelSettings | WorkerError
                try:
                    value = self._read_settings(name)
                except ModelLoadError as exc:
                    log.warning("model %s: %s", name, exc.message)
                    value = exc
            else:
                value = cached[2]
            cached = (now + self.rescan_s, stamp, value)
            with self._lock:
                self._settings[name] = cached
        if isinstance(cached[2], WorkerError):
            raise type(cached[2])(cached[2].message)
        return cached[2]

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

    # -- writing ------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, name: str, *, tag: str = "stage") -> Iterator[Path]:
        """A new, empty hidden directory ``DIR/<name>/.<tag>-<hex>`` to build a version in.

        The scan ignores it, and it sits on the versions' file system, so
        :meth:`publish_version` can rename it. ``DIR/<name>`` is created when
        the model has only the flat layout so far. Removed on exit unless
        published. Raises :class:`ModelNotFound` for a bad name,
        :class:`NotADirectoryError` when ``DIR/<name>`` is a file.
        """
        self._check_name(name)
        model_dir = self.root / name
        if model_dir.exists() and not model_dir.is_dir():
            raise NotADirectoryError(f"{model_dir} exists and is not a directory")
        model_dir.mkdir(exist_ok=True)
        work = model_dir / f".{tag}-{uuid.uuid4().hex}"
        work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)  # already gone when published

    def publish_version(self, name: str, staged: Path) -> ModelRef:
        """Make ``staged`` (from :meth:`staging`) version ``max+1`` of ``name``, in one rename.

        Every file in ``staged`` is flushed to disk first and the model
        directory after the rename, so a crash leaves either no version or a
        whole one. ``max`` counts every numeric directory, even one without a
        model file, so a half-made version is never replaced; when another
        writer takes the number first, the next one is used. This repository's
        cached answers for ``name`` are dropped, so it serves the new version
        at once. Raises :class:`ValueError` when ``staged`` is not a staging
        directory of ``name`` holding a ``model.onnx``, :class:`FileExistsError`
        when no version number is free.
        """
        self._check_name(name)
        model_dir = self.root / name
        staged = Path(os.path.realpath(staged))
        if staged.parent != Path(os.path.realpath(model_dir)) or not staged.name.startswith("."):
            raise ValueError(f"{staged} is not a staging directory of model {name!r}")
        if not (staged / MODEL_FILE).is_file():
            raise ValueError(f"{staged} holds no {MODEL_FILE}")
        for folder, _, files in os.walk(staged):
            for file in files:
                _fsync(Path(folder) / file)
        first = self._next_version(model_dir)
        for version in range(first, first + _PUBLISH_TRIES):
            target = model_dir / str(version)
            if target.exists():
                continue
            try:
                os.rename(staged, target)  # ENOTEMPTY/EEXIST if someone took it meanwhile
            except OSError:
                if target.exists():
                    continue
                raise
            _fsync(model_dir)
            with self._lock:
                for key in [k for k in self._resolved if k[0] == name]:
                    del self._resolved[key]
            return ModelRef(name, version, Path(os.path.realpath(target / MODEL_FILE)))
        raise FileExistsError(f"no free version directory under {model_dir}")

    # -- internals ----------------------------------------------------------

    def _settings_stamp(self, name: str) -> tuple[object, ...]:
        stamp: list[object] = []
        for file in (CONFIG_PBTXT, MODEL_TOML):
            try:
                st = os.stat(os.path.join(self.root, name, file))
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def _read_settings(self, name: str) -> ModelSettings:
        pbtxt = self._inside(os.path.join(self.root, name, CONFIG_PBTXT))
        toml = self._inside(os.path.join(self.root, name, MODEL_TOML))
        if pbtxt is not None and toml is not None:
            log.info("model %s: both %s and %s exist; %s wins", name, CONFIG_PBTXT, MODEL_TOML,
                     CONFIG_PBTXT)  # fmt: skip
        chosen = pbtxt or toml
        if chosen is None:
            return DEFAULT_SETTINGS
        where = f"{name}/{chosen.name}"
        try:
            text = chosen.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{where}: cannot read it: {exc}") from None
        if chosen is pbtxt:
            return parse_config_pbtxt(text, name, where)
        return parse_model_toml(text, where)

    def _next_version(self, model_dir: Path) -> int:
        # Numeric directories without a model.onnx count too: renaming onto an
        # empty one would silently replace it.
        numeric = [
            int(p.name) for p in model_dir.iterdir() if p.name.isascii() and p.name.isdigit()
        ]
        return max([*self._scan(model_dir.name), *numeric, 0]) + 1

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
                path = self._inside(os.path.join(base, entry.name, MODEL_FILE))
                if path is not None:
                    found[int(entry.name)] = path  # the directory layout wins for v1
        return found

    def _resolve_fresh(self, name: str, version: int | None) -> ModelRef:
        available = self._scan(name)
        if not available:
            raise ModelNotFound(
                f"model {name!r} not found in the model repository "
                f"(expected {name}/<version>/{MODEL_FILE} or {name}{_SUFFIX})"
            )
        settings = self.settings(name)
        served = settings.versions.select(available)
        if version is None and not served:
            raise ModelNotFound(
                f"model {name!r}: no version present is served (version policy "
                f"{settings.versions} in {settings.source})"
            )
        if version is None:
            version = max(served)
        elif version not in available:
            listed = ", ".join(str(v) for v in sorted(served)[-10:])
            raise ModelNotFound(f"model {name!r} has no version {version} (available: {listed})")
        elif version not in served:
            listed = ", ".join(str(v) for v in sorted(served)[-10:]) or "none"
            raise ModelNotFound(
                f"model {name!r} version {version} is not served: version policy "
                f"{settings.versions} in {settings.source} (served: {listed})"
            )
        return ModelRef(name=name, version=version, path=available[version], settings=settings)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
