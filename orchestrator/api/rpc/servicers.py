"""gRPC servicers: protobuf in, `Orchestrator` calls, protobuf out.

The only place that sets gRPC status codes: InvalidJobError is INVALID_ARGUMENT
(its message names the field), NotFoundError is NOT_FOUND, a draining or full
service is UNAVAILABLE / RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import grpc
from grpc import aio

from orchestrator._proto import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.state.cluster import ProcessInfo
from orchestrator.domain.decision import EvictWorker
from orchestrator.scheduling.engine import platform_source
from orchestrator.domain.errors import ConfigError, OrchestratorError, SchedulerLoadError
from orchestrator.domain.jobs import TERMINAL, InvalidJobError, JobRecord, SubmitSpec
from orchestrator.domain.context import Gpu
from orchestrator.policy.parse import PolicyError
from orchestrator.service.orchestrator import (
    NotFoundError,
    Orchestrator,
    PermissionDeniedError,
    ServiceUnavailableError,
    ValidationFailedError,
    scheduler_version,
)
from orchestrator.sim.settings import SimSettings
from orchestrator.support.tasks import cancel_and_wait
from orchestrator.state.versions import Version

pb = orchestrator_pb2

STATES = {
    "queued": pb.JOB_STATE_QUEUED,
    "dispatched": pb.JOB_STATE_DISPATCHED,
    "running": pb.JOB_STATE_RUNNING,
    "completed": pb.JOB_STATE_COMPLETED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}


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


async def _fail(context: aio.ServicerContext, exc: OrchestratorError) -> None:
    code = grpc.StatusCode.INTERNAL
    if isinstance(exc, InvalidJobError | ConfigError | PolicyError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, NotFoundError):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, PermissionDeniedError):
        code = grpc.StatusCode.PERMISSION_DENIED
    elif isinstance(exc, ValidationFailedError | SchedulerLoadError):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(exc, ServiceUnavailableError):
        full = "queue is full" in str(exc)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE
    await context.abort(code, str(exc))


class JobServicer(orchestrator_pb2_grpc.JobServiceServicer):
    def __init__(self, orchestrator: Orchestrator) -> None:
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
            await _fail(context, exc)
            raise  # unreachable: abort raises

    async def Get(
        self, request: orchestrator_pb2.GetJobRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        try:
            return job_info(await self.o.get(request.job_id))
        except OrchestratorError as exc:
            await _fail(context, exc)
            raise

    async def Cancel(
        self, request: orchestrator_pb2.CancelJobRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.JobInfo:
        try:
            return job_info(await self.o.cancel(request.job_id))
        except OrchestratorError as exc:
            await _fail(context, exc)
            raise

    async def List(
        self, request: orchestrator_pb2.ListJobsRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.ListJobsReply:
        limit = request.limit or 100
        if not 0 < limit <= 1000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit: must be within 1..1000")
        try:
            after = int(request.page_token or "0")
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token")
        unknown = [s for s in request.states if s not in STATE_NAMES]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"states: unknown {unknown}")
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
                    await _fail(context, exc)
                    return
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


class PoolServicer(orchestrator_pb2_grpc.PoolServiceServicer):
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.o = orchestrator

    async def Register(
        self, request: orchestrator_pb2.RegisterPoolRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.RegisterPoolReply:
        if not request.pool_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "pool_id: required")
        try:
            self.o.register_pool(request.pool_id, request.endpoint)
        except OrchestratorError as exc:
            await _fail(context, exc)
        return pb.RegisterPoolReply(heartbeat_interval_ms=self.o.config.pools.heartbeat_ms)

    async def Heartbeat(
        self, request: orchestrator_pb2.PoolHeartbeat, context: aio.ServicerContext
    ) -> orchestrator_pb2.HeartbeatReply:
        info = request.info
        gpus = tuple(
            Gpu(
                id=g.id,
                device_name=g.device_name,
                compute_capability=g.compute_capability,
                vram_total_bytes=g.vram_total_bytes,
                vram_allocated_bytes=g.vram_allocated_bytes,
                vram_free_bytes=g.vram_free_bytes,
                utilization_percent=g.utilization_percent,
                temperature_celsius=g.temperature_celsius,
                power_draw_watts=g.power_draw_watts,
                supports_fp16=g.supports_fp16,
                supports_int8=g.supports_int8,
                supports_tensor_cores=g.supports_tensor_cores,
                measured=g.measured,
            )
            for g in request.gpus
        )
        workers = tuple(
            ProcessInfo(
                w.id,
                w.model_ref,
                tuple(w.gpu_ids),
                w.vram_bytes,
                w.uri,
                w.status or "starting",
                w.started_at_ms,
            )
            for w in request.workers
        )
        try:
            commands = self.o.pool_heartbeat(
                info.id,
                info.endpoint,
                gpus,
                workers,
                tuple(info.cached_models),
                (
                    info.host_ram_total_bytes,
                    info.host_ram_available_bytes,
                    info.host_cpu_percent,
                    info.host_cpu_count,
                ),
            )
        except OrchestratorError as exc:
            await _fail(context, exc)
            raise
        reply = pb.HeartbeatReply(heartbeat_interval_ms=self.o.config.pools.heartbeat_ms)
        for command in commands:
            msg = reply.commands.add(
                id=command.id, worker_id=command.worker_id, vram_bytes=command.vram_bytes
            )
            action = command.action
            if isinstance(action, EvictWorker):
                msg.evict_worker.worker_id = action.worker_id
            else:
                msg.start_worker.pool_id = action.pool_id
                msg.start_worker.gpu_id = action.gpu_id
                msg.start_worker.model_ref = action.model_ref
        return reply


class AdminServicer(orchestrator_pb2_grpc.AdminServiceServicer):
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.o = orchestrator

    async def GetStatus(
        self, request: orchestrator_pb2.GetStatusRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.StatusReply:
        status = self.o.status()
        scheduler = dict(status.pop("scheduler"))  # type: ignore[call-overload]
        shadow = shadow_status(status.pop("shadow"))  # type: ignore[arg-type]
        return pb.StatusReply(
            scheduler=pb.SchedulerStatus(**scheduler),
            shadow=shadow,
            **status,  # type: ignore[arg-type]
        )

    async def GetPlatformSource(
        self, request: orchestrator_pb2.GetPlatformSourceRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.PlatformSourceReply:
        source = platform_source()
        return pb.PlatformSourceReply(
            source=source,
            version=scheduler_version(source),
            sha256=hashlib.sha256(source.encode()).hexdigest(),
        )

    async def ValidateScheduler(
        self, request: orchestrator_pb2.SchedulerSource, context: aio.ServicerContext
    ) -> orchestrator_pb2.ValidationReply:
        report = await self.o.validate(request.source, request.language, request.name)
        return pb.ValidationReply(
            ok=report.ok, summary=report.summary(), report_json=json.dumps(report.to_dict()),
            lua=report.lua,
        )  # fmt: skip

    async def DeployScheduler(
        self, request: orchestrator_pb2.DeployRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.DeployReply:
        s = request.scheduler
        try:
            version, report = await self.o.deploy(s.source, s.language, s.name, request.deployer)
        except OrchestratorError as exc:
            await _fail(context, exc)
            raise
        return pb.DeployReply(
            version=version_info(version), report_json=json.dumps(report.to_dict())
        )

    async def ListVersions(
        self, request: orchestrator_pb2.ListVersionsRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.ListVersionsReply:
        return pb.ListVersionsReply(versions=[version_info(v) for v in self.o.versions.all()])

    async def Rollback(
        self, request: orchestrator_pb2.RollbackRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.DeployReply:
        try:
            version = await self.o.rollback(request.version_id)
        except OrchestratorError as exc:
            await _fail(context, exc)
            raise
        return pb.DeployReply(version=version_info(version) if version else None)

    async def Simulate(
        self, request: orchestrator_pb2.SimulateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[orchestrator_pb2.SimulateProgress]:
        fields = {f.name: value for f, value in request.workload.ListFields()}
        s = request.scheduler
        updates: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        try:
            settings = SimSettings.from_mapping(fields)
            run = asyncio.create_task(self.o.simulate(
                s.source, s.language, s.name, settings, compare_active=request.compare_active,
                progress=lambda fraction, message: updates.put_nowait((fraction, message)),
            ))  # fmt: skip
            try:
                while not run.done():
                    waiter = asyncio.ensure_future(updates.get())
                    await asyncio.wait([run, waiter], return_when=asyncio.FIRST_COMPLETED)
                    if waiter.done():
                        fraction, message = waiter.result()
                        yield pb.SimulateProgress(fraction=fraction, message=message)
                    else:
                        waiter.cancel()
                reports = run.result()
            finally:
                await cancel_and_wait(run)
        except OrchestratorError as exc:
            await _fail(context, exc)
            raise
        yield pb.SimulateProgress(
            fraction=1.0, message="done", report_json=json.dumps([r.to_dict() for r in reports])
        )

    async def StartShadow(
        self, request: orchestrator_pb2.SchedulerSource, context: aio.ServicerContext
    ) -> orchestrator_pb2.ShadowStatus:
        try:
            shadow = await self.o.start_shadow(request.source, request.language, request.name)
        except OrchestratorError as exc:
            await _fail(context, exc)
            raise
        return shadow_status(shadow.status())

    async def StopShadow(
        self, request: orchestrator_pb2.StopShadowRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.ShadowStatus:
        return shadow_status(await self.o.stop_shadow())


def shadow_status(status: dict[str, object]) -> orchestrator_pb2.ShadowStatus:
    return pb.ShadowStatus(**status)  # type: ignore[arg-type]


def version_info(v: Version) -> orchestrator_pb2.SchedulerVersion:
    return pb.SchedulerVersion(
        id=v.id, sha256=v.sha256, name=v.name, version=v.version, language=v.language,
        deployer=v.deployer, deployed_at_ms=v.deployed_at, reason=v.reason, active=v.active,
        summary=v.summary,
    )  # fmt: skip
