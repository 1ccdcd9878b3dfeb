"""Runs one corpus case through a real engine (real sandbox worker processes) and
checks everything the corpus promises: the outcome, nothing leaked or persisted,
the core still scheduling, and the metrics counting it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.domain.samples import sample_context
from orchestrator.scheduling.engine import CycleResult, EngineOptions, SchedulingEngine
from orchestrator.scheduling.validation import validate
from tests.security.corpus import Case

SECRET_ENV = "ORCH_ESCAPE_SECRET"
SECRET = "s3cret-7f1e9a-never-leaves-the-core"


@dataclass
class Outcome:
    case: Case
    language: str
    observed: str  # the outcome kind of the hostile cycle
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def observed_kind(result: CycleResult, second: CycleResult) -> str:
    if result.error is None:
        ok = result.source == "user" and second.source == "user"
        return (
            "contained"
            if ok and second.decision.reason == "safe"
            else f"ran ({second.decision.reason})"
        )
    return "violation" if result.error.kind == "sandbox_violation" else result.error.kind


def _texts(*results: CycleResult) -> str:
    parts = []
    for r in results:
        parts += [line.message for line in r.logs]
        parts.append(repr(r.decision))
        if r.error is not None:
            parts += [r.error.message, r.error.traceback]
    return "\n".join(parts)


def _sample(engine: SchedulingEngine, name: str, labels: dict[str, str]) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


async def run_case(case: Case, language: str, workdir: Path) -> Outcome:
    marker = workdir / "escaped"
    source = case.script.replace("MARKER", str(marker))
    os.environ[SECRET_ENV] = SECRET  # what a leaky worker would inherit
    runtime_dir = workdir / "rt"
    runtime_dir.mkdir(parents=True, exist_ok=True)
    # No spares: a case needs one user and one platform worker, and each spawn costs
    # a Python start-up; spare promotion is tested in test_engine.
    options = EngineOptions(runtime_dir=runtime_dir, user_spares=0, platform_spares=0)
    ctx = sample_context()
    async with SchedulingEngine(
        user_source=source, user_name=f"{case.name}.lua", language=language, options=options
    ) as engine:
        user = engine.user.active if engine.user is not None else None
        pid = user.pid if user is not None else 0
        first = await engine.schedule(ctx)
        second = await engine.schedule(dataclasses.replace(ctx, now_ms=ctx.now_ms + 1000))
        outcome = Outcome(case, language, observed_kind(first, second))
        problems = outcome.problems
        if outcome.observed not in case.expect:
            detail = first.error.message[:200] if first.error else second.decision.reason
            problems.append(f"expected {sorted(case.expect)}, got {outcome.observed}: {detail}")
        # The core kept scheduling: both cycles produced a decision valid on their context.
        for result in (first, second):
            verdict = validate(result.decision, result.context)
            if not verdict.ok or result.source == "wait-fallback":
                problems.append(f"cycle not served: {result.source} {verdict.summary()}")
        # Nothing leaked, nothing persisted outside the worker.
        if marker.exists():
            problems.append(f"marker file created: {marker}")
        if SECRET in _texts(first, second):
            problems.append("the environment secret reached the core")
        # Metrics counted the failure.
        if first.error is not None:
            kind = first.error.kind
            if kind == "timeout":
                counted = _sample(engine, "scheduler_timeout_total", {"scheduler": "user"})
            else:
                counted = _sample(
                    engine, "scheduler_error_total", {"scheduler": "user", "kind": kind}
                )
            fallbacks = _sample(
                engine, "scheduler_fallback_total", {"to": "platform", "reason": kind}
            )
            if counted < 1 or fallbacks < 1:
                problems.append(f"metrics did not count the {kind}: {counted}, {fallbacks}")
            if kind in ("sandbox_violation", "timeout") and pid and not await _gone(pid):
                problems.append(f"worker {pid} still running after a {kind}")
    return outcome


async def _gone(pid: int, within_s: float = 2.0) -> bool:
    """A retired or killed worker exits (or is a zombie) within a moment of the cycle."""
    for _ in range(int(within_s / 0.05)):
        try:
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except OSError:
            return True
        await asyncio.sleep(0.05)
    return False
