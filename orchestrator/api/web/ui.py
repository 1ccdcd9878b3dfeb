"""The web UI: static files at `/`, the builder's helper endpoints, and the live view's
server-sent events. The guard in front of it all is guard.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from importlib import resources
from typing import Any

from aiohttp import web

from orchestrator.api.web.common import GATE, ORCHESTRATOR, PREFIX, body, caller
from orchestrator.policy import builder
from orchestrator.policy.compile import compile_yaml
from orchestrator.policy.parse import PolicyError
from orchestrator.policy.validate import to_lua
from orchestrator.service.orchestrator import Orchestrator
from orchestrator.support.clock import now_ms

STATIC = resources.files("orchestrator.api.web").joinpath("static")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
EVENT_INTERVAL_S = 1.0
TEMPLATES = resources.files("schedulers").joinpath("templates")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/ui/{name}", static)
    app.router.add_get(f"{PREFIX}/vocabulary", vocabulary)
    app.router.add_get(f"{PREFIX}/templates", templates)
    app.router.add_get(f"{PREFIX}/active", active)
    app.router.add_post(f"{PREFIX}/compile", compile_policy)
    app.router.add_post(f"{PREFIX}/parse", parse)
    app.router.add_get("/v2/admin/events", events, allow_head=False)  # a stream: no HEAD


def _orchestrator(request: web.Request) -> Orchestrator:
    return request.app[ORCHESTRATOR]


async def index(request: web.Request) -> web.Response:
    return web.Response(text=STATIC.joinpath("index.html").read_text(), content_type="text/html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    suffix = name[name.rfind(".") :]
    if "/" in name or suffix not in CONTENT_TYPES or not STATIC.joinpath(name).is_file():
        raise web.HTTPNotFound()
    return web.Response(text=STATIC.joinpath(name).read_text(), content_type=CONTENT_TYPES[suffix])


async def vocabulary(request: web.Request) -> web.Response:
    o = _orchestrator(request)
    return web.json_response({
        **builder.vocabulary(),
        "models": sorted(o.catalog.aliases) or sorted(o.catalog.models),
        "deployment_mode": o.config.deployment_mode,
        "deploy_disabled": "platform mode: the platform scheduler cannot be replaced"
        if o.config.platform_mode else "",
    })  # fmt: skip


async def templates(request: web.Request) -> web.Response:
    descriptions = _template_descriptions()
    out = []
    for path in sorted(TEMPLATES.iterdir(), key=lambda p: p.name):
        if path.name.endswith(".yaml"):
            name = path.name.removesuffix(".yaml")
            lua = TEMPLATES.joinpath(f"{name}.lua")
            out.append({
                "name": name, "description": descriptions.get(name, ""),
                "yaml": path.read_text(), "lua": lua.read_text() if lua.is_file() else "",
            })  # fmt: skip
    return web.json_response({"templates": out})


def _template_descriptions() -> dict[str, str]:
    """The "when to use it" column of schedulers/templates/README.md."""
    out = {}
    for line in TEMPLATES.joinpath("README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            out[cells[0].strip("`")] = cells[1]
    return out


async def active(request: web.Request) -> web.Response:
    a = _orchestrator(request).active
    return web.json_response(
        {"name": a.name, "language": a.language, "source": a.source, "version_id": a.version_id}
    )


async def compile_policy(request: web.Request) -> web.Response:
    """The code view: {policy} (the builder's model) or {source} (YAML) to YAML and Lua.
    Errors come back in the reply (status 200): they are part of a live preview."""
    data = await body(request)
    name = str(data.get("name") or "policy.yaml")
    text = builder.to_yaml(data["policy"]) if "policy" in data else str(data.get("source", ""))
    try:
        lua = compile_yaml(text, name)
    except PolicyError as exc:
        return web.json_response({"yaml": text, "lua": "", "error": _error(exc, text)})
    return web.json_response({"yaml": text, "lua": lua, "error": None})


async def parse(request: web.Request) -> web.Response:
    """YAML typed in the code view, back into the builder where it can be."""
    data = await body(request)
    text, name = str(data.get("source", "")), str(data.get("name") or "policy.yaml")
    try:
        policy, why = builder.from_yaml(text, name)
        lua = to_lua(text, "yaml", name)
    except PolicyError as exc:
        return web.json_response({"policy": None, "error": _error(exc, text), "lua": ""})
    return web.json_response({"policy": policy, "unsupported": why, "error": None, "lua": lua})


def _error(exc: PolicyError, text: str) -> dict[str, Any]:
    return {
        "message": str(exc),
        "detail": exc.detail,
        "line": exc.line,
        "column": exc.column,
        "rule": builder.rule_at_line(text, exc.line),
    }


def live_state(o: Orchestrator) -> dict[str, Any]:
    """What the live view shows: status, queue, pools with GPUs and workers, decisions."""
    at = now_ms()
    # The last scheduled context (a tick old at most): taking a new one here would
    # steal the change hints the next cycle's diff relies on.
    ctx = o.last_result.context if o.last_result is not None else o.cluster.context(at)
    queue = [
        {"id": j.id, "priority": j.priority, "model": o.catalog.resolve(j.model_ref),
         "tenant": j.tenant_id, "wait_ms": at - j.queued_at}
        for j in ctx.queue[:100]
    ]  # fmt: skip
    pools = [
        {
            "id": p.id, "status": p.status,
            "gpus": [{"id": g.id, "name": g.device_name, "vram_total": g.vram_total_bytes,
                      "vram_used": g.vram_allocated_bytes, "util": g.utilization_percent,
                      "measured": g.measured} for g in p.gpus],
            "workers": [{"id": w.id, "model": w.model_ref, "status": w.status,
                         "job": w.current_job_id, "gpus": list(w.gpu_ids),
                         "slots_total": w.slots_total, "slots_busy": w.slots_busy,
                         "active_job_ids": list(w.active_job_ids)} for w in p.workers],
        }
        for p in ctx.pools
    ]  # fmt: skip
    return {
        "status": o.status(),
        "queue": queue,
        "queue_depth": len(ctx.queue),
        "pools": pools,
        "decisions": list(o.recent)[-20:][::-1],
    }


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the live state once a second."""
    o = _orchestrator(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    gate, who = request.app[GATE], caller(request)
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        while not o.draining and gate.still_admitted(who):  # a revoked key ends the stream
            payload = json.dumps(live_state(o), default=str)
            await response.write(f"event: state\ndata: {payload}\n\n".encode())
            await asyncio.sleep(EVENT_INTERVAL_S)
    return response
