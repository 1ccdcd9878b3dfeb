"""The scheduler context as plain, immutable dataclasses (lua-runtime-spec section 3).

This is the pure core's vocabulary: the snapshot builder, the decision validator
and the platform scheduler's inputs all take these. Conversion to protobuf lives
in `orchestrator/wire/context.py`, loading from files in
`orchestrator/config/context_file.py`.
"""

from __future__ import annotations

import weakref
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from types import MappingProxyType
from typing import NamedTuple, overload

from orchestrator.domain.prefix import EMPTY as EMPTY_PREFIX
from orchestrator.domain.prefix import PrefixState
from orchestrator.domain.serving import ServingPerf, for_device

PRIORITY_RANK: Mapping[str, int] = MappingProxyType({"interactive": 0, "batch": 1})
PRIORITIES = tuple(PRIORITY_RANK)
WORKER_STATUSES = ("ready", "busy", "starting", "failed")
# The HTTP dialects a worker speaks (issue 15): llama.cpp's `POST /completion`, or the
# OpenAI-compatible `/v1/completions` and `/v1/chat/completions` of vLLM, SGLang, TGI
# and llama-server.
WORKER_APIS = ("llamacpp", "openai")
POOL_STATUSES = ("healthy", "degraded", "offline")
# ctx.metrics travels as int64: a sum past this is clamped, not an error in every cycle.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    model_ref: str
    priority: str = "batch"
    tenant_id: str | None = None
    session_id: str | None = None
    prompt_hash: str = ""
    max_tokens: int = 0
    seed: int | None = None
    temperature: float = 0.0
    created_at: int = 0
    queued_at: int = 0
    retry_count: int = 0
    estimated_vram_bytes: int = 0
    estimated_duration_ms: int = 0
    # Prompt blocks (issue 16, docs/ARCHITECTURE.md D29): the prompt's tokens, the
    # chained hashes of its full blocks (domain/prefix.py), and the worker that last
    # ran a job of its session when it was queued. A script sees `prompt_tokens` and
    # the count of blocks; the hashes and the session's worker serve the built-ins.
    prompt_tokens: int = 0
    block_hashes: tuple[int, ...] = ()
    session_worker: str | None = None

    def queue_key(self) -> tuple[int, int, str]:
        """Queue order: interactive before batch, then arrival, then id (runtime-spec 3.1)."""
        return (PRIORITY_RANK.get(self.priority, len(PRIORITY_RANK)), self.queued_at, self.id)


@dataclass(frozen=True, slots=True)
class Gpu:
    id: int
    device_name: str
    vram_total_bytes: int
    vram_allocated_bytes: int = 0
    vram_free_bytes: int = -1  # -1: total - allocated
    compute_capability: str = ""
    utilization_percent: float = 0.0
    temperature_celsius: float = 0.0
    power_draw_watts: float = 0.0
    supports_fp16: bool = True
    supports_int8: bool = True
    supports_tensor_cores: bool = True
    measured: bool = False

    def __post_init__(self) -> None:
        if self.vram_free_bytes < 0:
            object.__setattr__(
                self, "vram_free_bytes", max(0, self.vram_total_bytes - self.vram_allocated_bytes)
            )


@dataclass(frozen=True, slots=True)
class Worker:
    id: str
    model_ref: str
    status: str = "ready"
    gpu_ids: tuple[int, ...] = ()
    vram_bytes: int = 0
    uri: str = ""
    current_job_id: str | None = None
    job_started_at: int | None = None
    jobs_completed: int = 0
    avg_tokens_per_sec: float = 0.0
    started_at_ms: int = 0
    last_used_at_ms: int = 0
    # Slots (an extension of runtime-spec 3.2, docs/ARCHITECTURE.md D27): a batched
    # server runs up to `slots_total` jobs at once. `status` is "busy" only when every
    # slot is taken; `current_job_id` is the oldest of `active_job_ids`. With one slot
    # this is exactly the spec's worker.
    slots_total: int = 1
    slots_busy: int = 0
    active_job_ids: tuple[str, ...] = ()
    api: str = "llamacpp"

    @property
    def slots_free(self) -> int:
        return max(0, self.slots_total - self.slots_busy)


@dataclass(frozen=True, slots=True)
class HostReading:
    """A pool host's RAM and CPU, as the local pool reads it or a remote pool reports it."""

    ram_total: int = 0
    ram_available: int = 0
    cpu_percent: float = 0.0
    cpu_count: int = 0


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A worker process as its pool reports it (the core overlays what it sent where)."""

    id: str
    model_ref: str
    gpu_ids: tuple[int, ...]
    vram_bytes: int
    uri: str
    status: str
    started_at_ms: int
    slots: int = 1  # how many jobs it runs at once (configured, or read from the server)
    api: str = "llamacpp"  # WORKER_APIS


@dataclass(frozen=True, slots=True)
class Pool:
    id: str
    endpoint: str = ""
    status: str = "healthy"
    last_heartbeat_ms: int = 0
    gpus: tuple[Gpu, ...] = ()
    workers: tuple[Worker, ...] = ()
    cached_models: tuple[str, ...] = ()  # least recently used first
    host_ram_total_bytes: int = 0
    host_ram_available_bytes: int = 0
    host_cpu_percent: float = 0.0
    host_cpu_count: int = 0

    def gpu(self, gpu_id: int) -> Gpu | None:
        return next((g for g in self.gpus if g.id == gpu_id), None)


@dataclass(frozen=True, slots=True)
class CatalogModel:
    model_ref: str
    vram_required_bytes: int
    family: str = ""
    size: str = ""
    quantization: str = ""
    context_length: int = 0
    supports_determinism: bool = False
    supports_streaming: bool = True
    estimated_tokens_per_sec: Mapping[str, float] = field(default_factory=dict)
    file_size_bytes: int = 0
    file_hash: str = ""
    min_compute_capability: str = ""
    # The KV cache one token takes (layers x KV heads x head size x 2 x bytes): with the
    # GPU's VRAM it bounds the prefix index and the simulated batch (issue 16).
    kv_bytes_per_token: int = 0
    # The simulator's performance model of this model by device name, plus "default"
    # (domain/serving.py, docs/SIMULATION.md). Not sent to schedulers.
    performance: Mapping[str, ServingPerf] = field(default_factory=dict)

    def tokens_per_sec(self, device_name: str) -> float:
        """Catalog estimate for a device (`for_device`: a catalog name matches a longer
        NVML name it starts), else the model's default, else 0."""
        return float(for_device(self.estimated_tokens_per_sec, device_name) or 0.0)


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, CatalogModel] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def _by_base_ref(self) -> Mapping[str, str | None]:
        # "hf:org/name@rev" names "hf:org/name@rev::file=x.gguf" when only one file matches.
        index: dict[str, str | None] = {}
        for ref in self.models:
            base = ref.split("::", 1)[0]
            if base != ref:
                index[base] = None if base in index else ref
        return index

    def resolve(self, model: str) -> str:
        """Canonical model_ref: alias, exact ref, unique ref without its ::file part, or as given.

        Must stay identical to `resolve` in sandbox_worker/lua/builtins/common.lua.
        """
        if model in self.aliases:
            return self.aliases[model]
        if model in self.models:
            return model
        return self._by_base_ref.get(model) or model

    def get(self, model: str) -> CatalogModel | None:
        return self.models.get(self.resolve(model))


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str = ""
    quota_vram_bytes: int | None = None
    quota_max_concurrent_jobs: int | None = None
    quota_tokens_daily: int | None = None
    vram_used_bytes: int = 0
    concurrent_jobs: int = 0
    tokens_used_today: int = 0
    quota_reset_at: int = 0
    quota_exceeded: bool = False


@dataclass(frozen=True, slots=True)
class Metrics:
    queue_depth: int = 0
    queue_depth_interactive: int = 0
    queue_depth_batch: int = 0
    avg_wait_time_ms: float = 0.0
    total_workers: int = 0
    ready_workers: int = 0
    busy_workers: int = 0
    failed_workers: int = 0
    total_pools: int = 0
    healthy_pools: int = 0
    degraded_pools: int = 0
    offline_pools: int = 0
    total_gpus: int = 0
    total_vram_bytes: int = 0
    allocated_vram_bytes: int = 0
    free_vram_bytes: int = 0
    avg_gpu_utilization: float = 0.0
    jobs_completed_last_minute: int = 0
    avg_tokens_per_sec: float = 0.0


@dataclass(frozen=True, slots=True)
class QueueConfig:
    capacity: int = -1
    policy: str = "queue"


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    default_ms: int = 300_000
    max_ms: int = 1_800_000


@dataclass(frozen=True, slots=True)
class RetryConfig:
    enabled: bool = True
    max_attempts: int = 5
    initial_delay_ms: int = 1000
    multiplier: float = 2.0
    max_delay_ms: int = 60_000


@dataclass(frozen=True, slots=True)
class EvictionConfig:
    model_cache_policy: str = "lru"
    worker_policy: str = "lru"
    vram_threshold: float = 0.9


@dataclass(frozen=True, slots=True)
class Config:
    mode: str = "agentic"
    deployment_mode: str = "lab"
    queue: QueueConfig = QueueConfig()
    timeout: TimeoutConfig = TimeoutConfig()
    retry: RetryConfig = RetryConfig()
    eviction: EvictionConfig = EvictionConfig()

    @property
    def platform_mode(self) -> bool:
        return self.deployment_mode == "platform" or self.mode == "platform"


@dataclass(frozen=True)
class JobChanges:
    """How a context's queue differs from an earlier context's.

    Recorded by whoever built the context as the changes happened (the live cluster
    state's queue logs every arrival and departure), so that a cycle costs what
    changed: the delta sent to the sandbox is exactly these changes. The parent is
    held weakly; without it, the snapshot diff falls back to walking every job.
    """

    parent: weakref.ref[Context]
    upserted: tuple[Job, ...] = ()
    removed: frozenset[str] = frozenset()


class QueueView(Sequence[Job]):
    """A queue that answers what a cycle needs without being built in full.

    The live queue changes between cycles, and copying it for each context would
    make every cycle cost the queue's length (issue 17). A view answers its length,
    its totals for ctx.metrics and single lookups from what the queue keeps up to
    date; the ordered tuple is built only when something reads the queue in full
    (a full snapshot for a resync, a decision-log snapshot, a report), then kept.
    """

    __slots__ = ("__weakref__", "_jobs")

    def __init__(self) -> None:
        self._jobs: tuple[Job, ...] | None = None

    @abstractmethod
    def lookup(self, job_id: str) -> Job | None:
        """The job as this view saw it, or None."""

    @abstractmethod
    def totals(self, tenant_id: str | None = None) -> QueueTotals:
        """What ctx.metrics needs of the queue (of one tenant's jobs when given)."""

    @abstractmethod
    def _build(self) -> tuple[Job, ...]:
        """Every job, in queue order."""

    def materialized(self) -> tuple[Job, ...]:
        if self._jobs is None:
            self._jobs = self._build()
        return self._jobs

    def for_tenant(self, tenant_id: str) -> QueueView:
        return TenantQueue(self, tenant_id)

    def __len__(self) -> int:
        return self.totals().count

    @overload
    def __getitem__(self, index: int) -> Job: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Job, ...]: ...
    def __getitem__(self, index: int | slice) -> Job | tuple[Job, ...]:
        return self.materialized()[index]

    def __iter__(self) -> Iterator[Job]:
        return iter(self.materialized())

    def __contains__(self, job: object) -> bool:
        return isinstance(job, Job) and self.lookup(job.id) == job

    def __eq__(self, other: object) -> bool:
        if isinstance(other, QueueView):
            return other is self or self.materialized() == other.materialized()
        if isinstance(other, tuple):
            return self.materialized() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.materialized())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {len(self)} jobs>"


class TenantQueue(QueueView):
    """One tenant's jobs of a view: what its own scheduler sees (D15)."""

    __slots__ = ("_parent", "_tenant_id")

    def __init__(self, parent: QueueView, tenant_id: str) -> None:
        super().__init__()
        self._parent = parent
        self._tenant_id = tenant_id

    def lookup(self, job_id: str) -> Job | None:
        job = self._parent.lookup(job_id)
        return job if job is not None and job.tenant_id == self._tenant_id else None

    def totals(self, tenant_id: str | None = None) -> QueueTotals:
        if tenant_id is not None and tenant_id != self._tenant_id:
            return QueueTotals(0, 0, 0, 0)
        return self._parent.totals(self._tenant_id)

    def _build(self) -> tuple[Job, ...]:
        tenant = self._tenant_id
        return tuple(job for job in self._parent if job.tenant_id == tenant)


class _JobLookup(Mapping[str, Job]):
    """ctx.jobs_by_id over a view: single lookups cost nothing; iterating builds it."""

    __slots__ = ("_view",)

    def __init__(self, view: QueueView) -> None:
        self._view = view

    def __getitem__(self, job_id: str) -> Job:
        job = self._view.lookup(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def get(self, job_id: str, default: Job | None = None) -> Job | None:  # type: ignore[override]
        job = self._view.lookup(job_id)
        return default if job is None else job

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and self._view.lookup(job_id) is not None

    def __iter__(self) -> Iterator[str]:
        return (job.id for job in self._view)

    def __len__(self) -> int:
        return len(self._view)


@dataclass(frozen=True)
class Context:
    """One scheduling cycle's view of the world."""

    now_ms: int
    # A tuple, or a view of the live queue (QueueView) built in full only when read so.
    queue: Sequence[Job] = ()
    pools: tuple[Pool, ...] = ()
    catalog: Catalog = Catalog()
    tenants: tuple[Tenant, ...] = ()
    metrics: Metrics = Metrics()
    config: Config = Config()
    changes: JobChanges | None = field(default=None, compare=False, repr=False)
    prefix: PrefixState = EMPTY_PREFIX  # what workers hold of prompts (domain/prefix.py)
    # The context a view was made from (a tenant's view, scheduling/tenancy.py).
    source: weakref.ref[Context] | None = field(default=None, compare=False, repr=False)

    def changes_since(self, other: Context) -> JobChanges | None:
        """The job changes from `other` to this context, when they are known."""
        changes = self.changes
        if changes is not None and changes.parent() is other:
            return changes
        return None

    @cached_property
    def jobs_by_id(self) -> Mapping[str, Job]:
        if isinstance(self.queue, QueueView):
            return _JobLookup(self.queue)
        changes = self.changes
        parent = changes.parent() if changes is not None else None
        if changes is not None and parent is not None and "jobs_by_id" in parent.__dict__:
            jobs = dict(parent.jobs_by_id)  # a C-level copy, then only what changed
            for job_id in changes.removed:
                jobs.pop(job_id, None)
            for job in changes.upserted:
                jobs[job.id] = job
            return jobs
        return dict(zip(map(_job_id, self.queue), self.queue, strict=True))

    @cached_property
    def workers_by_id(self) -> Mapping[str, tuple[Pool, Worker]]:
        changes = self.changes
        parent = changes.parent() if changes is not None else None
        if parent is None or "workers_by_id" not in parent.__dict__:
            return {w.id: (pool, w) for pool in self.pools for w in pool.workers}
        # Pools are rebuilt only when something in them changed: start from the
        # parent's index, and redo the pools that are not the parent's objects.
        workers = dict(parent.workers_by_id)
        before, after = parent.pools_by_id, self.pools_by_id
        changed = [pool for pool in self.pools if before.get(pool.id) is not pool]
        for pool_id, old in before.items():
            if after.get(pool_id) is not old:
                for w in old.workers:
                    workers.pop(w.id, None)
        for pool in changed:
            for w in pool.workers:
                workers[w.id] = (pool, w)
        return workers

    @cached_property
    def pools_by_id(self) -> Mapping[str, Pool]:
        return {pool.id: pool for pool in self.pools}

    @cached_property
    def tenants_by_id(self) -> Mapping[str, Tenant]:
        return {tenant.id: tenant for tenant in self.tenants}


_job_id = attrgetter("id")


def estimate_job(catalog: Catalog, model_ref: str, max_tokens: int) -> tuple[int, int]:
    """(estimated_vram_bytes, estimated_duration_ms) of a job, from the catalog."""
    model = catalog.get(model_ref)
    if model is None:
        return 0, 0
    rate = model.tokens_per_sec("default")
    duration = int(max_tokens / rate * 1000) if rate > 0 else 0
    return model.vram_required_bytes, duration


@dataclass(frozen=True, slots=True)
class QueueTotals:
    """What ctx.metrics needs of the queue, kept up to date as jobs come and go."""

    count: int
    interactive: int
    batch: int
    queued_at_sum: int

    @classmethod
    def of(cls, queue: Sequence[Job]) -> QueueTotals:
        """Walks the queue (in C: map, Counter, sum) when nobody kept the totals."""
        if isinstance(queue, QueueView):
            return queue.totals()
        priorities = Counter(map(attrgetter("priority"), queue))
        return cls(len(queue), priorities["interactive"], priorities["batch"],
                   sum(map(attrgetter("queued_at"), queue)))  # fmt: skip


def derive_metrics(
    queue: Sequence[Job],
    pools: tuple[Pool, ...],
    now_ms: int,
    *,
    jobs_completed_last_minute: int = 0,
    totals: QueueTotals | None = None,
) -> Metrics:
    """ctx.metrics computed from the queue and pool state (runtime-spec 3.5).

    A pool's part is tallied once per pool record (they are reused while nothing in
    them changes), so a cycle costs the pools that changed, not every worker and GPU."""
    q = totals or QueueTotals.of(queue)
    waited = q.count * now_ms - q.queued_at_sum
    tallies = [_tally(pool) for pool in pools]
    tally = _PoolTally(*map(sum, zip(*tallies, strict=True))) if tallies else _NO_TALLY
    pool_statuses = Counter(p.status for p in pools)
    gpus = tally.gpus
    return Metrics(
        queue_depth=q.count,
        queue_depth_interactive=q.interactive,
        queue_depth_batch=q.batch,
        # Never negative: a context may be evaluated before its jobs' queue times.
        avg_wait_time_ms=max(0.0, waited / q.count) if q.count else 0.0,
        total_workers=tally.workers,
        ready_workers=tally.ready,
        busy_workers=tally.busy,
        failed_workers=tally.failed,
        total_pools=len(pools),
        healthy_pools=pool_statuses["healthy"],
        degraded_pools=pool_statuses["degraded"],
        offline_pools=pool_statuses["offline"],
        total_gpus=gpus,
        total_vram_bytes=_int64(tally.vram_total),
        allocated_vram_bytes=_int64(tally.vram_allocated),
        free_vram_bytes=_int64(tally.vram_free),
        avg_gpu_utilization=tally.utilization / gpus if gpus else 0.0,
        jobs_completed_last_minute=jobs_completed_last_minute,
        avg_tokens_per_sec=tally.rate_sum / tally.rates if tally.rates else 0.0,
    )


class _PoolTally(NamedTuple):
    workers: int
    ready: int
    busy: int
    failed: int
    rates: int
    rate_sum: float
    gpus: int
    vram_total: int
    vram_allocated: int
    vram_free: int
    utilization: float


_NO_TALLY = _PoolTally(0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0.0)
# id(pool) -> (pool, its tally). The pool is kept to check identity (an id can be
# reused once its object is gone); bounded, since old pools are never asked again.
_TALLIES: dict[int, tuple[Pool, _PoolTally]] = {}
_MAX_TALLIES = 4096


def _tally(pool: Pool) -> _PoolTally:
    cached = _TALLIES.get(id(pool))
    if cached is not None and cached[0] is pool:
        return cached[1]
    workers, gpus = pool.workers, pool.gpus
    statuses = Counter(w.status for w in workers)
    rates = [w.avg_tokens_per_sec for w in workers if w.avg_tokens_per_sec > 0]
    tally = _PoolTally(
        len(workers), statuses["ready"], statuses["busy"], statuses["failed"],
        len(rates), sum(rates), len(gpus),
        sum(g.vram_total_bytes for g in gpus), sum(g.vram_allocated_bytes for g in gpus),
        sum(g.vram_free_bytes for g in gpus), sum(g.utilization_percent for g in gpus),
    )  # fmt: skip
    if len(_TALLIES) >= _MAX_TALLIES:
        _TALLIES.clear()
    _TALLIES[id(pool)] = (pool, tally)
    return tally


def _int64(total: int) -> int:
    """A sum of per-GPU values, within int64. Each value is bounded where it enters
    (orchestrator/state/pool_checks.py), but 64 GPUs in each of hundreds of pools can
    still add up past 2**63."""
    return max(-INT64_MAX - 1, min(total, INT64_MAX))
