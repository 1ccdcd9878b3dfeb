"""Applying a decision: dispatches start jobs, worker starts and evictions go to pools.

A decision was validated against the context it was made on, but the world moves
while a scheduler thinks: a job may have been cancelled, a worker may have failed or
taken another job. Each action is checked again against the live state, in order,
and one the world has moved past is skipped and counted as stale
(`orchestrator_actions_applied{result="stale"}`), never applied half-way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Protocol

from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Catalog, ProcessInfo
from orchestrator.domain.decision import Decision, Dispatch, EvictWorker, StartWorker
from orchestrator.domain.errors import PoolError
from orchestrator.domain.jobs import JobRecord, JobState
from orchestrator.pools.completion import WorkerEndpoint
from orchestrator.service.jobs import Jobs
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.service.running import JobRunner
from orchestrator.state.remote_pools import RemoteCommand
from orchestrator.support.clock import now_ms
from orchestrator.support.log import get_logger

log = get_logger("service")

START_BACKOFF_MAX_S = 60.0


class RemoteCommands(Protocol):
    """Commands for pools on other hosts (orchestrator/state/remote_pools.py)."""

    def __contains__(self, pool_id: object) -> bool: ...
    def start(self, pool_id: str, command: RemoteCommand, at_ms: int) -> None: ...
    def evict(self, worker_id: str, command: RemoteCommand) -> bool: ...


class LiveCluster(Protocol):
    """What applying reads and changes of the live state (ClusterState)."""

    catalog: Catalog
    records: dict[str, JobRecord]
    in_flight: dict[str, JobRecord]

    @property
    def remote(self) -> RemoteCommands: ...
    def processes(self) -> list[tuple[str, ProcessInfo]]: ...
    def running_jobs(self, worker_id: str) -> tuple[str, ...]: ...
    def forget_worker(self, worker_id: str) -> None: ...
    def changed(self) -> None: ...


class LocalWorkers(Protocol):
    """The core's own pool (orchestrator/pools/local_pool.py, LocalPool)."""

    id: str

    @property
    def workers(self) -> Mapping[str, object]: ...
    async def start_worker(
        self, worker_id: str, model_ref: str, gpu_id: int, vram_bytes: int
    ) -> object: ...
    async def evict_worker(self, worker_id: str) -> None: ...


class DecisionApplier:
    def __init__(
        self,
        cluster: LiveCluster,
        jobs: Jobs,
        runner: JobRunner,
        local_pool: LocalWorkers | None,
        metrics: ServiceMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,  # the start backoff's
    ) -> None:
        self.cluster = cluster
        self.jobs = jobs
        self.runner = runner
        self.local_pool = local_pool
        self.metrics = metrics
        self.clock = clock
        self._worker_ids = itertools.count(1)
        self._command_ids = itertools.count(1)
        # (pool, model) -> (monotonic time before which no start is tried, last delay)
        self._start_backoff: dict[tuple[str, str], tuple[float, float]] = {}

    async def apply(self, decision: Decision) -> None:
        """Apply in order; an action the world has moved past since the snapshot is skipped."""
        at = now_ms()
        dispatches: list[tuple[JobRecord, str, WorkerEndpoint]] = []  # (job, worker id, where)
        claimed: Counter[str] = Counter()  # dispatches per worker in this decision
        # The local pool's worker wins over a remote one reporting the same id (a remote
        # pool may have reported the id before the local worker it names was started).
        ready: dict[str, ProcessInfo] = {}
        for _, reported in self.cluster.processes():
            ready.setdefault(reported.id, reported)
        for action in decisions.flatten(decision):
            if isinstance(action, Dispatch):
                record = self.cluster.records.get(action.job_id)
                process = ready.get(action.worker_id)
                if (
                    record is None
                    or record.state != JobState.QUEUED
                    or action.job_id in self.cluster.in_flight
                    or process is None
                    or process.status != "ready"
                    or len(self.cluster.running_jobs(action.worker_id)) + claimed[action.worker_id]
                    >= process.slots
                ):
                    self.metrics.applied.labels("dispatch", "stale").inc()
                    continue
                claimed[action.worker_id] += 1
                dispatches.append(
                    (record, action.worker_id, WorkerEndpoint(process.uri, process.api))
                )
            elif isinstance(action, StartWorker):
                await self._start_worker(action)
            elif isinstance(action, EvictWorker):
                self._evict_worker(action)
        if dispatches:
            await self._dispatch(dispatches, at)

    async def _dispatch(
        self, dispatches: list[tuple[JobRecord, str, WorkerEndpoint]], at: int
    ) -> None:
        results = await self.jobs.dispatch(
            [(record, worker) for record, worker, _ in dispatches], at
        )
        for (_, worker_id, endpoint), updated in zip(dispatches, results, strict=True):
            if updated is not None:
                self.runner.start(updated, worker_id, endpoint, at)

    async def _start_worker(self, action: StartWorker) -> None:
        model = self.cluster.catalog.get(action.model_ref)
        if model is None:
            self.metrics.applied.labels("start_worker", "stale").inc()
            return
        worker_id = self._new_worker_id(action.pool_id)
        pool = self.local_pool
        if pool is not None and action.pool_id == pool.id:
            key = (action.pool_id, model.model_ref)
            until, delay = self._start_backoff.get(key, (0.0, 0.0))
            if self.clock() < until:
                self.metrics.applied.labels("start_worker", "backoff").inc()
                return
            try:
                await pool.start_worker(
                    worker_id, model.model_ref, action.gpu_id, model.vram_required_bytes
                )
            except PoolError as exc:
                # The scheduler will ask again; do not try more than once per backoff.
                delay = min(max(1.0, delay * 2), START_BACKOFF_MAX_S)
                self._start_backoff[key] = (self.clock() + delay, delay)
                log.error(
                    "pool.start_failed", pool=action.pool_id, error=str(exc), retry_in_s=delay
                )
                self.metrics.applied.labels("start_worker", "failed").inc()
                return
            self._start_backoff.pop(key, None)
        elif action.pool_id in self.cluster.remote:
            command = RemoteCommand(
                f"c{next(self._command_ids)}",
                dataclasses.replace(action, model_ref=model.model_ref),
                worker_id,
                model.vram_required_bytes,
            )
            self.cluster.remote.start(action.pool_id, command, now_ms())
        else:
            self.metrics.applied.labels("start_worker", "stale").inc()
            return
        self.metrics.applied.labels("start_worker", "applied").inc()
        self.cluster.changed()

    def _new_worker_id(self, pool_id: str) -> str:
        """An id no pool holds: a remote pool could have reported the one that comes
        next, to be handed the new worker's jobs or to have its owner's heartbeats
        refused."""
        taken = {process.id for _, process in self.cluster.processes()}
        while True:
            worker_id = f"{pool_id}-w{next(self._worker_ids)}-{secrets.token_hex(2)}"
            if worker_id not in taken:
                return worker_id

    def _evict_worker(self, action: EvictWorker) -> None:
        if self.cluster.running_jobs(action.worker_id):
            self.metrics.applied.labels("evict_worker", "stale").inc()
            return
        pool = self.local_pool
        if pool is not None and action.worker_id in pool.workers:
            asyncio.get_running_loop().create_task(pool.evict_worker(action.worker_id))
        else:
            command = RemoteCommand(f"c{next(self._command_ids)}", action)
            if not self.cluster.remote.evict(action.worker_id, command):
                self.metrics.applied.labels("evict_worker", "stale").inc()
                return
        self.cluster.forget_worker(action.worker_id)
        self.metrics.applied.labels("evict_worker", "applied").inc()
