"""The HTTP edge's one table: error codes to statuses, and the middleware that uses it.

An error answers `{"error": message, "code": code}`, plus whatever structured detail
the error carries (a refused scheduler's validation report). Under `/v1/`, the
OpenAI-compatible routes (openai.py), the same statuses answer in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, which is what OpenAI clients read;
so do the guard's refusals and aiohttp's own (413 for a body over the bound, 405, 404).
Those routes also report how a job ended short of completing (`JobOutcome`); its
statuses sit here too, so that every status of the edge comes from this module.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from aiohttp import hdrs, web

from orchestrator.domain.errors import ErrorCode, InvalidRequestError, OrchestratorError

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


class JobOutcome(StrEnum):
    """How a job ended short of completing, as the OpenAI routes report it (their `code`):
    not an error of the request, so not an `ErrorCode`, but a status all the same."""

    CANCELLED = "cancelled"  # someone cancelled it
    JOB_FAILED = "job_failed"  # it failed, after its retries
    WORKER_FAILED = "worker_failed"  # its worker failed after its output had been sent


OUTCOME_STATUS: Mapping[JobOutcome, int] = MappingProxyType({
    JobOutcome.CANCELLED: 409,
    JobOutcome.JOB_FAILED: 502,
    JobOutcome.WORKER_FAILED: 502,
})  # fmt: skip


def status_of(code: ErrorCode | JobOutcome) -> int:
    """The HTTP status of an error code or a job's outcome."""
    return OUTCOME_STATUS[code] if isinstance(code, JobOutcome) else STATUS[code]


OPENAI_PREFIX = "/v1/"
# OpenAI's error `type` is a coarse class of the status; `code` carries ours.
OPENAI_TYPE: Mapping[int, str] = MappingProxyType({
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
})  # fmt: skip


def openai_error(
    message: str, code: ErrorCode | JobOutcome, *, param: str | None = None
) -> dict[str, Any]:
    """An error in OpenAI's shape, for a response with `code`'s status or an event of a
    stream."""
    return _openai_body(message, status_of(code), code, param)


def openai_response(
    message: str, code: ErrorCode | JobOutcome, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An answer of an OpenAI route that is an error, with `code`'s status."""
    return web.json_response(openai_error(message, code), status=status_of(code), headers=headers)


def _openai_body(message: str, status: int, code: str | None, param: str | None) -> dict[str, Any]:
    kind = OPENAI_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    openai = request.path.startswith(OPENAI_PREFIX)
    try:
        return await handler(request)
    except OrchestratorError as exc:
        status = STATUS[exc.code]
        if openai:
            param = exc.field if isinstance(exc, InvalidRequestError) else None
            body = openai_error(str(exc), exc.code, param=param)
            return web.json_response(body, status=status)
        return web.json_response(
            {"error": str(exc), "code": exc.code, **exc.details()}, status=status
        )
    except web.HTTPException as exc:
        if not openai or exc.status < 400:
            raise
        allow = {hdrs.ALLOW: exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else None
        body = _openai_body(_message(exc), exc.status, None, None)
        return web.json_response(body, status=exc.status, headers=allow)


def _message(exc: web.HTTPException) -> str:
    """What an aiohttp refusal says: its text, or the message of our own JSON error body
    (api/web/common.py, `body`)."""
    if exc.content_type == "application/json" and exc.text:
        try:
            return str(json.loads(exc.text)["error"])
        except (ValueError, KeyError, TypeError):
            pass
    return exc.text or exc.reason
