"""JobService: submit, get, cancel, list and watch jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from grpc import aio

from orchestrator._proto import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.api.rpc.errors import abort
from orchestrator.domain.errors import InvalidRequestError, OrchestratorError
from orchestrator.domain.jobs import TERMINAL, JobRecord, JobState, SubmitSpec
from orchestrator.service.events import JobEvent
from orchestrator.wire.jobs import STATE_NAMES, STATES

pb = orchestrator_pb2


class JobsFront(Protocol):
    """What JobService needs of the service (orchestrator/service/orchestrator.py)."""

    async def submit(self, spec: SubmitSpec) -> JobRecord: ...
    async def get(self, job_id: str) -> JobRecord: ...
    async def cancel(self, job_id: str) -> JobRecord: ...
    async def list_jobs(
        self, states: Sequence[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]: ...
    def subscribe(
        self, job_id: str | None
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Queue[JobEvent]]: ...


def job_info(record: JobRecord) -> orchestrator_pb2.JobInfo:
    info = pb.JobInfo(
        id=record.id,
        state=STATES[record.state],
        model_ref=record.model_ref,
        priority=record.priority,
        tenant_id=record.tenant_id or "",
        session_id=record.session_id or "",
        max_tokens=record.max_tokens,
        temperature=record.temperature,
        created_at_ms=record.created_at,
        queued_at_ms=record.queued_at,
        dispatched_at_ms=record.dispatched_at or 0,
        finished_at_ms=record.finished_at or 0,
        attempts=record.attempts,
        worker_id=record.worker_id or "",
        output=record.output,
        tokens_generated=record.tokens_generated,
        error=record.error,
        request_id=record.request_id or "",
        prompt_hash=record.prompt_hash,
    )
    if record.seed is not None:
        info.seed = record.seed
    return info


class JobServicer(orchestrator_pb2_grpc.JobServiceServicer):
    def __init__(self, orchestrator: JobsFront) -> None:
        self.o = orchestrator

    async def Submit(
        self, request: orchestrator_pb2.SubmitRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        spec = SubmitSpec(
            model=request.model,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            priority=request.priority,
            seed=request.seed if request.HasField("seed") else None,
            temperature=request.temperature,
            tenant_id=request.tenant_id,
            session_id=request.session_id,
            request_id=request.request_id,
        )
        try:
            return job_info(await self.o.submit(spec))
        except OrchestratorError as exc:
            await abort(context, exc)

    async def Get(
        self, request: orchestrator_pb2.GetJobRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        try:
            return job_info(await self.o.get(request.job_id))
        except OrchestratorError as exc:
            await abort(context, exc)

    async def Cancel(
        self, request: orchestrator_pb2.CancelJobRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        try:
            return job_info(await self.o.cancel(request.job_id))
        except OrchestratorError as exc:
            await abort(context, exc)

    async def List(
        self, request: orchestrator_pb2.ListJobsRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.ListJobsReply:
        limit = request.limit or 100
        if not 0 < limit <= 1000:
            await abort(context, InvalidRequestError("limit", "must be within 1..1000"))
        try:
            after = int(request.page_token or "0")
        except ValueError:
            await abort(context, InvalidRequestError("page_token", "not a token"))
        unknown = [s for s in request.states if s not in STATE_NAMES]
        if unknown:
            await abort(context, InvalidRequestError("states", f"unknown {unknown}"))
        records = await self.o.list_jobs(
            [STATE_NAMES[s] for s in request.states], request.tenant_id or None, limit, after
        )
        reply = pb.ListJobsReply(jobs=[job_info(r) for r in records])
        if len(records) == limit:
            reply.next_page_token = str(records[-1].seq)
        return reply

    async def Watch(
        self, request: orchestrator_pb2.WatchRequest, context: aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.JobEvent]:
        job_id = request.job_id or None
        async with self.o.subscribe(job_id) as queue:
            if job_id is not None:
                try:
                    record = await self.o.get(job_id)
                except OrchestratorError as exc:
                    await abort(context, exc)
                yield _event(record, record.created_at, "current state")
                if record.state in TERMINAL:
                    return
            while True:
                event = await queue.get()
                yield _event(event.record, event.at_ms, event.detail)
                if job_id is not None and event.record.state in TERMINAL:
                    return


def _event(record: JobRecord, at_ms: int, detail: str) -> orchestrator_pb2.JobEvent:
    return pb.JobEvent(
        job_id=record.id,
        state=STATES[record.state],
        at_ms=at_ms,
        detail=detail,
        job=job_info(record),
    )
