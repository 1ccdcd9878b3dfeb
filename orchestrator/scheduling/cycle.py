"""What a scheduling cycle produces: the contracts between the engine and its callers.

`CycleResult` is what the engine hands back for a context: the decision (validated),
who made it (`source`), and why the user's scheduler did not, if it did not. The
engine only decides; applying the decision is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context
from orchestrator.domain.decision import Decision
from orchestrator.scheduling.validation import Rejection

# Who served a cycle: the user's scheduler, the platform scheduler (no user scheduler,
# or as the fallback), or nobody (both failed: the cycle waits, which loses nothing).
Source = Literal["user", "platform", "platform-fallback", "wait-fallback"]


@dataclass(frozen=True)
class Failure:
    """Why a scheduler did not produce a usable decision."""

    kind: str  # timeout, worker_crash, lua_error, sandbox_violation, memory_limit,
    # invalid_decision, rejected, load_error, circuit_open, unavailable, internal
    message: str
    traceback: str = ""
    rejections: tuple[Rejection, ...] = ()


@dataclass(frozen=True)
class ScriptLog:
    level: str
    message: str


@dataclass
class Attempt:
    """One scheduler's try at a cycle."""

    decision: Decision | None = None
    failure: Failure | None = None
    logs: list[ScriptLog] = field(default_factory=list)
    metrics: list[tuple[str, float]] = field(default_factory=list)
    worker_pid: int = 0
    context: Context | None = None
    call_s: float = 0.0  # in timed Schedule calls, resyncs excluded (hedge.py's lead)


@dataclass(frozen=True)
class CycleResult:
    decision: Decision
    source: Source
    context: Context  # the context the decision was made and validated on
    error: Failure | None = None  # why the user scheduler (or the platform) failed
    logs: tuple[ScriptLog, ...] = ()
    metrics: tuple[tuple[str, float], ...] = ()
    latency_ms: float = 0.0
    snapshot_hash: str = ""
    seq: int = 0
    worker_pid: int = 0

    def to_json(self) -> dict[str, Any]:
        """The dry-run's JSON: decision, source, error, logs, metrics, latency_ms."""
        error = self.error
        return {
            "decision": decisions.to_dict(self.decision),
            "source": self.source,
            "error": None
            if error is None
            else {
                "kind": error.kind,
                "message": error.message,
                "traceback": error.traceback,
                "rejections": [
                    {"index": r.index, "action": r.action, "reason": r.reason, "detail": r.detail}
                    for r in error.rejections
                ],
            },
            "logs": [{"level": line.level, "message": line.message} for line in self.logs],
            "metrics": [{"name": name, "value": value} for name, value in self.metrics],
            "latency_ms": round(self.latency_ms, 3),
        }
