"""The latest cycles, for the live view: the last result and the decisions that did
something (or fell back). Idle waits are not kept: they would push out the rest."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from orchestrator.domain import decision as decisions
from orchestrator.domain.decision import Wait
from orchestrator.scheduling.cycle import CycleResult
from orchestrator.support.clock import now_ms

RECENT_DECISIONS = 50


class CycleHistory:
    def __init__(self, scheduler_name: Callable[[], str]) -> None:
        self.scheduler_name = scheduler_name  # the active scheduler's, when it decided
        self.last_result: CycleResult | None = None
        self.recent: deque[dict[str, object]] = deque(maxlen=RECENT_DECISIONS)

    def record(self, result: CycleResult) -> None:
        self.last_result = result
        if not isinstance(result.decision, Wait) or result.error is not None:
            self.recent.append({
                "seq": result.seq, "at_ms": now_ms(), "source": result.source,
                "decision": decisions.describe(result.decision),
                "latency_ms": round(result.latency_ms, 3),
                "error": result.error.kind if result.error else None,
                "scheduler": self.scheduler_name(),
            })  # fmt: skip
