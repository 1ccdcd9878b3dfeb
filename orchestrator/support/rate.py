"""A token bucket: a burst at once, then a sustained rate."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Up to `burst` tokens at once, and `per_second` on average after that.

    Starts full. `clock` is in seconds (monotonic); tests pass their own. Used for
    script log records (one token each) and tenants' submit rates (a request, or a
    job's tokens).
    """

    def __init__(
        self, burst: float, per_second: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if burst < 1 or per_second <= 0:
            raise ValueError("a token bucket needs burst >= 1 and per_second > 0")
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock()

    @property
    def level(self) -> float:
        """The tokens that may be spent now."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        return self._tokens

    def take(self, n: float = 1) -> bool:
        """Spend `n` tokens: True if there were that many (nothing is spent otherwise)."""
        if self.level < n:
            return False
        self._tokens -= n
        return True

    def seconds_until(self, n: float) -> float:
        """How long until `n` tokens may be spent (0: now)."""
        return max(0.0, (n - self.level) / self.per_second)

    def retune(self, burst: float, per_second: float) -> None:
        """New limits (a reload), keeping what was spent."""
        level = self.level
        self.burst, self.per_second = burst, per_second
        self._tokens = min(burst, level)
