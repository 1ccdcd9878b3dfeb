"""A small pure-Python interpreter of YAML policies: the compiler's reference.

It decides what the compiled Lua decides, from the same `Policy`, on a `Context`,
without a sandbox. The property test holds the two to identical decisions on
random contexts. `use: platform-scheduler` is outside its reach: it returns None
for the cycles where that rule would act.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.context import CatalogModel, Context, Gpu, Job, Pool, Worker
from orchestrator.domain.decision import Decision, Dispatch, EvictWorker, StartWorker, Wait
from orchestrator.domain.prefix_queries import prefix_match, session_worker
from orchestrator.policy.compile import CACHE_WEIGHT, LOAD_WEIGHT, split
from orchestrator.policy.parse import Condition, Policy, Rule, Test
from orchestrator.scheduling.validation import (
    check_gpu_compatibility,
    check_job_fit,
    check_tenant_quota,
)


class NeedsPlatform(Exception):
    """The policy hands this cycle to the platform scheduler."""


@dataclass
class Scope:
    """The records a condition may read; missing ones read as empty."""

    ctx: Context
    job: Job | None = None
    worker: Worker | None = None
    pool: Pool | None = None
    gpu: Gpu | None = None

    def get(self, field: str) -> Any:
        scope, _, name = field.partition(".")
        ctx = self.ctx
        if scope == "metrics":
            return getattr(ctx.metrics, name, None)
        if scope == "job":
            if self.job is None:
                return None
            if name == "wait_time_ms":  # never negative, as in the sandbox
                return max(0, ctx.now_ms - self.job.queued_at)
            if name == "prompt_blocks":  # scripts see the count, never the hashes
                return len(self.job.block_hashes)
            return getattr(self.job, name, None)
        if scope == "tenant":
            tenant = ctx.tenants_by_id.get(self.job.tenant_id or "") if self.job else None
            return getattr(tenant, name, None) if tenant is not None else None
        if scope == "model":
            model: CatalogModel | None = ctx.catalog.get(self.job.model_ref) if self.job else None
            return getattr(model, name, None) if model is not None else None
        if scope == "worker":
            if self.worker is None:
                return None
            if name == "uptime_ms":
                return ctx.now_ms - self.worker.started_at_ms
            if name == "pool_id":
                return self.pool.id if self.pool else None
            return getattr(self.worker, name, None)
        if scope == "pool":
            if self.pool is None:
                return None
            if name == "heartbeat_age_ms":
                return ctx.now_ms - self.pool.last_heartbeat_ms
            if name == "vram_utilization":
                total = sum(g.vram_total_bytes for g in self.pool.gpus)
                used = sum(g.vram_allocated_bytes for g in self.pool.gpus)
                return used / total if total else 0
            return getattr(self.pool, name, None)
        return getattr(self.gpu, name, None) if self.gpu is not None else None


def holds(cond: Condition, scope: Scope) -> bool:
    if cond.kind == "always":
        return True
    if cond.kind == "test":
        assert cond.test is not None
        return _test(cond.test, scope.get(cond.test.field))
    if cond.kind == "not":
        return not holds(cond.children[0], scope)
    results = (holds(c, scope) for c in cond.children)
    return all(results) if cond.kind == "all" else any(results)


def _test(test: Test, value: Any) -> bool:
    op, want = test.op, test.value
    if op == "exists":
        return bool((value is not None) == want)
    if op == "eq":
        return bool(value == want)
    if op == "ne":
        return bool(value != want)
    if op == "in":
        return bool(value in want)
    if op == "not_in":
        return bool(value not in want)
    if op == "contains":
        return isinstance(value, str) and want in value
    if op == "starts_with":
        return isinstance(value, str) and value.startswith(want)
    if value is None:
        return False
    compare: dict[str, Callable[[Any, Any], bool]] = {
        "gt": lambda a, b: a > b, "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b,
    }  # fmt: skip
    return bool(compare[op](value, want))


def _pools(ctx: Context) -> list[Pool]:
    return sorted(ctx.pools, key=lambda p: p.id)


def _workers(ctx: Context) -> list[tuple[Pool, Worker]]:
    return [(p, w) for p in _pools(ctx) for w in sorted(p.workers, key=lambda w: w.id)]


def _first_gpu(pool: Pool, worker: Worker) -> Gpu | None:
    return pool.gpu(worker.gpu_ids[0]) if worker.gpu_ids else None


def _gpus_of(pool: Pool, worker: Worker) -> list[Gpu]:
    return [g for gpu_id in worker.gpu_ids if (g := pool.gpu(gpu_id)) is not None]


def _choose(
    ctx: Context, job: Job, found: list[tuple[Pool, Worker]], selection: str
) -> Worker | None:
    """The worker `selection` takes for `job` among the candidates `found`, as the
    compiled Lua's built-in or helper does; None when there is none."""
    if not found:
        return None
    if selection == "prefix-affinity":
        # The same arithmetic, in the same order, as the compiled prefix_pick: equal
        # doubles on both sides, so ties break alike (by id).
        prompt = max(1, job.prompt_tokens)

        def score(worker: Worker) -> float:
            tokens = prefix_match(ctx, job, worker.id)[0]
            busy = worker.slots_busy / worker.slots_total
            return CACHE_WEIGHT * (tokens / prompt) - LOAD_WEIGHT * busy

        return min((w for _, w in found), key=lambda w: (-score(w), w.id))
    if selection == "session-affinity":
        home = session_worker(ctx, job)
        stay = [w for _, w in found if home is not None and w.id == home[1].id]
        return stay[0] if stay else _choose(ctx, job, found, "least-loaded")
    if selection == "ready":
        return found[0][1]
    if selection == "round-robin":  # a fresh cursor: the lowest id
        return min((w for _, w in found), key=lambda w: w.id)

    def key(item: tuple[Pool, Worker]) -> tuple[float, float, str]:
        pool, worker = item
        gpus = _gpus_of(pool, worker)
        if selection == "most-vram-free":
            return (0.0, -sum(g.vram_free_bytes for g in gpus), worker.id)
        # Least loaded: the smallest share of slots busy, then GPU utilization (D27).
        load = sum(g.utilization_percent for g in gpus) / len(gpus) if gpus else 0.0
        return (worker.slots_busy / worker.slots_total, load, worker.id)

    return min(found, key=key)[1]


def _quota_ok(ctx: Context, job: Job) -> bool:
    """ctx.check_tenant_quota, as the validator applies it."""
    if job.tenant_id is None:
        return True
    tenant = ctx.tenants_by_id.get(job.tenant_id)
    if tenant is None:
        return not ctx.config.platform_mode
    return check_tenant_quota(tenant, job)[0]


def _served(ctx: Context, model_ref: str) -> bool:
    ref = ctx.catalog.resolve(model_ref)
    return any(
        ctx.catalog.resolve(w.model_ref) == ref and w.status != "failed" for _, w in _workers(ctx)
    )


def _place(
    ctx: Context, model_ref: str, pool_id: str, ok: Condition, base: Scope
) -> tuple[Pool, Gpu] | None:
    model = ctx.catalog.get(model_ref)
    if model is None:
        return None
    best: tuple[Pool, Gpu] | None = None
    for pool in _pools(ctx):
        if pool.status == "offline" or (pool_id and pool.id != pool_id):
            continue
        for gpu in sorted(pool.gpus, key=lambda g: g.id):
            fits = gpu.vram_free_bytes >= model.vram_required_bytes
            compatible = check_gpu_compatibility(gpu, model)[0]
            passes = holds(ok, Scope(ctx, base.job, None, pool, gpu))
            better = best is None or gpu.vram_free_bytes > best[1].vram_free_bytes
            if fits and compatible and passes and better:
                best = (pool, gpu)
    return best


def _job_action(rule: Rule, ctx: Context, job: Job, place: Condition) -> Decision | None:
    action = rule.action
    if action.kind == "dispatch":
        ref = ctx.catalog.resolve(job.model_ref)
        found = [
            (p, w) for p, w in _workers(ctx)
            if w.status == "ready" and w.slots_free > 0 and p.status != "offline"
            and ctx.catalog.resolve(w.model_ref) == ref
            and holds(place, Scope(ctx, job, w, p, _first_gpu(p, w)))
        ]  # fmt: skip
        worker = _choose(ctx, job, found, action.selection)
        if worker is not None and check_job_fit(ctx, job, worker)[0] and _quota_ok(ctx, job):
            return Dispatch(job.id, worker.id, rule=rule.name)
        return None
    if action.kind == "wait":
        return Wait(action.duration_ms, reason=f"held by rule: {job.id}", rule=rule.name)
    if action.kind == "use":
        raise NeedsPlatform
    model = action.model or job.model_ref
    if _served(ctx, model):
        return None
    spot = _place(ctx, model, action.pool_id, place, Scope(ctx, job))
    if spot is None:
        return None
    return StartWorker(
        spot[0].id, spot[1].id, ctx.catalog.resolve(model), reason="unserved_model", rule=rule.name
    )


def _global_action(rule: Rule, ctx: Context, place: Condition) -> Decision | None:
    action = rule.action
    if action.kind == "wait":
        return Wait(action.duration_ms, reason=f"rule {rule.name}", rule=rule.name)
    if action.kind == "use":
        raise NeedsPlatform
    if action.kind == "evict":
        idle = [
            (p, w) for p, w in _workers(ctx)
            if w.status in ("ready", "failed") and w.slots_busy == 0 and w.current_job_id is None
            and (not action.worker_id or w.id == action.worker_id)
            and holds(place, Scope(ctx, None, w, p, _first_gpu(p, w)))
        ]  # fmt: skip
        if not idle:
            return None

        def key(item: tuple[Pool, Worker]) -> tuple[float, str]:
            w = item[1]
            if action.policy == "lfu":
                hours = max(ctx.now_ms - w.started_at_ms, 1) / 3_600_000
                return (w.jobs_completed / hours, w.id)
            return (w.last_used_at_ms, w.id)

        victim = min(idle, key=key)[1]
        return EvictWorker(victim.id, reason=f"{action.policy}_eviction", rule=rule.name)
    if _served(ctx, action.model):
        return None
    spot = _place(ctx, action.model, action.pool_id, place, Scope(ctx))
    if spot is None:
        return None
    return StartWorker(
        spot[0].id, spot[1].id, ctx.catalog.resolve(action.model), reason="preload", rule=rule.name
    )


def decide(policy: Policy, ctx: Context) -> Decision | None:
    """The decision the compiled policy makes on `ctx`; None if the platform would decide."""
    queue = sorted(ctx.queue, key=Job.queue_key)
    try:
        for rule in policy.rules:
            gate, place = split(rule.condition)
            if rule.job_scoped:
                for job in queue:
                    if holds(gate, Scope(ctx, job)):
                        decision = _job_action(rule, ctx, job, place)
                        if decision is not None:
                            return decision
            elif holds(gate, Scope(ctx)):
                decision = _global_action(rule, ctx, place)
                if decision is not None:
                    return decision
    except NeedsPlatform:
        return None
    return Wait(reason="no_rule_matched")
