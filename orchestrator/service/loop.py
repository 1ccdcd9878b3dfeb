"""The scheduling loop: when to run a cycle, and what one cycle is.

A cycle runs when the cluster state changed, and at least every tick. One cycle is
three calls into parts with one job each:

    result = await decider.decide(ctx)        # a sandboxed scheduler decides
    await applier.apply(result.decision)      # the decision meets the live state
    metrics.update_gauges(result.context)     # what the cycle left, for /metrics

Observers are told of each result: `on_decided` before it is applied (the live view's
history, the auto-rollback check), `on_applied` after the gauges (shadow mode, whose
candidate then decides the same context in the background). A cycle that wedges is cancelled after
CYCLE_STALL_S and logged with where it waits; the loop goes on. So does it after a cycle
that raises (bad state must not stop scheduling for good): each failure is counted,
and FAILING_CYCLES of them in a row make /healthz say "degraded" (`health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from orchestrator.domain.context import Context
from orchestrator.domain.decision import Decision, Wait
from orchestrator.domain.jobs import JobRecord
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger
from orchestrator.support.tasks import cancel_and_wait, where_it_waits

log = get_logger("service")

CYCLE_STALL_S = 30.0  # a cycle takes milliseconds; one this old waits on something broken
LOOP_STALL_S = 2 * CYCLE_STALL_S  # no cycle for this long: the watchdog stops pinging
FAILING_CYCLES = 3  # failed cycles in a row that make the service unhealthy; one is noise
TRACEBACK_EVERY = 100  # a failing cycle fails every tick: its traceback once in so many
ERROR_CHARS = 200  # of the last error, as the repeated cycle_failed line carries it


@dataclass(frozen=True)
class CycleHealth:
    """How the latest cycles went (what /healthz reports)."""

    consecutive_failures: int = 0
    last_error: str = ""  # of the latest failure, while they go on
    failing_since_ms: int | None = None

    @property
    def failing(self) -> bool:
        return self.consecutive_failures >= FAILING_CYCLES


class CycleSource(Protocol):
    """Where contexts come from (orchestrator/state/cluster.py, ClusterState)."""

    in_flight: dict[str, JobRecord]

    @property
    def version(self) -> int: ...
    @property
    def queue_depth(self) -> int: ...
    def context(self, at_ms: int | None = None, *, fresh: bool = False) -> Context: ...
    def next_due_ms(self) -> int | None: ...


class Deciding(Protocol):
    async def decide(self, ctx: Context, cycle: int) -> CycleResult: ...


class Applying(Protocol):
    async def apply(self, decision: Decision) -> None: ...


class SchedulingLoop:
    def __init__(
        self,
        cluster: CycleSource,
        decider: Deciding,
        applier: Applying,
        metrics: ServiceMetrics,
        *,
        on_decided: Sequence[Callable[[CycleResult], None]] = (),
        on_applied: Sequence[Callable[[CycleResult], None]] = (),
        tick_ms: int,
        wake: asyncio.Event,
    ) -> None:
        self.cluster = cluster
        self.decider = decider
        self.applier = applier
        self.on_decided = on_decided
        self.on_applied = on_applied
        self.metrics = metrics
        self.tick_s = tick_ms / 1000
        self.wake = wake  # set by whoever changed something worth a cycle
        self.cycles = 0
        self.last_cycle_at = time.monotonic()
        self._health = CycleHealth()
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        """The loop runs and has finished a cycle lately (what the watchdog pings on)."""
        return (
            self._task is not None
            and not self._task.done()
            and time.monotonic() - self.last_cycle_at < LOOP_STALL_S
        )

    def health(self) -> CycleHealth:
        return self._health

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        tick = self.tick_s
        seen_version = -1
        last_cycle = 0.0
        next_in = tick
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for may swallow the
            # cancellation that stops this loop when the event fires at the same moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_in):
                    await self.wake.wait()
            self.wake.clear()
            changed = self.cluster.version != seen_version
            due = time.monotonic() - last_cycle >= tick
            if not (changed or due):
                next_in = max(0.0, tick - (time.monotonic() - last_cycle))
                continue
            seen_version = self.cluster.version
            last_cycle = time.monotonic()
            try:
                result = await self._guarded_cycle()
            except Exception as exc:
                self._failed(f"{type(exc).__name__}: {exc}")
                failures = self._health.consecutive_failures
                if failures == 1 or failures % TRACEBACK_EVERY == 0:
                    log.exception("scheduler.cycle_failed", failures=failures)
                else:
                    log.error("scheduler.cycle_failed", failures=failures,
                              error=self._health.last_error)  # fmt: skip
                next_in = tick
                continue
            self.last_cycle_at = time.monotonic()
            if result is None:
                next_in = 0.0
                continue
            self._health = CycleHealth()
            next_in = tick
            if isinstance(result.decision, Wait) and result.decision.retry_after_ms:
                next_in = min(tick, result.decision.retry_after_ms / 1000)
            due_ms = self.cluster.next_due_ms()
            if due_ms is not None:
                next_in = max(0.0, min(next_in, (due_ms - now_ms()) / 1000))

    async def _guarded_cycle(self) -> CycleResult | None:
        """A cycle that cannot wedge the loop: one still running after CYCLE_STALL_S is
        logged with where it waits, counted, and cancelled; the next one starts afresh."""
        task = asyncio.get_running_loop().create_task(self.cycle())
        try:
            done, _ = await asyncio.wait({task}, timeout=CYCLE_STALL_S)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            if task.cancelled():
                # Nobody cancelled it from here: a CancelledError escaped from inside.
                # Raised on, it would end this loop (it is not an Exception).
                log.error("scheduler.cycle_failed", error="the cycle ended cancelled")
                self._failed("the cycle ended cancelled")
                return None
            return task.result()
        log.error("scheduler.cycle_stalled", after_s=CYCLE_STALL_S, stack=where_it_waits(task))
        self.metrics.cycle_stalls.inc()
        self._failed(f"the cycle stalled for {CYCLE_STALL_S:.0f} s")
        await cancel_and_wait(task)
        return None

    def _failed(self, error: str) -> None:
        self.metrics.cycle_failures.inc()
        before = self._health
        self._health = CycleHealth(
            consecutive_failures=before.consecutive_failures + 1,
            last_error=error[:ERROR_CHARS],
            failing_since_ms=before.failing_since_ms or now_ms(),
        )

    async def cycle(self) -> CycleResult:
        """One cycle: decide, apply, update."""
        result = await self.decider.decide(self.cluster.context(), self.cycles)
        self.cycles += 1
        self.metrics.cycles.inc()
        for observe in self.on_decided:
            observe(result)
        await self.applier.apply(result.decision)
        self.metrics.update_gauges(
            result.context,
            queue_depth=self.cluster.queue_depth,
            running=len(self.cluster.in_flight),
        )
        for observe in self.on_applied:
            observe(result)
        return result
