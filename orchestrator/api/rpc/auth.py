"""gRPC authentication: the interceptor in front of every method, and the caller it finds.

Every call passes `AuthInterceptor` first. It looks the method up in the access table
(orchestrator/api/access.py): a method with no row is refused, a public one passes
untouched, and any other needs a credential, the `authorization: Bearer <key>`
metadata or (with mutual TLS) a client certificate naming an identity, whose role the
row allows. The caller is then `current_caller()` for the servicer, which scopes what
the call may see by it. Changes to the service are written to the `audit` log.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

import grpc
from grpc import aio

from orchestrator.api.access import AUDITED_RPCS, RPC
from orchestrator.api.authn import Gatekeeper, bearer_token
from orchestrator.api.rpc.errors import abort
from orchestrator.domain.errors import OrchestratorError
from orchestrator.domain.identity import Identity, Role
from orchestrator.support.log import get_logger

log = get_logger("audit")

# Each RPC is served in its own asyncio task, so a value set here is that call's alone.
_CALLER: ContextVar[Identity] = ContextVar("caller")


def current_caller() -> Identity:
    """The authenticated caller of the RPC being served. Raises LookupError outside one,
    so that a servicer reached without the interceptor fails closed."""
    return _CALLER.get()


def peer_common_name(context: aio.ServicerContext) -> str:
    """The verified client certificate's common name (mutual TLS), or ""."""
    names = (context.auth_context() or {}).get("x509_common_name") or [b""]
    return bytes(names[0]).decode(errors="replace")


def authorization(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, gate: Gatekeeper, table: Mapping[str, frozenset[Role]] = RPC) -> None:
        self.gate = gate
        self.table = table
        # method -> (the servicer's handler, the one that guards it): built once per
        # method, not for every call, since a method's handler does not change.
        self._guards: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return None  # UNIMPLEMENTED, as without the interceptor
        known = self._guards.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        roles = self.table.get(method)
        if roles is None:
            guard = self._refusing(handler, method)
        elif not roles:
            guard = handler
        else:
            guard = self._guarded(handler, method, roles)
        self._guards[method] = (handler, guard)
        return guard

    def _refusing(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A method with no row in the table: served as a refusal, whatever its kind."""

        async def refuse(request: Any, context: aio.ServicerContext) -> Any:
            await abort(context, self.gate.deny_unlisted("grpc", method))

        codec = _codec(handler)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse, **codec)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse, **codec)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse, **codec)
        return grpc.unary_unary_rpc_method_handler(refuse, **codec)

    async def _admit(
        self, method: str, roles: frozenset[Role], context: aio.ServicerContext
    ) -> None:
        token = bearer_token(authorization(context))
        # A certificate names the caller only when no key does (Gatekeeper.identify);
        # reading it is a call into the transport, which a call with a key is spared.
        cert_cn = "" if token or self.gate.store is None else peer_common_name(context)
        try:
            caller = self.gate.admit("grpc", method, roles, token, cert_cn)
        except OrchestratorError as exc:
            await abort(context, exc)
        assert caller is not None  # non-public rows name roles
        _CALLER.set(caller)

    def _audit(self, method: str, outcome: str) -> None:
        if method in AUDITED_RPCS:
            caller = _CALLER.get(None)
            log.info(
                "audit", edge="grpc", action=method.rsplit("/", 1)[-1], outcome=outcome,
                caller=caller.describe() if caller else "",
            )  # fmt: skip

    def _guarded(
        self, handler: grpc.RpcMethodHandler, method: str, roles: frozenset[Role]
    ) -> grpc.RpcMethodHandler:
        codec = _codec(handler)
        behavior = handler.unary_unary or handler.unary_stream
        if behavior is None:  # no client-streaming method needs a credential (see RPC)
            raise AssertionError(f"{method}: a streaming-request method cannot be authenticated")
        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
        )
        # A server-streaming method yields (ours) or writes to its context (grpc's own
        # Health.Watch): the guard takes the same shape as what it guards.
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                await self._admit(method, roles, context)
                try:
                    async for reply in behavior(request, context):
                        yield reply
                except BaseException as exc:
                    self._audit(method, _outcome(exc, context))
                    raise
                self._audit(method, "ok")

            return make(stream, **codec)

        async def call(request: Any, context: aio.ServicerContext) -> Any:
            await self._admit(method, roles, context)
            try:
                reply = await behavior(request, context)
            except BaseException as exc:
                self._audit(method, _outcome(exc, context))
                raise
            self._audit(method, "ok")
            return reply

        return make(call, **codec)


def _codec(handler: grpc.RpcMethodHandler) -> dict[str, Any]:
    """How the method's messages are read and written, for the handler that replaces it."""
    return {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }


def _outcome(exc: BaseException, context: aio.ServicerContext) -> str:
    """How an audited call ended: the status it aborted with, or "failed"."""
    code = context.code()
    return code.name.lower() if isinstance(code, grpc.StatusCode) else "failed"
