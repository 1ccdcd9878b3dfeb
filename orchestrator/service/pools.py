"""Pools on other hosts joining and reporting (PoolService): registration, heartbeats,
the commands handed back with each heartbeat reply, and the end of silent pools.

Every request comes with its caller's `Identity`, and a caller speaks only for the
pool ids its credential names (`Identity.may_speak_for`). What a pool reports is
checked before it reaches the cluster state (orchestrator/state/pool_checks.py): a
value out of range, a worker serving on another host than the pool registered, or a
worker id that another pool or the local pool holds refuses the whole request, so
that the pool's operator sees at once what is wrong. A pool silent for
`pools.expire_after_ms` is removed, and the jobs on its workers are retried, as for
any lost worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Protocol

from orchestrator.config.settings import PoolsConfig
from orchestrator.domain.errors import (
    InvalidRequestError,
    NotFoundError,
    OrchestratorError,
    PermissionDeniedError,
    QueueFullError,
)
from orchestrator.domain.identity import Identity
from orchestrator.domain.jobs import JobRecord
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.state.pool_checks import (
    LIMITS,
    Problem,
    ReportLimits,
    check_heartbeat,
    check_registration,
)
from orchestrator.state.remote_pools import Heartbeat, RemoteCommand, RemotePool
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger
from orchestrator.support.rate import TokenBucket
from orchestrator.support.tasks import cancel_and_wait

log = get_logger("service")
REFUSAL_LOG_RATE = (10, 0.1)  # burst, then per second: the log lines of one caller's refusals


class Remotes(Protocol):
    """orchestrator/state/remote_pools.py, RemotePools."""

    def __contains__(self, pool_id: object) -> bool: ...
    def __len__(self) -> int: ...
    def get(self, pool_id: str) -> RemotePool | None: ...
    def owner(self, worker_id: str) -> str | None: ...
    def status(self, pool: RemotePool, at_ms: int) -> str: ...
    def register(self, pool_id: str, endpoint: str, at_ms: int) -> None: ...
    def heartbeat(self, pool: RemotePool, beat: Heartbeat, at_ms: int) -> list[RemoteCommand]: ...


class PoolState(Protocol):
    """orchestrator/state/cluster.py, ClusterState."""

    @property
    def remote(self) -> Remotes: ...
    @property
    def in_flight(self) -> Mapping[str, JobRecord]: ...
    def expire_pools(self, at_ms: int) -> list[RemotePool]: ...
    def forget_worker(self, worker_id: str) -> None: ...


class LocalPoolIds(Protocol):
    """The core's own pool (orchestrator/pools/local_pool.py): its id and its workers'
    ids are not for any remote pool to take."""

    id: str

    @property
    def workers(self) -> Mapping[str, object]: ...


class LostJobs(Protocol):
    """orchestrator/service/running.py, JobRunner."""

    async def abandon(self, job_id: str, error: str) -> bool: ...


class PoolRegistry:
    def __init__(
        self,
        cluster: PoolState,
        runner: LostJobs,
        local: LocalPoolIds | None,
        config: PoolsConfig,
        metrics: ServiceMetrics,
        *,
        wake: asyncio.Event,
        limits: ReportLimits = LIMITS,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.cluster = cluster
        self.runner = runner
        self.local = local  # the core's own pool: not for registration
        self.config = config
        self.metrics = metrics
        self.wake = wake
        self.limits = limits
        self.clock = clock
        self._refusal_logs: dict[str, TokenBucket] = {}
        self._refusals_unlogged: dict[str, int] = {}
        self._expiry: asyncio.Task[None] | None = None

    def register(self, caller: Identity, pool_id: str, endpoint: str) -> None:
        self._authorize(caller, pool_id)
        self._check(caller, pool_id, check_registration(pool_id, endpoint, self.limits))
        if self.local is not None and pool_id == self.local.id:
            message = f"{pool_id!r} is the orchestrator's own pool"
            raise self._refused(
                caller, pool_id, "local_pool", InvalidRequestError("pool_id", message)
            )
        remote = self.cluster.remote
        if pool_id not in remote and len(remote) >= self.config.max_pools:
            error = QueueFullError(
                f"pool_id: {len(remote)} pools are registered, the most pools.max_pools "
                "allows; one is removed after pools.expire_after_ms without a heartbeat"
            )
            raise self._refused(caller, pool_id, "too_many_pools", error)
        remote.register(pool_id, endpoint, self.clock())
        log.info("pool.registered", pool=pool_id, endpoint=endpoint, caller=caller.describe())
        self.wake.set()

    def heartbeat(self, caller: Identity, beat: Heartbeat) -> list[RemoteCommand]:
        """Record a heartbeat; returns the commands waiting for this pool."""
        self._authorize(caller, beat.pool_id)
        pool = self.cluster.remote.get(beat.pool_id)
        if pool is None:
            error = NotFoundError(f"pool {beat.pool_id!r} is not registered; call Register first")
            raise self._refused(caller, beat.pool_id, "not_registered", error)
        self._check(caller, beat.pool_id, check_heartbeat(beat, pool.endpoint, self.limits))
        self._check_owners(caller, beat)
        at = self.clock()
        remote = self.cluster.remote
        if remote.status(pool, at) == "offline":
            log.info("pool.back_online", pool=beat.pool_id)
        commands = remote.heartbeat(pool, beat, at)
        self.wake.set()
        return commands

    # ------------------------------------------------------------------ expiry
    def start(self) -> None:
        self._expiry = asyncio.get_running_loop().create_task(self._expire_silent())

    async def stop(self) -> None:
        await cancel_and_wait(self._expiry)

    async def expire(self) -> None:
        """Remove the pools silent for `pools.expire_after_ms`; the jobs running on
        their workers are retried under `retry`, as when any worker is lost."""
        at = self.clock()
        for pool in self.cluster.expire_pools(at):
            held = pool.worker_ids
            silent_ms = at - pool.last_heartbeat_ms
            error = f"pool {pool.id!r} expired: no heartbeat for {silent_ms} ms"
            lost = [job_id for job_id, r in self.cluster.in_flight.items() if r.worker_id in held]
            retried = [job_id for job_id in lost if await self.runner.abandon(job_id, error)]
            for worker_id in held:
                # While the jobs were retried (awaits), the pool may have registered again
                # and been given a job on this worker: its state is then live, not stale.
                if self.cluster.remote.owner(worker_id) is None:
                    self.cluster.forget_worker(worker_id)
            self.metrics.pools_expired.inc()
            log.warning("pool.expired", pool=pool.id, silent_ms=silent_ms, workers=len(held),
                        jobs_lost=lost, jobs_retried_or_failed=retried)  # fmt: skip
            self.wake.set()

    async def _expire_silent(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_ms / 1000)
            try:
                await self.expire()
            except Exception:  # the next round tries again; expiry must not stop for good
                log.exception("pool.expiry_failed")

    # ------------------------------------------------------------------ refusals
    def _authorize(self, caller: Identity, pool_id: str) -> None:
        if not caller.may_speak_for(pool_id):
            error = PermissionDeniedError(
                f"{caller.describe()} may not speak for pool {pool_id[:80]!r}: "
                "its credential names the pools it may register and report"
            )
            raise self._refused(caller, pool_id, "not_its_pool", error)

    def _check(self, caller: Identity, pool_id: str, problems: tuple[Problem, ...]) -> None:
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            error = InvalidRequestError(first.field, first.message + more)
            raise self._refused(caller, pool_id, first.reason, error)

    def _check_owners(self, caller: Identity, beat: Heartbeat) -> None:
        """A pool reports only workers no other pool holds: a worker id is where the
        core sends that worker's jobs."""
        remote = self.cluster.remote
        local: Mapping[str, object] = self.local.workers if self.local is not None else {}
        for i, worker in enumerate(beat.workers):
            if worker.id in local or remote.owner(worker.id) not in (None, beat.pool_id):
                error = PermissionDeniedError(
                    f"workers[{i}].id: {worker.id!r} is another pool's worker; "
                    "a pool reports only the workers it runs"
                )
                raise self._refused(caller, beat.pool_id, "worker_taken", error)

    def _refused(
        self, caller: Identity, pool_id: str, reason: str, error: OrchestratorError
    ) -> OrchestratorError:
        self.metrics.pool_refusals.labels(reason).inc()
        # A pool refused once is refused on every heartbeat: a few lines a minute per
        # caller say so, the metric counts them all (callers are the configured keys).
        bucket = self._refusal_logs.get(caller.name)
        if bucket is None:
            bucket = self._refusal_logs[caller.name] = TokenBucket(*REFUSAL_LOG_RATE)
        if bucket.take():
            suppressed = self._refusals_unlogged.pop(caller.name, 0)
            log.warning("pool.refused", pool=pool_id[:80], caller=caller.describe(),
                        reason=reason, error=str(error), not_logged_since=suppressed)  # fmt: skip
        else:
            self._refusals_unlogged[caller.name] = self._refusals_unlogged.get(caller.name, 0) + 1
        return error
