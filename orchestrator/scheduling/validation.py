"""Decision validation: a decision is only a proposal until it passes here.

Pure: takes a `Decision` and the `Context` it was made on, returns a verdict.
A batch is validated in order against the state its earlier actions leave behind
(a job dispatched once cannot be dispatched again, each job given to a worker takes
one of its free slots, VRAM promised to a start_worker is gone). A decision is
accepted whole or not at all; every rejection names the action's position and a
machine-readable reason.

The predicates here (quota, GPU compatibility, fit) have twins among the Lua
built-ins in sandbox_worker/lua/builtins/ (gpus, jobs, quotas); tests hold the two to the
same answers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from orchestrator.domain.context import CatalogModel, Context, Gpu, Job, Tenant, Worker
from orchestrator.domain.decision import (
    Batch,
    Decision,
    Dispatch,
    EvictWorker,
    StartWorker,
    Wait,
    flatten,
)

MAX_RETRY_AFTER_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int  # position in the batch; 0 for a single action
    action: str
    reason: str  # machine-readable, e.g. "unknown_job"
    detail: str  # for humans

    def __str__(self) -> str:
        return f"action #{self.index} ({self.action}): {self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    rejections: tuple[Rejection, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.rejections

    def summary(self) -> str:
        return "; ".join(str(r) for r in self.rejections)


def compute_capability_at_least(actual: str, required: str) -> bool:
    """'8.9' >= '8.0'; an empty requirement is always met, an unknown capability never."""
    if not required:
        return True
    try:
        have = tuple(int(part) for part in actual.split("."))
        need = tuple(int(part) for part in required.split("."))
    except ValueError:
        return False
    return have >= need


def check_gpu_compatibility(gpu: Gpu, model: CatalogModel | None) -> tuple[bool, str | None]:
    """Can this GPU ever hold this model? (ctx.check_gpu_compatibility)"""
    if model is None:
        return False, "unknown_model"
    if gpu.vram_total_bytes < model.vram_required_bytes:
        return False, "insufficient_vram"
    if not compute_capability_at_least(gpu.compute_capability, model.min_compute_capability):
        return False, "compute_capability_too_low"
    return True, None


def check_tenant_quota(
    tenant: Tenant | None,
    job: Job,
    *,
    extra_jobs: int = 0,
    extra_vram: int = 0,
    extra_tokens: int = 0,
) -> tuple[bool, str | None, str | None]:
    """(allowed, reason, detail) for one more job of this tenant (ctx.check_tenant_quota).

    `extra_*` carry what earlier actions of the same batch already took.
    """
    if tenant is None:
        return False, "unknown_tenant", None
    if tenant.quota_exceeded:
        return False, "quota_exceeded", "flagged"
    limit = tenant.quota_max_concurrent_jobs
    if limit is not None and tenant.concurrent_jobs + extra_jobs + 1 > limit:
        return False, "quota_exceeded", "concurrent_jobs"
    limit = tenant.quota_vram_bytes
    if limit is not None and (
        tenant.vram_used_bytes + extra_vram + job.estimated_vram_bytes > limit
    ):
        return False, "quota_exceeded", "vram"
    limit = tenant.quota_tokens_daily
    if limit is not None and tenant.tokens_used_today + extra_tokens + job.max_tokens > limit:
        return False, "quota_exceeded", "tokens_daily"
    return True, None, None


def check_job_fit(
    ctx: Context, job: Job, worker: Worker, *, extra_jobs: int = 0
) -> tuple[bool, str | None]:
    """Can `job` run on `worker` right now? (ctx.can_job_fit)

    The worker must be ready with a slot free (docs/ARCHITECTURE.md D27); `extra_jobs`
    are the jobs earlier actions of the same batch already gave it.
    """
    pool = ctx.workers_by_id[worker.id][0] if worker.id in ctx.workers_by_id else None
    if pool is not None and pool.status == "offline":
        return False, "pool_offline"
    if worker.status != "ready" or worker.slots_free <= extra_jobs:
        return False, "worker_not_ready"
    resolve = ctx.catalog.resolve
    if resolve(worker.model_ref) != resolve(job.model_ref):
        return False, "model_mismatch"
    if worker.vram_bytes < job.estimated_vram_bytes:
        return False, "insufficient_vram"
    return True, None


class _BatchState:
    """What the earlier actions of a batch have already claimed."""

    def __init__(self) -> None:
        self.dispatched_jobs: set[str] = set()
        self.worker_jobs: Counter[str] = Counter()  # jobs given to each worker
        self.evicted_workers: set[str] = set()
        self.reserved_vram: Counter[tuple[str, int]] = Counter()
        self.tenant_jobs: Counter[str] = Counter()
        self.tenant_vram: Counter[str] = Counter()
        self.tenant_tokens: Counter[str] = Counter()


def validate(decision: Decision, ctx: Context, *, max_batch_actions: int = 256) -> Verdict:
    """Check a decision against the context it was made on."""
    actions = flatten(decision)
    if isinstance(decision, Batch) and len(actions) > max_batch_actions:
        return Verdict(
            decision,
            (
                Rejection(
                    0,
                    "batch",
                    "too_many_actions",
                    f"{len(actions)} actions, the limit is {max_batch_actions}",
                ),
            ),
        )
    _, rejections = accept_in_order(list(actions), ctx)
    return Verdict(decision, tuple(rejections))


def accept_in_order(
    actions: list[Decision], ctx: Context
) -> tuple[list[Decision], list[Rejection]]:
    """Check actions one by one, each against the state the accepted ones leave; a
    rejected action is skipped rather than failing the rest (the platform's
    arbitration between tenants)."""
    state = _BatchState()
    accepted: list[Decision] = []
    rejected: list[Rejection] = []
    for index, action in enumerate(actions):
        problem = _check(action, ctx, state)
        if problem is None:
            accepted.append(action)
        else:
            rejected.append(Rejection(index, action.action, *problem))
    return accepted, rejected


def _check(action: Decision, ctx: Context, state: _BatchState) -> tuple[str, str] | None:
    match action:
        case Dispatch():
            return _check_dispatch(action, ctx, state)
        case StartWorker():
            return _check_start_worker(action, ctx, state)
        case EvictWorker():
            return _check_evict(action, ctx, state)
        case Wait():
            retry = action.retry_after_ms
            if retry is not None and not 0 <= retry <= MAX_RETRY_AFTER_MS:
                return "invalid_retry_after", f"retry_after_ms={retry} is outside 0..3600000"
            return None
        case Batch():
            return "nested_batch", "a batch may not contain another batch"
    return "unknown_action", repr(action)  # pragma: no cover - the union is exhaustive


def _check_dispatch(action: Dispatch, ctx: Context, state: _BatchState) -> tuple[str, str] | None:
    job = ctx.jobs_by_id.get(action.job_id)
    if job is None:
        return "unknown_job", f"job {action.job_id!r} is not in the queue"
    if job.id in state.dispatched_jobs:
        return "job_already_dispatched", f"job {job.id!r} is dispatched earlier in this batch"
    found = ctx.workers_by_id.get(action.worker_id)
    if found is None:
        return "unknown_worker", f"worker {action.worker_id!r} does not exist"
    _, worker = found
    if worker.id in state.evicted_workers:
        return "worker_evicted", f"worker {worker.id!r} is evicted earlier in this batch"
    earlier = state.worker_jobs[worker.id]
    fits, reason = check_job_fit(ctx, job, worker, extra_jobs=earlier)
    if not fits:
        assert reason is not None
        return reason, _fit_detail(reason, ctx, job, worker, worker.slots_busy + earlier)
    tenant_id = job.tenant_id
    if tenant_id is not None and (tenant_id in ctx.tenants_by_id or ctx.config.platform_mode):
        allowed, why, detail = check_tenant_quota(
            ctx.tenants_by_id.get(tenant_id),
            job,
            extra_jobs=state.tenant_jobs[tenant_id],
            extra_vram=state.tenant_vram[tenant_id],
            extra_tokens=state.tenant_tokens[tenant_id],
        )
        if not allowed:
            assert why is not None
            return why, f"tenant {tenant_id!r}: {detail or why}"
        state.tenant_jobs[tenant_id] += 1
        state.tenant_vram[tenant_id] += job.estimated_vram_bytes
        state.tenant_tokens[tenant_id] += job.max_tokens
    state.dispatched_jobs.add(job.id)
    state.worker_jobs[worker.id] += 1
    return None


def _fit_detail(reason: str, ctx: Context, job: Job, worker: Worker, busy: int) -> str:
    """Why `job` does not fit; `busy` counts the worker's slots taken, this batch's too."""
    if reason == "worker_not_ready":
        if worker.status == "ready":
            return f"worker {worker.id!r} has no free slot ({busy} of {worker.slots_total} busy)"
        return f"worker {worker.id!r} is {worker.status}"
    if reason == "model_mismatch":
        return (
            f"worker {worker.id!r} serves {ctx.catalog.resolve(worker.model_ref)!r}, "
            f"job {job.id!r} needs {ctx.catalog.resolve(job.model_ref)!r}"
        )
    if reason == "insufficient_vram":
        return (
            f"job {job.id!r} needs {job.estimated_vram_bytes} bytes of VRAM, "
            f"worker {worker.id!r} has {worker.vram_bytes}"
        )
    return f"the pool of worker {worker.id!r} is offline"


def _check_start_worker(
    action: StartWorker, ctx: Context, state: _BatchState
) -> tuple[str, str] | None:
    pool = ctx.pools_by_id.get(action.pool_id)
    if pool is None:
        return "unknown_pool", f"pool {action.pool_id!r} does not exist"
    if pool.status == "offline":
        return "pool_offline", f"pool {pool.id!r} is offline"
    gpu = pool.gpu(action.gpu_id)
    if gpu is None:
        return "unknown_gpu", f"pool {pool.id!r} has no GPU {action.gpu_id}"
    model = ctx.catalog.get(action.model_ref)
    ok, reason = check_gpu_compatibility(gpu, model)
    if not ok:
        assert reason is not None
        return reason, f"model {action.model_ref!r} on {pool.id} GPU {gpu.id}: {reason}"
    assert model is not None
    key = (pool.id, gpu.id)
    free = gpu.vram_free_bytes - state.reserved_vram[key]
    if free < model.vram_required_bytes:
        return (
            "insufficient_vram",
            f"{model.model_ref!r} needs {model.vram_required_bytes} bytes, "
            f"{pool.id} GPU {gpu.id} has {free} free",
        )
    state.reserved_vram[key] += model.vram_required_bytes
    return None


def _check_evict(action: EvictWorker, ctx: Context, state: _BatchState) -> tuple[str, str] | None:
    found = ctx.workers_by_id.get(action.worker_id)
    if found is None:
        return "unknown_worker", f"worker {action.worker_id!r} does not exist"
    _, worker = found
    if worker.id in state.evicted_workers:
        return "worker_already_evicted", f"worker {worker.id!r} is evicted twice"
    # Evicting a worker kills whatever it runs: only one without a job may go.
    running = worker.slots_busy or worker.current_job_id or state.worker_jobs[worker.id]
    if worker.status == "busy" or running:
        return "worker_busy", f"worker {worker.id!r} is running a job"
    state.evicted_workers.add(worker.id)
    return None
