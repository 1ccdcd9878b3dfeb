"""Counting and logging each cycle: the engine's metrics and its log events."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.domain import decision as decisions
from orchestrator.domain.decision import Decision, Wait
from orchestrator.scheduling.cycle import CycleResult, ScriptLog
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.support.log import get_logger
from orchestrator.support.rate import TokenBucket

log = get_logger("engine")


@dataclass(frozen=True)
class ScriptLogRate:
    """How much of one scheduler's ctx.log_* output reaches the service log.

    The sandbox bounds each call (`SandboxLimits.max_log_records`, `max_log_bytes`), but
    cycles run on every change: re-logging every record let one script write about 1 MB
    per 10 s. Records over the rate stay in the cycle's result (the dry run, the live
    view); the service log gets their count, once per interval.
    """

    burst: int = 100  # records at once: one call's full quota
    per_second: float = 5.0  # records per second, sustained
    max_record_chars: int = 512  # a longer record is cut in the service log
    summary_interval_s: float = 10.0  # at most one "N ... dropped" line per interval


class ScriptLogRelay:
    """Re-logs one scheduler's script log records in the service log, within its rate."""

    def __init__(
        self,
        rate: ScriptLogRate,
        metrics: EngineMetrics,
        tenant: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.clock = clock
        self._bucket = TokenBucket(rate.burst, rate.per_second, clock)
        self._rate_limited = metrics.script_logs_rate_limited.labels(tenant)
        # Tenant schedulers' lines say whose they are; the main scheduler's need not.
        self._whose = {"tenant": tenant} if tenant else {}
        self._dropped = 0  # since the last summary line
        self._summarised_at = clock()

    def relay(self, lines: Sequence[ScriptLog]) -> None:
        """Log what the rate allows of one cycle's records. Called every cycle, with
        records or without: a pending count is logged once its interval is over."""
        limit = self.rate.max_record_chars
        dropped = 0
        for line in lines:
            if not self._bucket.take():
                dropped += 1
                continue
            message = line.message
            if len(message) > limit:
                message = f"{message[:limit]}... ({len(message) - limit} more characters)"
            log.info("scheduler.script_log", level=line.level, message=message, **self._whose)
        if dropped:
            self._rate_limited.inc(dropped)
            self._dropped += dropped
        now = self.clock()
        if self._dropped and now - self._summarised_at >= self.rate.summary_interval_s:
            log.warning(
                "scheduler.script_logs_rate_limited",
                dropped=self._dropped,
                message=f"{self._dropped} script log records dropped in the last "
                f"{now - self._summarised_at:.0f} s (rate limit: bursts of {self.rate.burst}, "
                f"{self.rate.per_second:g} per second)",
                **self._whose,
            )
            self._dropped = 0
            self._summarised_at = now


def account(
    metrics: EngineMetrics,
    result: CycleResult,
    *,
    tenant: str,
    script_logs: ScriptLogRelay,
    has_user: bool,
    circuit_open: bool,
) -> None:
    """Count the cycle and log it: one event per decision, a warning per fallback, and
    the script's own records within the rate of `script_logs`. `tenant` is whose
    scheduler it is ("" for the main one)."""
    m = metrics
    # One increment per kind of action, not per action: a batch of 100 dispatches is
    # one call into prometheus_client (~1 µs each, with its lock), not 100.
    actions = Counter(action.action for action in decisions.flatten(result.decision))
    for action, count in actions.items():
        m.decision(action, result.source).inc(count)
    m.latency_for(result.source).observe(result.latency_ms / 1000)
    for name, value in result.metrics:
        m.record_custom(tenant, name, value)
    if has_user:
        m.circuit_open.labels("user").set(1 if circuit_open else 0)
    error = result.error
    if error is not None:
        failed = "user" if has_user else "platform"
        if error.kind == "timeout":
            m.timeouts.labels(failed).inc()
        elif error.kind != "circuit_open":
            m.errors.labels(failed, error.kind).inc()
        to = "platform" if result.source == "platform-fallback" else "wait"
        m.fallbacks.labels(to, error.kind).inc()
    script_logs.relay(result.logs)
    event = {
        "snapshot_hash": result.snapshot_hash[:16],
        "seq": result.seq,
        "source": result.source,
        "decision": Described(result.decision),
        "latency_ms": round(result.latency_ms, 3),
    }
    if error is None:
        # An idle wait every tick would drown the log; it stays visible at debug.
        quiet = isinstance(result.decision, Wait)
        (log.debug if quiet else log.info)("scheduler.decision", **event)
    else:
        log.warning(
            "scheduler.fallback",
            **event,
            kind=error.kind,
            reason=error.message,
            traceback=error.traceback or None,
        )


class Described:
    """A decision rendered as text only if a log line is actually written."""

    __slots__ = ("decision",)

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def __repr__(self) -> str:
        return decisions.describe(self.decision)

    __str__ = __repr__
