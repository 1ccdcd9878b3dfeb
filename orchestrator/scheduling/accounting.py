"""Counting and logging each cycle: the engine's metrics and its log events."""

from __future__ import annotations

from orchestrator.domain import decision as decisions
from orchestrator.domain.decision import Decision, Wait
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.scheduling.metrics import EngineMetrics
from orchestrator.support.log import get_logger

log = get_logger("engine")


def account(
    metrics: EngineMetrics, result: CycleResult, *, has_user: bool, circuit_open: bool
) -> None:
    """Count the cycle and log it: one event per decision, a warning per fallback."""
    m = metrics
    for action in decisions.flatten(result.decision):
        m.decision(action.action, result.source).inc()
    m.latency_for(result.source).observe(result.latency_ms / 1000)
    for name, value in result.metrics:
        m.record_custom(name, value)
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
    for line in result.logs:
        log.info("scheduler.script_log", level=line.level, message=line.message)
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
