"""Prometheus metrics of the service: jobs, actions applied, cycles, pools and workers,
and what a gateway's users watch: time to first token, time per output token, tokens
in and out by tenant."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.domain.context import POOL_STATUSES, WORKER_STATUSES, Context
from orchestrator.domain.jobs import JobRecord

# Each tenant label value is a time series per model and priority in every histogram.
# In platform mode tenant ids are those of the tenants file; elsewhere a client names
# any tenant it likes in a submit, so the first MAX_TENANT_LABELS distinct ones are
# labelled by name and the rest count as "other", or a client could grow the
# /metrics page (and Prometheus) without bound.
MAX_TENANT_LABELS = 100
# LLM latencies: a first token in milliseconds (a short prompt, a warm worker) to a
# minute (a long prompt queued behind a batch); a token every millisecond (a small
# model on a big GPU) to seconds (a large one swapping).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2)


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
        by_job = ["model", "priority", "tenant"]
        # Both observed when a job completes, from its record (the attempt that
        # completed), so that /metrics and the job record say the same.
        self.ttft = Histogram(
            "orchestrator_job_ttft_seconds",
            "Time from submit to the first token of the attempt that completed (queueing "
            "and failed attempts included), of completed jobs; as the job record's ttft_ms.",
            by_job,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "orchestrator_job_tpot_seconds",
            "Time per output token after the first, of the attempt that completed, of "
            "completed jobs of two tokens or more; as the job record's tpot_ms.",
            by_job,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens_in = Counter(
            "orchestrator_tokens_in",
            "Prompt tokens of completed jobs (the worker's count, else bytes / 4), by tenant.",
            ["tenant"],
            registry=r,
        )
        self.tokens_out = Counter(
            "orchestrator_tokens_out", "Tokens generated by completed jobs, by tenant.",
            ["tenant"], registry=r,
        )  # fmt: skip
        self.prefix_tokens = Counter(
            "orchestrator_prefix_tokens",
            "Prompt tokens dispatched (kind=dispatched), and those the prefix index believed "
            "their worker held already (kind=matched): matched / dispatched is the cache "
            "reuse the routing expects (docs/RUNTIME-EXTENSIONS.md).",
            ["kind"],
            registry=r,
        )
        self._tenants: set[str] = set()  # tenant label values given out by name

    def tenant_label(self, tenant_id: str, *, known: bool) -> str:
        """The label value of a tenant: "none" without one; with ids a client chose
        (not `known` from the tenants file), "other" past MAX_TENANT_LABELS of them."""
        if not tenant_id:
            return "none"
        if known or tenant_id in self._tenants:
            return tenant_id
        if len(self._tenants) >= MAX_TENANT_LABELS:
            return "other"
        self._tenants.add(tenant_id)
        return tenant_id

    def completed(self, record: JobRecord, *, known_tenants: bool) -> None:
        """A job completed: its time to first token and per output token, its tokens in
        and out."""
        labels = self._job_labels(record, known_tenants)
        if record.ttft_ms is not None:
            self.ttft.labels(*labels).observe(max(0, record.ttft_ms) / 1000)
        if record.tpot_ms is not None:
            self.tpot.labels(*labels).observe(max(0.0, record.tpot_ms) / 1000)
        self.tokens_in.labels(labels[2]).inc(record.input_tokens)
        self.tokens_out.labels(labels[2]).inc(record.tokens_generated)

    def _job_labels(self, record: JobRecord, known_tenants: bool) -> tuple[str, str, str]:
        tenant = self.tenant_label(record.tenant_id or "", known=known_tenants)
        return record.model_ref, record.priority, tenant

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
