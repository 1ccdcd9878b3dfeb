"""The HTTP edge's one table: error codes to statuses, and the middleware that uses it.

An error answers `{"error": message, "code": code}`, plus whatever structured detail
the error carries (a refused scheduler's validation report).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

from aiohttp import web

from orchestrator.domain.errors import ErrorCode, OrchestratorError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS: Mapping[ErrorCode, int] = MappingProxyType({
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.POLICY_REJECTED: 422,
    ErrorCode.SCHEDULER_UNLOADABLE: 400,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.USAGE: 400,
    ErrorCode.INTERNAL: 500,
})  # fmt: skip


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OrchestratorError as exc:
        return web.json_response(
            {"error": str(exc), "code": exc.code, **exc.details()}, status=STATUS[exc.code]
        )
