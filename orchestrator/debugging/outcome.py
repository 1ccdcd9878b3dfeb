"""How a debugged cycle ended, as production would take it.

`cycle_outcome` turns the end of a debugged Schedule call into the decision that
stands and the lines that explain it. The script's decision stands when it returned
one that validates against the context; otherwise (it raised, ran past its deadline,
crashed, returned none or an invalid one) production falls back, and so does the
outcome: the decision is the `Fallback`'s, the platform scheduler's on the same
context, and the last line says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from orchestrator.debugging.debug_link import CycleEnd
from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context
from orchestrator.scheduling.attempt import ERROR_KINDS
from orchestrator.scheduling.validation import validate
from orchestrator.wire import decision as decision_codec


@dataclass(frozen=True)
class FallbackDecision:
    decision: decisions.Decision
    source: str  # "platform-fallback", or "wait-fallback" when the platform failed too


class Fallback(Protocol):
    """What production decides when the user's scheduler fails on `ctx`."""

    async def decide(self, ctx: Context) -> FallbackDecision: ...


@dataclass(frozen=True)
class Outcome:
    decision: decisions.Decision
    source: str  # "user", "platform-fallback" or "wait-fallback"
    lines: tuple[str, ...]  # the script's logs, a traceback, then the verdict

    @property
    def valid(self) -> bool:
        """The script's own decision stands."""
        return self.source == "user"


async def cycle_outcome(
    end: CycleEnd,
    ctx: Context,
    fallback: Fallback,
    *,
    deadline_ms: int,
    max_batch_actions: int,
) -> Outcome:
    reply = end.reply
    lines = [f"[{log.level}] {log.message}" for log in reply.logs] if reply else []
    problem = ""
    if end.killed_for == "deadline":
        problem = (
            f"the scheduler ran past its {deadline_ms} ms deadline (running time; stops excluded)"
        )
    elif reply is None:
        problem = f"the sandbox worker failed: {end.failure}"
    elif reply.HasField("error"):
        kind = ERROR_KINDS.get(reply.error.kind, "internal")
        problem = f"the scheduler failed ({kind}): {reply.error.message}"
        lines.extend(reply.error.traceback.removeprefix(reply.error.message).strip().splitlines())
    elif not reply.HasField("decision"):
        problem = "the scheduler returned no decision"
    else:
        decision = decision_codec.from_proto(reply.decision)
        verdict = validate(decision, ctx, max_batch_actions=max_batch_actions)
        if verdict.ok:
            lines.append(f"decision (valid): {decisions.describe(decision)}")
            return Outcome(decision, "user", tuple(lines))
        problem = f"its decision {decisions.describe(decision)} is invalid: {verdict.summary()}"
    taken = await fallback.decide(ctx)
    to = "the platform scheduler" + (
        ", which failed too" if taken.source == "wait-fallback" else ""
    )
    lines.append(f"{problem}; production falls back to {to}: {decisions.describe(taken.decision)}")
    return Outcome(taken.decision, taken.source, tuple(lines))
