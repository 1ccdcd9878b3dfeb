"""The scheduler context as plain, immutable dataclasses (lua-runtime-spec section 3).

This is the pure core's vocabulary: the snapshot builder, the decision validator
and the platform scheduler's inputs all take these. Conversion to protobuf lives
in `orchestrator/wire/context.py`, loading from files in
`orchestrator/config/context_file.py`.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from types import MappingProxyType

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

    A hint from whoever built the context (the live cluster state knows what it
    changed), so that a cycle costs what changed: the snapshot diff and the job
    index use it instead of walking every queued job. The parent is held weakly;
    without it, everything falls back to the full walk.
    """

    parent: weakref.ref[Context]
    upserted: tuple[Job, ...] = ()
    removed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Context:
    """One scheduling cycle's view of the world."""

    now_ms: int
    queue: tuple[Job, ...] = ()
    pools: tuple[Pool, ...] = ()
    catalog: Catalog = Catalog()
    tenants: tuple[Tenant, ...] = ()
    metrics: Metrics = Metrics()
    config: Config = Config()
    changes: JobChanges | None = field(default=None, compare=False, repr=False)
    prefix: PrefixState = EMPTY_PREFIX  # what workers hold of prompts (domain/prefix.py)

    def changes_since(self, other: Context) -> JobChanges | None:
        """The job changes from `other` to this context, when they are known."""
        changes = self.changes
        if changes is not None and changes.parent() is other:
            return changes
        return None

    @cached_property
    def jobs_by_id(self) -> Mapping[str, Job]:
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
        return {w.id: (pool, w) for pool in self.pools for w in pool.workers}

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
    def of(cls, queue: tuple[Job, ...]) -> QueueTotals:
        """Walks the queue (in C: map, Counter, sum) when nobody kept the totals."""
        priorities = Counter(map(attrgetter("priority"), queue))
        return cls(len(queue), priorities["interactive"], priorities["batch"],
                   sum(map(attrgetter("queued_at"), queue)))  # fmt: skip


def derive_metrics(
    queue: tuple[Job, ...],
    pools: tuple[Pool, ...],
    now_ms: int,
    *,
    jobs_completed_last_minute: int = 0,
    totals: QueueTotals | None = None,
) -> Metrics:
    """ctx.metrics computed from the queue and pool state (runtime-spec 3.5)."""
    workers = [w for pool in pools for w in pool.workers]
    gpus = [g for pool in pools for g in pool.gpus]
    rates = [w.avg_tokens_per_sec for w in workers if w.avg_tokens_per_sec > 0]
    q = totals or QueueTotals.of(queue)
    waited = q.count * now_ms - q.queued_at_sum
    statuses = Counter(w.status for w in workers)
    pool_statuses = Counter(p.status for p in pools)
    return Metrics(
        queue_depth=q.count,
        queue_depth_interactive=q.interactive,
        queue_depth_batch=q.batch,
        avg_wait_time_ms=waited / q.count if q.count else 0.0,
        total_workers=len(workers),
        ready_workers=statuses["ready"],
        busy_workers=statuses["busy"],
        failed_workers=statuses["failed"],
        total_pools=len(pools),
        healthy_pools=pool_statuses["healthy"],
        degraded_pools=pool_statuses["degraded"],
        offline_pools=pool_statuses["offline"],
        total_gpus=len(gpus),
        total_vram_bytes=_int64(sum(g.vram_total_bytes for g in gpus)),
        allocated_vram_bytes=_int64(sum(g.vram_allocated_bytes for g in gpus)),
        free_vram_bytes=_int64(sum(g.vram_free_bytes for g in gpus)),
        avg_gpu_utilization=(sum(g.utilization_percent for g in gpus) / len(gpus) if gpus else 0.0),
        jobs_completed_last_minute=jobs_completed_last_minute,
        avg_tokens_per_sec=sum(rates) / len(rates) if rates else 0.0,
    )


def _int64(total: int) -> int:
    """A sum of per-GPU values, within int64. Each value is bounded where it enters
    (orchestrator/state/pool_checks.py), but 64 GPUs in each of hundreds of pools can
    still add up past 2**63."""
    return max(-INT64_MAX - 1, min(total, INT64_MAX))
