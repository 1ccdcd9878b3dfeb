"""PoolService: pools on other hosts register, heartbeat, and take their commands.

The caller is the authenticated identity the interceptor found (auth.py), never a
request field: the registry lets it speak only for the pools its credential names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from grpc import aio

from orchestrator._proto import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.api.rpc.auth import current_caller
from orchestrator.api.rpc.errors import abort
from orchestrator.domain.decision import EvictWorker
from orchestrator.domain.errors import OrchestratorError
from orchestrator.domain.identity import Identity
from orchestrator.state.remote_pools import Heartbeat, RemoteCommand

pb = orchestrator_pb2


class Pools(Protocol):
    """What PoolService needs of the service (orchestrator/service/pools.py, PoolRegistry)."""

    def register(self, caller: Identity, pool_id: str, endpoint: str) -> None: ...
    def heartbeat(self, caller: Identity, beat: Heartbeat) -> list[RemoteCommand]: ...


class PoolServicer(orchestrator_pb2_grpc.PoolServiceServicer):
    def __init__(
        self, pools: Pools, *, heartbeat_ms: int, caller: Callable[[], Identity] = current_caller
    ) -> None:
        self.pools = pools
        self.heartbeat_ms = heartbeat_ms  # the interval pools are told to keep
        self.caller = caller  # who is calling: the interceptor's answer (api/rpc/auth.py)

    async def Register(
        self, request: orchestrator_pb2.RegisterPoolRequest, context: aio.ServicerContext
    ) -> orchestrator_pb2.RegisterPoolReply:
        caller = self.caller()
        try:
            self.pools.register(caller, request.pool_id, request.endpoint)
        except OrchestratorError as exc:
            await abort(context, exc)
        return pb.RegisterPoolReply(heartbeat_interval_ms=self.heartbeat_ms)

    async def Heartbeat(
        self, request: orchestrator_pb2.PoolHeartbeat, context: aio.ServicerContext
    ) -> orchestrator_pb2.HeartbeatReply:
        caller = self.caller()
        beat = Heartbeat.from_proto(request)
        try:
            commands = self.pools.heartbeat(caller, beat)
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
