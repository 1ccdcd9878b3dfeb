"""Building the service from its config: every part, each given what it needs.

This is the one place that knows every concrete class; the parts themselves declare
the narrow interfaces they use (typing.Protocol) and receive them here, in their
constructors. `assemble` returns the `Orchestrator` front over them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from orchestrator.config.settings import ServiceConfig, load_catalog, load_tenants, split_tenants
from orchestrator.domain.context import Context
from orchestrator.domain.errors import ConfigError
from orchestrator.policy.validate import detect_language, to_lua
from orchestrator.pools.completion import CompletionClient
from orchestrator.pools.hardware import GpuProbe, HostProbe, NvmlProbe, PsutilProbe
from orchestrator.pools.local_pool import LocalPool
from orchestrator.sandbox.process import SystemdLaunch
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.service.apply import DecisionApplier
from orchestrator.service.deciding import Decider
from orchestrator.service.events import JobEvents
from orchestrator.service.history import CycleHistory
from orchestrator.service.jobs import Jobs
from orchestrator.service.loop import CYCLE_STALL_S, SchedulingLoop
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.service.orchestrator import Orchestrator
from orchestrator.service.outputs import JobOutputs
from orchestrator.service.pools import PoolRegistry
from orchestrator.service.running import JobRunner
from orchestrator.service.schedulers import SchedulerVersions, read_scheduler_file
from orchestrator.service.trials import ShadowTrial, Simulations
from orchestrator.state.cluster import ClusterState
from orchestrator.state.decision_log import DecisionLog
from orchestrator.state.store import AsyncJobStore, JobStore
from orchestrator.state.versions import VersionStore
from orchestrator.support.files import UnsafePathError, private_dir
from orchestrator.support.log import get_logger

log = get_logger("service")


def assemble(
    config: ServiceConfig,
    *,
    gpu_probe: GpuProbe | None = None,
    host_probe: HostProbe | None = None,
) -> Orchestrator:
    state_dir = config.path(config.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    engine_metrics = EngineMetrics()
    metrics = ServiceMetrics(engine_metrics.registry, cycle_stall_s=CYCLE_STALL_S)
    wake = asyncio.Event()  # the scheduling loop's: set on any change worth a cycle

    catalog = load_catalog(config)
    tenants, tenant_limits = split_tenants(load_tenants(config))
    local_pool = _local_pool(config, state_dir, gpu_probe, host_probe)
    cluster = ClusterState(config, catalog, tenants, local_pool)
    if local_pool is not None:
        local_pool.on_change.append(wake)
    store = AsyncJobStore(JobStore(state_dir / "jobs.sqlite3", durability=config.durability))
    versions = VersionStore(state_dir / "schedulers.sqlite3")

    initial, startup_error = read_scheduler_file(config)
    sandbox_dir = _sandbox_dir(state_dir)
    engine = SchedulingEngine(
        user_source=initial.lua if initial else None,
        user_name=initial.name if initial else "scheduler.lua",
        language=config.scheduler.language,
        options=EngineOptions.from_config(
            config.scheduler,
            expose_platform_source=not config.platform_mode,
            runtime_dir=sandbox_dir,
        ),
        metrics=engine_metrics,
    )
    tenant_engines = {
        tenant_id: _tenant_engine(
            config, cluster, sandbox_dir, index, tenant_id, file, engine_metrics
        )
        for index, (tenant_id, file) in enumerate(sorted(config.tenant_schedulers.items()))
    }
    decision_log = None
    if config.decision_log.enabled:
        decision_log = DecisionLog(
            state_dir / "decisions",
            max_file_bytes=int(config.decision_log.max_file_mb * 2**20),
            keep_files=config.decision_log.keep_files,
        )
        engine.decision_log = decision_log

    async def refresh() -> Context:
        """ctx.refresh_pool_state(): read the local pool now instead of from cache."""
        return cluster.context(fresh=True)

    events = JobEvents()
    outputs = JobOutputs()
    jobs = Jobs(
        store, cluster, events, outputs, metrics, limits=config.limits, queue=config.queue,
        retry=config.retry, platform_mode=config.platform_mode, wake=wake,
        tenant_limits=tenant_limits,
    )  # fmt: skip
    runner = JobRunner(
        jobs, cluster, CompletionClient(), local_pool, outputs,
        timeout_s=config.timeout.default_ms / 1000,
    )  # fmt: skip
    schedulers = SchedulerVersions(
        config, engine, versions, engine_metrics, initial=initial, startup_error=startup_error
    )
    shadow = ShadowTrial(config, metrics)
    history = CycleHistory(lambda: schedulers.active.name)
    decider = Decider(engine, tenant_engines, cluster.in_flight, metrics, refresh=refresh)
    loop = SchedulingLoop(
        cluster,
        decider,
        DecisionApplier(cluster, jobs, runner, local_pool, metrics),
        metrics,
        on_decided=(history.record, schedulers.check_auto_rollback),
        on_applied=(shadow.offer,),
        tick_ms=config.scheduler.tick_ms,
        wake=wake,
    )
    return Orchestrator(
        config=config,
        state_dir=state_dir,
        metrics=engine_metrics,
        local_pool=local_pool,
        cluster=cluster,
        store=store,
        versions=versions,
        decision_log=decision_log,
        engine=engine,
        tenant_engines=tenant_engines,
        events=events,
        outputs=outputs,
        jobs=jobs,
        runner=runner,
        decider=decider,
        loop=loop,
        history=history,
        schedulers=schedulers,
        shadow=shadow,
        simulations=Simulations(config, lambda: cluster.catalog, lambda: schedulers.active),
        pools=PoolRegistry(cluster, runner, local_pool, config.pools, metrics, wake=wake),
    )


def _local_pool(
    config: ServiceConfig, state_dir: Path, gpu_probe: GpuProbe | None, host_probe: HostProbe | None
) -> LocalPool | None:
    if not config.local_pool.enabled:
        return None
    probe = gpu_probe if gpu_probe is not None else NvmlProbe()
    if not probe.available() and config.local_pool.use_nvml:
        reason = getattr(probe, "reason", "no GPU")
        log.warning(
            "pool.no_nvml",
            message=f"no NVIDIA GPU or driver found ({reason}); using the "
            f"{len(config.local_pool.gpus)} GPUs declared in the config, "
            "marked as declared (measured=false)",
        )
    return LocalPool(
        config.local_pool,
        probe,
        host_probe or PsutilProbe(),
        state_dir,
        cache_ms=config.pools.heartbeat_ms,
    )


def _tenant_engine(
    config: ServiceConfig,
    cluster: ClusterState,
    sandbox_dir: Path | None,
    index: int,
    tenant_id: str,
    file: str,
    metrics: EngineMetrics,
) -> SchedulingEngine:
    """A tenant's own scheduler (platform mode), in sandboxes of its own
    (docs/ARCHITECTURE.md, D15)."""
    if tenant_id not in cluster.tenant_quotas:
        raise ConfigError(f"tenant_schedulers[{tenant_id!r}]: no such tenant in `tenants`")
    path = config.path(file)
    try:
        source = path.read_text()
    except OSError as exc:
        raise ConfigError(f"tenant_schedulers[{tenant_id!r}]: {path}: {exc.strerror}") from None
    lua = to_lua(source, detect_language(source, path.name), path.name)
    runtime_dir = None  # the engine's own, from mkdtemp
    if sandbox_dir is not None:
        # The index keeps two tenants apart whose ids share their first 16 characters.
        runtime_dir = _private(sandbox_dir / f"t{index}-{tenant_id[:16]}")
    return SchedulingEngine(
        user_source=lua,
        user_name=f"{tenant_id}:{path.name}",
        language=config.scheduler.language,
        options=EngineOptions.from_config(
            config.scheduler,
            expose_platform_source=False,
            runtime_dir=runtime_dir,
            systemd=_tenant_launch(config, tenant_id),
        ),
        metrics=metrics,
        tenant=tenant_id,
    )


def _tenant_launch(config: ServiceConfig, tenant_id: str) -> SystemdLaunch | None:
    t = config.scheduler.tenant_sandbox
    if t.launcher != "systemd":
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", tenant_id):
        raise ConfigError(
            f"tenant_schedulers[{tenant_id!r}]: a systemd unit instance needs a tenant id "
            "of letters, digits, '_', '.' and '-'"
        )
    return SystemdLaunch(prefix=tenant_id, unit=t.unit, socket_dir=Path(t.socket_dir),
                         systemctl=tuple(t.systemctl))  # fmt: skip


def _sandbox_dir(state_dir: Path) -> Path | None:
    """Where the sandbox workers' sockets and logs go: state_dir/sandbox, private to
    this user (created 0700; reused only if it is ours and writable by no one else).
    Unix socket paths are limited to 108 bytes: when that path is too long, None, and
    each engine makes its own directory with mkdtemp (unpredictable, 0700, removed when
    it closes). A predictable name in the shared /tmp could be created first by anyone,
    who would then own the directory of our sockets."""
    path = state_dir / "sandbox"
    if len(str(path)) > 60:
        return None
    return _private(path)


def _private(path: Path) -> Path:
    try:
        return private_dir(path)
    except UnsafePathError as exc:
        raise ConfigError(f"sandbox directory {exc}") from None
