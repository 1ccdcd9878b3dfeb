"""Every door as every role, against a real server over real TLS (SECURITY.md).

The service listens on 0.0.0.0, as a deployment does, with certificates made here and
API keys for an operator, two tenants and a pool. Each gRPC method and each HTTP
route is called as: no credential, another tenant, the tenant, the pool, the
operator. The statuses seen must be exactly the table below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2
from structlog.testing import capture_logs

from orchestrator._proto import context_pb2
from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator._proto import orchestrator_pb2_grpc as pb_grpc
from orchestrator.api.access import RPC
from orchestrator.api.rpc.jobs import WATCHES_PER_CALLER
from orchestrator.cli.certs import Pki, make_pki
from orchestrator.config.credentials import token_hash
from orchestrator.config.settings import ServiceConfig, listen_host, load_config
from orchestrator.domain.errors import ConfigError
from orchestrator.wire.channel import ClientAuth, open_channel
from tests.conftest import REPO
from tests.service_helpers import Running, free_port, running_service, write_config

ROLES = ("none", "other", "tenant", "pool", "operator")
TOKENS = {
    "other": "orch_globex-app-key",
    "tenant": "orch_acme-app-key",
    "pool": "orch_pool-a-key",
    "operator": "orch_ops-alice-key",
}
KEYS = [
    {"name": "globex-app", "role": "tenant", "tenant": "globex"},
    {"name": "acme-app", "role": "tenant", "tenant": "acme"},
    {"name": "pool-a", "role": "pool", "pools": ["pool-a"]},
    {"name": "ops-alice", "role": "operator"},
]
for key, role in zip(KEYS, ("other", "tenant", "pool", "operator"), strict=True):
    key["sha256"] = token_hash(TOKENS[role])

S = grpc.StatusCode
OK = S.OK
# What each kind of door answers, by role.
JOB_OF_TENANT = dict(none=S.UNAUTHENTICATED, other=S.NOT_FOUND, tenant=OK,
                     pool=S.PERMISSION_DENIED, operator=OK)  # fmt: skip
AS_TENANT = dict(none=S.UNAUTHENTICATED, other=S.PERMISSION_DENIED, tenant=OK,
                 pool=S.PERMISSION_DENIED, operator=OK)  # fmt: skip
POOL_ONLY = dict(none=S.UNAUTHENTICATED, other=S.PERMISSION_DENIED, tenant=S.PERMISSION_DENIED,
                 pool=OK, operator=OK)  # fmt: skip
OPERATOR_ONLY = dict(none=S.UNAUTHENTICATED, other=S.PERMISSION_DENIED,
                     tenant=S.PERMISSION_DENIED, pool=S.PERMISSION_DENIED, operator=OK)  # fmt: skip
PUBLIC = dict.fromkeys(ROLES, OK)

GOOD = (REPO / "schedulers" / "templates" / "batch-optimized.yaml").read_text()
SOURCE = pb.SchedulerSource(source=GOOD, name="batch-optimized.yaml")
BEAT = pb.PoolHeartbeat(info=context_pb2.PoolInfo(id="pool-a", endpoint="127.0.0.1:9"))


@dataclass
class Stubs:
    jobs: pb_grpc.JobServiceStub
    pools: pb_grpc.PoolServiceStub
    admin: pb_grpc.AdminServiceStub
    health: Any


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def _first(stream: Any) -> None:
    async for _ in stream:
        stream.cancel()
        return


Call = Callable[[Stubs, str], Awaitable[Any]]
# (method, how to call it on a job of tenant acme, the statuses by role)
GRPC_DOORS: list[tuple[str, Call, dict[str, grpc.StatusCode]]] = [
    ("JobService/Submit", lambda s, _: s.jobs.Submit(pb.SubmitRequest(
        model="llama-8b", prompt="hi", max_tokens=4, tenant_id="acme")), AS_TENANT),
    ("JobService/Get", lambda s, j: s.jobs.Get(pb.GetJobRequest(job_id=j)), JOB_OF_TENANT),
    ("JobService/List", lambda s, _: s.jobs.List(pb.ListJobsRequest(tenant_id="acme")),
     AS_TENANT),
    ("JobService/Watch", lambda s, j: _first(s.jobs.Watch(pb.WatchRequest(job_id=j))),
     JOB_OF_TENANT),
    ("JobService/Cancel", lambda s, j: s.jobs.Cancel(pb.CancelJobRequest(job_id=j)),
     JOB_OF_TENANT),
    ("JobService/StreamOutput", lambda s, j: _first(s.jobs.StreamOutput(
        pb.GetJobRequest(job_id=j))), JOB_OF_TENANT),
    ("PoolService/Register", lambda s, _: s.pools.Register(pb.RegisterPoolRequest(
        pool_id="pool-a", endpoint="127.0.0.1:9")), POOL_ONLY),
    ("PoolService/Heartbeat", lambda s, _: s.pools.Heartbeat(BEAT), POOL_ONLY),
    ("PoolService/Register (another pool's id)", lambda s, _: s.pools.Register(
        pb.RegisterPoolRequest(pool_id="pool-b", endpoint="127.0.0.1:9")),
     {**POOL_ONLY, "pool": S.PERMISSION_DENIED}),
    ("PoolService/Heartbeat (another pool's id)", lambda s, _: s.pools.Heartbeat(
        pb.PoolHeartbeat(info=context_pb2.PoolInfo(id="pool-b", endpoint="127.0.0.1:9"))),
     {**POOL_ONLY, "pool": S.PERMISSION_DENIED}),
    ("AdminService/GetStatus", lambda s, _: s.admin.GetStatus(pb.GetStatusRequest()),
     OPERATOR_ONLY),
    ("AdminService/GetPlatformSource",
     lambda s, _: s.admin.GetPlatformSource(pb.GetPlatformSourceRequest()), OPERATOR_ONLY),
    ("AdminService/ValidateScheduler", lambda s, _: s.admin.ValidateScheduler(SOURCE),
     OPERATOR_ONLY),
    ("AdminService/DeployScheduler", lambda s, _: s.admin.DeployScheduler(pb.DeployRequest(
        scheduler=SOURCE, deployer="mallory")), OPERATOR_ONLY),
    ("AdminService/ListVersions", lambda s, _: s.admin.ListVersions(pb.ListVersionsRequest()),
     OPERATOR_ONLY),
    ("AdminService/Rollback", lambda s, _: s.admin.Rollback(pb.RollbackRequest(version_id=1)),
     OPERATOR_ONLY),
    ("AdminService/Simulate", lambda s, _: _drain(s.admin.Simulate(pb.SimulateRequest(
        workload=pb.SimulationWorkload(queue_depth=2, pools=1, workers_per_pool=1,
                                       duration_s=2.0, rate=1.0)))), OPERATOR_ONLY),
    ("AdminService/StartShadow", lambda s, _: s.admin.StartShadow(SOURCE), OPERATOR_ONLY),
    ("AdminService/StopShadow", lambda s, _: s.admin.StopShadow(pb.StopShadowRequest()),
     OPERATOR_ONLY),
    ("grpc.health.v1.Health/Check", lambda s, _: s.health.Check(
        health_pb2.HealthCheckRequest()), PUBLIC),
    ("grpc.health.v1.Health/Watch", lambda s, _: _first(s.health.Watch(
        health_pb2.HealthCheckRequest())), {**PUBLIC, "none": S.UNAUTHENTICATED}),
]  # fmt: skip

H = {"none": 401, "other": 403, "tenant": 403, "pool": 403, "operator": 200}
HTTP_PUBLIC = dict.fromkeys(ROLES, 200)
# The OpenAI routes: every client, each submitting as its own tenant (the operator as none).
HTTP_CLIENTS = {"none": 401, "other": 200, "tenant": 200, "pool": 403, "operator": 200}
CHAT = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PROMPT = {"model": "llama-8b", "prompt": "hi", "max_tokens": 2}
# (method, path, JSON body or None, the statuses by role)
HTTP_DOORS: list[tuple[str, str, dict[str, Any] | None, dict[str, int]]] = [
    ("GET", "/", None, HTTP_PUBLIC),
    ("GET", "/ui/app.js", None, HTTP_PUBLIC),
    ("GET", "/healthz", None, HTTP_PUBLIC),
    ("GET", "/metrics", None, H),  # every tenant's labels: an operator's
    ("GET", "/v2/admin/scheduler/status", None, H),
    ("GET", "/v2/admin/scheduler/platform-source", None, H),
    ("GET", "/v2/admin/scheduler/versions", None, H),
    ("GET", "/v2/admin/scheduler/vocabulary", None, H),
    ("GET", "/v2/admin/scheduler/templates", None, H),
    ("GET", "/v2/admin/scheduler/active", None, H),
    ("GET", "/v2/admin/scheduler/shadow", None, H),
    ("GET", "/v2/admin/events", None, H),
    ("POST", "/v2/admin/scheduler/validate", {"source": GOOD, "name": "p.yaml"}, H),
    ("POST", "/v2/admin/scheduler/compile", {"source": GOOD, "name": "p.yaml"}, H),
    ("POST", "/v2/admin/scheduler/parse", {"source": GOOD, "name": "p.yaml"}, H),
    ("POST", "/v2/admin/scheduler/simulate", {"source": GOOD, "name": "p.yaml"}, H),
    ("POST", "/v2/admin/scheduler/deploy", {"source": GOOD, "name": "p.yaml"}, H),
    ("POST", "/v2/admin/scheduler/rollback", {"version": 1}, H),
    ("POST", "/v2/admin/scheduler/shadow", {"source": GOOD, "name": "p.yaml"}, H),
    ("POST", "/v2/admin/scheduler/shadow/stop", {}, H),
    ("GET", "/v2/admin/scheduler/trace", None, H),
    ("POST", "/v2/admin/scheduler/trace", {"source": GOOD, "name": "p.yaml"}, H),
    ("GET", "/v1/models", None, HTTP_CLIENTS),
    ("POST", "/v1/chat/completions", CHAT, HTTP_CLIENTS),
    ("POST", "/v1/completions", PROMPT, HTTP_CLIENTS),
]


def secured_config(tmp_path: Path, pki: Pki, **overrides: Any) -> Path:
    return write_config(
        tmp_path,
        listen={"grpc": f"0.0.0.0:{free_port()}", "http": f"0.0.0.0:{free_port()}"},
        tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
        auth={"keys": KEYS},
        tenants={"acme": {"name": "Acme"}, "globex": {"name": "Globex"}},
        **overrides,
    )


def client_auth(pki: Pki, role: str) -> ClientAuth:
    return ClientAuth(token=TOKENS.get(role, ""), tls_ca=pki.ca.read_bytes())


@contextlib.asynccontextmanager
async def as_roles(svc: Running, pki: Pki) -> AsyncIterator[dict[str, Stubs]]:
    from grpc_health.v1 import health_pb2_grpc  # noqa: PLC0415

    channels = {r: open_channel(f"127.0.0.1:{svc.server.grpc_port}", client_auth(pki, r))
                for r in ROLES}  # fmt: skip
    try:
        yield {
            r: Stubs(pb_grpc.JobServiceStub(c), pb_grpc.PoolServiceStub(c),
                     pb_grpc.AdminServiceStub(c), health_pb2_grpc.HealthStub(c))
            for r, c in channels.items()
        }  # fmt: skip
    finally:
        for channel in channels.values():
            await channel.close()


async def status_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await asyncio.wait_for(call, 60)
    except aio.AioRpcError as exc:
        return exc.code()
    return OK


def https(pki: Pki) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=pki.ca))


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"} if role in TOKENS else {}


async def http_status(
    http: aiohttp.ClientSession, method: str, url: str, body: Any, role: str
) -> int:
    kwargs: dict[str, Any] = {"headers": bearer(role)}
    if body is not None:
        kwargs["json"] = body
    async with http.request(method, url, **kwargs) as response:
        if response.content_type != "text/event-stream":
            await response.read()
        return response.status


@pytest.mark.slow
async def test_every_door_as_every_role(tmp_path: Path) -> None:
    """The role x door table holds on a real TLS server: gRPC statuses and HTTP statuses."""
    pki = make_pki(tmp_path / "pki")
    config = secured_config(tmp_path, pki)
    listen = load_config(config).listen
    assert {listen_host(listen.grpc), listen_host(listen.http)} == {"0.0.0.0"}
    async with running_service(config, auth=client_auth(pki, "operator")) as svc:
        # Every authenticated RPC of the service has a row here and in the access table.
        tested = {name.split(" (")[0] for name, _, _ in GRPC_DOORS}
        assert {m.removeprefix("/orchestrator.v1.").lstrip("/") for m in RPC
                if "reflection" not in m} == tested  # fmt: skip
        async with as_roles(svc, pki) as stubs:
            job = await stubs["tenant"].jobs.Submit(
                pb.SubmitRequest(model="llama-8b", prompt="hello", max_tokens=4)
            )
            assert job.tenant_id == "acme"  # from the key, not from the request
            seen: dict[str, dict[str, str]] = {}
            for name, call, expected in GRPC_DOORS:
                row = seen.setdefault(name, {})
                for role in ROLES:
                    row[role] = (await status_of(call(stubs[role], job.id))).name
                assert row == {r: s.name for r, s in expected.items()}, name
        base = svc.http.replace("0.0.0.0", "127.0.0.1")
        async with aiohttp.ClientSession(connector=https(pki)) as http:
            for method, path, body, expected_http in HTTP_DOORS:
                got = {r: await http_status(http, method, base + path, body, r) for r in ROLES}
                assert got == expected_http, f"{method} {path}"
            # The event stream alone takes ?token= (EventSource sends no headers).
            url = f"{base}/v2/admin/scheduler/status?token={TOKENS['operator']}"
            assert await http_status(http, "GET", url, None, "none") == 401
            url = f"{base}/v2/admin/events?token={TOKENS['operator']}"
            assert await http_status(http, "GET", url, None, "none") == 200
            # Through the OpenAI routes too, a tenant's key submits as its tenant only.
            url = f"{base}/v1/chat/completions"
            async with http.post(url, json=CHAT, headers=bearer("tenant")) as response:
                submitted = response.headers["X-Job-Id"]
            other = {**bearer("tenant"), "X-Tenant-Id": "globex"}
            async with http.post(url, json=CHAT, headers=other) as response:
                assert response.status == 403
        mine = await svc.jobs.Get(pb.GetJobRequest(job_id=submitted))
        assert mine.tenant_id == "acme"


@pytest.mark.slow
async def test_the_deployer_and_the_audit_log_come_from_the_credential(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    async with running_service(
        secured_config(tmp_path, pki), auth=client_auth(pki, "operator")
    ) as svc:
        with capture_logs() as logs:
            reply = await svc.admin.DeployScheduler(
                pb.DeployRequest(scheduler=SOURCE, deployer="mallory")
            )
        assert reply.version.deployer == "ops-alice"
        audit = [e for e in logs if e["event"] == "audit"]
        assert audit and audit[-1]["caller"] == "ops-alice (operator)"
        assert audit[-1]["action"] == "DeployScheduler" and audit[-1]["outcome"] == "ok"


@pytest.mark.slow
async def test_tenants_see_only_their_own_jobs(tmp_path: Path) -> None:
    """List, Watch-all and request_id are per tenant; an operator sees all."""
    pki = make_pki(tmp_path / "pki")
    async with running_service(
        secured_config(tmp_path, pki), auth=client_auth(pki, "operator")
    ) as svc, as_roles(svc, pki) as stubs:  # fmt: skip
        acme, globex = stubs["tenant"].jobs, stubs["other"].jobs
        watch = globex.Watch(pb.WatchRequest())
        seen: list[str] = []

        async def follow() -> None:
            async for event in watch:
                seen.append(event.job.tenant_id)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        first = await acme.Submit(pb.SubmitRequest(
            model="llama-8b", prompt="a", max_tokens=4, request_id="r-1"))  # fmt: skip
        # The same request_id from another tenant is another job, not the first one.
        theirs = await globex.Submit(pb.SubmitRequest(
            model="llama-8b", prompt="b", max_tokens=4, request_id="r-1"))  # fmt: skip
        assert theirs.id != first.id and theirs.tenant_id == "globex"
        again = await acme.Submit(pb.SubmitRequest(
            model="llama-8b", prompt="a", max_tokens=4, request_id="r-1"))  # fmt: skip
        assert again.id == first.id
        listed = await globex.List(pb.ListJobsRequest())
        assert {j.tenant_id for j in listed.jobs} == {"globex"}
        everything = await stubs["operator"].jobs.List(pb.ListJobsRequest())
        assert {j.tenant_id for j in everything.jobs} == {"acme", "globex"}
        await asyncio.sleep(0.5)
        watch.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        assert seen and set(seen) == {"globex"}


@pytest.mark.slow
async def test_mutual_tls_names_the_caller_by_its_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    keys = [*KEYS, {"name": "ops-bob", "role": "operator", "cert_cn": "ops-bob"}]
    config = write_config(
        tmp_path,
        tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
             "client_ca_file": str(pki.ca)},
        auth={"keys": keys},
    )  # fmt: skip
    bob_cert, bob_key = pki.client("ops-bob")
    eve_cert, eve_key = pki.client("eve")
    bob = ClientAuth(tls_ca=pki.ca.read_bytes(), tls_cert=bob_cert.read_bytes(),
                     tls_key=bob_key.read_bytes())  # fmt: skip
    async with running_service(config, auth=bob) as svc:
        reply = await svc.admin.DeployScheduler(pb.DeployRequest(scheduler=SOURCE))
        assert reply.version.deployer == "ops-bob"
        address = f"127.0.0.1:{svc.server.grpc_port}"
        eve = ClientAuth(tls_ca=pki.ca.read_bytes(), tls_cert=eve_cert.read_bytes(),
                         tls_key=eve_key.read_bytes())  # fmt: skip
        async with open_channel(address, eve) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            assert await status_of(admin.GetStatus(pb.GetStatusRequest())) == S.UNAUTHENTICATED
        # No client certificate at all: the handshake itself fails.
        async with open_channel(address, ClientAuth(tls_ca=pki.ca.read_bytes())) as channel:
            jobs = pb_grpc.JobServiceStub(channel)
            call = jobs.List(pb.ListJobsRequest(), timeout=5)
            assert await status_of(call) == S.UNAVAILABLE


@pytest.mark.slow
async def test_keys_rotate_without_a_restart(tmp_path: Path) -> None:
    """Adding a key to the keys file admits it; removing one refuses it, within seconds."""
    keys_file = tmp_path / "keys.yaml"
    old, new = "orch_old-operator-key", "orch_new-operator-key"

    def write(*tokens: str) -> None:
        entries = [{"name": f"ops-{i}", "role": "operator", "sha256": token_hash(t)}
                   for i, t in enumerate(tokens)]  # fmt: skip
        keys_file.write_text(json.dumps({"keys": entries}))

    write(old)
    config = write_config(tmp_path, auth={"keys_file": str(keys_file)})
    async with running_service(config, auth=ClientAuth(token=old)) as svc:
        address = f"127.0.0.1:{svc.server.grpc_port}"

        async def status_as(token: str) -> grpc.StatusCode:
            async with open_channel(address, ClientAuth(token=token)) as channel:
                admin = pb_grpc.AdminServiceStub(channel)
                return await status_of(admin.GetStatus(pb.GetStatusRequest()))

        assert await status_as(new) == S.UNAUTHENTICATED
        write(old, new)
        await asyncio.sleep(1.2)
        assert await status_as(new) == OK
        async with open_channel(address, ClientAuth(token=old)) as channel:
            watch = pb_grpc.JobServiceStub(channel).Watch(pb.WatchRequest())
            watched = asyncio.create_task(status_of(_drain(watch)))
            await asyncio.sleep(0.3)
            write(new)
            svc.server.reload()  # SIGHUP reloads at once
            assert await status_as(old) == S.UNAUTHENTICATED
            async with open_channel(address, ClientAuth(token=new)) as fresh:
                await pb_grpc.JobServiceStub(fresh).Submit(
                    pb.SubmitRequest(model="llama-8b", prompt="x", max_tokens=2)
                )  # the next event ends the revoked key's open stream
            assert await asyncio.wait_for(watched, 10) == S.UNAUTHENTICATED
        keys_file.write_text("keys: [ {name: broken")  # a bad edit keeps the last good keys
        svc.server.reload()
        assert await status_as(new) == OK


def test_a_listener_off_loopback_needs_tls_and_keys(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    for listen, extra, setting in (
        ({"grpc": "0.0.0.0:50051"}, {}, "listen.grpc"),
        ({"http": "0.0.0.0:8080"}, {"auth": {"keys": KEYS}}, "listen.http"),
        ({"grpc": "10.1.2.3:50051"}, {"tls": tls}, "listen.grpc"),
    ):
        path = write_config(tmp_path, listen=listen, **extra)
        with pytest.raises(ConfigError, match=f"{setting} .* set tls.cert_file"):
            load_config(path)
    with pytest.raises(ValueError, match=r"platform serves several tenants: set auth\.keys"):
        ServiceConfig(deployment_mode="platform", mode="platform")


async def test_the_http_api_answers_only_to_its_own_host_names(tmp_path: Path) -> None:
    """DNS rebinding: a page whose name resolves to 127.0.0.1 names its own Host."""
    async with running_service(write_config(tmp_path)) as svc, aiohttp.ClientSession() as http:
        url = svc.http + "/v2/admin/scheduler/status"
        port = svc.server.http_port
        async with http.get(url, headers={"Host": f"rebound.attacker.example:{port}"}) as r:
            assert r.status == 403 and "allowed_hosts" in (await r.json())["error"]
        async with http.get(url, headers={"Host": f"localhost:{port}"}) as r:
            assert r.status == 200
        deploy = svc.http + "/v2/admin/scheduler/deploy"
        hostile = {"Origin": "http://rebound.attacker.example", "Host": f"127.0.0.1:{port}"}
        async with http.post(deploy, json={"source": GOOD}, headers=hostile) as r:
            assert r.status == 403


async def test_one_caller_holds_a_bounded_number_of_watches(tmp_path: Path) -> None:
    """Each Watch holds a buffer: a caller may keep WATCHES_PER_CALLER open, not more."""
    async with running_service(write_config(tmp_path)) as svc:
        streams = [svc.jobs.Watch(pb.WatchRequest()) for _ in range(WATCHES_PER_CALLER)]
        readers = [asyncio.create_task(_drain(stream)) for stream in streams]
        await asyncio.sleep(1.0)  # all of them open on the server
        extra = svc.jobs.Watch(pb.WatchRequest())
        assert await status_of(_drain(extra)) == S.RESOURCE_EXHAUSTED
        streams[0].cancel()
        await asyncio.sleep(0.5)
        again = svc.jobs.Watch(pb.WatchRequest())
        first = asyncio.create_task(status_of(_first(again)))
        await asyncio.sleep(0.3)
        await svc.submit()
        assert await first == OK
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def reflected_services(svc: Running) -> list[str] | grpc.StatusCode:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: PLC0415

    stub = reflection_pb2_grpc.ServerReflectionStub(svc.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        async for reply in stub.ServerReflectionInfo(iter([request])):
            return [s.name for s in reply.list_services_response.service]
    except aio.AioRpcError as exc:
        return exc.code()
    return []


async def test_reflection_is_off_in_platform_mode(tmp_path: Path) -> None:
    for sub in ("lab", "platform"):
        (tmp_path / sub).mkdir()
    async with running_service(write_config(tmp_path / "lab")) as svc:
        names = await reflected_services(svc)
        assert isinstance(names, list) and "orchestrator.v1.JobService" in names
    platform = write_config(tmp_path / "platform", deployment_mode="platform", mode="platform",
                            tenants={"acme": {}}, local_pool={"enabled": False})  # fmt: skip
    async with running_service(platform) as svc:
        assert await reflected_services(svc) == S.UNIMPLEMENTED
