"""`orchestratord pool-manager`: run a pool on another host and report it to the core.

It registers with the orchestrator's PoolService, then sends a heartbeat every
interval with the pool fields of runtime-spec 3.2 (GPUs through NVML or declared,
host RAM and CPU, its workers), and carries out the start_worker and evict_worker
commands that come back. Workers are started from the same command template as
the core's local pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from grpc import aio

from orchestrator._proto import context_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.config.settings import LocalPoolConfig, ServiceConfig
from orchestrator.domain.errors import ConfigError, PoolError
from orchestrator.pools.hardware import GpuProbe, HostProbe, NvmlProbe, PsutilProbe
from orchestrator.pools.local_pool import LocalPool
from orchestrator.state.pool_checks import endpoint_host
from orchestrator.support.log import get_logger
from orchestrator.wire.channel import ClientAuth, open_channel
from orchestrator.wire.context import gpu_to_proto

log = get_logger("pool-manager")


class PoolManager:
    def __init__(
        self,
        config: ServiceConfig,
        orchestrator_address: str,
        auth: ClientAuth | None = None,
        *,
        gpu_probe: GpuProbe | None = None,
        host_probe: HostProbe | None = None,
    ) -> None:
        self.address = orchestrator_address
        self.auth = auth or ClientAuth()  # a pool key bound to this pool's id (SECURITY.md)
        state_dir = config.path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.pool = LocalPool(
            config.local_pool,
            gpu_probe if gpu_probe is not None else NvmlProbe(),
            host_probe or PsutilProbe(),
            state_dir,
            cache_ms=config.pools.heartbeat_ms,
        )
        self.endpoint = pool_endpoint(config.local_pool)
        self.interval_s = config.pools.heartbeat_ms / 1000
        self.done: list[str] = []
        self._stop = asyncio.Event()

    def heartbeat(self) -> orchestrator_pb2.PoolHeartbeat:
        gpus, host = self.pool.read()
        info = context_pb2.PoolInfo(
            id=self.pool.id,
            endpoint=self.endpoint,
            status="healthy",
            host_ram_total_bytes=host.ram_total,
            host_ram_available_bytes=host.ram_available,
            host_cpu_percent=host.cpu_percent,
            host_cpu_count=host.cpu_count,
        )
        workers = [
            context_pb2.Worker(
                pool_id=self.pool.id,
                id=w.id,
                status=w.status,
                model_ref=w.model_ref,
                gpu_ids=w.gpu_ids,
                vram_bytes=w.vram_bytes,
                uri=w.uri,
                started_at_ms=w.started_at_ms,
                # The core counts the slots in use from its own dispatches; the pool
                # says how many there are and how to talk to the worker.
                slots_total=w.slots,
                api=w.api,
            )
            for w in self.pool.workers.values()
        ]
        beat = orchestrator_pb2.PoolHeartbeat(
            info=info,
            gpus=[gpu_to_proto(self.pool.id, g) for g in gpus],
            workers=workers,
            done_commands=self.done,
        )
        self.done = []
        return beat

    async def carry_out(self, command: orchestrator_pb2.PoolCommand) -> None:
        try:
            if command.HasField("start_worker"):
                start = command.start_worker
                await self.pool.start_worker(
                    command.worker_id, start.model_ref, start.gpu_id, command.vram_bytes
                )
            elif command.HasField("evict_worker"):
                await self.pool.evict_worker(command.evict_worker.worker_id)
        except PoolError as exc:
            log.error("pool_manager.command_failed", command=command.id, error=str(exc))
        self.done.append(command.id)

    async def run(self) -> None:
        self.pool.kill_leftovers()
        async with open_channel(self.address, self.auth) as channel:
            stub = orchestrator_pb2_grpc.PoolServiceStub(channel)
            registered = False
            while not self._stop.is_set():
                try:
                    if not registered:
                        reply = await stub.Register(
                            orchestrator_pb2.RegisterPoolRequest(
                                pool_id=self.pool.id, endpoint=self.endpoint
                            ),
                            timeout=5,
                        )
                        self.interval_s = reply.heartbeat_interval_ms / 1000 or self.interval_s
                        registered = True
                        log.info("pool_manager.registered", pool=self.pool.id, core=self.address)
                    beat = await stub.Heartbeat(self.heartbeat(), timeout=5)
                    for command in beat.commands:
                        await self.carry_out(command)
                except aio.AioRpcError as exc:
                    log.warning("pool_manager.core_unreachable", error=exc.details() or str(exc))
                    registered = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await self._stop.wait()
        await self.pool.close()

    def stop(self) -> None:
        self._stop.set()


def pool_endpoint(config: LocalPoolConfig) -> str:
    """What the pool registers as: `local_pool.endpoint`, by default its workers' host.

    The core accepts a pool's workers only on the host of the endpoint it registered
    (orchestrator/state/pool_checks.py), so a mismatch is refused here, at start,
    rather than in every heartbeat.
    """
    host = config.worker.host
    endpoint = config.endpoint or f"http://{host}"
    registered = endpoint_host(endpoint)
    if registered is None:
        named = "local_pool.endpoint" if config.endpoint else "local_pool.worker.host"
        raise ConfigError(
            f"{named}: {endpoint!r} is not http(s)://host[:port] or host:port on an "
            "address the orchestrator can reach"
        )
    if endpoint_host(f"http://{host}") != registered:
        raise ConfigError(
            f"local_pool.worker.host: {host!r} is not the host of local_pool.endpoint "
            f"{endpoint!r}; the orchestrator takes a pool's workers only on the host it "
            "registers, at an address it can reach"
        )
    return endpoint


async def run_pool_manager(
    config: ServiceConfig, orchestrator_address: str, auth: ClientAuth | None = None
) -> None:
    manager = PoolManager(config, orchestrator_address, auth)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, manager.stop)
    await manager.run()
