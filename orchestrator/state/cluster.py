"""The core's live view: queued and running jobs, pools, workers, tenants.

It turns into a `Context` once per scheduling cycle, at a cost that follows what
changed, not the queue's length (issue 17): the queue is a snapshot view with the
changes logged since the last context (state/jobqueue.py), and records that did not
change keep their identity between cycles (jobs are converted once; a pool is
rebuilt only when something in it changed), so the delta skips them by identity.

Workers are seen twice: the pool reports the process (starting, ready, failed) and
the core knows what it sent where (busy, current job, completions). `Worker`
records merge both. Pools on other hosts are `RemotePools`; the core's own pool is
read through `LocalPoolView`, which the local pool implements.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from operator import is_not
from typing import Protocol

from orchestrator.config.settings import ServiceConfig
from orchestrator.domain.context import (
    Catalog,
    Context,
    Gpu,
    HostReading,
    Job,
    Pool,
    ProcessInfo,
    Tenant,
    Worker,
    derive_metrics,
)
from orchestrator.domain.jobs import JobRecord
from orchestrator.domain.prefix import NO_TENANT, capacity_blocks, text_blocks
from orchestrator.domain.prefix_queries import kv_capacity_tokens
from orchestrator.state.jobqueue import JobQueue
from orchestrator.state.prefix import PrefixIndex
from orchestrator.state.remote_pools import RemotePool, RemotePools
from orchestrator.support.clock import now_ms


def next_midnight_utc_ms(at_ms: int) -> int:
    day = datetime.fromtimestamp(at_ms / 1000, UTC).date() + timedelta(days=1)
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def last_midnight_utc_ms(at_ms: int) -> int:
    """When the day of daily token quotas began (a UTC day: Unix time has no leap seconds)."""
    return next_midnight_utc_ms(at_ms) - 86_400_000


class LocalPoolView(Protocol):
    """What the cluster state reads of the core's own pool."""

    id: str
    version: int  # bumped by the pool on every change the core must see

    @property
    def endpoint(self) -> str: ...
    def read(self, *, force: bool = False) -> tuple[tuple[Gpu, ...], HostReading]: ...
    def processes(self) -> list[ProcessInfo]: ...


@dataclass
class WorkerStats:
    """What the core knows of a worker from the jobs it sent it."""

    # The jobs it runs now, each with when it was sent, oldest first (dicts keep order).
    active: dict[str, int] = field(default_factory=dict)
    jobs_completed: int = 0
    tokens: int = 0
    busy_ms: int = 0
    last_used_at_ms: int = 0

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / (self.busy_ms / 1000) if self.busy_ms > 0 else 0.0


class ClusterState:
    def __init__(
        self,
        config: ServiceConfig,
        catalog: Catalog,
        tenants: dict[str, Tenant],
        local_pool: LocalPoolView | None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.tenant_quotas = tenants
        self.local_pool = local_pool
        self.remote = RemotePools(
            config.pools, startup_timeout_ms=config.local_pool.worker.startup_timeout_ms
        )
        self.stats: dict[str, WorkerStats] = {}
        # Jobs: queued (eligible now, in queue order), delayed (retry backoff), in flight.
        self.records: dict[str, JobRecord] = {}
        self._queue = JobQueue()
        self._last_context: Context | None = None
        self._delayed: list[tuple[int, str]] = []
        self.in_flight: dict[str, JobRecord] = {}
        # Queued jobs (retries in their backoff included) by tenant ("" without one), and
        # their prompts' bytes: what submit admission bounds (service/admission.py).
        self._queued_shares: dict[str, tuple[str, int]] = {}  # job id -> (tenant, bytes)
        self._tenant_queued: dict[str, tuple[int, int]] = {}  # tenant -> (jobs, bytes)
        self.queued_prompt_bytes = 0
        self.tokens_today: dict[str, int] = {}
        self.tokens_day_ends_ms = 0
        self.completions: deque[int] = deque()
        self._pool_cache: dict[str, tuple[tuple[object, ...], Pool]] = {}
        # What the core knows of a pool's workers changes with their jobs: each change
        # bumps the pool's counter, so that a cycle rebuilds only the pools it touched
        # instead of comparing every worker's stats (issue 17).
        self._stats_versions: dict[str, int] = {}
        self._worker_pools: dict[str, str] = {}  # worker id -> pool id, as last built
        self._context_config = config.context_config()
        self.prefix = PrefixIndex(
            config.prefix_cache.block_tokens, config.prefix_cache.max_sessions
        )
        self._changes = 0

    @property
    def version(self) -> int:
        """Grows with every change; the scheduling loop runs a cycle when it moved."""
        return self._changes + self.remote.version

    def changed(self) -> None:
        """Something the next context depends on changed (a worker asked for, a reload)."""
        self._changes += 1

    # ------------------------------------------------------------------ jobs
    def enqueue(self, record: JobRecord, at_ms: int) -> None:
        self.records[record.id] = record
        self.in_flight.pop(record.id, None)
        self._count_queued(record)
        if record.not_before > at_ms:
            heapq.heappush(self._delayed, (record.not_before, record.id))
        else:
            self._insert(record)
        self._changes += 1

    def _insert(self, record: JobRecord) -> None:
        tenant, index = record.tenant_id, self.prefix
        self._queue.insert(
            replace(
                record.to_job(),
                prompt_tokens=record.input_tokens,
                block_hashes=text_blocks(record.prompt, tenant or NO_TENANT, index.block_tokens),
                session_worker=index.session_worker(tenant, record.session_id),
            )
        )

    def _unqueue(self, job_id: str) -> None:
        self._queue.remove(job_id)

    def start(self, record: JobRecord) -> tuple[int, int]:
        """The job was dispatched. Returns its prompt tokens, and how many of them the
        prefix index believed its worker held (what the routing expects to reuse)."""
        job = self._queue.remove(record.id)
        self._uncount_queued(record.id)
        self.records[record.id] = record
        self.in_flight[record.id] = record
        self._changes += 1
        if job is None or not record.worker_id:
            return (0, 0)
        return self._remember_prefix(job, record.worker_id)

    def attempt_failed(self, record: JobRecord) -> None:
        """An attempt of the job failed. Before its first token, the worker never
        processed the prompt: the index stops believing it holds the prompt's blocks,
        so that retries and jobs sharing the prefix are not drawn back to it."""
        if record.worker_id and record.first_token_at is None:
            tenant = record.tenant_id
            hashes = text_blocks(record.prompt, tenant or NO_TENANT, self.prefix.block_tokens)
            self.prefix.discard(record.worker_id, tenant, hashes)

    def update(self, record: JobRecord) -> None:
        """A change that keeps the job where it is (e.g. dispatched -> running)."""
        self.records[record.id] = record
        if record.id in self.in_flight:
            self.in_flight[record.id] = record

    def finish(self, job_id: str) -> None:
        """The job left the cluster (completed, failed or cancelled)."""
        self._unqueue(job_id)
        self._uncount_queued(job_id)
        self.in_flight.pop(job_id, None)
        self.records.pop(job_id, None)
        self._changes += 1

    def release_due(self, at_ms: int) -> None:
        """Move retries whose backoff ended into the queue."""
        while self._delayed and self._delayed[0][0] <= at_ms:
            _, job_id = heapq.heappop(self._delayed)
            record = self.records.get(job_id)
            if record is not None and job_id not in self.in_flight and job_id not in self._queue:
                self._insert(record)
                self._changes += 1

    def next_due_ms(self) -> int | None:
        return self._delayed[0][0] if self._delayed else None

    @property
    def queue_depth(self) -> int:
        return len(self.records) - len(self.in_flight)

    def tenant_queued(self, tenant: str) -> tuple[int, int]:
        """(jobs, prompt bytes) queued for `tenant` ("": jobs without a tenant)."""
        return self._tenant_queued.get(tenant, (0, 0))

    def _count_queued(self, record: JobRecord) -> None:
        if record.id in self._queued_shares:
            return
        tenant, size = record.tenant_id or "", record.held_bytes
        self._queued_shares[record.id] = (tenant, size)
        jobs, held = self.tenant_queued(tenant)
        self._tenant_queued[tenant] = (jobs + 1, held + size)
        self.queued_prompt_bytes += size

    def _uncount_queued(self, job_id: str) -> None:
        share = self._queued_shares.pop(job_id, None)
        if share is None:
            return
        tenant, size = share
        jobs, held = self._tenant_queued[tenant]
        if jobs == 1:
            del self._tenant_queued[tenant]  # tenant ids are the client's: keep no empty ones
        else:
            self._tenant_queued[tenant] = (jobs - 1, held - size)
        self.queued_prompt_bytes -= size

    def _touched(self, worker_id: str) -> None:
        """What the core knows of the worker changed: its pool's record is rebuilt."""
        pool_id = self._worker_pools.get(worker_id)
        if pool_id is not None:
            self._stats_versions[pool_id] = self._stats_versions.get(pool_id, 0) + 1

    def record_completion(self, record: JobRecord, worker_id: str, at_ms: int) -> None:
        self._touched(worker_id)
        stats = self.stats.setdefault(worker_id, WorkerStats())
        stats.jobs_completed += 1
        stats.tokens += record.tokens_generated
        if record.dispatched_at:
            stats.busy_ms += max(1, at_ms - record.dispatched_at)
        self.completions.append(at_ms)
        if record.tenant_id:
            self.tokens_today[record.tenant_id] = (
                self.tokens_today.get(record.tenant_id, 0) + record.tokens_generated
            )

    def occupy(self, worker_id: str, job_id: str, at_ms: int) -> None:
        """`job_id` was sent to `worker_id`: it takes one of the worker's slots."""
        self._touched(worker_id)
        stats = self.stats.setdefault(worker_id, WorkerStats())
        stats.active[job_id] = at_ms
        stats.last_used_at_ms = at_ms
        self._changes += 1

    def release(self, worker_id: str, job_id: str, at_ms: int) -> None:
        """The core heard the end of `job_id` on `worker_id`: its slot is free."""
        self._touched(worker_id)
        stats = self.stats.setdefault(worker_id, WorkerStats())
        stats.active.pop(job_id, None)
        stats.last_used_at_ms = at_ms
        self._changes += 1

    def running_jobs(self, worker_id: str) -> tuple[str, ...]:
        """The jobs the core sent `worker_id` and has not heard the end of, oldest first."""
        stats = self.stats.get(worker_id)
        return tuple(stats.active) if stats is not None else ()

    def forget_worker(self, worker_id: str) -> None:
        """The worker was evicted: what the core knew of it goes too."""
        self._touched(worker_id)
        self.stats.pop(worker_id, None)
        self._worker_pools.pop(worker_id, None)
        self.prefix.forget(worker_id)

    def _remember_prefix(self, job: Job, worker_id: str) -> tuple[int, int]:
        """The worker now holds the job's prompt blocks, and runs its session. Returns
        the prompt's tokens and those the worker was believed to hold already."""
        index = self.prefix
        index.route(job.tenant_id, job.session_id, worker_id)
        ctx = self._last_context
        found = ctx.workers_by_id.get(worker_id) if ctx is not None else None
        if ctx is None or found is None or not job.block_hashes:
            return job.prompt_tokens, 0
        held = min(
            job.prompt_tokens,
            index.matched(worker_id, job.tenant_id, job.block_hashes) * index.block_tokens,
        )
        pool, worker = found
        room = capacity_blocks(kv_capacity_tokens(ctx, pool, worker), index.block_tokens)
        index.record(worker_id, job.tenant_id, job.block_hashes, room)
        return job.prompt_tokens, held

    # ------------------------------------------------------------------ pools
    def expire_pools(self, at_ms: int) -> list[RemotePool]:
        """Remove the remote pools silent for `pools.expire_after_ms`; returns them.
        Their jobs in flight are the caller's to retry (service/pools.py)."""
        gone = self.remote.expire(at_ms)
        for pool in gone:
            self._pool_cache.pop(pool.id, None)
        return gone

    def processes(self) -> list[tuple[str, ProcessInfo]]:
        """Every worker process, with its pool id."""
        out: list[tuple[str, ProcessInfo]] = []
        if self.local_pool is not None:
            out.extend((self.local_pool.id, p) for p in self.local_pool.processes())
        out.extend(self.remote.processes())
        return out

    def _worker(self, p: ProcessInfo) -> Worker:
        stats = self.stats.get(p.id) or WorkerStats()
        active = tuple(stats.active)
        oldest = active[0] if active else None
        full = len(active) >= p.slots
        return Worker(
            id=p.id,
            model_ref=p.model_ref,
            status="busy" if full and p.status == "ready" else p.status,
            gpu_ids=p.gpu_ids,
            vram_bytes=p.vram_bytes,
            uri=p.uri,
            current_job_id=oldest,
            job_started_at=stats.active[oldest] if oldest is not None else None,
            jobs_completed=stats.jobs_completed,
            avg_tokens_per_sec=round(stats.tokens_per_sec, 3),
            started_at_ms=p.started_at_ms,
            last_used_at_ms=stats.last_used_at_ms or p.started_at_ms,
            slots_total=p.slots,
            slots_busy=len(active),
            active_job_ids=active,
            api=p.api,
        )

    def _pool(self, pool_id: str, key: tuple[object, ...], build: Callable[[], Pool]) -> Pool:
        """The pool's record, rebuilt only when its key (everything it is made of) changed."""
        cached = self._pool_cache.get(pool_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        pool = build()
        self._pool_cache[pool_id] = (key, pool)
        for worker in pool.workers:
            self._worker_pools[worker.id] = pool_id
        return pool

    def pools(self, at_ms: int, *, fresh: bool = False) -> tuple[Pool, ...]:
        out: list[Pool] = []
        if self.local_pool is not None:
            lp = self.local_pool
            gpus, host = lp.read(force=fresh)
            workers = lp.processes()
            overlay = self._stats_versions.get(lp.id, 0)
            local_key: tuple[object, ...] = (lp.version, gpus, host, overlay)

            def build_local() -> Pool:
                return Pool(
                    id=lp.id,
                    endpoint=lp.endpoint,
                    status="healthy",
                    last_heartbeat_ms=at_ms,
                    gpus=gpus,
                    workers=tuple(sorted((self._worker(w) for w in workers), key=_by_id)),
                    host_ram_total_bytes=host.ram_total,
                    host_ram_available_bytes=host.ram_available,
                    host_cpu_percent=host.cpu_percent,
                    host_cpu_count=host.cpu_count,
                )

            pool = self._pool(lp.id, local_key, build_local)
            # The local pool is its own heartbeat: keep the record, refresh the time.
            out.append(pool if pool.last_heartbeat_ms == at_ms else _beat(pool, at_ms))
        for rp in self.remote.sorted():
            status = self.remote.status(rp, at_ms)
            overlay = self._stats_versions.get(rp.id, 0)
            remote_key: tuple[object, ...] = (
                rp.last_heartbeat_ms,
                status,
                rp.gpus,
                tuple(map(id, rp.workers)),
                overlay,
                rp.host,
                rp.endpoint,
            )

            def build_remote(rp: RemotePool = rp, status: str = status) -> Pool:
                return Pool(
                    id=rp.id,
                    endpoint=rp.endpoint,
                    status=status,
                    last_heartbeat_ms=rp.last_heartbeat_ms,
                    gpus=rp.gpus,
                    workers=tuple(sorted((self._worker(w) for w in rp.workers), key=_by_id)),
                    cached_models=rp.cached_models,
                    host_ram_total_bytes=rp.host.ram_total,
                    host_ram_available_bytes=rp.host.ram_available,
                    host_cpu_percent=rp.host.cpu_percent,
                    host_cpu_count=rp.host.cpu_count,
                )

            out.append(self._pool(rp.id, remote_key, build_remote))
        return tuple(out)

    # ------------------------------------------------------------------ tenants
    def restore_tokens_today(self, tokens: dict[str, int], at_ms: int) -> None:
        """Today's tokens by tenant as the job store counted them (at start-up), so that
        a restart does not hand every tenant a fresh daily quota."""
        self.tokens_today = dict(tokens)
        self.tokens_day_ends_ms = next_midnight_utc_ms(at_ms)

    def tenants(self, at_ms: int) -> tuple[Tenant, ...]:
        if at_ms >= self.tokens_day_ends_ms:
            self.tokens_today = {}
            self.tokens_day_ends_ms = next_midnight_utc_ms(at_ms)
        running: dict[str, list[JobRecord]] = {}
        for record in self.in_flight.values():
            if record.tenant_id:
                running.setdefault(record.tenant_id, []).append(record)
        out = []
        for tenant_id, quota in sorted(self.tenant_quotas.items()):
            jobs = running.get(tenant_id, [])
            tokens = self.tokens_today.get(tenant_id, 0)
            daily = quota.quota_tokens_daily
            out.append(
                Tenant(
                    id=tenant_id,
                    name=quota.name,
                    quota_vram_bytes=quota.quota_vram_bytes,
                    quota_max_concurrent_jobs=quota.quota_max_concurrent_jobs,
                    quota_tokens_daily=daily,
                    vram_used_bytes=sum(r.estimated_vram_bytes for r in jobs),
                    concurrent_jobs=len(jobs),
                    tokens_used_today=tokens,
                    quota_reset_at=self.tokens_day_ends_ms,
                    quota_exceeded=daily is not None and tokens >= daily,
                )
            )
        return tuple(out)

    # ------------------------------------------------------------------ the context
    def context(self, at_ms: int | None = None, *, fresh: bool = False) -> Context:
        at = at_ms if at_ms is not None else now_ms()
        self.release_due(at)
        while self.completions and self.completions[0] < at - 60_000:
            self.completions.popleft()
        queue = self._queue.snapshot()
        pools = self.pools(at, fresh=fresh)
        last = self._last_context
        if last is None or len(pools) != len(last.pools) or any(map(is_not, pools, last.pools)):
            # Workers that stopped without an eviction (a crash, a pool gone) leave
            # nothing behind in the index, nor in the map of whose pool they were.
            live = {w.id for pool in pools for w in pool.workers}
            self.prefix.retain(live)
            self._worker_pools = {w: p for w, p in self._worker_pools.items() if w in live}
        ctx = Context(
            now_ms=at,
            queue=queue,
            pools=pools,
            catalog=self.catalog,
            tenants=self.tenants(at),
            metrics=derive_metrics(
                queue,
                pools,
                at,
                jobs_completed_last_minute=len(self.completions),
                totals=queue.totals(),
            ),
            config=self._context_config,
            changes=self._queue.take_changes(self._last_context),
            prefix=self.prefix.state(),
        )
        self._last_context = ctx
        return ctx


def _by_id(worker: Worker) -> str:
    return worker.id


def _beat(pool: Pool, at_ms: int) -> Pool:
    return replace(pool, last_heartbeat_ms=at_ms)
