"""Per-tenant schedulers in platform mode (docs/ARCHITECTURE.md, D15). Pure.

A tenant's scheduler runs in its own sandbox worker on its own view of the cluster:
its queued jobs only, its own tenant record, the workers with other tenants' jobs,
usage and cached prompt blocks blanked out, and GPU free VRAM capped at what its
quota has left. Its decision is validated on that view, so naming another tenant's job is an unknown
job. The platform then arbitrates: the tenants' proposals and the platform
scheduler's decision (made on the whole cluster: it provisions workers for every
tenant, and dispatches for tenants without a scheduler) are interleaved one action
at a time, the tenant furthest below its quota first, and each action is checked
against the whole cluster and the actions accepted before it. What conflicts is
dropped and counted; the dropped jobs stay queued for the next cycle.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.domain.context import (
    Context,
    Gpu,
    Job,
    JobChanges,
    Pool,
    QueueView,
    Tenant,
    Worker,
    derive_metrics,
)
from orchestrator.domain.decision import Batch, Decision, Dispatch, EvictWorker, Wait, flatten
from orchestrator.scheduling.validation import accept_in_order

PLATFORM = ""  # the proposer key of the platform scheduler's decision


def tenant_view(
    ctx: Context,
    tenant_id: str,
    owners: Mapping[str, str | None],
    previous: Context | None = None,
) -> Context:
    """What tenant `tenant_id`'s scheduler sees. `owners` maps running job ids to
    their tenants (a worker's running jobs are only shown to their owners).

    `previous` is the tenant's view of the last cycle: when it was made from the
    context `ctx` changed from, the view's job changes are `ctx`'s filtered to the
    tenant, so that its delta costs what changed rather than the queue's length."""
    tenant = ctx.tenants_by_id.get(tenant_id) or Tenant(id=tenant_id)
    queue: Sequence[Job]
    if isinstance(ctx.queue, QueueView):
        queue = ctx.queue.for_tenant(tenant_id)
    else:
        queue = tuple(job for job in ctx.queue if job.tenant_id == tenant_id)
    headroom = None
    if tenant.quota_vram_bytes is not None:
        headroom = max(0, tenant.quota_vram_bytes - tenant.vram_used_bytes)
    pools = tuple(_pool_view(pool, tenant_id, owners, headroom) for pool in ctx.pools)
    return Context(
        now_ms=ctx.now_ms,
        queue=queue,
        pools=pools,
        catalog=ctx.catalog,
        tenants=(tenant,),
        metrics=derive_metrics(queue, pools, ctx.now_ms),
        config=ctx.config,
        changes=_tenant_changes(ctx, tenant_id, previous),
        source=weakref.ref(ctx),
        # Only what its own prompts left in the workers' caches: block hashes are salted
        # by tenant (domain/prefix.py), and each tenant's entries are evicted in an order
        # of their own (state/prefix.py), so not even their number tells of another's.
        prefix=ctx.prefix.for_tenant(tenant_id),
    )


def _tenant_changes(ctx: Context, tenant_id: str, previous: Context | None) -> JobChanges | None:
    changes = ctx.changes
    parent = changes.parent() if changes is not None else None
    if changes is None or parent is None or previous is None or previous.source is None:
        return None  # the diff walks the view's jobs instead
    if previous.source() is not parent:
        return None
    held = previous.jobs_by_id
    return JobChanges(
        weakref.ref(previous),
        upserted=tuple(job for job in changes.upserted if job.tenant_id == tenant_id),
        # Only ids the tenant's scheduler held: other tenants' job ids are not its to see.
        removed=frozenset(job_id for job_id in changes.removed if job_id in held),
    )


def _pool_view(
    pool: Pool, tenant_id: str, owners: Mapping[str, str | None], headroom: int | None
) -> Pool:
    workers = tuple(_worker_view(w, tenant_id, owners) for w in pool.workers)
    return dataclasses.replace(
        pool, workers=workers, gpus=tuple(_gpu_view(g, headroom) for g in pool.gpus)
    )


def _worker_view(worker: Worker, tenant_id: str, owners: Mapping[str, str | None]) -> Worker:
    mine = tuple(job for job in worker.active_job_ids if owners.get(job) == tenant_id)
    oldest = mine[0] if mine else None
    # Busy stays busy, and a taken slot stays taken (slots_busy is kept): the tenant
    # cannot use them either. Whose jobs they are, and how much others used the
    # worker, is not the tenant's to see. current_job_id is its own oldest job; when
    # that is not the worker's oldest, when it started is not known here.
    shows_start = oldest is not None and oldest == worker.current_job_id
    return dataclasses.replace(
        worker,
        current_job_id=oldest,
        job_started_at=worker.job_started_at if shows_start else None,
        active_job_ids=mine,
        jobs_completed=0,
        last_used_at_ms=worker.started_at_ms,
    )


def _gpu_view(gpu: Gpu, headroom: int | None) -> Gpu:
    if headroom is None or gpu.vram_free_bytes <= headroom:
        return gpu
    return dataclasses.replace(
        gpu,
        vram_free_bytes=headroom,
        vram_allocated_bytes=gpu.vram_total_bytes - headroom,
    )


@dataclass(frozen=True)
class Dropped:
    proposer: str  # a tenant id, or "" for the platform scheduler
    action: Decision
    reason: str
    detail: str


def fairness_order(ctx: Context, proposers: Sequence[str], cycle: int) -> list[str]:
    """Who goes first: the smallest share of its concurrency quota in use (no quota:
    its running jobs), ties rotated by cycle so that nobody always wins them. The
    platform scheduler's decision for tenants without a scheduler goes last."""

    def share(tenant_id: str) -> float:
        tenant = ctx.tenants_by_id.get(tenant_id)
        if tenant is None:
            return 0.0
        if tenant.quota_max_concurrent_jobs:
            return tenant.concurrent_jobs / tenant.quota_max_concurrent_jobs
        return float(tenant.concurrent_jobs)

    tenants = sorted(p for p in proposers if p != PLATFORM)
    if tenants:
        turn = cycle % len(tenants)
        tenants = tenants[turn:] + tenants[:turn]
    ordered = sorted(tenants, key=share)  # stable: the rotation breaks ties
    return ordered + ([PLATFORM] if PLATFORM in proposers else [])


def arbitrate(
    ctx: Context, proposals: Mapping[str, Decision], *, cycle: int = 0, max_actions: int = 256
) -> tuple[Decision, list[Dropped]]:
    """One decision for the whole cluster from every proposer's decision.

    The platform scheduler decides on the whole cluster, so that it provisions workers
    for every tenant's queued models; its dispatches of jobs whose tenant has its own
    scheduler are left to that scheduler (dropped as "tenant_scheduled")."""
    order = fairness_order(ctx, list(proposals), cycle)
    queues: dict[str, list[Decision]] = {}
    dropped: list[Dropped] = []
    retry: list[int] = []
    for proposer in order:
        actions: list[Decision] = []
        for action in flatten(proposals[proposer]):
            if isinstance(action, Wait):
                if action.retry_after_ms is not None:
                    retry.append(action.retry_after_ms)
            elif isinstance(action, EvictWorker) and proposer != PLATFORM:
                dropped.append(Dropped(proposer, action, "tenant_cannot_evict",
                                       "workers are shared; only the platform evicts"))  # fmt: skip
            elif (
                isinstance(action, Dispatch)
                and proposer == PLATFORM
                and (job := ctx.jobs_by_id.get(action.job_id)) is not None
                and job.tenant_id in proposals
            ):
                detail = f"tenant {job.tenant_id!r} schedules its own jobs"
                dropped.append(Dropped(proposer, action, "tenant_scheduled", detail))
            elif (
                isinstance(action, Dispatch)
                and proposer != PLATFORM
                and (
                    (job := ctx.jobs_by_id.get(action.job_id)) is not None
                    and job.tenant_id != proposer
                )
            ):
                # Its view never shows it other tenants' jobs; this is defence in depth.
                detail = f"job {action.job_id!r} is not tenant {proposer!r}'s"
                dropped.append(Dropped(proposer, action, "foreign_job", detail))
            else:
                actions.append(action)
        queues[proposer] = actions
    interleaved: list[tuple[str, Decision]] = []
    while any(queues.values()):
        for proposer in order:
            if queues[proposer]:
                interleaved.append((proposer, queues[proposer].pop(0)))
    interleaved = interleaved[:max_actions]
    accepted, rejected = accept_in_order([a for _, a in interleaved], ctx)
    for rejection in rejected:
        proposer, action = interleaved[rejection.index]
        dropped.append(Dropped(proposer, action, rejection.reason, rejection.detail))
    if not accepted:
        return Wait(min(retry) if retry else None, reason="arbitrated"), dropped
    if len(accepted) == 1:
        return accepted[0], dropped
    return Batch(tuple(accepted), reason="arbitrated"), dropped
