"""`orchestratord serve`: the Orchestrator behind grpc.aio and aiohttp, under systemd or not.

SIGTERM and SIGINT drain gracefully (running jobs finish, bounded by
drain_timeout_s); SIGHUP reloads the catalog and tenants.
"""

from __future__ import annotations

import asyncio
import gc
import signal

from aiohttp import web
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator._proto import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.api import tls
from orchestrator.api.authn import Gatekeeper
from orchestrator.api.rpc.admin import AdminServicer
from orchestrator.api.rpc.auth import AuthInterceptor
from orchestrator.api.rpc.jobs import JobServicer
from orchestrator.api.rpc.pools import PoolServicer
from orchestrator.api.web.app import make_app
from orchestrator.config.credentials import CredentialStore
from orchestrator.config.settings import ServiceConfig, load_catalog, load_tenants
from orchestrator.domain.errors import OrchestratorError
from orchestrator.service.assembly import assemble
from orchestrator.service.orchestrator import VERSION, Orchestrator
from orchestrator.support.log import get_logger
from orchestrator.support.systemd import notify, watchdog_interval_s
from orchestrator.support.tasks import cancel_and_wait, where_it_waits

log = get_logger("server")

# The largest request message: gRPC's default, stated because it is a bound of ours
# (SECURITY.md); a prompt is bounded well below it by limits.max_prompt_bytes.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Calls open at once on one connection; a Watch per job of a caller fits well within.
MAX_STREAMS_PER_CONNECTION = 256
HEALTH_CHECK_S = 1.0  # how often gRPC health follows the cycles' health
# The collector's thresholds once serving. Every request allocates hundreds of objects
# and leaves reference cycles (a task and its futures, an exception and its traceback):
# at a few hundred requests a second the default (700) collects the young generation
# every few requests and the oldest every two seconds, 4 to 10% of the event loop's
# time (orchestrator/cli/bench_service.py). At 10,000, a few times a second, for a few
# hundred KB more held between collections.
GC_THRESHOLDS = (10_000, 10, 10)
SERVICE_NAMES = (
    orchestrator_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    orchestrator_pb2.DESCRIPTOR.services_by_name["PoolService"].full_name,
    orchestrator_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise OrchestratorError(f"listen address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class Server:
    def __init__(self, config: ServiceConfig, orchestrator: Orchestrator | None = None) -> None:
        self.config = config
        self.orchestrator = orchestrator or assemble(config)
        # Read before anything listens: bad keys stop the start with the file's error.
        self.gate = Gatekeeper(
            CredentialStore(config) if config.auth.configured else None,
            self.orchestrator.metrics.registry,
        )
        self.grpc: aio.Server | None = None
        self.http: web.AppRunner | None = None
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self._stopped = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None
        self._gc_thresholds: tuple[int, int, int] | None = None  # before start set ours

    async def start(self) -> None:
        o = self.orchestrator
        await o.start()
        self.grpc = aio.server(
            interceptors=[AuthInterceptor(self.gate)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ],
        )
        orchestrator_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(o, admitted=self.gate.still_admitted), self.grpc
        )
        orchestrator_pb2_grpc.add_PoolServiceServicer_to_server(
            PoolServicer(o.pools, heartbeat_ms=o.config.pools.heartbeat_ms), self.grpc
        )
        orchestrator_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(o), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if self.config.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
            )
        if self.config.tls.enabled:
            credentials = tls.grpc_credentials(self.config)
            self.grpc_port = self.grpc.add_secure_port(self.config.listen.grpc, credentials)
        else:
            self.grpc_port = self.grpc.add_insecure_port(self.config.listen.grpc)
        if self.grpc_port == 0:
            raise OrchestratorError(f"cannot listen on {self.config.listen.grpc} (gRPC)")
        await self.grpc.start()
        host, port = split_address(self.config.listen.http)
        self.http = web.AppRunner(make_app(o, self.gate), access_log=None)
        await self.http.setup()
        ssl_context = tls.http_context(self.config) if self.config.tls.enabled else None
        site = web.TCPSite(self.http, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise OrchestratorError(
                f"cannot listen on {self.config.listen.http} (HTTP): {exc.strerror}"
            ) from None
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._health_task = asyncio.get_running_loop().create_task(self._follow_cycles())
        scheme = "https" if self.config.tls.enabled else "http"
        log.info(
            "service.started",
            version=VERSION,
            grpc=f"{split_address(self.config.listen.grpc)[0]}:{self.grpc_port}",
            http=f"{scheme}://{host}:{self.http_port}",
            tls="mutual" if self.config.tls.client_ca_file else self.config.tls.enabled,
            auth="keys" if self.gate.store else "none: loopback only, every caller is the operator",
            deployment_mode=self.config.deployment_mode,
            scheduler=o.active.name,
            gpus=o.gpu_source,
            state_dir=str(o.state_dir),
        )
        # What start-up built lives as long as the process: keep the collector off it.
        gc.collect()
        gc.freeze()
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        notify("READY=1", f"STATUS=serving on {self.config.listen.grpc}")

    async def stop(self) -> None:
        notify("STOPPING=1")
        await cancel_and_wait(self._health_task)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.orchestrator.drain()
        if self.grpc is not None:
            await self.grpc.stop(grace=1.0)
        if self.http is not None:
            await self.http.cleanup()
        log.info("service.stopped")
        if self._gc_thresholds is not None:
            gc.set_threshold(*self._gc_thresholds)
        self._stopped.set()

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _follow_cycles(self) -> None:
        """gRPC health says what /healthz says: NOT_SERVING while cycles keep failing
        (the service answers but schedules nothing), SERVING again once one succeeds."""
        serving = True
        while True:
            await asyncio.sleep(HEALTH_CHECK_S)
            healthy = not self.orchestrator.cycle_health.failing
            if healthy != serving:
                serving = healthy
                await self._set_health(
                    health_pb2.HealthCheckResponse.SERVING
                    if healthy
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )

    def reload(self) -> None:
        """SIGHUP: reread the keys, the catalog and the tenants; keep the old ones if the
        new are bad."""
        if self.gate.store is not None:
            self.gate.store.reload()
        try:
            catalog, tenants = load_catalog(self.config), load_tenants(self.config)
        except OrchestratorError as exc:
            log.error("service.reload_rejected", error=str(exc))
            return
        self.orchestrator.reload_catalog(catalog, tenants)
        log.info("service.reloaded", models=len(catalog.models), tenants=len(tenants))

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stopping: asyncio.Task[None] | None = None

        def on_stop() -> None:
            nonlocal stopping
            if stopping is None:
                log.info("service.signal", action="drain")
                stopping = loop.create_task(self.stop())

        loop.add_signal_handler(signal.SIGTERM, on_stop)
        loop.add_signal_handler(signal.SIGINT, on_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        interval = watchdog_interval_s()
        watchdog = loop.create_task(self._watchdog(interval)) if interval else None
        await self._stopped.wait()
        await cancel_and_wait(watchdog)

    async def _watchdog(self, interval: float) -> None:
        # Ping only while the scheduling loop is alive: a wedged loop gets restarted.
        while True:
            if self.orchestrator.loop_alive:
                notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def dump_tasks() -> None:
    """SIGUSR1: log every asyncio task and where it waits, to see what a wedged core is stuck on."""
    for task in asyncio.all_tasks():
        log.warning("service.task", name=task.get_name(), stack=where_it_waits(task))


async def serve(config: ServiceConfig) -> None:
    server = Server(config)
    try:
        await server.start()
    except BaseException:
        await server.orchestrator.close()
        raise
    await server.run_until_signalled()
