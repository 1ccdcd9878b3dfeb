"""Prometheus metrics of the service: jobs, actions applied, cycles, pools and workers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.domain.context import POOL_STATUSES, WORKER_STATUSES, Context


class ServiceMetrics:
    """The service's own metrics, on the engine's registry (one /metrics page)."""

    def __init__(self, registry: CollectorRegistry, *, cycle_stall_s: float) -> None:
        r = registry
        self.queue_depth = Gauge("orchestrator_queue_depth", "Jobs waiting.", registry=r)
        self.running = Gauge("orchestrator_jobs_running", "Jobs dispatched or running.", registry=r)
        self.submitted = Counter("orchestrator_jobs_submitted", "Jobs accepted.", registry=r)
        self.rejected = Counter(
            "orchestrator_jobs_rejected", "Submits refused, by field.", ["field"], registry=r
        )
        self.limited = Counter(
            "orchestrator_jobs_limited",
            "Submits refused by a bound (service/admission.py): queue_capacity, "
            "queued_prompt_bytes, or a tenant's tenant_queued_jobs, tenant_queued_prompt_bytes, "
            "tenant_requests_per_minute, tenant_tokens_per_minute.",
            ["limit"],
            registry=r,
        )
        self.finished = Counter(
            "orchestrator_jobs_finished", "Jobs that ended, by state.", ["state"], registry=r
        )
        self.retried = Counter("orchestrator_jobs_retried", "Job attempts retried.", registry=r)
        self.applied = Counter(
            "orchestrator_actions_applied",
            "Decision actions applied or skipped as stale.",
            ["action", "result"],
            registry=r,
        )
        self.dispatch_wait = Histogram(
            "orchestrator_submit_to_dispatch_seconds",
            "Time from submit to dispatch.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.cycles = Counter("orchestrator_cycles", "Scheduling cycles run.", registry=r)
        self.cycle_stalls = Counter(
            "orchestrator_cycle_stalls",
            f"Cycles cancelled after {cycle_stall_s:.0f} s (each is logged with its stack).",
            registry=r,
        )
        self.cycle_failures = Counter(
            "orchestrator_cycle_failures",
            "Cycles that raised or stalled instead of deciding (each is logged).",
            registry=r,
        )
        self.pool_refusals = Counter(
            "orchestrator_pool_refusals",
            "PoolService registrations and heartbeats refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.pools_expired = Counter(
            "orchestrator_pools_expired",
            "Remote pools removed after pools.expire_after_ms without a heartbeat.",
            registry=r,
        )
        self.arbitration_dropped = Counter(
            "orchestrator_arbitration_dropped",
            "Actions proposed by tenant schedulers (or the platform's) dropped in arbitration.",
            ["proposer", "reason"],
            registry=r,
        )
        self.shadow_cycles = Counter(
            "orchestrator_shadow_cycles", "Cycles decided by the shadow scheduler.", registry=r
        )
        self.shadow_differing = Counter(
            "orchestrator_shadow_differing",
            "Shadow decisions that differ from the executed one, by kind.",
            ["kind"],
            registry=r,
        )
        self.workers = Gauge(
            "orchestrator_workers", "Inference workers by status.", ["status"], registry=r
        )
        self.pools = Gauge("orchestrator_pools", "Pools by status.", ["status"], registry=r)

    def update_gauges(self, ctx: Context, *, queue_depth: int, running: int) -> None:
        """The queue, running jobs, workers and pools as the cycle left them."""
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        for status in WORKER_STATUSES:
            self.workers.labels(status).set(
                sum(1 for p in ctx.pools for w in p.workers if w.status == status)
            )
        for status in POOL_STATUSES:
            self.pools.labels(status).set(sum(1 for p in ctx.pools if p.status == status))
