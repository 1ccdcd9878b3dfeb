"""Who is calling, and what that caller may touch. Pure.

An `Identity` comes from a credential (a bearer API key, or a verified client
certificate) and never from a request field (SECURITY.md). Three roles:

- `tenant`: submits as its own tenant and sees, watches and cancels only its jobs;
- `operator`: the admin surface and every job (it may submit on a tenant's behalf);
- `pool`: PoolService only, and only for the pool ids its credential names.

`LOCAL_OPERATOR` is the caller of a service that has no credentials configured, which
the configuration allows only when every listener is on loopback (home and lab
machines, `make run`): whoever can reach a loopback port already runs on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator.domain.errors import PermissionDeniedError


class Role(StrEnum):
    TENANT = "tenant"
    OPERATOR = "operator"
    POOL = "pool"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller. `name` is what audit records and versions carry."""

    name: str
    role: Role
    tenant_id: str | None = None  # the tenant role's tenant
    pool_ids: frozenset[str] = frozenset()  # the pool role's pools
    # What it was admitted by: a key's SHA-256, or "cert:<common name>"; a stream ends
    # when that credential is removed, even if the name lives on under a new key.
    credential: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if (self.role == Role.TENANT) != bool(self.tenant_id):
            raise ValueError("a tenant identity names exactly one tenant; other roles none")
        if self.pool_ids and self.role != Role.POOL:
            raise ValueError("only a pool identity names pools")

    @property
    def is_operator(self) -> bool:
        return self.role == Role.OPERATOR

    def job_scope(self) -> str | None:
        """The tenant whose jobs this caller may see; None means every tenant's. A pool
        has no jobs of its own (the access table keeps it out of JobService; this keeps
        a slip there from reading as "every job")."""
        if self.is_operator:
            return None
        if self.tenant_id:
            return self.tenant_id
        raise PermissionDeniedError(f"{self.describe()} has no jobs to see")

    def acting_for(self, requested: str) -> str:
        """The tenant a submit of this caller's acts for: a tenant's own, whether or not it
        names it (another's is PermissionDeniedError); an operator's choice, "" for none."""
        scope = self.job_scope()
        if scope is None:
            return requested
        if requested and requested != scope:
            raise PermissionDeniedError(
                f"{self.describe()} acts only for its own tenant, not {requested!r}"
            )
        return scope

    def may_speak_for(self, pool_id: str) -> bool:
        """Whether this caller may register, heartbeat and take commands as `pool_id`."""
        return self.is_operator or (self.role == Role.POOL and pool_id in self.pool_ids)

    def as_deployer(self, claimed: str = "") -> str:
        """The name a deployed version records. Only the local operator, which has no
        credential to be named by, may add the name a client claims, marked as local."""
        if self == LOCAL_OPERATOR and claimed:
            return f"{self.name}:{claimed}"
        return self.name

    def describe(self) -> str:
        """`name (role[:tenant])`, for audit lines and messages."""
        detail = f"{self.role}:{self.tenant_id}" if self.tenant_id else str(self.role)
        return f"{self.name} ({detail})"


LOCAL_OPERATOR = Identity(name="local", role=Role.OPERATOR)
