"""Liveness and readiness: every 503 path of /healthz and /readyz through the real server.

Time is a fake clock the tests move by hand, so a "stall" of minutes takes
no time at all and never depends on how loaded the machine is.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from worker.health import Health
from worker.observability import HealthServer, Metrics


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> Health:
    return Health(stall_after_s=60.0, commit_stall_after_s=45.0, clock=clock)


@pytest.fixture
def port(health: Health) -> Iterator[int]:
    with HealthServer(0, Metrics(), health) as server:
        yield server.port


# -- /healthz --------------------------------------------------------------------


def test_live_while_the_loop_passes(health: Health, clock: Clock, port: int) -> None:
    for _ in range(10):
        clock.advance(30)
        health.beat()
    assert _get(port, "/healthz") == (200, "ok\n")


def test_a_stalled_loop_is_503_with_its_reason(health: Health, clock: Clock, port: int) -> None:
    health.beat()
    clock.advance(59.9)
    assert _get(port, "/healthz")[0] == 200
    clock.advance(0.2)
    status, body = _get(port, "/healthz")
    assert status == 503
    assert body == "poll loop stalled: no pass for 60.1 s (limit 60 s)\n"
    health.beat()  # the loop came back
    assert _get(port, "/healthz")[0] == 200


def test_each_limit_is_reached_at_exactly_its_seconds(health: Health, clock: Clock) -> None:
    # The clock starts at a whole number of seconds, so the sums below are exact.
    health.beat()
    clock.advance(60.0)
    assert health.liveness() == "poll loop stalled: no pass for 60.0 s (limit 60 s)"
    health.beat()
    health.committed()
    health.set_pending(3)
    clock.advance(45.0)
    health.beat()
    assert health.liveness() == (
        "commits stalled: 3 records pending and no commit succeeded in the last 45.0 s"
        " (limit 45 s)"
    )


def test_frozen_commits_while_records_pend_are_503(health: Health, clock: Clock, port: int) -> None:
    """The loop keeps passing (answers flow) but no commit succeeds: a group that never settles."""
    health.committed()
    health.set_pending(12)
    for _ in range(4):
        clock.advance(10)
        health.beat()
    assert _get(port, "/healthz")[0] == 200  # 40 s < 45 s
    clock.advance(6)
    health.beat()
    status, body = _get(port, "/healthz")
    assert status == 503
    assert body == (
        "commits stalled: 12 records pending and no commit succeeded in the last 46.0 s"
        " (limit 45 s)\n"
    )
    health.committed()  # one commit succeeds: live again although records still pend
    assert _get(port, "/healthz")[0] == 200


def test_an_idle_worker_without_commits_stays_live(health: Health, clock: Clock, port: int) -> None:
    """Nothing pending, nothing to commit: an hour without a commit is not a stall."""
    for _ in range(120):
        clock.advance(30)
        health.beat()
    assert _get(port, "/healthz")[0] == 200


def test_commit_stall_counts_from_when_records_started_waiting(
    health: Health, clock: Clock
) -> None:
    """After a long idle spell the last commit is old; new records get the full allowance."""
    health.committed()
    clock.advance(3600)
    health.beat()
    health.set_pending(1)  # one record is enough to start the clock
    assert health.healthy
    clock.advance(44)
    health.beat()
    health.set_pending(5)  # more arrive: the clock keeps running from the first
    assert health.healthy
    clock.advance(2)
    health.beat()
    assert not health.healthy
    health.set_pending(0)  # all committed (or revoked): nothing waits
    assert health.healthy


def test_the_worker_loops_limit_is_60_s_without_a_pass_by_default(clock: Clock) -> None:
    # the loop builds its Health with the commit limit only (the group's session)
    health = Health(commit_stall_after_s=10.0, clock=clock)
    clock.advance(59.9)
    assert health.healthy
    clock.advance(0.1)
    assert health.liveness() == "poll loop stalled: no pass for 60.0 s (limit 60 s)"


def test_commits_that_never_succeeded_count_from_the_first_pending_record(
    health: Health, clock: Clock
) -> None:
    health.set_pending(1)
    clock.advance(45)
    health.beat()
    why = health.liveness()
    assert why is not None and why.startswith("commits stalled: 1 records pending")


# -- /readyz ---------------------------------------------------------------------


def test_a_broker_that_never_answered_is_not_ready(health: Health, port: int) -> None:
    health.preloaded = True
    assert _get(port, "/readyz") == (503, "not ready: broker has not answered yet\n")


def test_a_failed_preload_is_not_ready(health: Health, port: int) -> None:
    health.broker_ok = True
    assert _get(port, "/readyz") == (503, "not ready: preloaded models are not loaded yet\n")


def test_ready_once_broker_answered_and_models_loaded(health: Health, port: int) -> None:
    assert _get(port, "/readyz")[0] == 503
    health.broker_ok = True
    health.preloaded = True
    assert _get(port, "/readyz") == (200, "ready\n")
    assert health.ready


def test_liveness_and_readiness_are_independent(health: Health, clock: Clock, port: int) -> None:
    """A stalled loop is restarted (liveness) even though it was ready; readiness stays true."""
    health.broker_ok = health.preloaded = True
    clock.advance(61)
    assert _get(port, "/healthz")[0] == 503
    assert _get(port, "/readyz")[0] == 200


# -- the commit-age gauge ------------------------------------------------------------


def test_last_commit_age_is_computed_at_scrape_time(health: Health, clock: Clock) -> None:
    metrics = Metrics()
    metrics.watch_health(health)
    age = "inference_worker_last_commit_age_seconds"
    assert metrics.registry.get_sample_value(age) == 0.0  # since start, before any commit
    clock.advance(7.5)
    assert metrics.registry.get_sample_value(age) == 7.5
    health.committed()
    clock.advance(2)
    assert metrics.registry.get_sample_value(age) == 2.0


def test_the_server_wires_the_commit_age_gauge(health: Health, clock: Clock) -> None:
    metrics = Metrics()
    with HealthServer(0, metrics, health) as server:
        clock.advance(12)
        _, body = _get(server.port, "/metrics")
    assert "inference_worker_last_commit_age_seconds 12.0\n" in body


def test_the_default_clock_is_monotonic_time() -> None:
    """Without an injected clock the health object still works (the worker's own case)."""
    health = Health()
    health.beat()
    health.committed()
    health.set_pending(1)
    assert health.healthy
    assert 0.0 <= health.last_commit_age() < 5.0
