"""One scheduler's try at a cycle, in its sandbox.

The worker is brought up to date (deltas, or a full snapshot sent before the timed
call), `schedule(ctx)` runs under the deadline (past it, the worker is SIGKILLed),
and the decision that comes back is decoded and validated against the context.
Whatever goes wrong becomes a `Failure` in the `Attempt`: the engine decides what
to fall back to.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from grpc import aio

from orchestrator._proto import sandbox_pb2
from orchestrator.domain.context import Context
from orchestrator.domain.errors import SandboxUnavailableError, SchedulerLoadError
from orchestrator.sandbox.group import WorkerGroup
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.sandbox.process import WorkerProcess
from orchestrator.scheduling.cycle import Attempt, Failure, ScriptLog
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.scheduling.validation import validate
from orchestrator.state.journal import SnapshotJournal
from orchestrator.support.log import get_logger
from orchestrator.wire import decision as decision_codec

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

# A full snapshot sent before the timed call: ~60 ms at 10,000 jobs, ~0.6 s at 100,000.
RESYNC_TIMEOUT_S = 2.0
# ctx.refresh_pool_state(): the caller's way to read the pools now instead of from cache.
Refresh = Callable[[], Awaitable[Context]]


class CallWatch(Protocol):
    """Told when a timed Schedule call on the cycle's context starts and ends: the
    clock a hedge runs on (orchestrator/scheduling/hedge.py). A resync before the call
    is our cost, not the script's, and does not count."""

    def call_started(self) -> None: ...

    def call_ended(self) -> None: ...


class SandboxCaller:
    """Calls one worker group's scheduler on the journal's current context."""

    def __init__(
        self,
        journal: SnapshotJournal,
        limits: SandboxLimits,
        metrics: EngineMetrics,
        tenant: str = "",
    ) -> None:
        self.journal = journal
        self.limits = limits
        self.metrics = metrics
        self.tenant = tenant  # whose scheduler, for the metrics ("" for the main one)

    async def attempt(
        self,
        group: WorkerGroup,
        ctx: Context,
        refresh: Refresh | None,
        watch: CallWatch | None = None,
    ) -> Attempt:
        """Run `group`'s scheduler on `ctx` once; the outcome, never an exception.
        `watch` hears of the timed calls on `ctx` (not of one on a refreshed context)."""
        budget_s = self.limits.deadline_ms / 1000
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
        fresh = False
        resent_full = False
        while True:
            request = self.journal.request_for(worker.epoch, worker.seq)
            if request.HasField("snapshot"):
                await self._resync(group, worker, request)
                request = self.journal.request_for(worker.epoch, worker.seq)
            request.refresh_available = refresh is not None and not fresh
            request.pool_state_fresh = fresh
            reply = await self._call(
                group, worker, request, budget_s, attempt, None if fresh else watch
            )
            if reply is None:
                if attempt.failure is None and not resent_full:
                    resent_full = True  # FAILED_PRECONDITION: resend as a full snapshot
                    worker.epoch = 0
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
            self.metrics.script_logs_dropped.labels(self.tenant).inc(reply.logs_dropped)
        if reply.metrics_dropped:
            self.metrics.custom_dropped.labels(self.tenant).inc(reply.metrics_dropped)
        if reply.HasField("error"):
            kind = ERROR_KINDS.get(reply.error.kind, "internal")
            attempt.failure = Failure(kind, reply.error.message, reply.error.traceback)
            return attempt
        if not reply.HasField("decision"):
            attempt.failure = Failure("invalid_decision", "the worker returned no decision")
            return attempt
        decision = decision_codec.from_proto(reply.decision)
        assert attempt.context is not None
        verdict = validate(
            decision, attempt.context, max_batch_actions=self.limits.max_batch_actions
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

    async def _resync(
        self, group: WorkerGroup, worker: WorkerProcess, request: sandbox_pb2.ScheduleRequest
    ) -> None:
        """Bring a worker that needs a full snapshot (`request`) up to date before the
        timed call.

        Converting a big context costs more than the budget (about 60 ms at 10,000
        jobs), and it is our cost, not the script's: billing it to the deadline would
        kill a healthy worker, and its spare would pay the same. The sync runs no user
        code; the Schedule call that follows carries no context and keeps the deadline.
        """
        request.sync_only = True
        self.metrics.resyncs.labels(group.role, "cycle").inc()
        try:
            await worker.schedule(request, RESYNC_TIMEOUT_S)
        except aio.AioRpcError as exc:
            code = exc.code().name
            log.warning("sandbox.resync_failed", pid=worker.pid, code=code)
            if code == "DEADLINE_EXCEEDED":
                worker.kill()  # stopped or wedged: the timed call then fails fast

    async def _call(
        self,
        group: WorkerGroup,
        worker: WorkerProcess,
        request: sandbox_pb2.ScheduleRequest,
        budget_s: float,
        attempt: Attempt,
        watch: CallWatch | None,
    ) -> sandbox_pb2.ScheduleReply | None:
        """One Schedule RPC. None with `attempt.failure` unset means: resend in full."""
        if watch is not None:
            watch.call_started()
        started = time.perf_counter()
        try:
            return await worker.schedule(request, budget_s)
        except aio.AioRpcError as exc:
            code = exc.code()
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
        finally:
            attempt.call_s += time.perf_counter() - started
            if watch is not None:
                watch.call_ended()
