"""The HTTP side of orchestratord: Prometheus /metrics, /healthz, and the admin mirror.

Bound to localhost by default (listen.http in the config).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.engine import platform_source
from orchestrator.service import Orchestrator

ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)


def make_app(orchestrator: Orchestrator) -> web.Application:
    app = web.Application()
    app[ORCHESTRATOR] = orchestrator
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v2/admin/scheduler/status", status)
    app.router.add_get("/v2/admin/scheduler/platform-source", platform)
    return app


async def metrics(request: web.Request) -> web.Response:
    o = request.app[ORCHESTRATOR]
    body = generate_latest(o.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    o = request.app[ORCHESTRATOR]
    if o.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[ORCHESTRATOR].status())


async def platform(request: web.Request) -> web.Response:
    return web.Response(text=platform_source(), content_type="text/x-lua")
