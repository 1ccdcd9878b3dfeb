"""The orchestrator service: jobs in, decisions applied, jobs run, nothing lost.

`Orchestrator` owns the durable job store, the live cluster state, the scheduling
engine and the scheduling loop. The loop runs a cycle whenever the queue or the
cluster changes, and on a tick; each cycle's decision is re-checked against the
state as it is when the decision comes back (a job may have been cancelled in the
meantime) and applied: dispatches start streaming jobs from workers, worker
starts and evictions go to the pool that owns the GPU.

Every accepted job and every state change is in SQLite before it is acknowledged.
On start, jobs that were queued are queued again, and jobs that were running are
retried under `config.retry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import watchfiles
from prometheus_client import Counter, Gauge, Histogram

from orchestrator.domain import decision as decisions
from orchestrator.state.cluster import ClusterState, ProcessInfo, RemoteCommand, now_ms
from orchestrator.config.settings import ServiceConfig, load_catalog, load_tenants
from orchestrator.domain.decision import Decision, Dispatch, EvictWorker, StartWorker, Wait
from orchestrator.state.decision_log import DecisionLog
from orchestrator.scheduling.engine import (
    CycleResult,
    EngineOptions,
    SchedulingEngine,
    platform_source,
)
from orchestrator.domain.errors import ConfigError, OrchestratorError
from orchestrator.pools.completion import JobRunner
from orchestrator.pools.hardware import GpuProbe, HostProbe, NvmlProbe, PsutilProbe
from orchestrator.domain.jobs import (
    CANCELLED,
    COMPLETED,
    DISPATCHED,
    FAILED,
    IN_FLIGHT,
    QUEUED,
    RUNNING,
    TERMINAL,
    InvalidJobError,
    JobRecord,
    SubmitSpec,
    new_record,
    retry_delay_ms,
    validate_submit,
)
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.pools.local_pool import LocalPool, PoolError
from orchestrator.support.log import get_logger
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.domain.context import Context, Gpu
from orchestrator.policy.parse import PolicyError
from orchestrator.policy.validate import (
    Report,
    detect_language,
    policy_version,
    to_lua,
    validate_policy,
)
from orchestrator.sandbox.process import SystemdLaunch
from orchestrator.scheduling.shadow import Shadow
from orchestrator.sim.report import SimReport
from orchestrator.sim.run import Progress, part_progress, simulate
from orchestrator.sim.settings import SimSettings
from orchestrator.state.store import AsyncJobStore, JobStore, Transition
from orchestrator.support.tasks import cancel_and_wait, where_it_waits
from orchestrator.scheduling.tenancy import PLATFORM, arbitrate, tenant_view
from orchestrator.state.versions import Version, VersionStore

log = get_logger("service")

CYCLE_STALL_S = 30.0  # a cycle takes milliseconds; one this old waits on something broken
LOOP_STALL_S = 2 * CYCLE_STALL_S  # no cycle for this long: the watchdog stops pinging

VERSION = "0.1.0"
RECENT_DECISIONS = 50
MAX_SIMULATED_JOBS = 20_000  # a simulation in the service shares its CPU with scheduling


class ServiceUnavailableError(OrchestratorError):
    """The service is draining or the queue is full."""


class NotFoundError(OrchestratorError):
    """No such job, pool or scheduler version."""


class PermissionDeniedError(OrchestratorError):
    """Not allowed in this deployment mode."""


class ValidationFailedError(OrchestratorError):
    """A scheduler was refused: the report says at which stage and why."""

    def __init__(self, report: Report) -> None:
        super().__init__(report.summary())
        self.report = report


@dataclass(frozen=True)
class ActiveScheduler:
    name: str
    source: str
    language: str  # "lua" or "yaml"
    version_id: int  # 0: the platform scheduler
    since_ms: int


@dataclass(frozen=True)
class PolicyFile:
    name: str
    source: str
    language: str
    lua: str


def scheduler_version(source: str) -> str:
    """The semver of a scheduler, from its `-- @version X` header line."""
    match = re.search(r"^--\s*@version\s+(\S+)", source, re.MULTILINE)
    return match.group(1) if match else ""


@dataclass(frozen=True)
class JobEvent:
    record: JobRecord
    at_ms: int
    detail: str = ""


class ServiceMetrics:
    def __init__(self, metrics: EngineMetrics) -> None:
        r = metrics.registry
        self.queue_depth = Gauge("orchestrator_queue_depth", "Jobs waiting.", registry=r)
        self.running = Gauge("orchestrator_jobs_running", "Jobs dispatched or running.", registry=r)
        self.submitted = Counter("orchestrator_jobs_submitted", "Jobs accepted.", registry=r)
        self.rejected = Counter(
            "orchestrator_jobs_rejected", "Submits refused, by field.", ["field"], registry=r
        )
        self.finished = Counter(
            "orchestrator_jobs_finished", "Jobs that ended, by state.", ["state"], registry=r
        )
        self.retried = Counter("orchestrator_jobs_retried", "Job attempts retried.", registry=r)
        self.applied = Counter(
            "orchestrator_actions_applied",
            "Decision actions applied or skipped as stale.",
            ["action", "result"],
            registry=r,
        )
        self.dispatch_wait = Histogram(
            "orchestrator_submit_to_dispatch_seconds",
            "Time from submit to dispatch.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.cycles = Counter("orchestrator_cycles", "Scheduling cycles run.", registry=r)
        self.cycle_stalls = Counter(
            "orchestrator_cycle_stalls",
            f"Cycles cancelled after {CYCLE_STALL_S:.0f} s (each is logged with its stack).",
            registry=r,
        )
        self.arbitration_dropped = Counter(
            "orchestrator_arbitration_dropped",
            "Actions proposed by tenant schedulers (or the platform's) dropped in arbitration.",
            ["proposer", "reason"],
            registry=r,
        )
        self.shadow_cycles = Counter(
            "orchestrator_shadow_cycles", "Cycles decided by the shadow scheduler.", registry=r
        )
        self.shadow_differing = Counter(
            "orchestrator_shadow_differing",
            "Shadow decisions that differ from the executed one, by kind.",
            ["kind"],
            registry=r,
        )
        self.workers = Gauge(
            "orchestrator_workers", "Inference workers by status.", ["status"], registry=r
        )
        self.pools = Gauge("orchestrator_pools", "Pools by status.", ["status"], registry=r)


class Orchestrator:
    def __init__(
        self,
        config: ServiceConfig,
        *,
        gpu_probe: GpuProbe | None = None,
        host_probe: HostProbe | None = None,
    ) -> None:
        self.config = config
        self.state_dir = config.path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = load_catalog(config)
        self.tenant_quotas = load_tenants(config)
        self.metrics = EngineMetrics()
        self.service_metrics = ServiceMetrics(self.metrics)
        self.local_pool: LocalPool | None = None
        if config.local_pool.enabled:
            probe = gpu_probe if gpu_probe is not None else NvmlProbe()
            if not probe.available() and config.local_pool.use_nvml:
                reason = getattr(probe, "reason", "no GPU")
                log.warning(
                    "pool.no_nvml",
                    message=f"no NVIDIA GPU or driver found ({reason}); using the "
                    f"{len(config.local_pool.gpus)} GPUs declared in the config, "
                    "marked as declared (measured=false)",
                )
            self.local_pool = LocalPool(
                config.local_pool,
                probe,
                host_probe or PsutilProbe(),
                self.state_dir,
                cache_ms=config.pools.heartbeat_ms,
            )
        self.cluster = ClusterState(config, self.catalog, self.tenant_quotas, self.local_pool)
        self.store = AsyncJobStore(
            JobStore(self.state_dir / "jobs.sqlite3", durability=config.durability)
        )
        self.versions = VersionStore(self.state_dir / "schedulers.sqlite3")
        self.active = ActiveScheduler("platform", platform_source(), "lua", 0, now_ms())
        self._initial = self._read_scheduler_file()
        self._deploy_lock = asyncio.Lock()
        self._trips_at_activation = 0
        self._rollback_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.engine = SchedulingEngine(
            user_source=self._initial.lua if self._initial else None,
            user_name=self._initial.name if self._initial else "scheduler.lua",
            language=config.scheduler.language,
            options=EngineOptions(
                limits=SandboxLimits(deadline_ms=config.scheduler.deadline_ms),
                user_spares=config.scheduler.spares,
                platform_spares=config.scheduler.spares,
                breaker_threshold=config.scheduler.breaker.threshold,
                breaker_base_backoff_s=config.scheduler.breaker.base_backoff_s,
                breaker_max_backoff_s=config.scheduler.breaker.max_backoff_s,
                expose_platform_source=not config.platform_mode,
                seccomp=config.scheduler.seccomp,
                spawn=config.scheduler.spawn,
                runtime_dir=self._sandbox_dir(),
            ),
            metrics=self.metrics,
        )
        self.tenant_engines = {
            tenant_id: self._tenant_engine(tenant_id, file)
            for tenant_id, file in sorted(config.tenant_schedulers.items())
        }
        self.decision_log: DecisionLog | None = None
        if config.decision_log.enabled:
            self.decision_log = DecisionLog(
                self.state_dir / "decisions",
                max_file_bytes=int(config.decision_log.max_file_mb * 2**20),
                keep_files=config.decision_log.keep_files,
            )
            self.engine.decision_log = self.decision_log
        self.shadow: Shadow | None = None
        self._shadow_lock = asyncio.Lock()
        self._simulations = asyncio.Semaphore(1)
        self.runner = JobRunner()
        self.started_ms = now_ms()
        self.cycles = 0
        self.last_cycle_at = time.monotonic()
        self.draining = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._subscribers: dict[str | None, set[asyncio.Queue[JobEvent]]] = {}
        self._worker_ids = itertools.count(1)
        self._command_ids = itertools.count(1)
        self.last_result: CycleResult | None = None
        # The latest decisions that did something (or fell back), for the live view.
        self.recent: deque[dict[str, object]] = deque(maxlen=RECENT_DECISIONS)
        self._start_backoff: dict[tuple[str, str], tuple[float, float]] = {}
        if self.local_pool is not None:
            self.local_pool.on_change.append(self._wake)

    def _tenant_engine(self, tenant_id: str, file: str) -> SchedulingEngine:
        if tenant_id not in self.tenant_quotas:
            raise ConfigError(f"tenant_schedulers[{tenant_id!r}]: no such tenant in `tenants`")
        path = self.config.path(file)
        try:
            source = path.read_text()
        except OSError as exc:
            raise ConfigError(f"tenant_schedulers[{tenant_id!r}]: {path}: {exc.strerror}") from None
        lua = to_lua(source, detect_language(source, path.name), path.name)
        runtime_dir = (
            self._sandbox_dir() / f"t{len(self.config.tenant_schedulers)}-{tenant_id[:16]}"
        )
        runtime_dir.mkdir(exist_ok=True, mode=0o700)
        c = self.config.scheduler
        return SchedulingEngine(
            user_source=lua, user_name=f"{tenant_id}:{path.name}", language=c.language,
            options=EngineOptions(
                limits=SandboxLimits(deadline_ms=c.deadline_ms), user_spares=c.spares,
                platform_spares=c.spares, breaker_threshold=c.breaker.threshold,
                breaker_base_backoff_s=c.breaker.base_backoff_s,
                breaker_max_backoff_s=c.breaker.max_backoff_s, expose_platform_source=False,
                seccomp=c.seccomp, spawn=c.spawn, runtime_dir=runtime_dir,
                systemd=self._tenant_launch(tenant_id),
            ),
            metrics=self.metrics,
        )  # fmt: skip

    def _tenant_launch(self, tenant_id: str) -> SystemdLaunch | None:
        t = self.config.scheduler.tenant_sandbox
        if t.launcher != "systemd":
            return None
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", tenant_id):
            raise ConfigError(
                f"tenant_schedulers[{tenant_id!r}]: a systemd unit instance needs a tenant id "
                "of letters, digits, '_', '.' and '-'"
            )
        return SystemdLaunch(prefix=tenant_id, unit=t.unit, socket_dir=Path(t.socket_dir),
                             systemctl=tuple(t.systemctl))  # fmt: skip

    def _sandbox_dir(self) -> Path:
        # Unix socket paths are limited to 108 bytes: keep them short, under /tmp if needed.
        path = self.state_dir / "sandbox"
        if len(str(path)) > 60:
            digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
            path = Path("/tmp") / f"orch-{digest}"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    @property
    def loop_alive(self) -> bool:
        """The scheduling loop runs and has finished a cycle lately (what the watchdog pings on)."""
        return (
            self._loop_task is not None
            and not self._loop_task.done()
            and time.monotonic() - self.last_cycle_at < LOOP_STALL_S
        )

    @property
    def gpu_source(self) -> str:
        return self.local_pool.gpu_source if self.local_pool else "remote"

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.local_pool is not None:
            killed = self.local_pool.kill_leftovers()
            if killed:
                log.warning("pool.leftover_workers_killed", count=killed)
        await self.engine.start()
        for engine in self.tenant_engines.values():
            await engine.start()
        self._record_initial_scheduler()
        await self._recover()
        loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self._loop())
        watch = bool(self.config.scheduler.file) and self.config.scheduler.hot_reload
        if watch and not self.config.platform_mode:
            self._watch_task = loop.create_task(self._watch_scheduler_file())

    async def _recover(self) -> None:
        """Queued jobs go back in the queue; jobs that were running are retried."""
        at = now_ms()
        records = await self.store.run(self.store.store.active)
        requeued = retried = failed = 0
        transitions = []
        for record in records:
            if record.state == QUEUED:
                self.cluster.enqueue(record, at)
                requeued += 1
                continue
            delay = retry_delay_ms(self.config.retry, record.attempts)
            if delay is None:
                transitions.append(
                    Transition(
                        record.id,
                        IN_FLIGHT,
                        FAILED,
                        at,
                        "no attempt left after restart",
                        (("finished_at", at), ("error", "orchestrator restarted")),
                    )
                )
                failed += 1
            else:
                transitions.append(
                    Transition(
                        record.id,
                        IN_FLIGHT,
                        QUEUED,
                        at,
                        "retry after restart",
                        (("not_before", at + delay), ("worker_id", None)),
                    )
                )
                retried += 1
        for updated in await self.store.apply(transitions):
            if updated is not None and updated.state == QUEUED:
                self.cluster.enqueue(updated, at)
        if records:
            log.info("service.recovered", requeued=requeued, retried=retried, failed=failed)

    async def drain(self) -> None:
        """Stop taking jobs, let running ones finish (bounded), then stop everything."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "service.draining", running=len(self._running), timeout_s=self.config.drain_timeout_s
        )
        await cancel_and_wait(self._loop_task)
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=self.config.drain_timeout_s)
        for task in list(self._running.values()):
            task.cancel()  # left in the store as running: retried on the next start
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        await self.close()

    async def close(self) -> None:
        await cancel_and_wait(self._watch_task)
        await cancel_and_wait(self._rollback_task)
        await cancel_and_wait(self._loop_task)
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        await self.stop_shadow()
        for engine in self.tenant_engines.values():
            await engine.close()
        await self.engine.close()
        if self.decision_log is not None:
            self.decision_log.close()
        if self.local_pool is not None:
            await self.local_pool.close()
        await self.runner.close()
        await self.store.close()
        self.versions.close()

    # ------------------------------------------------------------------ jobs
    async def submit(self, spec: SubmitSpec) -> JobRecord:
        if self.draining:
            raise ServiceUnavailableError("the orchestrator is draining; submit elsewhere or retry")
        try:
            model_ref, priority = validate_submit(
                spec,
                catalog=self.catalog,
                tenants=self.tenant_quotas,
                limits=self.config.limits,
                platform_mode=self.config.platform_mode,
            )
        except InvalidJobError as exc:
            self.service_metrics.rejected.labels(exc.field).inc()
            raise
        capacity = self.config.queue.capacity
        if capacity >= 0 and self.cluster.queue_depth >= capacity:
            raise ServiceUnavailableError(f"the queue is full ({capacity} jobs)")
        at = now_ms()
        record = new_record(
            "job-" + secrets.token_hex(8), spec, model_ref, priority, self.catalog, at
        )
        stored, created = await self.store.insert(record)
        if created:
            self.cluster.enqueue(stored, at)
            self.service_metrics.submitted.inc()
            self._publish(stored, at, "submitted")
            self._wake.set()
        return stored

    async def get(self, job_id: str) -> JobRecord:
        record = self.cluster.records.get(job_id) or await self.store.get(job_id)
        if record is None:
            raise NotFoundError(f"job {job_id!r} not found")
        return record

    async def list_jobs(
        self, states: list[str], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]:
        return await self.store.run(self.store.store.list_jobs, states, tenant_id, limit, after_seq)

    async def cancel(self, job_id: str) -> JobRecord:
        record = await self.get(job_id)
        if record.state in TERMINAL:
            return record
        at = now_ms()
        if record.state == QUEUED:
            (updated,) = await self.store.apply(
                [
                    Transition(
                        job_id,
                        (QUEUED,),
                        CANCELLED,
                        at,
                        "cancelled by client",
                        (("finished_at", at),),
                    )
                ]
            )
            if updated is not None:
                self._finished(updated, at, "cancelled by client")
                return updated
            record = await self.get(job_id)  # it moved on meanwhile: cancel it there
        task = self._running.get(job_id)
        if task is not None:
            self._cancel_requested.add(job_id)
            await cancel_and_wait(task)
        return await self.get(job_id)

    def _finished(self, record: JobRecord, at: int, detail: str) -> None:
        self.cluster.finish(record.id)
        self.service_metrics.finished.labels(record.state).inc()
        self._publish(record, at, detail)
        self._wake.set()

    # ------------------------------------------------------------------ watch
    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str | None) -> AsyncIterator[asyncio.Queue[JobEvent]]:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize=10_000)
        self._subscribers.setdefault(job_id, set()).add(queue)
        try:
            yield queue
        finally:
            self._subscribers[job_id].discard(queue)

    def _publish(self, record: JobRecord, at: int, detail: str) -> None:
        event = JobEvent(record, at, detail)
        for key in (record.id, None):
            for queue in self._subscribers.get(key, ()):
                with contextlib.suppress(asyncio.QueueFull):  # a stuck watcher loses events
                    queue.put_nowait(event)

    # ------------------------------------------------------------------ pools
    def register_pool(self, pool_id: str, endpoint: str) -> None:
        if self.local_pool is not None and pool_id == self.local_pool.id:
            raise InvalidJobError("pool_id", f"{pool_id!r} is the orchestrator's own pool")
        self.cluster.register_remote(pool_id, endpoint, now_ms())
        log.info("pool.registered", pool=pool_id, endpoint=endpoint)
        self._wake.set()

    def pool_heartbeat(
        self,
        pool_id: str,
        endpoint: str,
        gpus: tuple[Gpu, ...],
        workers: tuple[ProcessInfo, ...],
        cached_models: tuple[str, ...],
        host: tuple[int, int, float, int],
    ) -> list[RemoteCommand]:
        """Record a heartbeat; returns the commands waiting for this pool."""
        pool = self.cluster.remote.get(pool_id)
        if pool is None:
            raise NotFoundError(f"pool {pool_id!r} is not registered; call Register first")
        at = now_ms()
        if self.cluster.pool_status(pool.last_heartbeat_ms, at) == "offline":
            log.info("pool.back_online", pool=pool_id)
        if endpoint:
            pool.endpoint = endpoint
        commands = self.cluster.remote_heartbeat(pool, gpus, workers, cached_models, host, at)
        self._wake.set()
        return commands

    # ------------------------------------------------------------------ schedulers
    def _read_scheduler_file(self) -> PolicyFile | None:
        """The scheduler named in the config, compiled if it is YAML; None if it is unusable
        (the platform scheduler then runs, and status says why)."""
        if not self.config.scheduler.file:
            return None
        path = self.config.path(self.config.scheduler.file)
        try:
            source = path.read_text()
        except OSError as exc:
            raise OrchestratorError(f"scheduler.file: {path}: {exc.strerror}") from None
        language = detect_language(source, path.name)
        try:
            lua = to_lua(source, language, path.name)
        except PolicyError as exc:
            log.error("scheduler.load_failed", error=str(exc))
            self.startup_error = str(exc)
            return None
        return PolicyFile(path.name, source, language, lua)

    startup_error = ""

    def _record_initial_scheduler(self) -> None:
        initial = self._initial
        if initial is None or self.engine.user is None or self.engine.user.load_error:
            if self.engine.user is not None and self.engine.user.load_error:
                self.startup_error = str(self.engine.user.load_error)
            return
        sha = hashlib.sha256(initial.source.encode()).hexdigest()
        active = self.versions.active()
        if active is None or active.sha256 != sha:
            active = self.versions.add(self._version_entry(
                initial.name, initial.source, initial.language, "file", "startup",
                "loaded at start-up from scheduler.file", "{}",
            ))  # fmt: skip
        self._activate(active)

    def _version_entry(self, name: str, source: str, language: str, deployer: str, reason: str,
                       summary: str, report: str) -> Version:  # fmt: skip
        return Version(
            0, hashlib.sha256(source.encode()).hexdigest(), name,
            policy_version(source, language, name), language, source, deployer, now_ms(), reason,
            summary, report, True,
        )  # fmt: skip

    def _activate(self, version: Version | None) -> None:
        if version is None:
            self.active = ActiveScheduler("platform", platform_source(), "lua", 0, now_ms())
        else:
            self.active = ActiveScheduler(
                version.name, version.source, version.language, version.id, now_ms()
            )
        self._trips_at_activation = self.engine.breaker.trips

    async def validate(self, source: str, language: str, name: str) -> Report:
        return await validate_policy(
            source, name or "policy", language or None,
            budget_ms=self.config.scheduler.deadline_ms, seccomp=self.config.scheduler.seccomp,
            spawn=self.config.scheduler.spawn,
        )  # fmt: skip

    async def deploy(
        self, source: str, language: str = "", name: str = "", deployer: str = "", *,
        reason: str = "deploy",
    ) -> tuple[Version, Report]:  # fmt: skip
        """Validate, then put the scheduler in charge. The running one stays on any failure."""
        if self.config.platform_mode:
            raise PermissionDeniedError("platform mode: the platform scheduler cannot be replaced")
        async with self._deploy_lock:
            name = name or "policy"
            language = language or detect_language(source, name)
            report = await self.validate(source, language, name)
            if not report.ok:
                self.metrics.reloads.labels("rejected").inc()
                log.warning("scheduler.deploy_rejected", name=name, reason=reason,
                            summary=report.summary())  # fmt: skip
                raise ValidationFailedError(report)
            await self.engine.replace_user(report.lua, name)
            version = self.versions.add(self._version_entry(
                name, source, language, deployer or "unknown", reason, report.summary(),
                json.dumps(report.to_dict()),
            ))  # fmt: skip
            self._activate(version)
            self.metrics.reloads.labels("applied").inc()
            log.info("scheduler.deployed", version_id=version.id, name=name,
                     semver=version.version, sha256=version.sha256[:12], reason=reason)  # fmt: skip
            return version, report

    # ------------------------------------------------------------------ shadow, simulation
    async def start_shadow(self, source: str, language: str = "", name: str = "") -> Shadow:
        """Run a candidate beside the active scheduler (replacing any earlier shadow)."""
        name = name or "shadow"
        language = language or detect_language(source, name)
        lua = to_lua(source, language, name)
        c = self.config.scheduler
        shadow = Shadow(
            lua, name, source, c.language,
            EngineOptions(
                limits=SandboxLimits(deadline_ms=c.deadline_ms), user_spares=0,
                platform_spares=0, seccomp=c.seccomp, spawn=c.spawn,
                expose_platform_source=not self.config.platform_mode,
            ),
            on_decided=self._shadow_decided,
        )  # fmt: skip
        await shadow.start()
        if shadow.engine.user is not None and shadow.engine.user.load_error is not None:
            error = shadow.engine.user.load_error
            await shadow.close()
            raise ConfigError(f"{name}: the shadow scheduler does not load: {error}")
        async with self._shadow_lock:
            old, self.shadow = self.shadow, shadow
        if old is not None:
            await old.close()
        log.info("shadow.started", name=name, sha256=shadow.sha256[:12])
        return shadow

    def _shadow_decided(self, kind: str | None) -> None:
        self.service_metrics.shadow_cycles.inc()
        if kind is not None:
            self.service_metrics.shadow_differing.labels(kind).inc()

    async def stop_shadow(self) -> dict[str, object]:
        """Stop the shadow; returns its final status."""
        async with self._shadow_lock:
            shadow, self.shadow = self.shadow, None
        if shadow is None:
            return {"active": False}
        await shadow.close()
        final = {**shadow.status(), "active": False}
        log.info("shadow.stopped", name=shadow.name, cycles=shadow.cycles,
                 diff_rate=final["diff_rate"])  # fmt: skip
        return final

    async def simulate(
        self, source: str, language: str, name: str, settings: SimSettings, *,
        compare_active: bool = False, progress: Progress | None = None,
    ) -> list[SimReport]:  # fmt: skip
        """Simulate a policy (empty source: the platform scheduler) on this service's
        catalog, and optionally the active scheduler on the same arrivals. One at a time."""
        if settings.expected_jobs() > MAX_SIMULATED_JOBS:
            raise ConfigError(
                f"workload: about {settings.expected_jobs()} jobs; the service simulates at "
                f"most {MAX_SIMULATED_JOBS} (use `orchestratord scheduler simulate` for more)"
            )
        policies: list[tuple[str | None, str]] = [(None, "platform")]
        if source.strip():
            name = name or "draft"
            policies = [(to_lua(source, language or detect_language(source, name), name), name)]
        if compare_active:
            a = self.active
            policies.append((None if a.version_id == 0 else to_lua(a.source, a.language, a.name),
                             f"active: {a.name}"))  # fmt: skip
        if self._simulations.locked():
            log.info("simulation.queued", name=name)
        async with self._simulations:
            arrivals = settings.arrivals(self.catalog)
            reports = []
            for i, (policy, label) in enumerate(policies):
                reports.append(await simulate(
                    policy, label, settings, catalog=self.catalog, arrivals=arrivals,
                    language=self.config.scheduler.language, seccomp=self.config.scheduler.seccomp,
                    spawn=self.config.scheduler.spawn,
                    progress=part_progress(progress, i, len(policies), label),
                ))  # fmt: skip
        return reports

    async def rollback(self, version_id: int = 0, *, reason: str = "") -> Version | None:
        """Back to `version_id`, or to the version before the active one; None: the
        platform scheduler. Rolled-back versions were validated when first deployed."""
        if self.config.platform_mode:
            raise PermissionDeniedError("platform mode: there is no user scheduler to roll back")
        async with self._deploy_lock:
            active = self.versions.active()
            if version_id:
                target = self.versions.get(version_id)
                if target is None:
                    raise NotFoundError(f"scheduler version #{version_id} does not exist")
            else:
                target = self.versions.before(active.id) if active else None
                if active is None:
                    raise NotFoundError("no user scheduler is active; nothing to roll back")
            why = reason or (f"rollback to #{target.id}" if target else "rollback to platform")
            if target is None:
                await self.engine.replace_user(None)
                self.versions.deactivate()
                self._activate(None)
                log.info("scheduler.rolled_back", to="platform", reason=why)
                return None
            await self.engine.replace_user(to_lua(target.source, target.language, target.name),
                                           target.name)  # fmt: skip
            version = self.versions.add(dataclasses.replace(
                target, deployer="rollback", reason=why, deployed_at=now_ms(),
            ))  # fmt: skip
            self._activate(version)
            self.metrics.reloads.labels("rollback").inc()
            log.info("scheduler.rolled_back", to=target.id, version_id=version.id, reason=why)
            return version

    async def _watch_scheduler_file(self) -> None:
        """Home/lab hot reload: a changed file is validated, then deployed or refused."""
        path = self.config.path(self.config.scheduler.file or "").resolve()
        async for changes in watchfiles.awatch(path.parent, debounce=200, recursive=False):
            if not any(Path(changed).resolve() == path for _, changed in changes):
                continue
            try:
                source = path.read_text()
            except OSError as exc:
                log.warning("scheduler.reload_rejected", file=str(path), error=exc.strerror)
                continue
            if hashlib.sha256(source.encode()).hexdigest() == self.versions_active_sha():
                continue
            try:
                await self.deploy(source, "", path.name, "file", reason="reload")
            except (ValidationFailedError, OrchestratorError) as exc:
                log.warning("scheduler.reload_rejected", file=str(path), error=str(exc),
                            running=self.active.name)  # fmt: skip

    def versions_active_sha(self) -> str:
        active = self.versions.active()
        return active.sha256 if active else ""

    def _check_auto_rollback(self) -> None:
        """DESIGN.md: a version that trips the breaker soon after deploy goes back to
        the one before it, if there is one (home/lab only)."""
        window = self.config.scheduler.auto_rollback_window_s
        if self.config.platform_mode or window <= 0 or self.active.version_id == 0:
            return
        if self.engine.breaker.trips <= self._trips_at_activation:
            return
        if now_ms() - self.active.since_ms > window * 1000:
            return
        if self._rollback_task is not None and not self._rollback_task.done():
            return
        previous = self.versions.before(self.active.version_id)
        if previous is None:
            return
        self._trips_at_activation = self.engine.breaker.trips
        reason = (f"auto-rollback: circuit breaker tripped for #{self.active.version_id} "
                  f"within {window:.0f}s of its deployment")  # fmt: skip
        log.warning("scheduler.auto_rollback", from_version=self.active.version_id,
                    to_version=previous.id)  # fmt: skip
        self.metrics.reloads.labels("auto_rollback").inc()
        self._rollback_task = asyncio.get_running_loop().create_task(
            self._auto_rollback(previous.id, reason)
        )

    async def _auto_rollback(self, version_id: int, reason: str) -> None:
        try:
            await self.rollback(version_id, reason=reason)
        except OrchestratorError as exc:
            log.error("scheduler.auto_rollback_failed", error=str(exc))

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        tick = self.config.scheduler.tick_ms / 1000
        seen_version = -1
        last_cycle = 0.0
        next_in = tick
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for may swallow the
            # cancellation that stops this loop when the event fires at the same moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_in):
                    await self._wake.wait()
            self._wake.clear()
            changed = self.cluster.version != seen_version
            due = time.monotonic() - last_cycle >= tick
            if not (changed or due):
                next_in = max(0.0, tick - (time.monotonic() - last_cycle))
                continue
            seen_version = self.cluster.version
            last_cycle = time.monotonic()
            try:
                result = await self._guarded_cycle()
            except Exception:
                log.exception("scheduler.cycle_failed")
                next_in = tick
                continue
            self.last_cycle_at = time.monotonic()
            if result is None:
                next_in = 0.0
                continue
            next_in = tick
            if isinstance(result.decision, Wait) and result.decision.retry_after_ms:
                next_in = min(tick, result.decision.retry_after_ms / 1000)
            due_ms = self.cluster.next_due_ms()
            if due_ms is not None:
                next_in = max(0.0, min(next_in, (due_ms - now_ms()) / 1000))

    async def _guarded_cycle(self) -> CycleResult | None:
        """A cycle that cannot wedge the loop: one still running after CYCLE_STALL_S is
        logged with where it waits, counted, and cancelled; the next one starts afresh."""
        task = asyncio.get_running_loop().create_task(self._cycle())
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
                return None
            return task.result()
        log.error("scheduler.cycle_stalled", after_s=CYCLE_STALL_S, stack=where_it_waits(task))
        self.service_metrics.cycle_stalls.inc()
        await cancel_and_wait(task)
        return None

    async def _cycle(self) -> CycleResult:
        ctx = self.cluster.context()
        if self.tenant_engines:
            result = await self._tenant_cycle(ctx)
        else:
            result = await self.engine.schedule(ctx, self._refresh)
        self.cycles += 1
        self.last_result = result
        if not isinstance(result.decision, Wait) or result.error is not None:
            self.recent.append({
                "seq": result.seq, "at_ms": now_ms(), "source": result.source,
                "decision": decisions.describe(result.decision),
                "latency_ms": round(result.latency_ms, 3),
                "error": result.error.kind if result.error else None,
                "scheduler": self.active.name,
            })  # fmt: skip
        self.service_metrics.cycles.inc()
        self._check_auto_rollback()
        await self._apply(result.decision)
        self._update_gauges(result.context)
        if self.shadow is not None:
            self.shadow.offer(result)
        return result

    async def _tenant_cycle(self, ctx: Context) -> CycleResult:
        """Platform mode with tenant schedulers: each decides on its own view, the
        platform scheduler on the whole cluster, and the platform arbitrates."""
        owners = {job_id: r.tenant_id for job_id, r in self.cluster.in_flight.items()}
        results = await asyncio.gather(
            self.engine.schedule(ctx),
            *(engine.schedule(tenant_view(ctx, tenant_id, owners))
              for tenant_id, engine in self.tenant_engines.items()),
        )  # fmt: skip
        proposals = {PLATFORM: results[0].decision}
        proposals |= {t: r.decision for t, r in zip(self.tenant_engines, results[1:], strict=True)}
        decision, dropped = arbitrate(ctx, proposals, cycle=self.cycles)
        for d in dropped:
            proposer = d.proposer or "platform"
            self.service_metrics.arbitration_dropped.labels(proposer, d.reason).inc()
            log.info(
                "scheduler.arbitration_dropped",
                proposer=proposer,
                action=decisions.describe(d.action),
                reason=d.reason,
                detail=d.detail,
            )
        return dataclasses.replace(results[0], decision=decision, context=ctx)

    async def _refresh(self) -> Context:
        """ctx.refresh_pool_state(): read the local pool now instead of from cache."""
        return self.cluster.context(fresh=True)

    def _update_gauges(self, ctx: Context) -> None:
        m = self.service_metrics
        m.queue_depth.set(self.cluster.queue_depth)
        m.running.set(len(self.cluster.in_flight))
        for status in ("ready", "busy", "starting", "failed"):
            m.workers.labels(status).set(
                sum(1 for p in ctx.pools for w in p.workers if w.status == status)
            )
        for status in ("healthy", "degraded", "offline"):
            m.pools.labels(status).set(sum(1 for p in ctx.pools if p.status == status))

    # ------------------------------------------------------------------ applying
    async def _apply(self, decision: Decision) -> None:
        """Apply in order; an action the world has moved past since the snapshot is skipped."""
        at = now_ms()
        dispatches: list[tuple[Dispatch, JobRecord, str]] = []
        claimed: set[str] = set()
        ready = {p.id: (pool_id, p) for pool_id, p in self.cluster.processes()}
        for action in decisions.flatten(decision):
            if isinstance(action, Dispatch):
                record = self.cluster.records.get(action.job_id)
                found = ready.get(action.worker_id)
                stats = self.cluster.stats.get(action.worker_id)
                fresh = (
                    record is not None
                    and record.state == QUEUED
                    and action.job_id not in self.cluster.in_flight
                    and found is not None
                    and found[1].status == "ready"
                    and (stats is None or stats.current_job_id is None)
                    and action.worker_id not in claimed
                )
                if not fresh or record is None or found is None:
                    self.service_metrics.applied.labels("dispatch", "stale").inc()
                    continue
                claimed.add(action.worker_id)
                dispatches.append((action, record, found[1].uri))
            elif isinstance(action, StartWorker):
                await self._start_worker(action)
            elif isinstance(action, EvictWorker):
                self._evict_worker(action)
        if dispatches:
            await self._dispatch(dispatches, at)

    async def _dispatch(self, dispatches: list[tuple[Dispatch, JobRecord, str]], at: int) -> None:
        transitions = [
            Transition(
                record.id,
                (QUEUED,),
                DISPATCHED,
                at,
                f"to {action.worker_id}",
                (
                    ("attempts", record.attempts + 1),
                    ("dispatched_at", at),
                    ("worker_id", action.worker_id),
                ),
            )
            for action, record, _ in dispatches
        ]
        results = await self.store.apply(transitions)
        for (action, _, uri), updated in zip(dispatches, results, strict=True):
            if updated is None:  # cancelled while we were writing
                self.service_metrics.applied.labels("dispatch", "stale").inc()
                continue
            self.cluster.start(updated)
            self.cluster.assign(action.worker_id, updated.id, at)
            self.service_metrics.applied.labels("dispatch", "applied").inc()
            self.service_metrics.dispatch_wait.observe(max(0, at - updated.queued_at) / 1000)
            self._publish(updated, at, f"dispatched to {action.worker_id}")
            self._running[updated.id] = asyncio.get_running_loop().create_task(
                self._run_job(updated, action.worker_id, uri)
            )

    async def _start_worker(self, action: StartWorker) -> None:
        model = self.catalog.get(action.model_ref)
        if model is None:
            self.service_metrics.applied.labels("start_worker", "stale").inc()
            return
        worker_id = f"{action.pool_id}-w{next(self._worker_ids)}-{secrets.token_hex(2)}"
        if self.local_pool is not None and action.pool_id == self.local_pool.id:
            key = (action.pool_id, model.model_ref)
            until, delay = self._start_backoff.get(key, (0.0, 0.0))
            if time.monotonic() < until:
                self.service_metrics.applied.labels("start_worker", "backoff").inc()
                return
            try:
                await self.local_pool.start_worker(
                    worker_id, model.model_ref, action.gpu_id, model.vram_required_bytes
                )
            except PoolError as exc:
                # The scheduler will ask again; do not try more than once per backoff.
                delay = min(max(1.0, delay * 2), 60.0)
                self._start_backoff[key] = (time.monotonic() + delay, delay)
                log.error(
                    "pool.start_failed", pool=action.pool_id, error=str(exc), retry_in_s=delay
                )
                self.service_metrics.applied.labels("start_worker", "failed").inc()
                return
            self._start_backoff.pop(key, None)
        elif action.pool_id in self.cluster.remote:
            command = RemoteCommand(
                f"c{next(self._command_ids)}",
                replace(action, model_ref=model.model_ref),
                worker_id,
                model.vram_required_bytes,
            )
            self.cluster.remote_start(action.pool_id, command, now_ms())
        else:
            self.service_metrics.applied.labels("start_worker", "stale").inc()
            return
        self.service_metrics.applied.labels("start_worker", "applied").inc()
        self.cluster.version += 1

    def _evict_worker(self, action: EvictWorker) -> None:
        stats = self.cluster.stats.get(action.worker_id)
        if stats is not None and stats.current_job_id is not None:
            self.service_metrics.applied.labels("evict_worker", "stale").inc()
            return
        if self.local_pool is not None and action.worker_id in self.local_pool.workers:
            asyncio.get_running_loop().create_task(self.local_pool.evict_worker(action.worker_id))
        else:
            command = RemoteCommand(f"c{next(self._command_ids)}", action)
            if not self.cluster.remote_evict(action.worker_id, command):
                self.service_metrics.applied.labels("evict_worker", "stale").inc()
                return
        self.cluster.stats.pop(action.worker_id, None)
        self.service_metrics.applied.labels("evict_worker", "applied").inc()

    # ------------------------------------------------------------------ running a job
    async def _run_job(self, record: JobRecord, worker_id: str, uri: str) -> None:
        job_id = record.id

        async def first_token() -> None:
            at = now_ms()
            (updated,) = await self.store.apply([Transition(job_id, (DISPATCHED,), RUNNING, at)])
            if updated is not None:
                self.cluster.update(updated)
                self._publish(updated, at, "running")

        try:
            timeout_s = self.config.timeout.default_ms / 1000
            outcome = await self.runner.run(record, uri, timeout_s, first_token)
        except asyncio.CancelledError:
            await self._job_cancelled(job_id, worker_id)
            raise
        finally:
            self._running.pop(job_id, None)
        at = now_ms()
        self.cluster.assign(worker_id, None, at)
        if outcome.ok:
            (done,) = await self.store.apply(
                [
                    Transition(
                        job_id,
                        IN_FLIGHT,
                        COMPLETED,
                        at,
                        f"on {worker_id}",
                        (
                            ("finished_at", at),
                            ("output", outcome.output),
                            ("tokens_generated", outcome.tokens),
                        ),
                    )
                ]
            )
            if done is not None:
                self.cluster.record_completion(done, worker_id, at)
                self._finished(done, at, "completed")
            return
        if outcome.worker_failed and self.local_pool is not None:
            self.local_pool.mark_failed(worker_id, outcome.error)
        await self._retry_or_fail(record, at, outcome.error)

    async def _retry_or_fail(self, record: JobRecord, at: int, error: str) -> None:
        delay = retry_delay_ms(self.config.retry, record.attempts)
        if delay is None:
            (failed,) = await self.store.apply(
                [
                    Transition(
                        record.id,
                        IN_FLIGHT,
                        FAILED,
                        at,
                        error,
                        (("finished_at", at), ("error", error)),
                    )
                ]
            )
            if failed is not None:
                self._finished(failed, at, error)
            return
        (queued,) = await self.store.apply(
            [
                Transition(
                    record.id,
                    IN_FLIGHT,
                    QUEUED,
                    at,
                    f"retry: {error}",
                    (("not_before", at + delay), ("worker_id", None), ("error", error)),
                )
            ]
        )
        if queued is not None:
            self.service_metrics.retried.inc()
            self.cluster.enqueue(queued, at)
            self._publish(queued, at, f"retry in {delay} ms: {error}")
            self._wake.set()

    async def _job_cancelled(self, job_id: str, worker_id: str) -> None:
        at = now_ms()
        self.cluster.assign(worker_id, None, at)
        if job_id not in self._cancel_requested:
            return  # shutting down: the job stays in flight in the store, retried on restart
        self._cancel_requested.discard(job_id)
        (cancelled,) = await self.store.apply(
            [
                Transition(
                    job_id, IN_FLIGHT, CANCELLED, at, "cancelled by client", (("finished_at", at),)
                )
            ]
        )
        if cancelled is not None:
            self._finished(cancelled, at, "cancelled by client")

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, object]:
        breaker = self.engine.breaker
        load_error = self.engine.user.load_error if self.engine.user else None
        pools = self.cluster.pools(now_ms())
        return {
            "version": VERSION,
            "deployment_mode": self.config.deployment_mode,
            "mode": self.config.mode,
            "scheduler": {
                "version_id": self.active.version_id,
                "name": self.active.name,
                "version": policy_version(
                    self.active.source, self.active.language, self.active.name
                ),
                "sha256": hashlib.sha256(self.active.source.encode()).hexdigest(),
                "active_since_ms": self.active.since_ms,
                "language": self.config.scheduler.language,
                "circuit": breaker.state,
                "load_error": str(load_error) if load_error else self.startup_error,
            },
            "queue_depth": self.cluster.queue_depth,
            "running_jobs": len(self.cluster.in_flight),
            "pools": len(pools),
            "workers": sum(len(p.workers) for p in pools),
            "cycles": self.cycles,
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
            "shadow": self.shadow.status() if self.shadow is not None else {"active": False},
            "decision_log": str(self.decision_log.path or "") if self.decision_log else "",
        }
