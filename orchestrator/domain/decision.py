"""Scheduler decisions (lua-runtime-spec section 5) as plain dataclasses. Pure.

On the wire they are `Decision` messages (orchestrator/wire/decision.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Dispatch:
    job_id: str
    worker_id: str
    reason: str = ""
    rule: str = ""
    action = "dispatch"


@dataclass(frozen=True, slots=True)
class Wait:
    retry_after_ms: int | None = None
    reason: str = ""
    rule: str = ""
    action = "wait"


@dataclass(frozen=True, slots=True)
class StartWorker:
    pool_id: str
    gpu_id: int
    model_ref: str
    reason: str = ""
    rule: str = ""
    action = "start_worker"


@dataclass(frozen=True, slots=True)
class EvictWorker:
    worker_id: str
    reason: str = ""
    rule: str = ""
    action = "evict_worker"


@dataclass(frozen=True, slots=True)
class Batch:
    actions: tuple[Decision, ...] = field(default_factory=tuple)
    reason: str = ""
    rule: str = ""
    action = "batch"


Decision = Dispatch | Wait | StartWorker | EvictWorker | Batch
Action = Dispatch | Wait | StartWorker | EvictWorker


def flatten(decision: Decision) -> tuple[Decision, ...]:
    """The actions a decision asks for, in order (a batch's members, or itself)."""
    return decision.actions if isinstance(decision, Batch) else (decision,)


def to_dict(decision: Decision) -> dict[str, Any]:
    """The decision as the Lua table a script would return (for JSON output and logs)."""
    out: dict[str, Any] = {"action": decision.action}
    match decision:
        case Dispatch():
            out |= {"job_id": decision.job_id, "worker_id": decision.worker_id}
        case StartWorker():
            out |= {
                "pool_id": decision.pool_id,
                "gpu_id": decision.gpu_id,
                "model_ref": decision.model_ref,
            }
        case EvictWorker():
            out["worker_id"] = decision.worker_id
        case Batch():
            out["actions"] = [to_dict(a) for a in decision.actions]
        case Wait():
            if decision.retry_after_ms is not None:
                out["retry_after_ms"] = decision.retry_after_ms
    if decision.reason:
        out["reason"] = decision.reason
    if decision.rule:
        out["rule"] = decision.rule
    return out


def describe(decision: Decision) -> str:
    """One line for humans: `dispatch job-1 -> worker-2`."""
    match decision:
        case Dispatch():
            text = f"dispatch {decision.job_id} -> {decision.worker_id}"
        case StartWorker():
            text = f"start_worker {decision.model_ref} on {decision.pool_id} gpu {decision.gpu_id}"
        case EvictWorker():
            text = f"evict_worker {decision.worker_id}"
        case Batch():
            text = f"batch of {len(decision.actions)}: " + "; ".join(
                describe(a) for a in decision.actions
            )
        case Wait():
            text = "wait" + (
                f" {decision.retry_after_ms} ms" if decision.retry_after_ms is not None else ""
            )
    return text + (f" ({decision.reason})" if decision.reason else "")


def _essence(action: Decision) -> tuple[str, ...]:
    match action:
        case Dispatch():
            return ("dispatch", action.job_id, action.worker_id)
        case StartWorker():
            return ("start_worker", action.pool_id, str(action.gpu_id), action.model_ref)
        case EvictWorker():
            return ("evict_worker", action.worker_id)
    return (action.action,)


def difference(a: Decision, b: Decision) -> str | None:
    """How `b` would act differently from `a`, ignoring rules, reasons and wait times.

    None when they do the same; otherwise the first that applies of: "action" (other
    kinds of action), "job" (other jobs dispatched), "worker" (same jobs, other
    workers), "target" (other workers started or evicted), "order" (same, reordered).
    """
    ea, eb = [_essence(x) for x in flatten(a)], [_essence(x) for x in flatten(b)]
    if ea == eb:
        return None
    if sorted(ea) == sorted(eb):
        return "order"
    if sorted(e[0] for e in ea) != sorted(e[0] for e in eb):
        return "action"
    jobs_a = sorted(e[1] for e in ea if e[0] == "dispatch")
    if jobs_a != sorted(e[1] for e in eb if e[0] == "dispatch"):
        return "job"
    if sorted(e for e in ea if e[0] == "dispatch") != sorted(e for e in eb if e[0] == "dispatch"):
        return "worker"
    return "target"
