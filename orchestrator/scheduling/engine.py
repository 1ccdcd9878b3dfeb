"""The scheduling engine: pick a sandbox, call it under a deadline, validate, fall back.

Each cycle:
1. the context is recorded in the snapshot journal (one diff per cycle);
2. the user scheduler's active worker is brought up to date and runs schedule(ctx)
   under a gRPC deadline (50 ms by default); past it, the worker is SIGKILLed;
3. the decision is validated against the context;
4. on any failure (error, timeout, crash, sandbox violation, invalid or rejected
   decision, open circuit) the platform scheduler, in its own sandbox, serves the
   cycle; if even that fails, the cycle answers `wait`, which loses nothing.

The engine only decides. Applying a decision is the caller's job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from orchestrator.domain import decision as decisions
from orchestrator._proto import sandbox_pb2
from orchestrator.scheduling.breaker import CircuitBreaker
from orchestrator.domain.decision import Decision, Wait
from orchestrator.state.decision_log import DecisionLog
from orchestrator.domain.errors import SandboxUnavailableError, SchedulerLoadError
from orchestrator.state.journal import SnapshotJournal
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.support.log import get_logger
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.domain.context import Context
from orchestrator.sandbox.group import WorkerGroup
from orchestrator.sandbox.process import SchedulerSpec, SystemdLaunch, WorkerProcess
from orchestrator.scheduling.validation import Rejection, validate

log = get_logger("engine")

ErrorKind = sandbox_pb2.ErrorKind
ERROR_KINDS = {
    ErrorKind.ERROR_KIND_LUA_ERROR: "lua_error",
    ErrorKind.ERROR_KIND_SANDBOX_VIOLATION: "sandbox_violation",
    ErrorKind.ERROR_KIND_MEMORY_LIMIT: "memory_limit",
    ErrorKind.ERROR_KIND_INVALID_DECISION: "invalid_decision",
    ErrorKind.ERROR_KIND_NOT_LOADED: "not_loaded",
    ErrorKind.ERROR_KIND_INTERNAL: "internal",
}

DEADLINE_SLACK_S = 0.02
# A full snapshot sent before the timed call: ~60 ms at 10,000 jobs, ~0.6 s at 100,000.
RESYNC_TIMEOUT_S = 2.0
Source = str  # "user", "platform", "platform-fallback" or "wait-fallback"
Refresh = Callable[[], Awaitable[Context]]


def platform_source() -> str:
    """schedulers/platform.lua, the built-in scheduler (read-only, shipped in the package)."""
    return resources.files("schedulers").joinpath("platform.lua").read_text()


@dataclass(frozen=True)
class Failure:
    """Why a scheduler did not produce a usable decision."""

    kind: str  # timeout, worker_crash, lua_error, sandbox_violation, memory_limit,
    # invalid_decision, rejected, load_error, circuit_open, unavailable, internal
    message: str
    traceback: str = ""
    rejections: tuple[Rejection, ...] = ()


@dataclass(frozen=True)
class ScriptLog:
    level: str
    message: str


@dataclass
class Attempt:
    """One scheduler's try at a cycle."""

    decision: Decision | None = None
    failure: Failure | None = None
    logs: list[ScriptLog] = field(default_factory=list)
    metrics: list[tuple[str, float]] = field(default_factory=list)
    worker_pid: int = 0
    context: Context | None = None


@dataclass(frozen=True)
class CycleResult:
    decision: Decision
    source: Source
    context: Context  # the context the decision was made and validated on
    error: Failure | None = None  # why the user scheduler (or the platform) failed
    logs: tuple[ScriptLog, ...] = ()
    metrics: tuple[tuple[str, float], ...] = ()
    latency_ms: float = 0.0
    snapshot_hash: str = ""
    seq: int = 0
    worker_pid: int = 0

    def to_json(self) -> dict[str, Any]:
        """The dry-run's JSON: decision, source, error, logs, metrics, latency_ms."""
        error = self.error
        return {
            "decision": decisions.to_dict(self.decision),
            "source": self.source,
            "error": None
            if error is None
            else {
                "kind": error.kind,
                "message": error.message,
                "traceback": error.traceback,
                "rejections": [
                    {"index": r.index, "action": r.action, "reason": r.reason, "detail": r.detail}
                    for r in error.rejections
                ],
            },
            "logs": [{"level": line.level, "message": line.message} for line in self.logs],
            "metrics": [{"name": name, "value": value} for name, value in self.metrics],
            "latency_ms": round(self.latency_ms, 3),
        }


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
    spawn: str = "fork-server"  # or "exec" (sandbox/process.py, SPAWN_METHODS)
    runtime_dir: Path | None = None
    clock: Callable[[], float] = time.monotonic  # the breaker's; the simulator's is simulated
    systemd: SystemdLaunch | None = None  # user-scheduler workers as systemd units (tenants)


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
    ) -> None:
        self.options = options
        self.metrics = metrics or EngineMetrics()
        self.platform_source = platform if platform is not None else platform_source()
        self._own_dir = options.runtime_dir is None
        self.runtime_dir = options.runtime_dir or Path(tempfile.mkdtemp(prefix="orch-"))
        self.journal = SnapshotJournal()
        self.breaker = self._new_breaker()
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
        self.platform = WorkerGroup(
            "platform", spec, self.runtime_dir, spares=options.platform_spares, metrics=self.metrics
        )
        self.user: WorkerGroup | None = None
        if user_source is not None:
            self.user = self._user_group(user_source, user_name)
        self._lock = asyncio.Lock()
        self.decision_log: DecisionLog | None = None  # set by the service to record cycles

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
            "user", spec, self.runtime_dir, spares=self.options.user_spares, metrics=self.metrics
        )

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
            self._account(result)
            if self.decision_log is not None:
                name = self.user.spec.name if self.user is not None else "platform"
                self.decision_log.record(result, self.journal, name)
            # While the circuit is open the user's spares would be synced for nothing;
            # when it half-opens, the journal's deltas (or a full snapshot) catch them up.
            if self.user is not None and self.breaker.state != "open":
                self.user.sync_spares(self.journal)
            self.platform.sync_spares(self.journal)
            return result

    async def _cycle(self, ctx: Context, refresh: Refresh | None, started: float) -> CycleResult:
        if self.user is None:
            attempt = await self._attempt(self.platform, ctx, refresh)
            if attempt.failure is None:
                return self._result(attempt, "platform", started)
            return self._wait_result(attempt, ctx, started)

        if self.breaker.allow():
            attempt = await self._attempt(self.user, ctx, refresh)
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
            self.breaker.record_success()
            return self._result(attempt, "user", started)
        if attempt.failure.kind != "circuit_open":
            self.breaker.record_failure()
        fallback = await self._attempt(self.platform, attempt.context or ctx, None)
        if fallback.failure is None:
            result = self._result(fallback, "platform-fallback", started, attempt.failure)
            # The user script's own logs explain its failure; keep them.
            return _with_logs(result, attempt)
        return self._wait_result(fallback, attempt.context or ctx, started, attempt.failure)

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

    async def _attempt(self, group: WorkerGroup, ctx: Context, refresh: Refresh | None) -> Attempt:
        budget_s = self.options.limits.deadline_ms / 1000
        attempt = Attempt(context=ctx)
        try:
            worker = await group.acquire(budget_s)
        except SchedulerLoadError as exc:
            attempt.failure = Failure("load_error", str(exc), exc.traceback)
            return attempt
        except SandboxUnavailableError as exc:
            attempt.failure = Failure("unavailable", str(exc))
            return attempt
        attempt.worker_pid = worker.pid
        if self.journal.deltas_since(worker.epoch, worker.seq) is None:
            await self._resync(worker)
        fresh = False
        resent_full = False
        while True:
            request = self.journal.request_for(worker.epoch, worker.seq)
            request.refresh_available = refresh is not None and not fresh
            request.pool_state_fresh = fresh
            reply = await self._call(group, worker, request, budget_s, attempt)
            if reply is None:
                if attempt.failure is None and not resent_full:
                    resent_full = True  # FAILED_PRECONDITION: resend as a full snapshot
                    worker.epoch = 0
                    await self._resync(worker)
                    continue
                attempt.failure = attempt.failure or Failure(
                    "internal", "the worker refused a full snapshot"
                )
                return attempt
            if reply.retire:
                group.retire(worker, "retired")
            if reply.refresh_requested and refresh is not None and not fresh:
                attempt.context = await refresh()
                self.journal.advance(attempt.context)
                fresh = True
                continue
            break
        attempt.logs = [ScriptLog(r.level, r.message) for r in reply.logs]
        attempt.metrics = [(m.name, m.value) for m in reply.metrics]
        if reply.logs_dropped:
            self.metrics.script_logs_dropped.inc(reply.logs_dropped)
        if reply.metrics_dropped:
            self.metrics.custom_dropped.inc(reply.metrics_dropped)
        if reply.HasField("error"):
            kind = ERROR_KINDS.get(reply.error.kind, "internal")
            attempt.failure = Failure(kind, reply.error.message, reply.error.traceback)
            return attempt
        if not reply.HasField("decision"):
            attempt.failure = Failure("invalid_decision", "the worker returned no decision")
            return attempt
        decision = decisions.from_proto(reply.decision)
        assert attempt.context is not None
        verdict = validate(
            decision, attempt.context, max_batch_actions=self.options.limits.max_batch_actions
        )
        if not verdict.ok:
            for rejection in verdict.rejections:
                self.metrics.rejections.labels(group.role, rejection.reason).inc()
            attempt.failure = Failure(
                "rejected",
                f"decision rejected: {verdict.summary()}",
                rejections=verdict.rejections,
            )
            return attempt
        attempt.decision = decision
        return attempt

    async def _resync(self, worker: WorkerProcess) -> None:
        """Bring a worker that needs a full snapshot up to date before the timed call.

        Converting a big context costs more than the budget (about 60 ms at 10,000
        jobs), and it is our cost, not the script's: billing it to the deadline would
        kill a healthy worker, and its spare would pay the same. The sync runs no user
        code; the Schedule call that follows carries no context and keeps the deadline.
        """
        request = self.journal.request_for(0, 0)
        request.sync_only = True
        try:
            async with asyncio.timeout(RESYNC_TIMEOUT_S):
                await worker.schedule(request, RESYNC_TIMEOUT_S + DEADLINE_SLACK_S)
        except (TimeoutError, aio.AioRpcError) as exc:
            code = exc.code().name if isinstance(exc, aio.AioRpcError) else "timeout"
            log.warning("sandbox.resync_failed", pid=worker.pid, code=code)
            if code in ("timeout", "DEADLINE_EXCEEDED"):
                worker.kill()  # stopped or wedged: the timed call then fails fast

    async def _call(
        self,
        group: WorkerGroup,
        worker: WorkerProcess,
        request: sandbox_pb2.ScheduleRequest,
        budget_s: float,
        attempt: Attempt,
    ) -> sandbox_pb2.ScheduleReply | None:
        """One Schedule RPC. None with `attempt.failure` unset means: resend in full."""
        try:
            # The event loop's timer is tighter than gRPC's deadline (~1 ms against
            # ~3 ms late); the gRPC deadline stays as a backstop. asyncio.timeout, not
            # wait_for: on 3.11 wait_for can swallow a cancellation of the caller.
            async with asyncio.timeout(budget_s):
                return await worker.schedule(request, budget_s + DEADLINE_SLACK_S)
        except (TimeoutError, aio.AioRpcError) as exc:
            code = (
                exc.code()
                if isinstance(exc, aio.AioRpcError)
                else grpc.StatusCode.DEADLINE_EXCEEDED
            )
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                return None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                group.retire(worker, "killed_timeout")
                attempt.failure = Failure(
                    "timeout",
                    f"scheduler timeout exceeded: no decision within {budget_s * 1000:.0f} ms; "
                    f"worker {worker.pid} killed",
                )
            else:
                group.retire(worker, "crashed")
                attempt.failure = Failure(
                    "worker_crash",
                    f"sandbox worker {worker.pid} failed during the call "
                    f"({code.name}): {worker.log_tail(500)}",
                )
            return None

    # ------------------------------------------------------------------ bookkeeping
    def _account(self, result: CycleResult) -> None:
        m = self.metrics
        for action in decisions.flatten(result.decision):
            m.decision(action.action, result.source).inc()
        m.latency_for(result.source).observe(result.latency_ms / 1000)
        for name, value in result.metrics:
            m.record_custom(name, value)
        if self.user is not None:
            m.circuit_open.labels("user").set(1 if self.breaker.state == "open" else 0)
        error = result.error
        if error is not None:
            failed = "user" if self.user is not None else "platform"
            if error.kind == "timeout":
                m.timeouts.labels(failed).inc()
            elif error.kind != "circuit_open":
                m.errors.labels(failed, error.kind).inc()
            to = "platform" if result.source == "platform-fallback" else "wait"
            m.fallbacks.labels(to, error.kind).inc()
        for line in result.logs:
            log.info("scheduler.script_log", level=line.level, message=line.message)
        event = {
            "snapshot_hash": result.snapshot_hash[:16],
            "seq": result.seq,
            "source": result.source,
            "decision": Described(result.decision),
            "latency_ms": round(result.latency_ms, 3),
        }
        if error is None:
            # An idle wait every tick would drown the log; it stays visible at debug.
            quiet = isinstance(result.decision, Wait)
            (log.debug if quiet else log.info)("scheduler.decision", **event)
        else:
            log.warning(
                "scheduler.fallback",
                **event,
                kind=error.kind,
                reason=error.message,
                traceback=error.traceback or None,
            )


class Described:
    """A decision rendered as text only if a log line is actually written."""

    __slots__ = ("decision",)

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def __repr__(self) -> str:
        return decisions.describe(self.decision)

    __str__ = __repr__


def _with_logs(result: CycleResult, attempt: Attempt) -> CycleResult:
    return dataclasses.replace(
        result,
        logs=tuple(attempt.logs) + result.logs,
        metrics=tuple(attempt.metrics) + result.metrics,
    )
