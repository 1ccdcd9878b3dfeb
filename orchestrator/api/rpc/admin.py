"""AdminService: status, validation, deploy, versions, rollback, simulation, shadow."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from grpc import aio

from orchestrator._proto import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.api.rpc.auth import current_caller
from orchestrator.api.rpc.errors import abort
from orchestrator.domain.errors import OrchestratorError
from orchestrator.domain.identity import Identity
from orchestrator.policy.validate import Report, policy_version
from orchestrator.scheduling.engine import platform_source
from orchestrator.scheduling.shadow import Shadow
from orchestrator.sim.report import SimReport
from orchestrator.sim.run import Progress
from orchestrator.sim.settings import SimSettings
from orchestrator.state.versions import Version
from orchestrator.support.tasks import cancel_and_wait

pb = orchestrator_pb2


class AdminFront(Protocol):
    """What AdminService needs of the service (orchestrator/service/orchestrator.py)."""

    def status(self) -> dict[str, object]: ...
    def list_versions(self) -> list[Version]: ...
    async def validate(self, source: str, language: str, name: str) -> Report: ...
    async def deploy(
        self, source: str, language: str = "", name: str = "", deployer: str = ""
    ) -> tuple[Version, Report]: ...
    async def rollback(self, version_id: int = 0) -> Version | None: ...
    async def simulate(
        self, source: str, language: str, name: str, settings: SimSettings, *,
        compare_active: bool = False, progress: Progress | None = None,
    ) -> list[SimReport]: ...  # fmt: skip
    async def start_shadow(self, source: str, language: str = "", name: str = "") -> Shadow: ...
    async def stop_shadow(self) -> dict[str, object]: ...


class AdminServicer(orchestrator_pb2_grpc.AdminServiceServicer):
    def __init__(
        self, orchestrator: AdminFront, caller: Callable[[], Identity] = current_caller
    ) -> None:
        self.o = orchestrator
        self.caller = caller  # who is calling: the interceptor's answer (api/rpc/auth.py)

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
            version=policy_version(source, "lua", "platform.lua"),
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
            deployer = self.caller().as_deployer(request.deployer)
            version, report = await self.o.deploy(s.source, s.language, s.name, deployer)
        except OrchestratorError as exc:
            await abort(context, exc)
        return pb.DeployReply(
            version=version_info(version), report_json=json.dumps(report.to_dict())
        )

    async def ListVersions(
        self, request: orchestrator_pb2.ListVersionsRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.ListVersionsReply:
        return pb.ListVersionsReply(versions=[version_info(v) for v in self.o.list_versions()])

    async def Rollback(
        self, request: orchestrator_pb2.RollbackRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.DeployReply:
        try:
            version = await self.o.rollback(request.version_id)
        except OrchestratorError as exc:
            await abort(context, exc)
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
            await abort(context, exc)
        yield pb.SimulateProgress(
            fraction=1.0, message="done", report_json=json.dumps([r.to_dict() for r in reports])
        )

    async def StartShadow(
        self, request: orchestrator_pb2.SchedulerSource, context: aio.ServicerContext
    ) -> orchestrator_pb2.ShadowStatus:
        try:
            shadow = await self.o.start_shadow(request.source, request.language, request.name)
        except OrchestratorError as exc:
            await abort(context, exc)
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
