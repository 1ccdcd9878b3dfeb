"""The one error root of the project.

Library errors (lupa's LuaError, pynvml's NVMLError, yaml's YAMLError, grpc's
RpcError) are mapped to these at the boundary where they are caught; gRPC status
codes are set only in servicers.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(OrchestratorError):
    """A configuration or context file is malformed; the message names the field."""


class SchedulerLoadError(OrchestratorError):
    """A scheduler could not be loaded into a sandbox worker (syntax error, bytecode, ...)."""

    def __init__(self, message: str, traceback: str = "", *, transient: bool = False) -> None:
        super().__init__(message)
        self.traceback = traceback
        # A load that timed out may be the worker's fault (stopped, starved), not the
        # script's: worth another worker before the script is declared unloadable.
        self.transient = transient


class SandboxUnavailableError(OrchestratorError):
    """No sandbox worker could be started or reached."""


class UsageError(OrchestratorError):
    """The command line was used wrongly (exit status 2)."""
