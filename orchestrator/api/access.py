"""Who may call what: the one access table of every door (SECURITY.md shows it).

Both edges enforce these tables before a handler runs, and deny what is not listed:
a new RPC or route is unreachable until it is given a row here. `PUBLIC` needs no
credential. Finer rules live with the data they protect: a tenant sees only its own
jobs (the job scope of its `Identity`), a pool speaks only for its own pool ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from orchestrator.domain.identity import Role

PUBLIC: frozenset[Role] = frozenset()  # no credential needed
CLIENTS = frozenset({Role.TENANT, Role.OPERATOR})
POOLS = frozenset({Role.POOL, Role.OPERATOR})
OPERATORS = frozenset({Role.OPERATOR})
ANYONE = frozenset(Role)  # any valid credential

JOBS = "/orchestrator.v1.JobService/"
POOL = "/orchestrator.v1.PoolService/"
ADMIN = "/orchestrator.v1.AdminService/"

RPC: Mapping[str, frozenset[Role]] = MappingProxyType({
    **{JOBS + m: CLIENTS for m in (
        "Submit", "Get", "Cancel", "List", "Watch", "StreamOutput",
    )},
    **{POOL + m: POOLS for m in ("Register", "Heartbeat")},
    **{ADMIN + m: OPERATORS for m in (
        "GetStatus", "GetPlatformSource", "ValidateScheduler", "DeployScheduler",
        "ListVersions", "Rollback", "Simulate", "StartShadow", "StopShadow",
    )},
    # Health answers SERVING or not, nothing more: load balancers probe it unauthenticated.
    # Its Watch holds a stream open, which only a caller with a key may do.
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": ANYONE,
    # Reflection describes the schema, no data; it is served only when enabled.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
})  # fmt: skip

# Audited: what changes the service, whoever does it (the `audit` log lines).
AUDITED_RPCS = frozenset({
    JOBS + "Cancel", POOL + "Register",
    *(ADMIN + m for m in ("DeployScheduler", "Rollback", "Simulate", "StartShadow", "StopShadow")),
})  # fmt: skip

# HTTP: by route (the aiohttp resource's canonical path). `/metrics` carries every
# tenant's labels and the values their schedulers emit: an operator's, like the admin API.
# The OpenAI-compatible routes (api/web/openai.py) are JobService's Submit and its output
# stream in another shape: the clients'.
ADMIN_HTTP = "/v2/admin/"
HTTP_PUBLIC = frozenset({"/", "/ui/{name}", "/healthz"})
HTTP_CLIENTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})
HTTP_METRICS = "/metrics"
# The browser's EventSource cannot send headers: only this route takes `?token=`.
HTTP_TOKEN_IN_QUERY = frozenset({"/v2/admin/events"})


def http_roles(route: str) -> frozenset[Role] | None:
    """The roles that may call `route`; None: no such row (denied)."""
    if route in HTTP_PUBLIC:
        return PUBLIC
    if route in HTTP_CLIENTS:
        return CLIENTS
    if route == HTTP_METRICS or route.startswith(ADMIN_HTTP):
        return OPERATORS
    return None


def http_audited(method: str, route: str) -> bool:
    """Whether a call is written to the `audit` log: every admin POST. A submit through
    the OpenAI routes is not, as a gRPC Submit is not; the cancels those routes make for
    a client are, by the routes themselves (api/web/openai.py, `_abandon`)."""
    return method == "POST" and route.startswith(ADMIN_HTTP)
