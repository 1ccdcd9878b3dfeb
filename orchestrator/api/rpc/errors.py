"""The gRPC edge's one table: error codes to status codes.

Every servicer fails through `abort`, so a code means the same status on every RPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NoReturn

import grpc
from grpc import aio

from orchestrator.domain.errors import ErrorCode, OrchestratorError

S = grpc.StatusCode
STATUS: Mapping[ErrorCode, grpc.StatusCode] = MappingProxyType({
    ErrorCode.INVALID_ARGUMENT: S.INVALID_ARGUMENT,
    ErrorCode.UNAUTHENTICATED: S.UNAUTHENTICATED,
    ErrorCode.NOT_FOUND: S.NOT_FOUND,
    ErrorCode.PERMISSION_DENIED: S.PERMISSION_DENIED,
    ErrorCode.POLICY_REJECTED: S.FAILED_PRECONDITION,
    ErrorCode.SCHEDULER_UNLOADABLE: S.FAILED_PRECONDITION,
    ErrorCode.UNAVAILABLE: S.UNAVAILABLE,
    ErrorCode.QUEUE_FULL: S.RESOURCE_EXHAUSTED,
    ErrorCode.RATE_LIMITED: S.RESOURCE_EXHAUSTED,
    ErrorCode.USAGE: S.INVALID_ARGUMENT,
    ErrorCode.INTERNAL: S.INTERNAL,
})  # fmt: skip


async def abort(context: aio.ServicerContext, exc: OrchestratorError) -> NoReturn:
    """End the call with the status of `exc.code` and its message."""
    await context.abort(STATUS[exc.code], str(exc))
    raise AssertionError("unreachable: ServicerContext.abort raises")
