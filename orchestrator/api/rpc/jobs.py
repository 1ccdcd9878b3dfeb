"""JobService: submit, get, cancel, list and watch jobs, and stream their output, each
within the caller's scope.

A tenant submits as the tenant its credential names and sees only that tenant's
jobs: another tenant's job is "not found", exactly like a job that does not exist.
An operator sees every job and may submit on a tenant's behalf (`tenant_id`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Protocol

from grpc import aio

from orchestrator._proto import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.api.rpc.auth import current_caller
from orchestrator.api.rpc.errors import abort
from orchestrator.domain.errors import (
    InvalidRequestError,
    OrchestratorError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
)
from orchestrator.domain.identity import Identity
from orchestrator.domain.jobs import TERMINAL, JobRecord, JobState, SubmitSpec
from orchestrator.service.events import JobEvent
from orchestrator.service.outputs import OutputChunk
from orchestrator.support.holds import Holds
from orchestrator.wire.jobs import STATE_NAMES, STATES

pb = orchestrator_pb2
# Each open Watch holds a bounded buffer (service/events.py), each StreamOutput a place
# among a job's followers (service/outputs.py); this bounds how many of both together
# one caller may hold. One Watch without a job_id follows all of a caller's jobs.
WATCHES_PER_CALLER = 64


class JobsFront(Protocol):
    """What JobService needs of the service (orchestrator/service/orchestrator.py)."""

    async def submit(self, spec: SubmitSpec) -> JobRecord: ...
    async def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord: ...
    async def cancel(self, job_id: str, *, tenant: str | None = None) -> JobRecord: ...
    async def list_jobs(
        self, states: Sequence[JobState], tenant_id: str | None, limit: int, after_seq: int
    ) -> list[JobRecord]: ...
    def subscribe(
        self, job_id: str | None, *, tenant: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[asyncio.Queue[JobEvent]]: ...
    def stream_output(
        self, job_id: str, *, tenant: str | None = None
    ) -> AsyncGenerator[OutputChunk]: ...


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
        prompt_tokens=record.prompt_tokens,
        ttft_ms=record.ttft_ms or 0,
        tpot_ms=record.tpot_ms or 0.0,
        stop=record.stop,
        top_p=record.top_p,
        finish_reason=record.finish_reason,
    )
    if record.seed is not None:
        info.seed = record.seed
    return info


def output_chunk(chunk: OutputChunk) -> orchestrator_pb2.OutputChunk:
    message = pb.OutputChunk(text=chunk.text, tokens=chunk.tokens, attempt=chunk.attempt)
    if chunk.final is not None:
        message.job.CopyFrom(job_info(chunk.final))
    return message


class JobServicer(orchestrator_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        orchestrator: JobsFront,
        caller: Callable[[], Identity] = current_caller,
        admitted: Callable[[Identity], bool] = lambda _: True,
    ) -> None:
        self.o = orchestrator
        self.caller = caller  # who is calling: the interceptor's answer (api/rpc/auth.py)
        self.admitted = admitted  # whether a caller's key still stands (Gatekeeper)
        self.watching: Holds[str] = Holds()  # open Watch and StreamOutput by caller name

    async def Submit(
        self, request: orchestrator_pb2.SubmitRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        caller = self.caller()
        try:
            tenant_id = _tenant_of(caller, request.tenant_id)
        except OrchestratorError as exc:
            await abort(context, exc)
        spec = SubmitSpec(
            model=request.model,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            priority=request.priority,
            seed=request.seed if request.HasField("seed") else None,
            temperature=request.temperature,
            tenant_id=tenant_id,
            session_id=request.session_id,
            request_id=request.request_id,
            stop=tuple(request.stop),
            top_p=request.top_p if request.HasField("top_p") else 1.0,
        )
        try:
            return job_info(await self.o.submit(spec))
        except OrchestratorError as exc:
            await abort(context, exc)

    async def Get(
        self, request: orchestrator_pb2.GetJobRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        try:
            return job_info(await self.o.get(request.job_id, tenant=self.caller().job_scope()))
        except OrchestratorError as exc:
            await abort(context, exc)

    async def Cancel(
        self, request: orchestrator_pb2.CancelJobRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        try:
            scope = self.caller().job_scope()
            return job_info(await self.o.cancel(request.job_id, tenant=scope))
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
        try:
            tenant_id = _tenant_of(self.caller(), request.tenant_id) or None
        except OrchestratorError as exc:
            await abort(context, exc)
        records = await self.o.list_jobs(
            [STATE_NAMES[s] for s in request.states], tenant_id, limit, after
        )
        reply = pb.ListJobsReply(jobs=[job_info(r) for r in records])
        if len(records) == limit:
            reply.next_page_token = str(records[-1].seq)
        return reply

    async def Watch(
        self, request: orchestrator_pb2.WatchRequest, context: aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.JobEvent]:
        name = self.caller().name
        try:
            with self.watching.hold(name, WATCHES_PER_CALLER, _too_many_streams):
                async with contextlib.aclosing(self._events(request.job_id or None)) as events:
                    async for event in events:
                        yield event
        except OrchestratorError as exc:  # too many open; not the caller's job; fell behind
            await abort(context, exc)

    async def StreamOutput(
        self, request: orchestrator_pb2.GetJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.OutputChunk]:
        caller = self.caller()
        try:
            with self.watching.hold(caller.name, WATCHES_PER_CALLER, _too_many_streams):
                chunks = self.o.stream_output(request.job_id, tenant=caller.job_scope())
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        if not self.admitted(caller):
                            raise UnauthenticatedError(
                                "the key this stream was opened with was revoked"
                            )
                        yield output_chunk(chunk)
        except OrchestratorError as exc:  # too many open; not the caller's job; key revoked
            await abort(context, exc)

    async def _events(self, job_id: str | None) -> AsyncGenerator[orchestrator_pb2.JobEvent]:
        caller = self.caller()
        scope = caller.job_scope()
        async with self.o.subscribe(job_id, tenant=scope) as queue:
            if job_id is not None:
                record = await self.o.get(job_id, tenant=scope)
                yield _event(record, record.created_at, "current state")
                if record.state in TERMINAL:
                    return
            while True:
                event = await queue.get()
                if not self.admitted(caller):
                    raise UnauthenticatedError("the key this watch was opened with was revoked")
                yield _event(event.record, event.at_ms, event.detail)
                if job_id is not None and event.record.state in TERMINAL:
                    return


def _too_many_streams(name: str) -> RateLimitedError:
    return RateLimitedError(
        f"{name} has {WATCHES_PER_CALLER} Watch and StreamOutput streams open already; close "
        "one, or watch every job with one Watch (no job_id)"
    )


def _tenant_of(caller: Identity, requested: str) -> str:
    """The tenant a call acts for (Identity.acting_for), its refusal naming the field."""
    try:
        return caller.acting_for(requested)
    except PermissionDeniedError as exc:
        raise PermissionDeniedError(f"tenant_id: {exc}") from None


def _event(record: JobRecord, at_ms: int, detail: str) -> orchestrator_pb2.JobEvent:
    return pb.JobEvent(
        job_id=record.id,
        state=STATES[record.state],
        at_ms=at_ms,
        detail=detail,
        job=job_info(record),
    )
