"""The orchestrator service: jobs in, decisions applied, jobs run, nothing lost.

`Orchestrator` is the thin front the API edges call. Each of its parts has one job:

- `Jobs` (jobs.py): submit, get, list, cancel, recovery, and every state change,
  durable before it is live; `JobEvents` (events.py) tells watchers;
- `SchedulingLoop` (loop.py): when to run a cycle; each cycle is `Decider.decide`
  (deciding.py), then `DecisionApplier.apply` (apply.py), then the gauges;
- `JobRunner` (running.py): one task per dispatched job, streaming it from its worker;
- `SchedulerVersions` (schedulers.py): deploy, rollback, hot reload, auto-rollback;
- `ShadowTrial` and `Simulations` (trials.py); `PoolRegistry` (pools.py), which
  PoolService calls directly.

`assemble` (assembly.py) builds them from the config. Every accepted job and every
state change is in SQLite before it is acknowledged. On start, jobs that were queued
are queued again, and jobs that were running are retried under `config.retry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path

from orchestrator.config.settings import ServiceConfig, TenantQuota, split_tenants
from orchestrator.domain.context import Catalog, Tenant
from orchestrator.domain.jobs import IN_FLIGHT, TERMINAL, JobRecord, JobState, SubmitSpec
from orchestrator.policy.validate import Report, policy_version
from orchestrator.pools.local_pool import LocalPool
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.scheduling.engine import SchedulingEngine
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.scheduling.shadow import Shadow
from orchestrator.service.deciding import Decider
from orchestrator.service.events import JobEvent, JobEvents
from orchestrator.service.history import CycleHistory
from orchestrator.service.jobs import Jobs
from orchestrator.service.loop import CycleHealth, SchedulingLoop
from orchestrator.service.outputs import JobOutputs, OutputChunk
from orchestrator.service.pools import PoolRegistry
from orchestrator.service.running import JobRunner
from orchestrator.service.schedulers import ActiveScheduler, SchedulerVersions
from orchestrator.service.trials import ShadowTrial, Simulations
from orchestrator.sim.report import SimReport
from orchestrator.sim.run import Progress
from orchestrator.sim.settings import SimSettings
from orchestrator.state.cluster import ClusterState
from orchestrator.state.decision_log import DecisionLog
from orchestrator.state.store import AsyncJobStore
from orchestrator.state.versions import Version, VersionStore
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger

log = get_logger("service")

VERSION = "0.1.0"


class Orchestrator:
    def __init__(
        self,
        *,
        config: ServiceConfig,
        state_dir: Path,
        metrics: EngineMetrics,
        local_pool: LocalPool | None,
        cluster: ClusterState,
        store: AsyncJobStore,
        versions: VersionStore,
        decision_log: DecisionLog | None,
        engine: SchedulingEngine,
        tenant_engines: Mapping[str, SchedulingEngine],
        events: JobEvents,
        outputs: JobOutputs,
        jobs: Jobs,
        runner: JobRunner,
        decider: Decider,
        loop: SchedulingLoop,
        history: CycleHistory,
        schedulers: SchedulerVersions,
        shadow: ShadowTrial,
        simulations: Simulations,
        pools: PoolRegistry,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.metrics = metrics  # its registry is /metrics: the engine's and the service's
        self.local_pool = local_pool
        self.cluster = cluster
        self.store = store
        self.versions = versions
        self.decision_log = decision_log
        self.engine = engine  # the platform scheduler's, with the user's when one runs
        self.tenant_engines = tenant_engines
        self.outputs = outputs
        self.events = events
        self.jobs = jobs
        self.runner = runner
        self.decider = decider
        self.loop = loop
        self.history = history
        self.schedulers = schedulers
        self.shadow_trial = shadow
        self.simulations = simulations
        self.pools = pools
        self.started_ms = now_ms()

    # ------------------------------------------------------------------ what the edges read
    @property
    def catalog(self) -> Catalog:
        return self.cluster.catalog

    @property
    def tenant_quotas(self) -> dict[str, Tenant]:
        return self.cluster.tenant_quotas

    @property
    def active(self) -> ActiveScheduler:
        return self.schedulers.active

    @property
    def shadow(self) -> Shadow | None:
        return self.shadow_trial.shadow

    @property
    def last_result(self) -> CycleResult | None:
        return self.history.last_result

    @property
    def recent(self) -> deque[dict[str, object]]:
        return self.history.recent

    @property
    def draining(self) -> bool:
        return self.jobs.draining

    @property
    def loop_alive(self) -> bool:
        return self.loop.alive

    @property
    def cycle_health(self) -> CycleHealth:
        return self.loop.health()

    @property
    def gpu_source(self) -> str:
        return self.local_pool.gpu_source if self.local_pool else "remote"

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.local_pool is not None:
            killed = self.local_pool.kill_leftovers()
            if killed:
                log.warning("pool.leftover_workers_killed", count=killed)
        await self.decider.start()
        self.schedulers.record_initial()
        await self.jobs.recover()
        self.loop.start()
        self.pools.start()
        self.schedulers.start_watching()

    async def drain(self) -> None:
        """Stop taking jobs, let running ones finish (bounded), then stop everything."""
        if self.jobs.draining:
            return
        self.jobs.draining = True
        log.info("service.draining", running=len(self.runner),
                 timeout_s=self.config.drain_timeout_s)  # fmt: skip
        await self.loop.stop()
        await self.runner.drain(self.config.drain_timeout_s)
        await self.close()

    async def close(self) -> None:
        await self.pools.stop()  # expiry retries jobs: before the runner stops
        await self.schedulers.close()
        await self.loop.stop()
        await self.runner.stop()
        self.outputs.close()  # after the runner: no text comes any more
        await self.shadow_trial.stop()
        await self.decider.close()
        if self.decision_log is not None:
            self.decision_log.close()
        if self.local_pool is not None:
            await self.local_pool.close()
        await self.runner.close()
        await self.store.close()
        self.versions.close()

    def reload_catalog(self, catalog: Catalog, tenants: Mapping[str, TenantQuota]) -> None:
        """SIGHUP: the next cycle, submit and simulation use the new catalog and tenants."""
        self.cluster.catalog = catalog
        self.cluster.tenant_quotas, self.jobs.admission.tenant_limits = split_tenants(tenants)
        self.cluster.changed()

    # ------------------------------------------------------------------ jobs
    async def submit(self, spec: SubmitSpec) -> JobRecord:
        return await self.jobs.submit(spec)

    async def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        """The job, if `tenant` may see it (None: any job; "": jobs without a tenant);
        NotFoundError otherwise, exactly as for an unknown job."""
        return await self.jobs.get(job_id, tenant=tenant)

    async def list_jobs(
        self, states: Sequence[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]:
        return await self.jobs.list_jobs(states, tenant_id, limit, after_seq)

    async def cancel(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        """Cancel the job, if `tenant` may see it (as `get`)."""
        record = await self.jobs.cancel_queued(job_id, tenant=tenant)
        if record.state in IN_FLIGHT:  # dispatched or running: its runner stops it
            await self.runner.cancel(job_id)
            record = await self.jobs.get(job_id)
        return record

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: str | None, *, tenant: str | None = None
    ) -> AsyncIterator[asyncio.Queue[JobEvent]]:
        """Events of `job_id` (None: of every job `tenant` may see). With a `tenant`, a
        job it may not see raises NotFoundError on entry, exactly as an unknown one; the
        check follows the subscription, so no event falls between. A watcher that falls
        behind gets RateLimitedError from `get` (service/events.py)."""
        async with self.events.subscribe(job_id, tenant=tenant) as queue:
            if job_id is not None and tenant is not None:
                await self.jobs.get(job_id, tenant=tenant)
            yield queue

    async def stream_output(
        self, job_id: str, *, tenant: str | None = None
    ) -> AsyncGenerator[OutputChunk]:
        """The job's output as it is produced, ending with a chunk that carries the job
        as it ended; a job that already ended gives that one chunk. NotFoundError as
        `get` (raised on the first iteration)."""
        with self.outputs.subscribe(job_id) as chunks:
            record = await self.jobs.get(job_id, tenant=tenant)
            if record.state in TERMINAL:
                yield OutputChunk(record.output, record.tokens_generated, record.attempts, record)
                return
            async for chunk in chunks:
                yield chunk

    # ------------------------------------------------------------------ schedulers
    def list_versions(self) -> list[Version]:
        return self.versions.all()

    async def validate(self, source: str, language: str, name: str) -> Report:
        return await self.schedulers.validate(source, language, name)

    async def deploy(
        self, source: str, language: str = "", name: str = "", deployer: str = ""
    ) -> tuple[Version, Report]:
        return await self.schedulers.deploy(source, language, name, deployer)

    async def rollback(self, version_id: int = 0) -> Version | None:
        return await self.schedulers.rollback(version_id)

    async def start_shadow(self, source: str, language: str = "", name: str = "") -> Shadow:
        return await self.shadow_trial.start(source, language, name)

    async def stop_shadow(self) -> dict[str, object]:
        return await self.shadow_trial.stop()

    async def simulate(
        self, source: str, language: str, name: str, settings: SimSettings, *,
        compare_active: bool = False, progress: Progress | None = None,
    ) -> list[SimReport]:  # fmt: skip
        return await self.simulations.simulate(
            source, language, name, settings, compare_active=compare_active, progress=progress
        )

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, object]:
        engine = self.engine
        load_error = engine.user_load_error
        active = self.schedulers.active
        pools = self.cluster.pools(now_ms())
        return {
            "version": VERSION,
            "deployment_mode": self.config.deployment_mode,
            "mode": self.config.mode,
            "scheduler": {
                "version_id": active.version_id,
                "name": active.name,
                "version": policy_version(active.source, active.language, active.name),
                "sha256": hashlib.sha256(active.source.encode()).hexdigest(),
                "active_since_ms": active.since_ms,
                "language": self.config.scheduler.language,
                "circuit": engine.breaker.state,
                "load_error": str(load_error) if load_error else self.schedulers.startup_error,
            },
            "queue_depth": self.cluster.queue_depth,
            "running_jobs": len(self.cluster.in_flight),
            "pools": len(pools),
            "workers": sum(len(p.workers) for p in pools),
            "cycles": self.loop.cycles,
            "fallbacks": int(
                sum(
                    s.value
                    for m in self.metrics.fallbacks.collect()
                    for s in m.samples
                    if s.name.endswith("_total")
                )
            ),
            "uptime_ms": now_ms() - self.started_ms,
            "draining": self.draining,
            "gpu_source": self.gpu_source,
            "shadow": self.shadow_trial.status(),
            "decision_log": str(self.decision_log.path or "") if self.decision_log else "",
        }
