"""Validation before deploy (docs/ARCHITECTURE.md, D13): syntax, semantics, speed.

Syntax: a YAML policy compiles, a Lua scheduler loads in a real sandbox worker.
Semantics: on every context of the validation bank (empty queue, no workers, all
busy, quotas exceeded, pools offline, 10,000 jobs, the sample) the scheduler itself
decides (no fallback) and the decision passes the decision validator.
Speed: after the bank's state has been sent once, the p99 of further cycles on it
stays within the budget; when it does not, the report lists the hottest lines of a
profile on the slowest context (`speed.hot_lines`, orchestrator/debugging/diagnose.py).
The result is a structured, JSON-ready report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.settings import SchedulerConfig
from orchestrator.debugging.diagnose import diagnose, instrumented_timeout_s, time_in_schedule
from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Context, Tenant, Worker
from orchestrator.domain.errors import ErrorCode, OrchestratorError, UsageError
from orchestrator.domain.samples import sample_context, synthetic_cluster
from orchestrator.policy.compile import compile_yaml
from orchestrator.policy.parse import PolicyError, parse_policy
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine

SPEED_CYCLES = 12


def detect_language(source: str, name: str = "") -> str:
    """ "yaml" or "lua", from the file name, else from the text."""
    if name.endswith((".yaml", ".yml")):
        return "yaml"
    if name.endswith(".lua"):
        return "lua"
    return "yaml" if re.match(r"\s*(#.*\n\s*)*scheduler\s*:", source) else "lua"


def to_lua(source: str, language: str, name: str) -> str:
    """The Lua a policy runs as (YAML compiles; Lua is itself). Raises PolicyError."""
    return compile_yaml(source, name) if language == "yaml" else source


def read_policy(path: Path) -> tuple[str, str]:
    """(source, language) of a policy file; usage errors for unreadable files."""
    try:
        source = path.read_text()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file (Lua bytecode is not accepted)") from None
    return source, detect_language(source, path.name)


def policy_version(source: str, language: str, name: str) -> str:
    """The semver of a policy: `version:` in YAML, the `-- @version` line in Lua."""
    if language == "yaml":
        try:
            return parse_policy(source, name).version
        except PolicyError:
            return ""
    match = re.search(r"^--\s*@version\s+(\S+)", source, re.MULTILINE)
    return match.group(1) if match else ""


def _every_slot_busy(worker: Worker) -> Worker:
    """`worker` running a job in each of its slots, as the live state shows it."""
    first = f"running-{worker.id}"
    running = (first, *(f"{first}-{n}" for n in range(1, worker.slots_total)))
    return dataclasses.replace(
        worker,
        status="busy",
        current_job_id=first,
        slots_busy=len(running),
        active_job_ids=running,
    )


def _empty_queue() -> Context:
    return dataclasses.replace(sample_context(), queue=())


def _no_workers() -> Context:
    sample = sample_context()
    return dataclasses.replace(
        sample, pools=tuple(dataclasses.replace(p, workers=()) for p in sample.pools)
    )


def _all_busy() -> Context:
    sample = sample_context()
    return dataclasses.replace(
        sample,
        pools=tuple(
            dataclasses.replace(pool, workers=tuple(_every_slot_busy(w) for w in pool.workers))
            for pool in sample.pools
        ),
    )


def _quota_exceeded() -> Context:
    platform = sample_context(platform_mode=True)
    exhausted = tuple(
        dataclasses.replace(t, quota_exceeded=True, tokens_used_today=t.quota_tokens_daily or 0)
        for t in platform.tenants
    )
    return dataclasses.replace(platform, tenants=exhausted)


def _offline_pools() -> Context:
    sample = sample_context()
    return dataclasses.replace(
        sample, pools=tuple(dataclasses.replace(p, status="offline") for p in sample.pools)
    )


def _no_tenants_known() -> Context:
    return dataclasses.replace(
        sample_context(platform_mode=True), tenants=(Tenant("someone-else"),)
    )


def _ten_thousand_jobs() -> Context:
    return synthetic_cluster(10_000, 64)


# The validation bank, by name: the contexts every policy must handle. Built on
# demand: the 10,000-job context takes a while, and `scheduler test --bank` wants one.
BANK: dict[str, Callable[[], Context]] = {
    "sample": sample_context,
    "empty-queue": _empty_queue,
    "no-workers": _no_workers,
    "all-busy": _all_busy,
    "quota-exceeded": _quota_exceeded,
    "offline-pools": _offline_pools,
    "no-tenants-known": _no_tenants_known,
    "10k-jobs": _ten_thousand_jobs,
}
LARGEST_BANK_CONTEXT = "10k-jobs"  # the one `scheduler validate --profile` profiles
HOT_LINES = 5  # lines a failed speed check lists, from a profile of its slowest context
PROFILE_SLOWDOWN = 200  # the most the profiler's hooks are expected to slow a script down
MAX_PROFILE_TIMEOUT_S = 60.0


def bank() -> list[tuple[str, Context]]:
    """The validation bank: the contexts every policy must handle."""
    return [(label, build()) for label, build in BANK.items()]


def bank_context(name: str) -> Context:
    """One context of the bank, by name; UsageError for a name it does not hold."""
    if name not in BANK:
        raise UsageError(f"no bank context {name!r}; the bank holds: {', '.join(BANK)}")
    return BANK[name]()


@dataclass
class CaseResult:
    context: str
    ok: bool
    source: str
    decision: dict[str, Any] | None
    error: str = ""
    latency_ms: float = 0.0


@dataclass
class Report:
    name: str
    language: str
    sha256: str
    version: str = ""
    ok: bool = False
    syntax: dict[str, Any] = field(default_factory=dict)
    semantics: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    lua: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("lua")
        return out

    def summary(self) -> str:
        if self.ok:
            return (
                f"valid: {len(self.semantics.get('cases', []))} bank contexts decided, "
                f"p99 {self.speed.get('p99_ms', 0):.2f} ms within {self.speed.get('budget_ms')} ms"
            )
        for stage in (self.syntax, self.semantics, self.speed):
            if stage and not stage.get("ok"):
                return f"invalid ({stage.get('stage')}): {stage.get('error')}"
        return "invalid"


class ValidationFailedError(OrchestratorError):
    """A scheduler was refused: the report says at which stage and why."""

    code = ErrorCode.POLICY_REJECTED

    def __init__(self, report: Report) -> None:
        super().__init__(report.summary())
        self.report = report

    def details(self) -> dict[str, object]:
        return {"report": self.report.to_dict()}


async def validate_policy(
    source: str,
    name: str = "policy",
    language: str | None = None,
    *,
    scheduler: SchedulerConfig = SchedulerConfig(),
) -> Report:
    """Run all three stages; stops at the first that fails. The budget is the
    scheduler's `deadline_ms`; its sandboxes are configured as `scheduler` says.

    A failed speed check says where the time goes: `report.speed["hot_lines"]`, the
    hottest lines of a profile on the slowest bank context (a passing one pays nothing).
    """
    report = await _run_stages(source, name, language, scheduler)
    if report.speed and not report.speed["ok"]:
        await _profile_slowest(report, scheduler)
    return report


async def _profile_slowest(report: Report, scheduler: SchedulerConfig) -> None:
    """Add the hottest lines of a profile on the bank context the script is slowest on
    (timed anew: the speed stage stops early and its latencies include the transport)."""
    try:
        times = await time_in_schedule(
            report.lua,
            report.name,
            dict(bank()),
            deadline_ms=scheduler.deadline_ms,
        )
        slowest = max(times, key=lambda label: times[label])
        # One profiled and one plain run: the script is already known to be slow, and
        # hooks may slow it a hundredfold, which the usual timeout would not allow.
        timeout_s = min(
            MAX_PROFILE_TIMEOUT_S,
            max(
                instrumented_timeout_s(scheduler.deadline_ms),
                times[slowest] * PROFILE_SLOWDOWN / 1000,
            ),
        )
        diagnosis = await diagnose(
            report.lua,
            report.name,
            bank_context(slowest),
            instrument="profile",
            deadline_ms=scheduler.deadline_ms,
            rounds=1,
            timeout_s=timeout_s,
        )
    except OrchestratorError as exc:  # no worker, or one that no longer loads the script
        report.speed["profile_error"] = str(exc)
        return
    report.speed["profiled_context"] = slowest
    report.speed["hot_lines"] = [line.to_json() for line in diagnosis.hot_lines(HOT_LINES)]
    if diagnosis.error is not None:
        report.speed["profile_error"] = f"{diagnosis.error.kind}: {diagnosis.error.message}"


async def _run_stages(
    source: str, name: str, language: str | None, scheduler: SchedulerConfig
) -> Report:
    budget_ms = scheduler.deadline_ms
    language = language or detect_language(source, name)
    report = Report(
        name=name,
        language=language,
        sha256=hashlib.sha256(source.encode()).hexdigest(),
        version=policy_version(source, language, name),
    )
    try:
        report.lua = to_lua(source, language, name)
    except PolicyError as exc:
        report.syntax = {"stage": "syntax", "ok": False, "error": str(exc), "line": exc.line,
                         "column": exc.column}  # fmt: skip
        return report
    # Generous deadline while validating: the first snapshot of the 10k bank takes
    # tens of ms to send; the speed stage then measures cycles against the budget.
    engine = SchedulingEngine(
        user_source=report.lua,
        user_name=name,
        options=EngineOptions.from_config(
            scheduler,
            deadline_ms=max(2000, budget_ms * 20),
            spares=0,
            breaker_threshold=1_000_000,  # every bank context must be decided by the policy
        ),
    )
    try:
        await engine.start()
        if engine.user is None or engine.user_load_error is not None:
            report.syntax = {"stage": "syntax", "ok": False, "error": str(engine.user_load_error)}
            return report
        report.syntax = {"stage": "syntax", "ok": True}
        cases, latencies = [], []
        contexts = bank()
        planned = len(contexts) * SPEED_CYCLES
        # p99 is over the budget once this many cycles are: stop there, not after all.
        too_slow = planned - int(0.99 * planned)
        over = 0
        for label, ctx in contexts:
            result = await engine.schedule(ctx)
            ok = result.source == "user"
            cases.append(
                CaseResult(
                    context=label,
                    ok=ok,
                    source=result.source,
                    decision=decisions.to_dict(result.decision) if ok else None,
                    error="" if ok or result.error is None else
                    f"{result.error.kind}: {result.error.message}",
                    latency_ms=round(result.latency_ms, 3),
                )
            )  # fmt: skip
            for step in range(SPEED_CYCLES if ok and over < too_slow else 0):
                again = await engine.schedule(
                    dataclasses.replace(ctx, now_ms=ctx.now_ms + step + 1)
                )
                latencies.append(again.latency_ms)
                over += again.latency_ms > budget_ms
                if over >= too_slow:
                    break
        failed = [c for c in cases if not c.ok]
        report.semantics = {
            "stage": "semantics",
            "ok": not failed,
            "cases": [dataclasses.asdict(c) for c in cases],
            "error": "; ".join(f"{c.context}: {c.error}" for c in failed),
        }
        if failed:
            return report
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0
        p50 = latencies[len(latencies) // 2] if latencies else 0.0
        report.speed = {
            "stage": "speed",
            "ok": p99 <= budget_ms,
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "budget_ms": budget_ms,
            "cycles": len(latencies),
            "error": ""
            if p99 <= budget_ms
            else f"p99 {p99:.1f} ms is over the {budget_ms} ms budget",
        }
        report.ok = bool(report.speed["ok"])
        return report
    except OrchestratorError as exc:
        report.syntax = report.syntax or {"stage": "syntax", "ok": False, "error": str(exc)}
        return report
    finally:
        await engine.close()
