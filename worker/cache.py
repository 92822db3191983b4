"""Caches in front of the runtime: loaded sessions, and (optionally) responses.

:class:`SessionCache` is a least-recently-*used* cache of sessions keyed by
``(name, version)``, bounded by a model count and a byte budget. Each
:meth:`SessionCache.acquire` moves its entry to the young end, so eviction
order follows use, not insertion. A session is never evicted while a run
holds it (reference count), when it was preloaded (pinned), or when it is
the most recently used one; the budget may then be exceeded until a holder
lets go, which is when eviction runs again.

A model's settings travel with each resolved reference; when those a
session depends on change (device, instances, declared inputs and outputs),
the next checkout after the repository's rescan loads it again and the old
session is closed once its last run lets go.

Concurrent requests for the same cold model share one load (single flight).
A failed load is answered to every waiter and remembered for
``retry_after_s`` only, so a fixed file is picked up without a restart while a
broken one is not re-parsed for every record.

:class:`ResponseCache` maps a strong hash of (model, version, request bytes) to
a finished response so a redelivered duplicate costs a dictionary look-up.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType

from worker.errors import ModelLoadError, ModelNotFound, WorkerError
from worker.model_config import ModelSettings
from worker.observability import Metrics
from worker.repository import ModelRef, ModelRepository
from worker.runtime import Session

__all__ = ["ResponseCache", "SessionCache", "SessionLease"]

log = logging.getLogger(__name__)

_Key = tuple[str, int]


class _Entry:
    __slots__ = ("key", "orphaned", "pinned", "refs", "session")

    def __init__(self, key: _Key, session: Session, pinned: bool) -> None:
        self.key = key
        self.session = session
        self.refs = 0
        self.pinned = pinned
        self.orphaned = False  # removed by close() while in use: closed on release


class _Flight:
    """One in-progress load that other requests for the same key wait on."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: WorkerError | None = None


class SessionLease:
    """Context manager returned by :meth:`SessionCache.acquire`.

    A small class rather than ``@contextmanager``: a cache hit is on every
    request's path and a generator-based manager costs several microseconds.
    """

    __slots__ = ("_cache", "_entry", "_name", "_version")

    def __init__(self, cache: SessionCache, name: str, version: int | None) -> None:
        self._cache = cache
        self._name = name
        self._version = version
        self._entry: _Entry | None = None

    def __enter__(self) -> Session:
        self._entry = self._cache._checkout(self._name, self._version, pin=False)
        return self._entry.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._cache._release(entry)


class SessionCache:
    """LRU of loaded sessions under a count and byte budget; thread-safe."""

    def __init__(
        self,
        repository: ModelRepository,
        loader: Callable[[ModelRef], Session],
        *,
        max_models: int = 4,
        max_bytes: int | None = None,
        metrics: Metrics | None = None,
        retry_after_s: float = 5.0,
        on_evict: Callable[[list[Session]], None] | None = None,
    ) -> None:
        if max_models < 1:
            raise ValueError(f"--cache-max-models: must be at least 1, got {max_models}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"--cache-max-bytes: must be positive, got {max_bytes}")
        self.repository = repository
        self._loader = loader
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._metrics = metrics
        self.retry_after_s = retry_after_s
        self._on_evict = on_evict
        """Called, outside the lock, with the sessions just closed by eviction: the
        place to read device memory again (e.g. a gauge from
        :func:`worker.runtime.device_memory`), so the release shows in a metric."""
        self.evicted_bytes = 0
        """Bytes charged to sessions evicted so far (what eviction should have released)."""
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()  # oldest use first
        self._flights: dict[_Key, _Flight] = {}
        self._failures: dict[_Key, tuple[float, WorkerError]] = {}
        self._bytes = 0
        self._closed = False

    # -- public API ---------------------------------------------------------

    def acquire(self, name: str, version: int | None = None) -> SessionLease:
        """``with cache.acquire(name) as session:`` -- the session stays loaded until exit.

        Resolves through the repository (newest version when ``version`` is
        None), then hits or loads once for all concurrent callers. Raises
        :class:`ModelNotFound` or :class:`ModelLoadError`.
        """
        return SessionLease(self, name, version)

    def preload(self, name: str, version: int | None = None) -> Session:
        """Load now and pin: a preloaded session is never evicted."""
        entry = self._checkout(name, version, pin=True)
        self._release(entry)
        with self._lock:
            pinned = sum(1 for e in self._entries.values() if e.pinned)
        if pinned >= self.max_models:
            log.warning(
                "%d pinned models fill --cache-max-models %d: every other model is "
                "reloaded per use",
                pinned,
                self.max_models,
            )
        return entry.session

    def peek(self, name: str, version: int | None = None) -> Session | None:
        """The loaded session ``acquire`` would hand out, counted as a hit and made the
        most recent, without a lease (for what a session says of itself: its signature
        and version); ``None`` when it is not loaded, or its settings changed.

        A request's way in: one resolve and one lock instead of a lease's two.
        """
        ref = self.repository.resolve(name, version, verify=False)
        settings = self.repository.settings(ref.name)
        with self._lock:
            entry, stale = self._hit_locked((ref.name, ref.version), settings)
        if stale is not None and not stale.orphaned:
            self._close_all([stale])
        return None if entry is None else entry.session

    def loaded(self) -> list[tuple[str, int]]:
        """Keys of the loaded sessions, least recently used first (tests, /metrics)."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        """Close every session; those still in use are closed when released."""
        with self._lock:
            self._closed = True
            entries = list(self._entries.values())
            self._entries.clear()
            self._bytes = 0
            idle = []
            for entry in entries:
                if entry.refs:
                    entry.orphaned = True
                else:
                    idle.append(entry)
            self._update_gauges()
        self._close_all(idle, notify=False)

    # -- internals ----------------------------------------------------------

    def _checkout(self, name: str, version: int | None, *, pin: bool) -> _Entry:
        # Unverified first: a loaded session needs no stat of its file.
        ref = self.repository.resolve(name, version, verify=False)
        # One source for every version's settings (re-read on rescan), so a session
        # is compared with, and loaded under, the settings the batcher also sees.
        settings = self.repository.settings(ref.name)
        key = (ref.name, ref.version)
        victims: list[_Entry] = []
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("session cache is closed")
                entry, stale = self._hit_locked(key, settings)
                if stale is not None:
                    pin = pin or stale.pinned
                if entry is not None:
                    entry.refs += 1
                    entry.pinned = entry.pinned or pin
                    return entry
            if stale is not None and not stale.orphaned:
                self._close_all([stale])
            verified = replace(self.repository.resolve(name, version), settings=settings)
            if verified != ref:  # the file went away: e.g. newest deleted, fall back
                ref, key = verified, (verified.name, verified.version)
                continue
            with self._lock:
                failed = self._failures.get(key)
                if failed is not None:
                    if failed[0] > time.monotonic():
                        raise _copy(failed[1])
                    del self._failures[key]  # backoff over: try again
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
                    if self._metrics is not None:
                        self._metrics.model_cache_misses.inc()
                    # Make room before loading: on a GPU the new session needs the memory.
                    victims = self._evict_locked(keep_newest=False)
            if leader:
                self._close_all(victims)
                return self._load(key, verified, flight, pin)
            flight.done.wait()
            if flight.error is not None:
                raise _copy(flight.error)
            # Loaded: loop to take a reference (or load again if already evicted).

    def _hit_locked(
        self, key: _Key, settings: ModelSettings
    ) -> tuple[_Entry | None, _Entry | None]:
        """``(entry, None)`` for a loaded session under ``settings``, counted as a hit and
        made the most recent; ``(None, stale)`` when its settings changed (removed);
        ``(None, None)`` when it is not loaded."""
        entry = self._entries.get(key)
        if entry is None:
            return None, None
        if self._stale_locked(entry, settings):
            return None, entry
        self._entries.move_to_end(key)
        if self._metrics is not None:
            self._metrics.model_cache_hits.inc()
        return entry, None

    def _stale_locked(self, entry: _Entry, settings: ModelSettings) -> bool:
        """True (and the entry removed) when ``settings`` need another session."""
        loaded = entry.session.ref.settings
        if loaded is settings or loaded.session_key == settings.session_key:
            return False  # the same object while the file is unchanged: one identity test
        log.info(
            "model %s: settings changed (%s): loading it again",
            entry.session.ref,
            settings.source or "the flags",
        )
        del self._entries[entry.key]
        self._bytes -= entry.session.nbytes
        entry.orphaned = entry.refs > 0  # closed by its last release instead
        self._update_gauges()
        return True

    def _load(self, key: _Key, ref: ModelRef, flight: _Flight, pin: bool) -> _Entry:
        start = time.monotonic()
        error: WorkerError | None = None
        try:
            session = self._loader(ref)
        except (ModelLoadError, ModelNotFound) as exc:
            error = exc
        except BaseException as exc:
            error = ModelLoadError(f"model {ref}: load failed: {type(exc).__name__}: {exc}")
            if not isinstance(exc, Exception):  # KeyboardInterrupt etc.: let waiters go first
                self._fail(key, flight, error, remember=False)
                raise
            log.exception("model %s: unexpected error while loading", ref)
        if error is not None:
            # A missing file is not remembered: the next request re-resolves.
            self._fail(key, flight, error, remember=isinstance(error, ModelLoadError))
            raise _copy(error) from error
        elapsed = time.monotonic() - start
        entry = _Entry(key, session, pin)
        entry.refs = 1
        with self._lock:
            self._flights.pop(key, None)
            self._failures.pop(key, None)
            self._entries[key] = entry
            self._bytes += session.nbytes
            victims = self._evict_locked()
            self._update_gauges()
        flight.done.set()
        if self._metrics is not None:
            self._metrics.model_load_seconds.observe(elapsed)
        log.info(
            "model %s loaded in %.3f s (%d bytes, %s)", ref, elapsed, session.nbytes, session.device
        )
        self._close_all(victims)
        return entry

    def _fail(self, key: _Key, flight: _Flight, error: WorkerError, *, remember: bool) -> None:
        with self._lock:
            self._flights.pop(key, None)
            if remember:
                self._failures[key] = (time.monotonic() + self.retry_after_s, error)
        flight.error = error
        flight.done.set()
        log.warning("%s (retry in %.1f s)", error.message, self.retry_after_s if remember else 0)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.refs:
                return
            if entry.orphaned:
                victims = [entry]
            elif self._over_budget():
                victims = self._evict_locked()
            else:
                return
        self._close_all(victims)

    def _over_budget(self) -> bool:
        # In-flight loads count: each will add one session.
        if len(self._entries) + len(self._flights) > self.max_models:
            return True
        return self.max_bytes is not None and self._bytes > self.max_bytes

    def _evict_locked(self, *, keep_newest: bool = True) -> list[_Entry]:
        """Remove least recently used idle, unpinned entries until within budget."""
        victims: list[_Entry] = []
        if not self._over_budget():
            return victims
        # Oldest use first. The most recent one stays (unless a load is about to
        # replace it as the newest), so a model larger than the byte budget is
        # still served rather than reloaded for every use.
        candidates = list(self._entries.items())
        for key, entry in candidates[:-1] if keep_newest else candidates:
            if entry.refs or entry.pinned:
                continue
            del self._entries[key]
            self._bytes -= entry.session.nbytes
            self.evicted_bytes += entry.session.nbytes
            victims.append(entry)
            if not self._over_budget():
                break
        if victims:
            if self._metrics is not None:
                self._metrics.model_cache_evictions.inc(len(victims))
            self._update_gauges()
        return victims

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.model_cache_models.set(len(self._entries))
            self._metrics.model_cache_bytes.set(self._bytes)

    def _close_all(self, entries: list[_Entry], *, notify: bool = True) -> None:
        # Outside the lock: closing a CUDA session frees device memory and can take a while.
        for entry in entries:
            log.info("model %s evicted", entry.session.ref)
            entry.session.close()
        if entries and notify and self._on_evict is not None:
            try:
                self._on_evict([e.session for e in entries])
            except Exception:  # a metrics hook must never fail a request
                log.exception("session cache: on_evict hook failed")


def _copy(error: WorkerError) -> WorkerError:
    """A fresh exception per raiser: one object raised in many threads shares a traceback."""
    return type(error)(error.message)


class ResponseCache:
    """Finished responses by request hash; LRU, bounded in entries and bytes.

    Values are returned as stored: callers must treat them as read-only.
    ``max_entries <= 0`` disables the cache (every ``get`` misses silently).
    """

    def __init__(
        self, max_entries: int, max_bytes: int = 256 * 1024 * 1024, metrics: Metrics | None = None
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(model: str, version: int, payload: bytes) -> bytes:
        """blake2b-256 of (model, version, payload); the NUL cannot occur in a model name."""
        h = hashlib.blake2b(digest_size=32, person=b"iw-response-v1")
        h.update(model.encode())
        h.update(b"\0")
        h.update(int(version).to_bytes(8, "big", signed=True))
        h.update(payload)
        return h.digest()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> object | None:
        if self.max_entries <= 0:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
        if self._metrics is not None:
            m = self._metrics
            (m.response_cache_hits if item is not None else m.response_cache_misses).inc()
        return item[0] if item is not None else None

    def put(self, key: bytes, value: object, nbytes: int) -> None:
        if self.max_entries <= 0 or nbytes > self.max_bytes:
            return  # bigger than the whole budget: caching it would flush everything
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size
