"""The guard in front of every HTTP route (UI, admin API, metrics, the OpenAI routes).

In order, for each request:
1. the `Host` header must name this service (the loopback names, the listen address,
   or `listen.allowed_hosts`): a page whose DNS name was rebound to this address
   names its own host and is refused;
2. the caller is authenticated (`Authorization: Bearer <key>`, or a client certificate
   under mutual TLS) and must hold a role the route's row in orchestrator/api/access.py
   allows; `?token=` is taken only on the event stream, which a browser's EventSource
   opens without headers;
3. a state-changing request (a POST with a JSON body, which a cross-site form cannot
   send) that names an `Origin` must come from an allowed host as well.
Changes (POSTs to the admin API) are written to the `audit` log with the caller
(`audit`, which the OpenAI routes use for the cancels they make).
Under `/v1/` (the OpenAI-compatible routes) the refusals answer in OpenAI's error shape
(errors.py).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from orchestrator.api.access import HTTP_TOKEN_IN_QUERY, http_audited, http_roles
from orchestrator.api.authn import bearer_token
from orchestrator.api.tls import http_common_name
from orchestrator.api.web.common import ALLOWED_HOSTS, CALLER, GATE
from orchestrator.api.web.errors import Handler
from orchestrator.config.settings import LOOPBACK_HOSTS, ServiceConfig, listen_host
from orchestrator.domain.errors import OrchestratorError, PermissionDeniedError
from orchestrator.domain.identity import Identity
from orchestrator.support.log import get_logger

log = get_logger("audit")

WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def allowed_hosts(config: ServiceConfig) -> frozenset[str]:
    own = listen_host(config.listen.http)
    extra = {own} if own not in WILDCARDS else set()
    return LOOPBACK_HOSTS | extra | {h.lower() for h in config.listen.allowed_hosts}


def audit(caller: Identity, action: str, outcome: object, **detail: object) -> None:
    """One line of the `audit` log for a change made through the HTTP edge: what was
    done, how it ended, and by whom (SECURITY.md)."""
    log.info(
        "audit", edge="http", action=action, outcome=outcome, caller=caller.describe(), **detail
    )


def _hostname(value: str) -> str:
    try:
        return (urlsplit("//" + value).hostname or "").lower()
    except ValueError:
        return ""


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    allowed = request.app[ALLOWED_HOSTS]
    if _hostname(request.host) not in allowed:
        raise PermissionDeniedError(
            f"Host {request.host!r} is not a name of this service "
            "(add it to listen.allowed_hosts if it is)"
        )
    resource = request.match_info.route.resource
    if resource is None:
        return await handler(request)  # no such route: 404, nothing to guard
    route = resource.canonical
    roles = http_roles(route)
    gate = request.app[GATE]
    if roles is None:
        raise gate.deny_unlisted("http", route)
    token = bearer_token(request.headers.get("Authorization", ""))
    if not token and route in HTTP_TOKEN_IN_QUERY:
        token = request.query.get("token", "")
    peercert = request.transport.get_extra_info("peercert") if request.transport else None
    door = f"{request.method} {route}"
    caller = gate.admit("http", door, roles, token, http_common_name(peercert))
    if caller is not None:
        request[CALLER] = caller
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if origin is not None and _hostname(urlsplit(origin).netloc) not in allowed:
            raise PermissionDeniedError(f"cross-origin request from {origin}")
    if caller is None or not http_audited(request.method, route):
        return await handler(request)
    outcome: object = "failed"
    try:
        response = await handler(request)
        outcome = response.status
        return response
    except web.HTTPException as exc:
        outcome = exc.status
        raise
    except OrchestratorError as exc:
        outcome = str(exc.code)
        raise
    finally:
        audit(caller, door, outcome)
