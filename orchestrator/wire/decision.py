"""Decisions on the wire: the `Decision` message of proto/context.proto and back."""

from __future__ import annotations

from orchestrator._proto import context_pb2
from orchestrator.domain.decision import Batch, Decision, Dispatch, EvictWorker, StartWorker, Wait


def from_proto(msg: context_pb2.Decision) -> Decision:
    """Decode a decision; an empty message is a wait."""
    kind = msg.WhichOneof("action")
    common = {"reason": msg.reason, "rule": msg.rule}
    if kind == "dispatch":
        return Dispatch(msg.dispatch.job_id, msg.dispatch.worker_id, **common)
    if kind == "start_worker":
        sw = msg.start_worker
        return StartWorker(sw.pool_id, sw.gpu_id, sw.model_ref, **common)
    if kind == "evict_worker":
        return EvictWorker(msg.evict_worker.worker_id, **common)
    if kind == "batch":
        return Batch(tuple(from_proto(a) for a in msg.batch.actions), **common)
    retry = msg.wait.retry_after_ms if msg.wait.HasField("retry_after_ms") else None
    return Wait(retry, **common)


def to_proto(decision: Decision) -> context_pb2.Decision:
    msg = context_pb2.Decision(reason=decision.reason, rule=decision.rule)
    match decision:
        case Dispatch():
            msg.dispatch.job_id = decision.job_id
            msg.dispatch.worker_id = decision.worker_id
        case StartWorker():
            msg.start_worker.pool_id = decision.pool_id
            msg.start_worker.gpu_id = decision.gpu_id
            msg.start_worker.model_ref = decision.model_ref
        case EvictWorker():
            msg.evict_worker.worker_id = decision.worker_id
        case Batch():
            msg.batch.SetInParent()
            msg.batch.actions.extend(to_proto(a) for a in decision.actions)
        case Wait():
            msg.wait.SetInParent()
            if decision.retry_after_ms is not None:
                msg.wait.retry_after_ms = decision.retry_after_ms
    return msg
