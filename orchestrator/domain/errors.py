"""The one error taxonomy of the project.

Every error this project raises on purpose is an `OrchestratorError`, and each class
carries an `ErrorCode`: what went wrong, in words no protocol owns. Each edge turns
codes into its own terms in exactly one table: gRPC status codes in
`orchestrator/api/rpc/errors.py`, HTTP statuses in `orchestrator/api/web/errors.py`
(docs/ARCHITECTURE.md, D24). No edge looks at a message to decide.

Library errors (lupa's LuaError, pynvml's NVMLError, yaml's YAMLError, grpc's
RpcError) are mapped to these at the boundary where they are caught.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """What kind of failure an error is, for callers that must act on it."""

    INVALID_ARGUMENT = "invalid_argument"  # the request, file or field is malformed
    UNAUTHENTICATED = "unauthenticated"  # no credential, or one that matches no identity
    NOT_FOUND = "not_found"  # no such job, pool or scheduler version
    PERMISSION_DENIED = "permission_denied"  # not allowed: this role, mode or pool
    POLICY_REJECTED = "policy_rejected"  # a scheduler failed validation before deploy
    SCHEDULER_UNLOADABLE = "scheduler_unloadable"  # a scheduler does not load in a sandbox
    UNAVAILABLE = "unavailable"  # draining: the service takes no new work
    QUEUE_FULL = "queue_full"  # the queue is at its configured capacity
    RATE_LIMITED = "rate_limited"  # a tenant's request or token rate, or its share, is used up
    USAGE = "usage"  # the command line was used wrongly
    INTERNAL = "internal"  # a failure of ours


class OrchestratorError(Exception):
    """Base class of every error this project raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def details(self) -> dict[str, object]:
        """Structured detail an edge may send along with the message (JSON-ready)."""
        return {}


class ConfigError(OrchestratorError):
    """A configuration or context file is malformed; the message names the field."""

    code = ErrorCode.INVALID_ARGUMENT


class InvalidRequestError(OrchestratorError):
    """A request was refused; `field` names what was wrong."""

    code = ErrorCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnauthenticatedError(OrchestratorError):
    """No credential was given, or the one given matches no identity."""

    code = ErrorCode.UNAUTHENTICATED


class NotFoundError(OrchestratorError):
    """No such job, pool or scheduler version."""

    code = ErrorCode.NOT_FOUND


class PermissionDeniedError(OrchestratorError):
    """Not allowed: for this caller's role, in this deployment mode, or for this pool."""

    code = ErrorCode.PERMISSION_DENIED


class DrainingError(OrchestratorError):
    """The service is draining: it takes no new work."""

    code = ErrorCode.UNAVAILABLE


class QueueFullError(OrchestratorError):
    """The queue holds `queue.capacity` jobs already."""

    code = ErrorCode.QUEUE_FULL


class RateLimitedError(OrchestratorError):
    """A tenant's submit rate or queue share is used up; retrying later may succeed."""

    code = ErrorCode.RATE_LIMITED


class SchedulerLoadError(OrchestratorError):
    """A scheduler could not be loaded into a sandbox worker (syntax error, bytecode, ...)."""

    code = ErrorCode.SCHEDULER_UNLOADABLE

    def __init__(self, message: str, traceback: str = "", *, transient: bool = False) -> None:
        super().__init__(message)
        self.traceback = traceback
        # A load that timed out may be the worker's fault (stopped, starved), not the
        # script's: worth another worker before the script is declared unloadable.
        self.transient = transient


class SandboxUnavailableError(OrchestratorError):
    """No sandbox worker could be started or reached (a failure of ours: INTERNAL)."""


class PoolError(OrchestratorError):
    """An inference worker could not be started or stopped."""


class UsageError(OrchestratorError):
    """The command line was used wrongly (exit status 2)."""

    code = ErrorCode.USAGE
