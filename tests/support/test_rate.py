"""The token bucket, with an injected clock."""

from __future__ import annotations

import pytest

from orchestrator.support.rate import TokenBucket
from tests.fakes import Clock


def test_a_burst_then_the_sustained_rate() -> None:
    """A full bucket gives `burst` at once; then one token per 1/per_second, never more
    than `burst` however long it rested."""
    clock = Clock()
    bucket = TokenBucket(burst=3, per_second=2.0, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now = 0.5
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.now = 100.0
    assert sum(bucket.take() for _ in range(10)) == 3


def test_a_bucket_that_never_gives_is_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(burst=0, per_second=1.0)
    with pytest.raises(ValueError, match="per_second"):
        TokenBucket(burst=1, per_second=0.0)
