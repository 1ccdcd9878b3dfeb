"""Circuit breaker for crash-looping user schedulers (docs/ARCHITECTURE.md, D5).

Pure: time comes from an injected clock. After `threshold` consecutive failures
the circuit opens and the platform scheduler stays in charge; after a backoff one
trial call is let through (half-open). A success closes the circuit, a failure
reopens it with the backoff doubled, up to `max_backoff_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 5,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self.state: State = "closed"
        self.consecutive_failures = 0
        self.trips = 0
        self.backoff_s = base_backoff_s
        self.open_until = 0.0

    def allow(self) -> bool:
        """May the user scheduler serve this cycle?"""
        if self.state == "open" and self._clock() >= self.open_until:
            self.state = "half_open"
        return self.state != "open"

    def record_success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self.backoff_s = self.base_backoff_s

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open":
            self.backoff_s = min(self.backoff_s * 2, self.max_backoff_s)
            self._open()
        elif self.state == "closed" and self.consecutive_failures >= self.threshold:
            self._open()

    def _open(self) -> None:
        self.state = "open"
        self.trips += 1
        self.open_until = self._clock() + self.backoff_s

    def retry_in_s(self) -> float:
        return max(0.0, self.open_until - self._clock()) if self.state == "open" else 0.0
