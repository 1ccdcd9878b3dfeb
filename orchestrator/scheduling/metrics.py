"""Prometheus metrics of the scheduling engine, on a registry of their own.

One `EngineMetrics` per engine, so tests and several engines in one process do not
share counters. The service exposes `registry` at /metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Custom metrics from ctx.emit_metric become one gauge labelled by tenant and name.
# Each tenant's scheduler ("" for the main one) may make this many distinct names, so
# that a script cannot blow up the exposition, nor use up another tenant's share.
MAX_CUSTOM_METRICS = 200

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "scheduler_decisions",
            "Decisions served, by action and source.",
            ["action", "source"],
            registry=r,
        )
        self.errors = Counter(
            "scheduler_error",
            "Failed scheduler calls, by scheduler and kind.",
            ["scheduler", "kind"],
            registry=r,
        )
        self.timeouts = Counter(
            "scheduler_timeout",
            "Scheduler calls that ran past their deadline.",
            ["scheduler"],
            registry=r,
        )
        self.fallbacks = Counter(
            "scheduler_fallback",
            "Cycles served by a fallback, by the reason.",
            ["to", "reason"],
            registry=r,
        )
        self.rejections = Counter(
            "scheduler_rejected_decisions",
            "Decisions the validator rejected, by reason.",
            ["scheduler", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "scheduler_decision_latency_seconds",
            "Time from cycle start to decision.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_events = Counter(
            "sandbox_worker_events",
            "Sandbox worker lifecycle events.",
            ["scheduler", "event"],
            registry=r,
        )
        self.resyncs = Counter(
            "sandbox_resync",
            "Full snapshots sent to sandbox workers, by scheduler and when: in a cycle, "
            "before the timed call, or in the background (a new spare, one that fell "
            "behind).",
            ["scheduler", "when"],
            registry=r,
        )
        self.hedges = Counter(
            "scheduler_hedge",
            "Platform decisions computed beside a user scheduler slow to answer, by what "
            "became of them: started, used (the cycle fell back to it), discarded.",
            ["event"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "scheduler_circuit_open",
            "1 while the circuit breaker keeps the user scheduler out.",
            ["scheduler"],
            registry=r,
        )
        self.script_logs_dropped = Counter(
            "scheduler_script_logs_dropped",
            "ctx.log_* records over the per-call quota, by tenant.",
            ["tenant"],
            registry=r,
        )
        self.script_logs_rate_limited = Counter(
            "scheduler_script_logs_rate_limited",
            "ctx.log_* records kept out of the service log by the scheduler's rate limit.",
            ["tenant"],
            registry=r,
        )
        self.custom = Gauge(
            "scheduler_custom_metric",
            "Values sent by schedulers through ctx.emit_metric, by tenant ('' for the main one).",
            ["tenant", "name"],
            registry=r,
        )
        self.custom_dropped = Counter(
            "scheduler_custom_metrics_dropped",
            "ctx.emit_metric samples over the per-call quota or the tenant's name cap.",
            ["tenant"],
            registry=r,
        )
        self.reloads = Counter(
            "scheduler_reload",
            "Scheduler deployments and reloads, by result.",
            ["result"],
            registry=r,
        )
        self._custom_names: dict[str, set[str]] = {}  # by tenant
        # labels() costs microseconds per call; the hot path reuses the children.
        self._decision_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def decision(self, action: str, source: str) -> Any:
        """The decisions counter for (action, source), looked up once per pair."""
        key = (action, source)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(action, source)
        return child

    def latency_for(self, source: str) -> Any:
        child = self._latency_children.get(source)
        if child is None:
            child = self._latency_children[source] = self.latency.labels(source)
        return child

    def record_custom(self, tenant: str, name: str, value: float) -> None:
        """A ctx.emit_metric sample of `tenant`'s scheduler ("" for the main one)."""
        names = self._custom_names.setdefault(tenant, set())
        if name not in names and len(names) >= MAX_CUSTOM_METRICS:
            self.custom_dropped.labels(tenant).inc()
            return
        names.add(name)
        self.custom.labels(tenant, name).set(value)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (0 when absent); for status pages and tests."""
        sample = self.registry.get_sample_value(name, labels)
        return float(sample) if sample is not None else 0.0
