"""PoolService: pools on other hosts register, heartbeat, and take their commands.

The caller is the authenticated identity the interceptor found (auth.py), never a
request field: the registry lets it speak only for the pools its credential names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from grpc import aio

from orchestrator._proto import context_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.api.rpc.auth import current_caller
from orchestrator.api.rpc.errors import abort
from orchestrator.domain.context import HostReading, ProcessInfo
from orchestrator.domain.decision import EvictWorker
from orchestrator.domain.errors import OrchestratorError
from orchestrator.domain.identity import Identity
from orchestrator.state.remote_pools import Heartbeat, RemoteCommand
from orchestrator.wire.context import gpu_from_proto

pb = orchestrator_pb2


class Pools(Protocol):
    """What PoolService needs of the service (orchestrator/service/pools.py, PoolRegistry)."""

    def register(self, caller: Identity, pool_id: str, endpoint: str) -> None: ...
    def heartbeat(self, caller: Identity, beat: Heartbeat) -> list[RemoteCommand]: ...


def heartbeat_from_proto(msg: orchestrator_pb2.PoolHeartbeat) -> Heartbeat:
    """The heartbeat a PoolService request carries, unchecked (state/pool_checks.py is next)."""
    info = msg.info
    return Heartbeat(
        pool_id=info.id,
        endpoint=info.endpoint,
        gpus=tuple(gpu_from_proto(g) for g in msg.gpus),
        workers=tuple(_reported_process(w) for w in msg.workers),
        cached_models=tuple(info.cached_models),
        host=HostReading(
            info.host_ram_total_bytes,
            info.host_ram_available_bytes,
            info.host_cpu_percent,
            info.host_cpu_count,
        ),
    )


def _reported_process(w: context_pb2.Worker) -> ProcessInfo:
    """A worker process as its pool reports it. A pool that predates slots sends 0 and
    "": the spec's one-slot llama.cpp worker (docs/ARCHITECTURE.md D27). Its
    `slots_busy` and `active_job_ids` are not read: which jobs fill the slots is the
    core's to know, from what it dispatched."""
    return ProcessInfo(
        w.id,
        w.model_ref,
        tuple(w.gpu_ids),
        w.vram_bytes,
        w.uri,
        w.status or "starting",
        w.started_at_ms,
        slots=w.slots_total or 1,
        api=w.api or "llamacpp",
    )


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
        beat = heartbeat_from_proto(request)
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
