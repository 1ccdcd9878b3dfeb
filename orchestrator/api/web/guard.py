"""The guard in front of the whole admin surface (UI and API alike).

With `admin_token` set (required when listen.http is not loopback), every admin
request carries `Authorization: Bearer <token>` (or `?token=` for the event stream,
which browsers cannot give headers). State-changing requests are POSTs with a JSON
body (a cross-site form cannot send one), and one that names a foreign `Origin` is
refused: together, no cross-site request can deploy or roll back.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from aiohttp import web

from orchestrator.api.web.common import ORCHESTRATOR
from orchestrator.api.web.errors import Handler

PUBLIC = ("/", "/healthz", "/metrics")  # the page itself holds no data


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token (when configured), and no cross-origin state changes."""
    token = request.app[ORCHESTRATOR].config.admin_token
    if token and request.path not in PUBLIC and not request.path.startswith("/ui/"):
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        given = given or request.query.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return web.json_response({"error": f"cross-origin request from {origin}"}, status=403)
    response: web.StreamResponse = await handler(request)
    return response
