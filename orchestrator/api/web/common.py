"""What every HTTP handler module shares: the app keys, the caller, the admin prefix,
JSON bodies."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from orchestrator.api.authn import Gatekeeper
from orchestrator.domain.identity import Identity
from orchestrator.service.orchestrator import Orchestrator

ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)
GATE = web.AppKey("gate", Gatekeeper)
CALLER = web.RequestKey("caller", Identity)  # set by the guard on non-public routes
ALLOWED_HOSTS = web.AppKey("allowed_hosts", frozenset[str])  # guard.allowed_hosts, once
PREFIX = "/v2/admin/scheduler"


async def body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object. State-changing endpoints take JSON bodies only, so
    that a cross-site form cannot post to them."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json.dumps({"error": "send application/json"}), content_type="application/json"
        )
    try:
        data = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "the body is not valid JSON"}),
            content_type="application/json",
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "expected a JSON object"}), content_type="application/json"
        )
    return data


def caller(request: web.Request) -> Identity:
    """Who made this request; the guard has admitted it to a non-public route."""
    return request[CALLER]
