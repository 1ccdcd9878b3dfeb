"""Deciding one cycle: the active scheduler, or, in platform mode with tenant
schedulers, every tenant's scheduler on its own view and the platform's arbitration.

Tenant views and arbitration are pure (`orchestrator/scheduling/tenancy.py`); this
runs the engines side by side and counts what arbitration dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Protocol

from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context
from orchestrator.domain.jobs import JobRecord
from orchestrator.scheduling.attempt import Refresh
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.scheduling.tenancy import PLATFORM, arbitrate, tenant_view
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.support.log import get_logger

log = get_logger("service")


class Engine(Protocol):
    """A scheduling engine (orchestrator/scheduling/engine.py, SchedulingEngine)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def schedule(self, ctx: Context, refresh: Refresh | None = None) -> CycleResult: ...


class Decider:
    def __init__(
        self,
        engine: Engine,
        tenant_engines: Mapping[str, Engine],
        in_flight: Mapping[str, JobRecord],
        metrics: ServiceMetrics,
        *,
        refresh: Refresh,
    ) -> None:
        self.engine = engine  # the platform scheduler's, with the user's when one runs
        self.tenant_engines = tenant_engines
        self.in_flight = in_flight  # running jobs: whose they are, for tenant views
        # Each tenant's last view: the next one's job changes are filtered from ctx's.
        self._views: dict[str, Context] = {}
        self.metrics = metrics
        self.refresh = refresh  # ctx.refresh_pool_state()

    async def start(self) -> None:
        await self.engine.start()
        for engine in self.tenant_engines.values():
            await engine.start()

    async def close(self) -> None:
        for engine in self.tenant_engines.values():
            await engine.close()
        await self.engine.close()

    async def decide(self, ctx: Context, cycle: int) -> CycleResult:
        if self.tenant_engines:
            return await self._arbitrated(ctx, cycle)
        return await self.engine.schedule(ctx, self.refresh)

    def _view(self, ctx: Context, tenant_id: str, owners: Mapping[str, str | None]) -> Context:
        view = tenant_view(ctx, tenant_id, owners, self._views.get(tenant_id))
        self._views[tenant_id] = view
        return view

    async def _arbitrated(self, ctx: Context, cycle: int) -> CycleResult:
        """Each tenant scheduler decides on its own view, the platform scheduler on the
        whole cluster, and the platform arbitrates."""
        owners = {job_id: r.tenant_id for job_id, r in self.in_flight.items()}
        results = await asyncio.gather(
            self.engine.schedule(ctx),
            *(engine.schedule(self._view(ctx, tenant_id, owners))
              for tenant_id, engine in self.tenant_engines.items()),
        )  # fmt: skip
        proposals = {PLATFORM: results[0].decision}
        proposals |= {t: r.decision for t, r in zip(self.tenant_engines, results[1:], strict=True)}
        decision, dropped = arbitrate(ctx, proposals, cycle=cycle)
        for d in dropped:
            proposer = d.proposer or "platform"
            self.metrics.arbitration_dropped.labels(proposer, d.reason).inc()
            log.info(
                "scheduler.arbitration_dropped",
                proposer=proposer,
                action=decisions.describe(d.action),
                reason=d.reason,
                detail=d.detail,
            )
        return dataclasses.replace(results[0], decision=decision, context=ctx)
