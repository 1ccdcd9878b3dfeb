"""The scheduling engine: pick a sandbox, call it under a deadline, validate, fall back.

Each cycle:
1. the context is recorded in the snapshot journal (one diff per cycle);
2. the user scheduler's active worker is brought up to date and runs schedule(ctx)
   under a gRPC deadline (50 ms by default); past it, the worker is SIGKILLed
   (`orchestrator/scheduling/attempt.py`);
3. the decision is validated against the context;
4. on any failure (error, timeout, crash, sandbox violation, invalid or rejected
   decision, open circuit) the platform scheduler, in its own sandbox, serves the
   cycle; if even that fails, the cycle answers `wait`, which loses nothing. When the
   user's call runs close to its deadline, the platform scheduler has already started
   on the same context, in parallel (a hedge: `orchestrator/scheduling/hedge.py`).

The engine only decides: it returns a `CycleResult` (`orchestrator/scheduling/cycle.py`).
Applying a decision is the caller's job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from orchestrator.config.settings import SchedulerConfig
from orchestrator.domain.context import Context
from orchestrator.domain.decision import Wait
from orchestrator.domain.errors import SchedulerLoadError
from orchestrator.sandbox.group import WorkerGroup
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.sandbox.process import SchedulerSpec, SystemdLaunch
from orchestrator.scheduling.accounting import ScriptLogRate, ScriptLogRelay, account
from orchestrator.scheduling.attempt import Refresh, SandboxCaller
from orchestrator.scheduling.breaker import CircuitBreaker
from orchestrator.scheduling.cycle import Attempt, CycleResult, Failure, Source
from orchestrator.scheduling.hedge import Hedge, HedgeTiming
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.state.decision_log import DecisionLog
from orchestrator.state.journal import SnapshotJournal
from orchestrator.support.log import get_logger

log = get_logger("engine")

# While hedging, the platform's spares are brought up to date every this many cycles.
PLATFORM_SPARE_LAG = 8


def platform_source() -> str:
    """schedulers/platform.lua, the built-in scheduler (read-only, shipped in the package)."""
    return resources.files("schedulers").joinpath("platform.lua").read_text()


@dataclass(frozen=True)
class EngineOptions:
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    user_spares: int = 1
    platform_spares: int = 1
    breaker_threshold: int = 5
    breaker_base_backoff_s: float = 1.0
    breaker_max_backoff_s: float = 60.0
    expose_platform_source: bool = True
    seccomp: bool = True
    spawn: str = "fork-server"  # or "exec" (config/settings.py, SPAWN_METHODS)
    runtime_dir: Path | None = None
    clock: Callable[[], float] = time.monotonic  # the breaker's; the simulator's is simulated
    systemd: SystemdLaunch | None = None  # user-scheduler workers as systemd units (tenants)
    script_logs: ScriptLogRate = field(default_factory=ScriptLogRate)  # into the service log
    # The hedge's margin (hedge.py); None: no hedge, and the platform's active worker
    # is brought up to date only when it serves.
    hedge_margin_ms: float | None = 10.0

    @classmethod
    def from_config(
        cls,
        scheduler: SchedulerConfig,
        *,
        deadline_ms: int | None = None,
        spares: int | None = None,
        platform_spares: int | None = None,
        breaker_threshold: int | None = None,
        expose_platform_source: bool = True,
        runtime_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        systemd: SystemdLaunch | None = None,
    ) -> EngineOptions:
        """The options of `scheduler` (the config's `scheduler` section), with overrides:
        `deadline_ms`, `spares` (both groups; `platform_spares` for the platform's
        alone) and `breaker_threshold` replace the configured values.

        A hedge keeps the platform's active worker in sync every cycle, as its spares
        are: an engine whose platform scheduler keeps no spare (the simulator, replays,
        shadows, dry runs: latency after a failure is not what they measure) does not
        hedge either."""
        breaker = scheduler.breaker
        spares = scheduler.spares if spares is None else spares
        platform_spares = spares if platform_spares is None else platform_spares
        return cls(
            limits=SandboxLimits(
                deadline_ms=scheduler.deadline_ms if deadline_ms is None else deadline_ms
            ),
            user_spares=spares,
            platform_spares=platform_spares,
            breaker_threshold=breaker.threshold if breaker_threshold is None else breaker_threshold,
            breaker_base_backoff_s=breaker.base_backoff_s,
            breaker_max_backoff_s=breaker.max_backoff_s,
            expose_platform_source=expose_platform_source,
            seccomp=scheduler.seccomp,
            spawn=scheduler.spawn,
            runtime_dir=runtime_dir,
            clock=clock,
            systemd=systemd,
            hedge_margin_ms=scheduler.hedge_margin_ms if platform_spares > 0 else None,
        )


class SchedulingEngine:
    def __init__(
        self,
        *,
        user_source: str | None = None,
        user_name: str = "scheduler.lua",
        language: str = "luajit",
        platform: str | None = None,
        options: EngineOptions = EngineOptions(),
        metrics: EngineMetrics | None = None,
        tenant: str = "",
    ) -> None:
        self.options = options
        self.metrics = metrics or EngineMetrics()
        # Whose scheduler this is: a tenant's in platform mode (D15), "" for the main
        # one. Its custom metrics and script logs are that tenant's, with a share of
        # their own (engines of one service share one registry and one log).
        self.tenant = tenant
        self.script_logs = ScriptLogRelay(options.script_logs, self.metrics, tenant)
        self.platform_source = platform if platform is not None else platform_source()
        self._own_dir = options.runtime_dir is None
        self.runtime_dir = options.runtime_dir or Path(tempfile.mkdtemp(prefix="orch-"))
        self.journal = SnapshotJournal()
        self.caller = SandboxCaller(self.journal, options.limits, self.metrics, tenant)
        self.breaker = self._new_breaker()
        self.hedge_timing: HedgeTiming | None = None
        if options.hedge_margin_ms is not None:
            self.hedge_timing = HedgeTiming(
                options.limits.deadline_ms / 1000, options.hedge_margin_ms / 1000
            )
        # Platform attempts begun as hedges, kept until they end (discarded ones too).
        self._hedges: set[asyncio.Task[Attempt]] = set()
        spec = SchedulerSpec(
            name="platform.lua",
            source=self.platform_source,
            platform_source=self.platform_source,
            language=language,
            limits=options.limits,
            expose_platform_source=options.expose_platform_source,
            seccomp=options.seccomp,
            spawn=options.spawn,
        )
        self.language = language
        # While hedging, the platform's active worker takes every cycle's delta, so
        # that a hedge sends it one. Its spares serve only once the platform scheduler
        # itself has crashed (a bug, not a script's doing): a few deltas more then are
        # a fair price for not paying a second background call every cycle.
        self.platform = WorkerGroup(
            "platform", spec, self.runtime_dir, spares=options.platform_spares,
            metrics=self.metrics, journal=self.journal,
            spare_lag=1 if self.hedge_timing is None else PLATFORM_SPARE_LAG,
        )  # fmt: skip
        self.user: WorkerGroup | None = None
        # The sha256 of the Lua the user scheduler runs, recorded with each logged
        # cycle (`scheduler replay --seq` tells a changed script by it); "" without one.
        self.user_sha256 = ""
        if user_source is not None:
            self.user = self._user_group(user_source, user_name)
            self.user_sha256 = _sha256(user_source)
        self._lock = asyncio.Lock()
        self.decision_log: DecisionLog | None = None  # set by the service to record cycles

    @property
    def user_load_error(self) -> SchedulerLoadError | None:
        """Why the user scheduler does not load, if it does not (its cycles fall back)."""
        return self.user.load_error if self.user is not None else None

    def _new_breaker(self) -> CircuitBreaker:
        o = self.options
        return CircuitBreaker(
            o.breaker_threshold, o.breaker_base_backoff_s, o.breaker_max_backoff_s, o.clock
        )

    def _user_group(self, source: str, name: str) -> WorkerGroup:
        spec = SchedulerSpec(
            name=name,
            source=source,
            platform_source=self.platform_source,
            language=self.language,
            limits=self.options.limits,
            expose_platform_source=self.options.expose_platform_source,
            seccomp=self.options.seccomp,
            spawn=self.options.spawn,
            systemd=self.options.systemd,
        )
        return WorkerGroup(
            "user", spec, self.runtime_dir, spares=self.options.user_spares,
            metrics=self.metrics, journal=self.journal,
        )  # fmt: skip

    async def replace_user(self, source: str | None, name: str = "scheduler.lua") -> None:
        """Put another user scheduler in charge (None: the platform scheduler alone).

        The new one's workers are started and loaded first; if it does not load,
        SchedulerLoadError is raised and the running one stays. The switch happens
        between cycles, and the circuit breaker starts afresh.
        """
        group = None
        if source is not None:
            group = self._user_group(source, name)
            try:
                await group.start()
            except BaseException:
                await group.close()
                raise
        async with self._lock:
            old, self.user = self.user, group
            self.user_sha256 = _sha256(source) if source is not None else ""
            self.breaker = self._new_breaker()
        if old is not None:
            await old.close()

    async def start(self) -> None:
        """Spawn the sandboxes. A user script that fails to load is not fatal: its
        cycles fall back, with the load error as the reason."""
        groups = [self.platform.start()]
        if self.user is not None:
            groups.append(self.user.start())
        results = await asyncio.gather(*groups, return_exceptions=True)
        if isinstance(results[0], BaseException):
            raise results[0]
        if len(results) > 1 and isinstance(results[1], SchedulerLoadError):
            log.error(
                "scheduler.load_failed",
                error=str(results[1]),
                traceback=results[1].traceback,
            )
        elif len(results) > 1 and isinstance(results[1], BaseException):
            raise results[1]

    async def close(self) -> None:
        for task in self._hedges:
            task.cancel()
        for group in (self.user, self.platform):
            if group is not None:
                await group.close()
        await asyncio.sleep(0.05)  # let the kills be reaped
        if self._own_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def __aenter__(self) -> SchedulingEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ a cycle
    async def schedule(self, ctx: Context, refresh: Refresh | None = None) -> CycleResult:
        async with self._lock:
            started = time.perf_counter()
            self.journal.advance(ctx)
            result = await self._cycle(ctx, refresh, started)
            account(
                self.metrics, result, tenant=self.tenant, script_logs=self.script_logs,
                has_user=self.user is not None, circuit_open=self.breaker.state == "open",
            )  # fmt: skip
            if self.decision_log is not None:
                name = self.user.spec.name if self.user is not None else "platform"
                self.decision_log.record(result, self.journal, name, self.user_sha256)
            # While the circuit is open the user's spares would be synced for nothing;
            # when it half-opens, the journal's deltas (or a full snapshot) catch them up.
            if self.user is not None and self.breaker.state != "open":
                self.user.sync()
            # A hedge then sends the platform's active worker the next cycle's delta alone.
            self.platform.sync(active=self.hedge_timing is not None and self.user is not None)
            return result

    async def _cycle(self, ctx: Context, refresh: Refresh | None, started: float) -> CycleResult:
        if self.user is None:
            attempt = await self._platform_attempt(ctx, refresh)
            if attempt.failure is None:
                return self._result(attempt, "platform", started)
            return self._wait_result(attempt, ctx, started)

        hedge = None
        if self.breaker.allow():
            if self.hedge_timing is not None:
                hedge = Hedge(
                    lambda: self._start_hedge(ctx), self.hedge_timing.delay_s, self.metrics.hedges
                )
            attempt = await self.caller.attempt(self.user, ctx, refresh, hedge)
        else:
            attempt = Attempt(
                failure=Failure(
                    "circuit_open",
                    f"circuit breaker open after {self.breaker.consecutive_failures} consecutive "
                    f"failures; retrying in {self.breaker.retry_in_s():.1f}s",
                ),
                context=ctx,
            )
        if attempt.failure is None:
            if hedge is not None:
                hedge.discard()
            self.breaker.record_success()
            return self._result(attempt, "user", started)
        if attempt.failure.kind != "circuit_open":
            self.breaker.record_failure()
        fallback = await self._fallback(ctx, attempt.context or ctx, hedge)
        if fallback.failure is None:
            result = self._result(fallback, "platform-fallback", started, attempt.failure)
            # The user script's own logs explain its failure; keep them.
            return _with_logs(result, attempt)
        return self._wait_result(fallback, attempt.context or ctx, started, attempt.failure)

    async def _fallback(self, ctx: Context, context: Context, hedge: Hedge | None) -> Attempt:
        """The platform's attempt on `context` (the cycle's `ctx`, or a refreshed one)."""
        # A hedge decided on the cycle's context: after a refresh it is stale.
        if hedge is None or not hedge.started or context is not ctx:
            if hedge is not None:
                hedge.discard()
            return await self._platform_attempt(context, None)
        fallback = await hedge.use()
        failure = fallback.failure
        if failure is not None and failure.kind in ("timeout", "worker_crash"):
            # Started beside a script that may have been burning a CPU, the hedge may
            # have starved: a hedge must not leave the cycle worse off than none would.
            return await self._platform_attempt(context, None)
        return fallback

    async def _platform_attempt(self, ctx: Context, refresh: Refresh | None) -> Attempt:
        attempt = await self.caller.attempt(self.platform, ctx, refresh)
        if attempt.failure is None and self.hedge_timing is not None:
            self.hedge_timing.record(attempt.call_s)
        return attempt

    def _start_hedge(self, ctx: Context) -> asyncio.Task[Attempt]:
        task = asyncio.get_running_loop().create_task(self._platform_attempt(ctx, None))
        self._hedges.add(task)
        task.add_done_callback(self._hedges.discard)
        return task

    def _result(
        self, attempt: Attempt, source: Source, started: float, error: Failure | None = None
    ) -> CycleResult:
        assert attempt.decision is not None and attempt.context is not None
        return CycleResult(
            decision=attempt.decision,
            source=source,
            context=attempt.context,
            error=error,
            logs=tuple(attempt.logs),
            metrics=tuple(attempt.metrics),
            latency_ms=(time.perf_counter() - started) * 1000,
            snapshot_hash=self.journal.snapshot_hash,
            seq=self.journal.seq,
            worker_pid=attempt.worker_pid,
        )

    def _wait_result(
        self, attempt: Attempt, ctx: Context, started: float, first: Failure | None = None
    ) -> CycleResult:
        assert attempt.failure is not None
        log.error(
            "scheduler.platform_failed",
            kind=attempt.failure.kind,
            error=attempt.failure.message,
            traceback=attempt.failure.traceback,
        )
        return CycleResult(
            decision=Wait(reason="scheduler_unavailable"),
            source="wait-fallback",
            context=attempt.context or ctx,
            error=first or attempt.failure,
            latency_ms=(time.perf_counter() - started) * 1000,
            snapshot_hash=self.journal.snapshot_hash,
            seq=self.journal.seq,
        )


def _sha256(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _with_logs(result: CycleResult, attempt: Attempt) -> CycleResult:
    return dataclasses.replace(
        result,
        logs=tuple(attempt.logs) + result.logs,
        metrics=tuple(attempt.metrics) + result.metrics,
    )
