"""Session cache (LRU, budgets, pinning, single flight, failure backoff) and response cache."""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.modelzoo import ZOO, sample_feeds, write_corrupt, write_mlp
from worker.cache import ResponseCache, SessionCache
from worker.errors import ModelLoadError, ModelNotFound
from worker.observability import Metrics
from worker.repository import ModelRef, ModelRepository
from worker.runtime import RuntimeOptions, Session, load_session


class FakeSession:
    """Stands in for a runtime Session: records close() and use-after-close."""

    def __init__(self, ref: ModelRef, nbytes: int) -> None:
        self.ref = ref
        self.nbytes = nbytes
        self.closed = False
        self.device = "cpu"

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    def __init__(self, sizes: dict[str, int] | None = None, delay_s: float = 0.0) -> None:
        self.sizes = sizes or {}
        self.delay_s = delay_s
        self.calls: list[ModelRef] = []
        self.fail: dict[str, Exception] = {}
        self._lock = threading.Lock()

    def __call__(self, ref: ModelRef) -> Session:
        with self._lock:
            self.calls.append(ref)
        if self.delay_s:
            time.sleep(self.delay_s)
        if ref.name in self.fail:
            raise self.fail[ref.name]
        return FakeSession(ref, self.sizes.get(ref.name, 100))  # type: ignore[return-value]

    def count(self, name: str) -> int:
        return sum(r.name == name for r in self.calls)


def _repo(tmp_path: Path, *names: str) -> ModelRepository:
    for name in names:
        path = tmp_path / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"fake")
    return ModelRepository(tmp_path)


def _use(cache: SessionCache, name: str, version: int | None = None) -> Any:
    with cache.acquire(name, version) as session:
        assert not session.closed  # type: ignore[attr-defined]
        return session


def _metric(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(f"inference_worker_{name}")


# -- LRU and budgets -------------------------------------------------------------


def test_hit_returns_the_same_session_and_counts(tmp_path: Path) -> None:
    metrics, loader = Metrics(), FakeLoader()
    cache = SessionCache(_repo(tmp_path, "a"), loader, metrics=metrics)
    first = _use(cache, "a")
    assert _use(cache, "a") is first and _use(cache, "a", 1) is first
    assert loader.count("a") == 1
    assert _metric(metrics, "model_cache_misses_total") == 1
    assert _metric(metrics, "model_cache_hits_total") == 2
    assert _metric(metrics, "model_cache_models") == 1
    assert _metric(metrics, "model_cache_bytes") == 100
    assert _metric(metrics, "model_load_seconds_count") == 1


def test_peek_answers_a_loaded_session_as_a_hit_and_loads_nothing(tmp_path: Path) -> None:
    metrics, loader = Metrics(), FakeLoader()
    cache = SessionCache(_repo(tmp_path, "a", "b"), loader, max_models=2, metrics=metrics)
    assert cache.peek("a") is None and cache.peek("a", 1) is None  # not loaded: no load either
    assert loader.calls == [] and _metric(metrics, "model_cache_misses_total") == 0
    a, b = _use(cache, "a"), _use(cache, "b")
    assert cache.peek("a") is a and cache.peek("a", 1) is a
    assert _metric(metrics, "model_cache_hits_total") == 2
    assert cache.loaded() == [("b", 1), ("a", 1)]  # a peek is a use: A is the newest now
    assert not b.closed and cache.peek("b") is b
    with pytest.raises(ModelNotFound):
        cache.peek("nope")


def test_peek_of_a_session_whose_settings_changed_drops_it(tmp_path: Path) -> None:
    loader = FakeLoader()
    repo = _repo(tmp_path, "a")
    repo.rescan_s = 0
    cache = SessionCache(repo, loader)
    first = _use(cache, "a")
    (tmp_path / "a" / "model.toml").write_text("instances = 2\n")
    assert cache.peek("a") is None  # the next acquire loads it under the new settings
    assert first.closed and cache.loaded() == []
    assert _use(cache, "a") is not first and loader.count("a") == 2


def test_evicts_least_recently_used_not_first_inserted(tmp_path: Path) -> None:
    metrics, loader = Metrics(), FakeLoader()
    cache = SessionCache(_repo(tmp_path, "a", "b", "c"), loader, max_models=2, metrics=metrics)
    a, b = _use(cache, "a"), _use(cache, "b")
    _use(cache, "a")  # touching A makes B the least recently used
    c = _use(cache, "c")
    assert cache.loaded() == [("a", 1), ("c", 1)]
    assert b.closed and not a.closed and not c.closed
    assert _metric(metrics, "model_cache_evictions_total") == 1
    _use(cache, "b")  # reloaded; now A is the oldest use
    assert a.closed and cache.loaded() == [("c", 1), ("b", 1)]
    assert loader.count("b") == 2


def test_on_evict_sees_closed_sessions_and_counts_bytes(tmp_path: Path) -> None:
    loader = FakeLoader({"a": 300, "b": 200, "c": 100})
    seen: list[list[tuple[str, bool]]] = []

    def hook(sessions: list[Session]) -> None:  # e.g. read device memory into a gauge
        seen.append([(s.ref.name, s.closed) for s in sessions])  # type: ignore[attr-defined]
        raise RuntimeError("a broken metrics hook must not fail the request")

    cache = SessionCache(_repo(tmp_path, "a", "b", "c"), loader, max_models=1, on_evict=hook)
    _use(cache, "a")
    _use(cache, "b")
    _use(cache, "c")
    assert seen == [[("a", True)], [("b", True)]]  # called after close, once per eviction
    assert cache.evicted_bytes == 500
    cache.close()
    assert len(seen) == 2  # shutting down is not an eviction


@pytest.fixture(scope="module")
def six_models(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    return _repo(tmp_path_factory.mktemp("six"), *"abcdef")


@settings(max_examples=60, deadline=None)
@given(uses=st.lists(st.sampled_from("abcdef"), max_size=40), max_models=st.integers(1, 4))
def test_eviction_matches_a_reference_lru(
    six_models: ModelRepository, uses: list[str], max_models: int
) -> None:
    cache = SessionCache(six_models, FakeLoader(), max_models=max_models)
    reference: OrderedDict[str, None] = OrderedDict()
    for name in uses:
        _use(cache, name)
        reference[name] = None
        reference.move_to_end(name)
        while len(reference) > max_models:
            reference.popitem(last=False)
        assert cache.loaded() == [(n, 1) for n in reference]


def test_count_budget_respected(tmp_path: Path) -> None:
    names = [f"m{i}" for i in range(6)]
    metrics = Metrics()
    cache = SessionCache(_repo(tmp_path, *names), FakeLoader(), max_models=3, metrics=metrics)
    sessions = [_use(cache, n) for n in names]
    assert cache.loaded() == [("m3", 1), ("m4", 1), ("m5", 1)]
    assert [s.closed for s in sessions] == [True, True, True, False, False, False]
    assert _metric(metrics, "model_cache_models") == 3
    assert _metric(metrics, "model_cache_evictions_total") == 3


def test_byte_budget_respected(tmp_path: Path) -> None:
    metrics = Metrics()
    loader = FakeLoader({"a": 100, "b": 100, "c": 100, "big": 240})
    cache = SessionCache(
        _repo(tmp_path, "a", "b", "c", "big"), loader, max_models=10, max_bytes=250,
        metrics=metrics,
    )
    _use(cache, "a")
    _use(cache, "b")
    assert cache.nbytes == 200
    _use(cache, "c")
    assert cache.loaded() == [("b", 1), ("c", 1)] and cache.nbytes == 200
    _use(cache, "big")
    assert cache.loaded() == [("big", 1)] and cache.nbytes == 240
    assert _metric(metrics, "model_cache_bytes") == 240


def test_model_larger_than_byte_budget_is_still_served(tmp_path: Path) -> None:
    cache = SessionCache(_repo(tmp_path, "a", "huge"), FakeLoader({"huge": 1000}), max_bytes=500)
    _use(cache, "a")
    assert _use(cache, "huge").nbytes == 1000
    assert cache.loaded() == [("huge", 1)]


def test_pinned_never_evicted(tmp_path: Path) -> None:
    loader = FakeLoader()
    cache = SessionCache(_repo(tmp_path, "p", "a", "b", "c"), loader, max_models=2)
    pinned = cache.preload("p")
    for name in ("a", "b", "c", "a"):
        _use(cache, name)
        assert ("p", 1) in cache.loaded() and len(cache.loaded()) == 2
    assert not pinned.closed and loader.count("p") == 1  # type: ignore[attr-defined]
    assert _use(cache, "p") is pinned


def test_preloading_a_loaded_model_pins_it(tmp_path: Path) -> None:
    cache = SessionCache(_repo(tmp_path, "a", "b", "c"), FakeLoader(), max_models=2)
    a = _use(cache, "a")
    assert cache.preload("a") is a
    _use(cache, "b")
    _use(cache, "c")
    assert not a.closed and ("a", 1) in cache.loaded()


def test_in_use_never_evicted(tmp_path: Path) -> None:
    cache = SessionCache(_repo(tmp_path, "a", "b", "c"), FakeLoader(), max_models=1)
    with cache.acquire("a") as a:
        with cache.acquire("b") as b:
            assert not a.closed  # type: ignore[attr-defined]
            assert cache.loaded() == [("a", 1), ("b", 1)]  # over budget while both run
        c = _use(cache, "c")
        assert b.closed and not a.closed  # type: ignore[attr-defined]
        assert cache.loaded() == [("a", 1), ("c", 1)]
    assert a.closed and not c.closed  # type: ignore[attr-defined]
    assert cache.loaded() == [("c", 1)]  # over-budget victims go as soon as they are idle


def test_concurrent_use_never_sees_a_closed_session(tmp_path: Path) -> None:
    names = [f"m{i}" for i in range(6)]
    loader = FakeLoader(delay_s=0.001)
    cache = SessionCache(_repo(tmp_path, *names), loader, max_models=3)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                with cache.acquire(rng.choice(names)) as s:
                    assert not s.closed  # type: ignore[attr-defined]
                    time.sleep(0)
                    assert not s.closed  # type: ignore[attr-defined]
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache.loaded()) <= 3


# -- single flight and failures ---------------------------------------------------


def _together(n: int, fn: Any) -> list[Any]:
    """Run ``fn`` in ``n`` threads released at once; results or exceptions, in order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # returned to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_single_flight_eight_threads_one_load(tmp_path: Path) -> None:
    metrics = Metrics()
    loader = FakeLoader(delay_s=0.2)
    cache = SessionCache(_repo(tmp_path, "cold"), loader, metrics=metrics)
    results = _together(8, lambda: _use(cache, "cold"))
    assert loader.count("cold") == 1
    assert all(r is results[0] for r in results) and isinstance(results[0], FakeSession)
    assert _metric(metrics, "model_cache_misses_total") == 1


def test_load_failure_reaches_all_waiters_then_is_retried(tmp_path: Path) -> None:
    loader = FakeLoader(delay_s=0.1)
    loader.fail["bad"] = ModelLoadError("model bad:1: model.onnx could not be loaded: junk")
    cache = SessionCache(_repo(tmp_path, "bad", "good"), loader, retry_after_s=0.3)
    results = _together(8, lambda: _use(cache, "bad"))
    assert all(isinstance(r, ModelLoadError) and "junk" in str(r) for r in results)
    assert loader.count("bad") == 1
    with pytest.raises(ModelLoadError, match="junk"):  # remembered: no new load
        _use(cache, "bad")
    assert loader.count("bad") == 1
    assert _use(cache, "good").ref.name == "good"  # other models unaffected
    time.sleep(0.35)
    del loader.fail["bad"]  # "fixed" on disk: the retry after the backoff succeeds
    assert _use(cache, "bad").ref.name == "bad"
    assert loader.count("bad") == 2


def test_unexpected_loader_error_becomes_model_load_error(tmp_path: Path) -> None:
    loader = FakeLoader()
    loader.fail["x"] = RuntimeError("boom")
    cache = SessionCache(_repo(tmp_path, "x"), loader)
    with pytest.raises(ModelLoadError, match="x:1: load failed: RuntimeError: boom"):
        _use(cache, "x")


def test_model_not_found_passes_through_without_loading(tmp_path: Path) -> None:
    loader = FakeLoader()
    cache = SessionCache(_repo(tmp_path, "a"), loader)
    for name in ("missing", "../a"):
        with pytest.raises(ModelNotFound):
            _use(cache, name)
    with pytest.raises(ModelNotFound, match="no version 2"):
        _use(cache, "a", 2)
    assert loader.calls == []


def test_new_version_served_and_deleted_version_falls_back(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "m")
    repo.rescan_s = 0.1
    cache = SessionCache(repo, FakeLoader())
    assert _use(cache, "m").ref.version == 1
    v2 = tmp_path / "m" / "2" / "model.onnx"
    v2.parent.mkdir()
    v2.write_bytes(b"fake")
    time.sleep(0.15)
    assert _use(cache, "m").ref.version == 2
    v2.unlink()  # loaded sessions are served from memory until the next rescan
    time.sleep(0.15)
    assert _use(cache, "m").ref.version == 1


def test_deleted_newest_not_loaded_falls_back_at_once(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "m")
    v2 = tmp_path / "m" / "2" / "model.onnx"
    v2.parent.mkdir()
    v2.write_bytes(b"fake")
    repo.rescan_s = 60
    assert repo.resolve("m").version == 2  # "newest" is now cached for a minute
    v2.unlink()
    loader = FakeLoader()
    assert _use(SessionCache(repo, loader), "m").ref.version == 1
    assert [r.version for r in loader.calls] == [1]  # never tried the vanished file


def test_close_closes_idle_now_and_busy_on_release(tmp_path: Path) -> None:
    cache = SessionCache(_repo(tmp_path, "a", "b"), FakeLoader())
    a = _use(cache, "a")
    with cache.acquire("b") as b:
        cache.close()
        assert a.closed and not b.closed  # type: ignore[attr-defined]
    assert b.closed  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="closed"):
        _use(cache, "a")


def test_config_errors() -> None:
    repo = ModelRepository(Path("."))
    with pytest.raises(ValueError, match="--cache-max-models"):
        SessionCache(repo, FakeLoader(), max_models=0)
    with pytest.raises(ValueError, match="--cache-max-bytes"):
        SessionCache(repo, FakeLoader(), max_bytes=0)


# -- with the real runtime -------------------------------------------------------------


def test_real_sessions_through_a_small_cache_match_direct_runs(tmp_path: Path) -> None:
    for builder in ZOO.values():
        builder(tmp_path)
    write_corrupt(tmp_path, "corrupt")
    repo = ModelRepository(tmp_path)
    metrics = Metrics()
    options = RuntimeOptions(device="cpu", optimized_dir=tmp_path / ".." / "opt")
    cache = SessionCache(repo, lambda ref: load_session(ref, options), max_models=3,
                         metrics=metrics)
    direct = {
        name: ort.InferenceSession(str(repo.resolve(name).path), providers=["CPUExecutionProvider"])
        for name in ZOO
    }
    order = [*ZOO, *reversed(ZOO), "corrupt", *ZOO]
    for i, name in enumerate(order):
        if name == "corrupt":
            with pytest.raises(ModelLoadError, match="corrupt:1"):
                _use(cache, name)
            continue
        with cache.acquire(name) as session:
            feeds = sample_feeds(session.signature, rows=2, seed=i)
            got = session.run(feeds)
        want = direct[name].run(None, feeds)
        for value, expected in zip(got.values(), want, strict=True):
            if isinstance(expected, np.ndarray):
                np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
            else:  # seq(map)
                assert [d.keys() for d in value] == [d.keys() for d in expected]  # type: ignore[attr-defined]
                for g, w in zip(value, expected, strict=True):  # type: ignore[call-overload]
                    assert list(g.values()) == pytest.approx(list(w.values()), rel=1e-5)
        assert len(cache.loaded()) <= 3
    assert _metric(metrics, "model_cache_models") == 3
    cache.close()


# -- response cache ---------------------------------------------------------------------


def test_response_key_is_strong_and_separates_fields() -> None:
    k = ResponseCache.key("m", 1, b"payload")
    assert len(k) == 32 and k == ResponseCache.key("m", 1, b"payload")
    assert k != ResponseCache.key("m", 2, b"payload")
    assert k != ResponseCache.key("m1", 1, b"payload")
    assert ResponseCache.key("m", 1, b"1x") != ResponseCache.key("m1", 1, b"x")
    assert k != ResponseCache.key("m", 1, b"payload2")


def test_response_cache_bounds_entries_lru() -> None:
    metrics = Metrics()
    cache = ResponseCache(max_entries=2, metrics=metrics)
    cache.put(b"a", "A", 10)
    cache.put(b"b", "B", 10)
    assert cache.get(b"a") == "A"  # a is now the most recent
    cache.put(b"c", "C", 10)
    assert cache.get(b"b") is None and cache.get(b"a") == "A" and cache.get(b"c") == "C"
    assert len(cache) == 2 and cache.nbytes == 20
    assert _metric(metrics, "response_cache_hits_total") == 3
    assert _metric(metrics, "response_cache_misses_total") == 1


def test_response_cache_bounds_bytes() -> None:
    cache = ResponseCache(max_entries=100, max_bytes=100)
    for i in range(5):
        cache.put(bytes([i]), i, 30)
    assert len(cache) == 3 and cache.nbytes == 90
    cache.put(b"\x04", "replaced", 50)  # same key: old size is given back first
    assert cache.nbytes == 80 and cache.get(b"\x04") == "replaced"
    cache.put(b"huge", "x", 101)  # bigger than the whole budget: not stored, nothing flushed
    assert cache.get(b"huge") is None and len(cache) == 2


def test_response_cache_off_when_size_zero() -> None:
    metrics = Metrics()
    cache = ResponseCache(max_entries=0, metrics=metrics)
    cache.put(b"a", "A", 1)
    assert not cache.enabled and cache.get(b"a") is None and len(cache) == 0
    assert _metric(metrics, "response_cache_misses_total") == 0


def test_write_mlp_is_deterministic(tmp_path: Path) -> None:
    a = write_mlp(tmp_path / "1").read_bytes()
    assert a == write_mlp(tmp_path / "2").read_bytes()
