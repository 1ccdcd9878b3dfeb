"""Trying a candidate scheduler without letting it act: shadow mode and simulation.

Shadow mode runs the candidate beside the active scheduler on every live cycle and
keeps how its decisions differ (orchestrator/scheduling/shadow.py); nothing it
decides is executed. A simulation runs it on a simulated cluster with this service's
catalog (orchestrator/sim/). It shares the CPU and the event loop with scheduling, so
its size is capped (the workload's fields by SimSettings, its jobs and cycles here),
the workload is generated in a thread, and one simulation runs at a time: another
request meanwhile is refused (RATE_LIMITED), not queued behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from orchestrator.config.settings import ServiceConfig
from orchestrator.domain.context import Catalog
from orchestrator.domain.errors import ConfigError, InvalidRequestError, RateLimitedError
from orchestrator.policy.validate import detect_language, to_lua
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.scheduling.engine import EngineOptions
from orchestrator.scheduling.shadow import Shadow
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.service.schedulers import ActiveScheduler
from orchestrator.sim.report import SimReport
from orchestrator.sim.run import Progress, part_progress, simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.support.log import get_logger

log = get_logger("service")

MAX_SIMULATED_JOBS = 20_000  # a simulation in the service shares its CPU with scheduling
# Scheduling cycles per policy run: the policy, not the workload, decides how many
# cycles a simulation takes (a 1 ms retry_after_ms, or workers started and evicted
# with no delay, repeat cycles without end). Past this the run stops and reports what
# it has, jobs_unfinished included; 20,000 jobs usually take about 20,000
# (a cycle runs only when something can be placed: docs/SIMULATION.md).
MAX_SIMULATED_CYCLES = 100_000


class ShadowTrial:
    """The shadow scheduler, if one runs: started, offered every cycle, stopped."""

    def __init__(self, config: ServiceConfig, metrics: ServiceMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.shadow: Shadow | None = None
        self._lock = asyncio.Lock()

    async def start(self, source: str, language: str = "", name: str = "") -> Shadow:
        """Run a candidate beside the active scheduler (replacing any earlier shadow)."""
        name = name or "shadow"
        language = language or detect_language(source, name)
        lua = to_lua(source, language, name)
        c = self.config.scheduler
        shadow = Shadow(
            lua, name, source, c.language,
            EngineOptions.from_config(c, spares=0,
                                      expose_platform_source=not self.config.platform_mode),
            on_decided=self._decided,
        )  # fmt: skip
        await shadow.start()
        error = shadow.engine.user_load_error
        if error is not None:
            await shadow.close()
            raise ConfigError(f"{name}: the shadow scheduler does not load: {error}")
        async with self._lock:
            old, self.shadow = self.shadow, shadow
        if old is not None:
            await old.close()
        log.info("shadow.started", name=name, sha256=shadow.sha256[:12])
        return shadow

    def _decided(self, kind: str | None) -> None:
        self.metrics.shadow_cycles.inc()
        if kind is not None:
            self.metrics.shadow_differing.labels(kind).inc()

    def offer(self, result: CycleResult) -> None:
        """The active scheduler's cycle, for the shadow to decide too (if one runs)."""
        if self.shadow is not None:
            self.shadow.offer(result)

    def status(self) -> dict[str, object]:
        return self.shadow.status() if self.shadow is not None else {"active": False}

    async def stop(self) -> dict[str, object]:
        """Stop the shadow; returns its final status."""
        async with self._lock:
            shadow, self.shadow = self.shadow, None
        if shadow is None:
            return {"active": False}
        await shadow.close()
        final = {**shadow.status(), "active": False}
        log.info("shadow.stopped", name=shadow.name, cycles=shadow.cycles,
                 diff_rate=final["diff_rate"])  # fmt: skip
        return final


class Simulations:
    """Simulations on this service's catalog, one at a time; another is refused."""

    def __init__(
        self,
        config: ServiceConfig,
        catalog: Callable[[], Catalog],
        active: Callable[[], ActiveScheduler],
    ) -> None:
        self.config = config
        self.catalog = catalog  # read at each run: SIGHUP may have reloaded it
        self.active = active
        self._running = asyncio.Lock()

    async def simulate(
        self, source: str, language: str, name: str, settings: SimSettings, *,
        compare_active: bool = False, progress: Progress | None = None,
    ) -> list[SimReport]:  # fmt: skip
        """Simulate a policy (empty source: the platform scheduler), and optionally the
        active scheduler on the same arrivals."""
        expected = settings.expected_jobs()  # an upper bound: nothing is generated yet
        if expected > MAX_SIMULATED_JOBS:
            raise InvalidRequestError(
                "workload",
                f"about {expected} jobs; the service simulates at most {MAX_SIMULATED_JOBS} "
                "(use `orchestratord scheduler simulate` for more)",
            )
        policies: list[tuple[str | None, str]] = [(None, "platform")]
        if source.strip():
            name = name or "draft"
            policies = [(to_lua(source, language or detect_language(source, name), name), name)]
        if compare_active:
            a = self.active()
            policies.append((None if a.version_id == 0 else to_lua(a.source, a.language, a.name),
                             f"active: {a.name}"))  # fmt: skip
        # No await between this test and taking the lock: two requests cannot both pass.
        if self._running.locked():
            raise RateLimitedError(
                "a simulation is already running in this service; try again when it ends"
            )
        async with self._running:
            catalog = self.catalog()
            # Pure and CPU-bound (0.1 s for 20,000 jobs): off the event loop.
            arrivals = await asyncio.to_thread(settings.arrivals, catalog)
            reports = []
            for i, (policy, label) in enumerate(policies):
                report = await simulate(
                    policy, label, settings, catalog=catalog, arrivals=arrivals,
                    scheduler=self.config.scheduler, max_cycles=MAX_SIMULATED_CYCLES,
                    progress=part_progress(progress, i, len(policies), label),
                )  # fmt: skip
                if report.cycles >= MAX_SIMULATED_CYCLES:
                    log.warning(
                        "simulation.cycle_budget_reached",
                        policy=label,
                        cycles=report.cycles,
                        unfinished=report.jobs_unfinished,
                    )
                reports.append(report)
        return reports
