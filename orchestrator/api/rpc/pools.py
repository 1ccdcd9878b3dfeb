"""PoolService: pools on other hosts register, heartbeat, and take their commands."""

from __future__ import annotations

from typing import Protocol

from grpc import aio

from orchestrator._proto import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.api.rpc.errors import abort
from orchestrator.domain.context import HostReading, ProcessInfo
from orchestrator.domain.decision import EvictWorker
from orchestrator.domain.errors import InvalidRequestError, OrchestratorError
from orchestrator.state.remote_pools import Heartbeat, RemoteCommand
from orchestrator.wire.context import gpu_from_proto

pb = orchestrator_pb2


class Pools(Protocol):
    """What PoolService needs of the service (orchestrator/service/pools.py, PoolRegistry)."""

    def register(self, pool_id: str, endpoint: str) -> None: ...
    def heartbeat(self, beat: Heartbeat) -> list[RemoteCommand]: ...


class PoolServicer(orchestrator_pb2_grpc.PoolServiceServicer):
    def __init__(self, pools: Pools, *, heartbeat_ms: int) -> None:
        self.pools = pools
        self.heartbeat_ms = heartbeat_ms  # the interval pools are told to keep

    async def Register(
        self, request: orchestrator_pb2.RegisterPoolRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.RegisterPoolReply:
        if not request.pool_id:
            await abort(context, InvalidRequestError("pool_id", "required"))
        try:
            self.pools.register(request.pool_id, request.endpoint)
        except OrchestratorError as exc:
            await abort(context, exc)
        return pb.RegisterPoolReply(heartbeat_interval_ms=self.heartbeat_ms)

    async def Heartbeat(
        self, request: orchestrator_pb2.PoolHeartbeat, context: aio.ServicerContext
    ) -> orchestrator_pb2.HeartbeatReply:
        info = request.info
        beat = Heartbeat(
            pool_id=info.id,
            endpoint=info.endpoint,
            gpus=tuple(gpu_from_proto(g) for g in request.gpus),
            workers=tuple(
                ProcessInfo(w.id, w.model_ref, tuple(w.gpu_ids), w.vram_bytes, w.uri,
                            w.status or "starting", w.started_at_ms)
                for w in request.workers
            ),
            cached_models=tuple(info.cached_models),
            host=HostReading(info.host_ram_total_bytes, info.host_ram_available_bytes,
                             info.host_cpu_percent, info.host_cpu_count),
        )  # fmt: skip
        try:
            commands = self.pools.heartbeat(beat)
        except OrchestratorError as exc:
            await abort(context, exc)
        reply = pb.HeartbeatReply(heartbeat_interval_ms=self.heartbeat_ms)
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
