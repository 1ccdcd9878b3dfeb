"""The sample context with batched servers (docs/ARCHITECTURE.md D27), for the tests
that hold the validator, the built-ins, platform.lua and YAML policies to slots."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from orchestrator.domain.context import Context, Job, Worker, derive_metrics
from orchestrator.domain.samples import LLAMA_8B, sample_context

# The sample's two llama-8b workers: worker-1 on a GPU at 35 % utilization, worker-4
# on one at 10 %.
LLAMA_WORKERS = ("worker-1", "worker-4")


def running(worker: Worker, busy: int, prefix: str = "run") -> Worker:
    """`worker` running `busy` jobs ("<prefix>-<worker id>-<n>"), oldest first, as the
    live state shows it: busy only when every slot is taken."""
    active = tuple(f"{prefix}-{worker.id}-{n}" for n in range(busy))
    return dataclasses.replace(
        worker,
        status="busy" if busy >= worker.slots_total else "ready",
        slots_busy=busy,
        active_job_ids=active,
        current_job_id=active[0] if active else None,
        job_started_at=worker.last_used_at_ms if active else None,
    )


def slotted_context(
    slots: int = 4,
    busy: Mapping[str, int] | None = None,
    extra_jobs: int = 0,
    *,
    platform_mode: bool = False,
) -> Context:
    """The sample with `slots` slots on both llama-8b workers, `busy` of them taken per
    worker id, and `extra_jobs` more llama-8b batch jobs ("extra-0", ...) queued after
    the sample's, in that order."""
    ctx = sample_context(platform_mode=platform_mode)
    taken = busy or {}
    pools = tuple(
        dataclasses.replace(
            pool,
            workers=tuple(
                running(dataclasses.replace(w, slots_total=slots), taken.get(w.id, 0))
                if w.id in LLAMA_WORKERS
                else w
                for w in pool.workers
            ),
        )
        for pool in ctx.pools
    )
    template = ctx.jobs_by_id["job-3"]
    extra = tuple(
        dataclasses.replace(
            template,
            id=f"extra-{i}",
            model_ref=LLAMA_8B,
            seed=None,
            session_id=None,
            queued_at=ctx.now_ms - 1000 + i,
            created_at=ctx.now_ms - 2000 + i,
        )
        for i in range(extra_jobs)
    )
    queue = tuple(sorted((*ctx.queue, *extra), key=Job.queue_key))
    return dataclasses.replace(
        ctx, queue=queue, pools=pools, metrics=derive_metrics(queue, pools, ctx.now_ms)
    )
