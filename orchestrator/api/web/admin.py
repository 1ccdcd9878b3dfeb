"""Prometheus /metrics, /healthz, and the JSON mirror of AdminService at
/v2/admin/scheduler/* for the browser and scripts, with the trace of a draft policy
(`trace`) beside it.

Every route is behind the guard (guard.py): an operator credential, unless the
service runs without keys on loopback. State-changing endpoints take JSON
bodies only (common.body), so that a cross-site form cannot post to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, get_args

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.api.web.common import ORCHESTRATOR, PREFIX, body, caller
from orchestrator.config.context_file import context_from_dict
from orchestrator.debugging.diagnose import Mode, diagnose
from orchestrator.domain.errors import (
    ConfigError,
    InvalidRequestError,
    OrchestratorError,
    RateLimitedError,
)
from orchestrator.domain.samples import sample_context
from orchestrator.policy.builder import rule_at_line
from orchestrator.policy.validate import BANK, detect_language, to_lua
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine, platform_source
from orchestrator.sim.settings import SimSettings
from orchestrator.state.versions import Version
from orchestrator.support.tasks import cancel_and_wait

TRACE_MODES: tuple[Mode, ...] = get_args(Mode)  # "trace", "profile"
TRACE_CONTEXT = "sample"  # the bank context a trace runs on when the request names none
MAX_TRACE_NAME = 255  # characters of a traced policy's name (its chunk name in tracebacks)
# One trace at a time per service: a second, while one runs, is refused (429).
TRACE_SLOT = web.AppKey("trace_slot", asyncio.Semaphore)


def add_routes(app: web.Application) -> None:
    app[TRACE_SLOT] = asyncio.Semaphore(1)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get(f"{PREFIX}/status", status)
    app.router.add_get(f"{PREFIX}/platform-source", platform)
    app.router.add_get(f"{PREFIX}/versions", versions)
    app.router.add_post(f"{PREFIX}/validate", validate)
    app.router.add_post(f"{PREFIX}/deploy", deploy)
    app.router.add_post(f"{PREFIX}/rollback", rollback)
    app.router.add_post(f"{PREFIX}/simulate", simulate)
    app.router.add_get(f"{PREFIX}/shadow", shadow_status)
    app.router.add_post(f"{PREFIX}/shadow", shadow_start)
    app.router.add_post(f"{PREFIX}/shadow/stop", shadow_stop)
    app.router.add_get(f"{PREFIX}/trace", trace_options)
    app.router.add_post(f"{PREFIX}/trace", trace)


def source_fields(data: dict[str, Any]) -> tuple[str, str, str]:
    source = data.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("source: required (the Lua or YAML text of the policy)")
    name = str(data.get("name") or "policy")
    language = str(data.get("language") or detect_language(source, name))
    if language not in ("lua", "yaml"):
        raise ConfigError(f"language: expected lua or yaml, got {language!r}")
    return source, language, name


def version_json(v: Version | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {
        "id": v.id, "sha256": v.sha256, "name": v.name, "version": v.version,
        "language": v.language, "deployer": v.deployer, "deployed_at_ms": v.deployed_at,
        "reason": v.reason, "summary": v.summary, "active": v.active,
    }  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    o = request.app[ORCHESTRATOR]
    return web.Response(
        body=generate_latest(o.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def healthz(request: web.Request) -> web.Response:
    o = request.app[ORCHESTRATOR]
    if o.draining:
        return web.json_response({"status": "draining"}, status=503)
    cycles = o.cycle_health
    if cycles.failing:  # it answers, but schedules nothing: not healthy
        return web.json_response(
            {
                "status": "degraded",
                "failed_cycles": cycles.consecutive_failures,
                "failing_since_ms": cycles.failing_since_ms,
            },  # the error itself is in the log: /healthz is public, and messages name things
            status=503,
        )
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[ORCHESTRATOR].status())


async def platform(request: web.Request) -> web.Response:
    return web.Response(text=platform_source(), content_type="text/x-lua")


async def versions(request: web.Request) -> web.Response:
    o = request.app[ORCHESTRATOR]
    return web.json_response({"versions": [version_json(v) for v in o.list_versions()]})


async def validate(request: web.Request) -> web.Response:
    source, language, name = source_fields(await body(request))
    report = await request.app[ORCHESTRATOR].validate(source, language, name)
    out = {**report.to_dict(), "summary": report.summary(), "lua": report.lua}
    line = report.syntax.get("line")
    if language == "yaml" and isinstance(line, int):
        out["syntax"] = {**report.syntax, "rule": rule_at_line(source, line)}  # inline errors
    return web.json_response(out)


async def deploy(request: web.Request) -> web.Response:
    data = await body(request)
    source, language, name = source_fields(data)
    o = request.app[ORCHESTRATOR]
    deployer = caller(request).as_deployer(str(data.get("deployer") or "web"))
    version, report = await o.deploy(source, language, name, deployer)
    return web.json_response({"version": version_json(version), "report": report.to_dict()})


async def rollback(request: web.Request) -> web.Response:
    data = await body(request)
    version_id = data.get("version", 0)
    if not isinstance(version_id, int):
        raise ConfigError("version: expected a version id (an integer), or nothing")
    version = await request.app[ORCHESTRATOR].rollback(version_id)
    return web.json_response({"version": version_json(version)})


async def simulate(request: web.Request) -> web.StreamResponse:
    """With a `workload`: a simulation, its report as JSON (`{"reports": [...]}`), or
    with ?stream=1 as NDJSON progress lines ending in the reports. Without: the dry
    run with sample data (programmable-spec 8.3), one cycle, nothing applied."""
    data = await body(request)
    if "workload" in data:
        return await simulation(request, data)
    source, language, name = source_fields(data)
    ctx = context_from_dict(data["context"]) if data.get("context") else sample_context()
    lua = to_lua(source, language, name)
    o = request.app[ORCHESTRATOR]
    engine = SchedulingEngine(
        user_source=lua,
        user_name=name,
        language=o.config.scheduler.language,
        options=EngineOptions.from_config(o.config.scheduler, spares=0),
    )
    async with engine:
        result = await engine.schedule(ctx)
    return web.json_response({**result.to_json(), "lua": lua if language == "yaml" else None})


async def simulation(request: web.Request, data: dict[str, Any]) -> web.StreamResponse:
    workload = data["workload"]
    if not isinstance(workload, dict):
        raise ConfigError("workload: expected an object of simulation settings")
    settings = SimSettings.from_mapping(workload)
    source = data.get("source") or ""
    if not isinstance(source, str):
        raise ConfigError("source: expected the policy text, or nothing for the platform")
    name = str(data.get("name") or ("draft" if source.strip() else "platform"))
    language = str(data.get("language") or "")
    o = request.app[ORCHESTRATOR]
    compare_active = bool(data.get("compare_active"))
    if request.query.get("stream") not in ("1", "true"):
        reports = await o.simulate(source, language, name, settings, compare_active=compare_active)
        return web.json_response({"reports": [r.to_dict() for r in reports]})
    updates: asyncio.Queue[bytes] = asyncio.Queue()

    def progress(fraction: float, message: str) -> None:
        line = {"progress": round(fraction, 4), "message": message}
        updates.put_nowait(json.dumps(line).encode() + b"\n")

    run = asyncio.create_task(o.simulate(
        source, language, name, settings, compare_active=compare_active, progress=progress
    ))  # fmt: skip
    try:
        # A refusal (another simulation running, over the cap) comes before any progress:
        # it answers with its own status, not as a line of a stream already under 200.
        first = asyncio.ensure_future(updates.get())
        await asyncio.wait([run, first], return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            if run.exception() is not None:
                run.result()  # raises it, for the error table
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        if first.done() and not first.cancelled():
            await response.write(first.result())
        while not run.done() or not updates.empty():
            line = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    line = await updates.get()
            if line is not None:
                await response.write(line)
        try:
            final: dict[str, Any] = {"reports": [r.to_dict() for r in run.result()]}
        except OrchestratorError as exc:
            final = {"error": str(exc)}
        await response.write(json.dumps(final).encode() + b"\n")
    finally:
        await cancel_and_wait(run)
    await response.write_eof()
    return response


async def shadow_status(request: web.Request) -> web.Response:
    o = request.app[ORCHESTRATOR]
    return web.json_response(o.shadow.status() if o.shadow else {"active": False})


async def shadow_start(request: web.Request) -> web.Response:
    source, language, name = source_fields(await body(request))
    shadow = await request.app[ORCHESTRATOR].start_shadow(source, language, name)
    return web.json_response(shadow.status())


async def shadow_stop(request: web.Request) -> web.Response:
    await body(request)  # JSON only, like every state-changing call
    return web.json_response(await request.app[ORCHESTRATOR].stop_shadow())


async def trace_options(request: web.Request) -> web.Response:
    """What a trace may be asked for: `{"contexts": [bank context names], "default_context":
    "sample", "modes": ["trace", "profile"]}` (the web UI's selectors)."""
    return web.json_response(
        {"contexts": list(BANK), "default_context": TRACE_CONTEXT, "modes": list(TRACE_MODES)}
    )


async def trace(request: web.Request) -> web.Response:
    """Run a draft policy once on a bank context, instrumented, in a diagnostics sandbox
    worker (never the production path), and answer what it did.

    Body: `{"source", "language"?, "name"?}` as `validate` reads them (bounded as every
    body, 1 MiB; `name` at most MAX_TRACE_NAME characters), `"context"`: a bank context's
    name (`GET` lists them; default "sample"), `"mode"`: "trace" (default) or "profile".
    Answers the diagnosis (orchestrator/debugging/diagnose.py, `Diagnosis.to_json`) plus
    `"lua"`: the source its line numbers refer to (a YAML policy's compiled Lua).
    The script's own failures (Lua that does not load, raises, times out, returns no
    decision) are a 200 whose `error` says how. Refused: a bad field, an unknown context
    or mode, or YAML that does not compile, 400 invalid_argument (the message names the
    field, or the line); a trace while another runs in this service, 429 rate_limited
    (it is not queued: try again when it ends)."""
    data = await body(request)
    source, language, name = source_fields(data)
    if len(name) > MAX_TRACE_NAME:
        raise InvalidRequestError("name", f"at most {MAX_TRACE_NAME} characters")
    mode = data.get("mode") or "trace"
    if mode not in TRACE_MODES:
        raise InvalidRequestError("mode", f"expected one of {list(TRACE_MODES)}")
    label = data.get("context") or TRACE_CONTEXT
    if not isinstance(label, str) or label not in BANK:
        raise InvalidRequestError("context", f"expected one of {list(BANK)}")
    lua = to_lua(source, language, name)
    slot = request.app[TRACE_SLOT]
    # No await between this test and taking the slot: two requests cannot both pass.
    if slot.locked():
        raise RateLimitedError("a trace is already running in this service; try again when it ends")
    async with slot:
        ctx = await asyncio.to_thread(BANK[label])  # the 10k-job context takes a while
        scheduler = request.app[ORCHESTRATOR].config.scheduler
        diagnosis = await diagnose(
            lua, name, ctx, instrument=mode, language=scheduler.language,
            deadline_ms=scheduler.deadline_ms,
        )  # fmt: skip
    return web.json_response({**diagnosis.to_json(), "lua": lua})
