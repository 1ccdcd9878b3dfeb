"""Authentication and authorization shared by both edges (gRPC and HTTP).

Each edge extracts what the transport gives (the `authorization` header or metadata,
the verified client certificate's common name) and asks `Gatekeeper.admit` for the
caller, against the roles its access table (orchestrator/api/access.py) allows.
Refusals are `UnauthenticatedError` or `PermissionDeniedError`, counted by edge and
reason, and never say whether a credential exists.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from orchestrator.config.credentials import CredentialStore
from orchestrator.domain.errors import PermissionDeniedError, UnauthenticatedError
from orchestrator.domain.identity import LOCAL_OPERATOR, Identity, Role
from orchestrator.support.log import get_logger

log = get_logger("auth")


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` value ("" when it is not one)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Gatekeeper:
    """Credentials to an `Identity`, and whether that identity may pass a door.

    Without a credential store (no `auth` configured, which the configuration allows
    only while every listener is on loopback) every caller is `LOCAL_OPERATOR`.
    """

    def __init__(self, store: CredentialStore | None, registry: CollectorRegistry) -> None:
        self.store = store
        self.refused = Counter(
            "orchestrator_auth_refused",
            "Calls refused at an edge, by edge (grpc, http) and reason.",
            ["edge", "reason"],
            registry=registry,
        )

    def identify(self, edge: str, token: str, cert_cn: str) -> Identity:
        if self.store is None:
            return LOCAL_OPERATOR
        credentials = self.store.get()
        identity = credentials.for_token(token) if token else None
        if identity is None and not token:
            identity = credentials.for_certificate(cert_cn)
        if identity is None:
            reason = "unknown_credential" if token or cert_cn else "no_credential"
            self.refused.labels(edge, reason).inc()
            raise UnauthenticatedError(
                "no valid credential: send `authorization: Bearer <api key>`"
                + (" or a client certificate that names an identity" if cert_cn else "")
            )
        return identity

    def admit(
        self, edge: str, door: str, roles: frozenset[Role], token: str, cert_cn: str
    ) -> Identity | None:
        """The caller passing `door`; None for a public door (no credential looked at)."""
        if not roles:
            return None
        identity = self.identify(edge, token, cert_cn)
        if identity.role not in roles:
            self.refused.labels(edge, "role").inc()
            log.warning("auth.denied", edge=edge, door=door, caller=identity.describe())
            raise PermissionDeniedError(
                f"{identity.describe()} may not call {door} "
                f"(it needs the {' or '.join(sorted(roles))} role)"
            )
        return identity

    def still_admitted(self, identity: Identity) -> bool:
        """Whether `identity`'s credential is still configured: a stream opened with a
        key that was since removed ends at its next event (revocation is immediate)."""
        return self.store is None or self.store.get().holds(identity)

    def deny_unlisted(self, edge: str, door: str) -> PermissionDeniedError:
        self.refused.labels(edge, "unlisted").inc()
        return PermissionDeniedError(f"{door} is not in the access table")
