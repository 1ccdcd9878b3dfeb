"""The scheduling loop outlives cycles that raise, counts them, and says so (issue 14,
finding 3: one bad heartbeat made every cycle raise, while /healthz said ok)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from orchestrator.domain.context import Context
from orchestrator.domain.decision import Decision, Wait
from orchestrator.domain.jobs import JobRecord
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.service.loop import FAILING_CYCLES, SchedulingLoop
from orchestrator.service.metrics import ServiceMetrics


class BrokenCluster:
    """A cluster state whose contexts cannot be built while `broken` is set."""

    def __init__(self) -> None:
        self.in_flight: dict[str, JobRecord] = {}
        self.broken = True
        self.version = 0
        self.queue_depth = 0

    def context(self, at_ms: int | None = None, *, fresh: bool = False) -> Context:
        if self.broken:
            raise ValueError("Value out of range: 9223372036854775808")
        return Context(now_ms=at_ms or 0)

    def next_due_ms(self) -> int | None:
        return None


class Decider:
    async def decide(self, ctx: Context, cycle: int) -> CycleResult:
        return CycleResult(decision=Wait(), source="platform", context=ctx)


class Applier:
    async def apply(self, decision: Decision) -> None:
        return None


async def test_failing_cycles_are_counted_and_scheduling_resumes_when_they_stop() -> None:
    cluster = BrokenCluster()
    registry = CollectorRegistry()
    loop = SchedulingLoop(
        cluster, Decider(), Applier(), ServiceMetrics(registry, cycle_stall_s=30),
        tick_ms=10, wake=asyncio.Event(),
    )  # fmt: skip
    loop.start()
    try:
        async with asyncio.timeout(5):
            while loop.health().consecutive_failures < FAILING_CYCLES:
                await asyncio.sleep(0.005)
        health = loop.health()
        assert health.failing and health.failing_since_ms is not None
        assert health.last_error == "ValueError: Value out of range: 9223372036854775808"
        failed = registry.get_sample_value("orchestrator_cycle_failures_total")
        assert failed is not None and failed >= FAILING_CYCLES
        assert loop.cycles == 0
        cluster.broken = False  # the bad state is gone (the pool expired)
        async with asyncio.timeout(5):
            while loop.health().consecutive_failures:
                await asyncio.sleep(0.005)
        assert loop.cycles > 0 and loop.health().last_error == ""
    finally:
        await loop.stop()
