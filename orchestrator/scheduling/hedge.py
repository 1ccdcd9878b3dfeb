"""A hedged fallback: the platform scheduler's decision, computed beside a slow user one.

When the user scheduler's timed call has not answered by the hedge point, the
platform scheduler starts on the same context, in its own sandbox and in parallel.
If the user's call then fails (its deadline, a crash, an error, a rejected decision),
the cycle falls back to that decision, which is ready or nearly: the fallback costs a
kill, not a second call after it. If the user answers in time, the hedge is discarded
but never cancelled: it runs to its end in the background, so that what the core
knows its worker holds (epoch, seq) stays what the worker holds.

The hedge point is the deadline less a lead: the platform's recent call latency (the
slowest of its last calls, measured on this cluster and machine, deltas included)
plus a margin for a loaded machine (`scheduler.hedge_margin_ms`). So the decision is
ready at the deadline, and a script that answers well within its budget costs no
hedge, where a fixed fraction of the budget would start one for every script that
uses that much of it. The latency counts for at most half the deadline: one slow call
(a stall of the machine) must not make every cycle hedge from its start.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter

from orchestrator.scheduling.cycle import Attempt

# Until the platform scheduler has answered a call, its latency is taken to be this.
INITIAL_LATENCY_S = 0.005
RECENT_CALLS = 32  # the lead follows the slowest of these (a p97)


class HedgeTiming:
    """When, from the start of the user's timed call, a hedge starts."""

    def __init__(self, deadline_s: float, margin_s: float) -> None:
        self.deadline_s = deadline_s
        self.margin_s = margin_s
        self._recent: deque[float] = deque(maxlen=RECENT_CALLS)
        self.delay_s = self._delay()

    def record(self, call_s: float) -> None:
        """A platform call that answered, and how long it took."""
        self._recent.append(call_s)
        self.delay_s = self._delay()

    def _delay(self) -> float:
        latency = min(max(self._recent, default=INITIAL_LATENCY_S), self.deadline_s / 2)
        return max(0.0, self.deadline_s - latency - self.margin_s)


class Hedge:
    """One cycle's hedge, armed by the user's timed call (a `CallWatch`).

    `start` begins the platform's attempt on the cycle's context and returns its task;
    the engine keeps the task until it ends, used or not.
    """

    def __init__(
        self, start: Callable[[], asyncio.Task[Attempt]], delay_s: float, counter: Counter
    ) -> None:
        self._start = start
        self._delay_s = delay_s
        self._counter = counter
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Attempt] | None = None

    def call_started(self) -> None:
        if self._task is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._fire)

    def call_ended(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._task = self._start()
        self._counter.labels("started").inc()

    @property
    def started(self) -> bool:
        return self._task is not None

    async def use(self) -> Attempt:
        """The platform's attempt, once it ends. Shielded: a cancelled cycle leaves it
        to end in the background rather than cut its call short."""
        assert self._task is not None, "use() a hedge that started"
        self._counter.labels("used").inc()
        return await asyncio.shield(self._task)

    def discard(self) -> None:
        """Not needed: no hedge starts any more, and one that did runs to its end."""
        self.call_ended()
        if self._task is not None:
            self._counter.labels("discarded").inc()
