"""The circuit breaker, with an injected clock."""

from __future__ import annotations

from orchestrator.scheduling.breaker import CircuitBreaker
from tests.fakes import Clock


def test_opens_after_threshold_and_half_opens_after_backoff() -> None:
    """N consecutive failures open it; after the backoff one trial is allowed."""
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, base_backoff_s=1.0, max_backoff_s=4.0, clock=clock)
    for _ in range(2):
        breaker.record_failure()
        assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now = 1.0
    assert breaker.allow() and breaker.state == "half_open"


def test_backoff_doubles_up_to_the_cap_and_success_resets() -> None:
    """A failed trial doubles the backoff (capped); a success closes and resets it."""
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, base_backoff_s=1.0, max_backoff_s=4.0, clock=clock)
    breaker.record_failure()
    for expected in (2.0, 4.0, 4.0):
        clock.now = breaker.open_until
        assert breaker.allow()
        breaker.record_failure()
        assert breaker.backoff_s == expected
    clock.now = breaker.open_until
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.backoff_s == 1.0
    assert breaker.consecutive_failures == 0 and breaker.trips == 4


def test_success_between_failures_keeps_it_closed() -> None:
    """Only consecutive failures count."""
    breaker = CircuitBreaker(threshold=2, clock=Clock())
    for _ in range(5):
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state == "closed"
