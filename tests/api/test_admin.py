"""Deploying policies: validation, versions, rollback, hot reload, platform mode, HTTP mirror, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc import aio
from structlog.testing import capture_logs

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.api.web.admin import TRACE_SLOT
from orchestrator.config.credentials import token_hash
from tests.conftest import REPO
from tests.service_helpers import OPERATOR_KEY, Running, code_of, running_service, write_config

TEMPLATES = REPO / "schedulers" / "templates"
GOOD = (TEMPLATES / "batch-optimized.yaml").read_text()
OTHER = (TEMPLATES / "fair-share.yaml").read_text()
# Loads and passes the bank, but raises on the service's own pool: it fails only in production.
BREAKS_IN_PRODUCTION = """-- @version 9.9.9
function schedule(ctx)
  if ctx.get_pool("local") then error("boom on the real cluster") end
  return ctx.platform_schedule(ctx)
end
"""


async def deploy(svc: Running, source: str, name: str = "policy.yaml") -> pb.DeployReply:
    reply: pb.DeployReply = await svc.admin.DeployScheduler(
        pb.DeployRequest(scheduler=pb.SchedulerSource(source=source, name=name), deployer="test")
    )
    return reply


async def test_deploy_list_and_roll_back(tmp_path: Path) -> None:
    """A valid policy deploys and takes over; versions keep history; rollback is one call."""
    async with running_service(write_config(tmp_path)) as svc:
        first = await deploy(svc, GOOD, "batch-optimized.yaml")
        assert first.version.id == 1 and first.version.version == "1.0.0"
        assert first.version.active and "valid: 8 bank contexts" in first.version.summary
        status = await svc.admin.GetStatus(pb.GetStatusRequest())
        assert (status.scheduler.version_id, status.scheduler.name) == (1, "batch-optimized.yaml")
        done = await svc.wait_finished((await svc.submit(priority="interactive")).id)
        assert done.state == pb.JOB_STATE_COMPLETED
        second = await deploy(svc, OTHER, "fair-share.yaml")
        assert second.version.id == 2
        listed = (await svc.admin.ListVersions(pb.ListVersionsRequest())).versions
        assert [(v.id, v.active) for v in listed] == [(1, False), (2, True)]
        back = await svc.admin.Rollback(pb.RollbackRequest())
        assert (
            back.version.name == "batch-optimized.yaml" and back.version.reason == "rollback to #1"
        )
        status = await svc.admin.GetStatus(pb.GetStatusRequest())
        assert status.scheduler.name == "batch-optimized.yaml"
        assert status.scheduler.sha256 == listed[0].sha256
        # Past the first version there is only the platform scheduler to go back to.
        await svc.admin.Rollback(pb.RollbackRequest(version_id=0))
        await svc.admin.Rollback(pb.RollbackRequest(version_id=0))
        assert (await svc.admin.GetStatus(pb.GetStatusRequest())).scheduler.name in (
            "fair-share.yaml",
            "batch-optimized.yaml",
            "platform",
        )


async def test_rollback_from_the_only_version_returns_to_platform(tmp_path: Path) -> None:
    """With a single deployment, rollback puts the platform scheduler back in charge."""
    async with running_service(write_config(tmp_path)) as svc:
        await deploy(svc, GOOD)
        reply = await svc.admin.Rollback(pb.RollbackRequest())
        assert not reply.HasField("version")
        status = await svc.admin.GetStatus(pb.GetStatusRequest())
        assert (status.scheduler.name, status.scheduler.version_id) == ("platform", 0)
        with pytest.raises(aio.AioRpcError) as info:
            await svc.admin.Rollback(pb.RollbackRequest())
        assert code_of(info.value) == grpc.StatusCode.NOT_FOUND


async def test_invalid_policy_is_refused_and_the_running_one_stays(tmp_path: Path) -> None:
    """A deploy that fails validation answers FAILED_PRECONDITION with the reason; nothing changes."""
    async with running_service(write_config(tmp_path)) as svc:
        await deploy(svc, GOOD)
        broken = GOOD.replace("job.priority: interactive", "job.priority: urgent")
        with pytest.raises(aio.AioRpcError) as info:
            await deploy(svc, broken, "broken.yaml")
        assert code_of(info.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert "broken.yaml:12:" in (info.value.details() or "")
        slow = "function schedule(ctx) local t = os.clock() while os.clock() - t < 0.2 do end return {action='wait'} end"
        with pytest.raises(aio.AioRpcError) as info:
            await deploy(svc, slow, "slow.lua")
        assert "over the 50 ms budget" in (info.value.details() or "")
        status = await svc.admin.GetStatus(pb.GetStatusRequest())
        assert status.scheduler.version_id == 1
        validation = await svc.admin.ValidateScheduler(
            pb.SchedulerSource(source=broken, name="b.yaml")
        )
        assert not validation.ok
        assert json.loads(validation.report_json)["syntax"]["line"] == 12


async def test_platform_mode_refuses_deploys(tmp_path: Path) -> None:
    """In platform mode the platform scheduler cannot be replaced: PERMISSION_DENIED, HTTP 403."""
    config = write_config(
        tmp_path, deployment_mode="platform", mode="platform", tenants={"acme": {"name": "Acme"}}
    )
    async with running_service(config) as svc:
        with pytest.raises(aio.AioRpcError) as info:
            await deploy(svc, GOOD)
        assert code_of(info.value) == grpc.StatusCode.PERMISSION_DENIED
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                svc.http + "/v2/admin/scheduler/deploy", json={"source": GOOD},
                headers=svc.operator_headers,
            ) as r,
        ):  # fmt: skip
            assert r.status == 403
            assert "cannot be replaced" in (await r.json())["error"]


async def test_http_mirror(tmp_path: Path) -> None:
    """validate, deploy, simulate, versions, rollback and platform-source over HTTP/JSON."""
    async with running_service(write_config(tmp_path)) as svc, aiohttp.ClientSession() as http:
        base = svc.http + "/v2/admin/scheduler"
        async with http.post(base + "/validate", json={"source": GOOD, "name": "g.yaml"}) as r:
            report = await r.json()
            assert r.status == 200 and report["ok"] and report["lua"].startswith("-- Generated")
        async with http.post(base + "/simulate", json={"source": GOOD, "name": "g.yaml"}) as r:
            dry = await r.json()
            assert (
                dry["source"] == "user" and dry["decision"]["rule"] == "interactive-to-least-loaded"
            )
        async with http.post(
            base + "/deploy", json={"source": GOOD, "name": "g.yaml", "deployer": "ann"}
        ) as r:
            assert r.status == 200 and (await r.json())["version"]["deployer"] == "local:ann"
        async with http.post(base + "/deploy", json={"source": "scheduler: {name: x}"}) as r:
            assert r.status == 422 and "missing 'rules'" in (await r.json())["error"]
        async with http.get(base + "/versions") as r:
            assert [v["id"] for v in (await r.json())["versions"]] == [1]
        async with http.post(base + "/rollback", json={}) as r:
            assert r.status == 200 and (await r.json())["version"] is None
        async with http.post(base + "/deploy", data="source=x") as r:
            assert r.status == 415  # forms cannot post: no cross-site deploys
        async with http.get(base + "/platform-source") as r:
            assert (await r.text()) == (REPO / "schedulers" / "platform.lua").read_text()


# Line 7 never runs on the sample (a ready worker serves job-1's model).
TRACED = """-- @version 0.1.0
function schedule(ctx)
  local job = ctx.get_job(ctx.queue[1].id)
  local worker = ctx.find_ready_worker(job.model_ref)
  if worker == nil then
    -- not on the sample
    return {action = "wait", reason = "no ready worker"}
  end
  return {action = "dispatch", job_id = job.id, worker_id = worker.id}
end
"""


async def test_http_trace(tmp_path: Path) -> None:
    """POST /trace runs an operator's draft once, traced, on a bank context: the lines that
    ran, the built-ins each called, the decision. YAML answers with the Lua its lines refer
    to. A tenant's key is refused; a bad mode or context is a 400 naming the field; a
    second trace while one runs is a 429."""
    tenant = "orch_acme-app-key"
    keys = [OPERATOR_KEY, {"name": "acme-app", "role": "tenant", "tenant": "acme",
                           "sha256": token_hash(tenant)}]  # fmt: skip
    config = write_config(tmp_path, auth={"keys": keys}, tenants={"acme": {"name": "Acme"}})
    async with (
        running_service(config) as svc,
        aiohttp.ClientSession(headers=svc.operator_headers) as http,
    ):
        url = svc.http + "/v2/admin/scheduler/trace"
        async with http.get(url) as r:
            options = await r.json()
            assert options["contexts"][0] == options["default_context"] == "sample"
            assert "empty-queue" in options["contexts"] and options["modes"] == ["trace", "profile"]
        async with http.post(url, json={"source": TRACED, "name": "t.lua"}) as r:
            assert r.status == 200
            trace = await r.json()
        assert (trace["mode"], trace["ok"], trace["lua"]) == ("trace", True, TRACED)
        assert trace["decision_text"] == "dispatch job-1 -> worker-1"
        assert {line["line"] for line in trace["lines"]} == {3, 4, 5, 9}
        calls = [(c["name"], c["line"], c["raised"]) for c in trace["calls"]]
        assert calls == [("get_job", 3, False), ("find_ready_worker", 4, False)]
        assert "worker-1" in trace["calls"][1]["result"]
        yaml_request = {
            "source": GOOD,
            "name": "g.yaml",
            "context": "empty-queue",
            "mode": "profile",
        }
        async with http.post(url, json=yaml_request) as r:
            profile = await r.json()
            assert r.status == 200 and (profile["mode"], profile["ok"]) == ("profile", True)
            assert profile["lua"].startswith("-- Generated") and profile["lines"]
        for bad, field in (({"mode": "step"}, "mode"), ({"context": "nowhere"}, "context")):
            async with http.post(url, json={"source": TRACED, **bad}) as r:
                refusal = await r.json()
                assert (r.status, refusal["code"]) == (400, "invalid_argument")
                assert refusal["error"].startswith(f"{field}: expected one of")
        async with http.post(url, json={"source": GOOD.replace("least-loaded", "fastest")}) as r:
            assert r.status == 400 and (await r.json())["code"] == "invalid_argument"
        async with http.post(
            url, json={"source": TRACED}, headers={"Authorization": f"Bearer {tenant}"}
        ) as r:
            assert r.status == 403 and (await r.json())["code"] == "permission_denied"
        assert svc.server.http is not None
        async with svc.server.http.app[TRACE_SLOT], http.post(url, json={"source": TRACED}) as r:
            assert r.status == 429 and (await r.json())["code"] == "rate_limited"


async def test_hot_reload_applies_good_changes_and_refuses_bad_ones(tmp_path: Path) -> None:
    """Editing the policy file redeploys it after validation; a bad edit is logged and refused."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(GOOD)
    config = write_config(tmp_path, scheduler={"file": str(policy)})
    with capture_logs() as logs:
        async with running_service(config) as svc:
            status = await svc.admin.GetStatus(pb.GetStatusRequest())
            assert status.scheduler.name == "policy.yaml" and status.scheduler.version_id == 1
            policy.write_text(GOOD.replace('version: "1.0.0"', 'version: "1.1.0"'))
            async with asyncio.timeout(20):
                while (
                    await svc.admin.GetStatus(pb.GetStatusRequest())
                ).scheduler.version != "1.1.0":
                    await asyncio.sleep(0.1)
            policy.write_text(GOOD.replace("least-loaded", "fastest"))
            async with asyncio.timeout(20):
                while not any(e["event"] == "scheduler.reload_rejected" for e in logs):
                    await asyncio.sleep(0.1)
            status = await svc.admin.GetStatus(pb.GetStatusRequest())
            assert status.scheduler.version == "1.1.0"
            reloads = svc.server.orchestrator.metrics
            assert reloads.value("scheduler_reload_total", result="applied") == 1
            assert reloads.value("scheduler_reload_total", result="rejected") == 1
    rejected = next(e for e in logs if e["event"] == "scheduler.reload_rejected")
    assert "fastest" in rejected["error"]


async def test_auto_rollback_when_a_new_version_trips_the_breaker(tmp_path: Path) -> None:
    """A version that passes validation but crash-loops in production goes back to the last good one."""
    config = write_config(tmp_path, scheduler={"breaker": {"threshold": 3, "base_backoff_s": 30}})
    async with running_service(config) as svc:
        await deploy(svc, GOOD, "good.yaml")
        bad = await deploy(svc, BREAKS_IN_PRODUCTION, "bad.lua")
        assert bad.version.version == "9.9.9"
        await svc.submit()
        async with asyncio.timeout(20):
            while (await svc.admin.GetStatus(pb.GetStatusRequest())).scheduler.name != "good.yaml":
                await asyncio.sleep(0.1)
        versions = (await svc.admin.ListVersions(pb.ListVersionsRequest())).versions
        assert versions[-1].reason.startswith("auto-rollback: circuit breaker tripped for #2")


def test_cli_compile_validate_and_admin(tmp_path: Path) -> None:
    """compile prints Lua; validate exits 0/1; deploy, versions and rollback talk to a server."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "scheduler", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    good = TEMPLATES / "determinism-first.yaml"
    compiled = cli("compile", str(good))
    assert compiled.returncode == 0 and "function schedule(ctx)" in compiled.stdout
    assert json.loads(cli("compile", str(good), "--json").stdout)["version"] == "1.0.0"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("ready", "fastest"))
    assert cli("compile", str(bad)).returncode == 2
    assert cli("validate", str(good)).returncode == 0
    report = cli("validate", str(bad), "--json")
    assert report.returncode == 1 and json.loads(report.stdout)["syntax"]["ok"] is False
    dry = cli("test", "--file", str(good), "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["decision"]["rule"] == "seeded-jobs-first"

    config = write_config(tmp_path)
    address = json.loads(json.dumps(__import__("yaml").safe_load(config.read_text())))["listen"][
        "grpc"
    ]
    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if cli("versions", "--address", address).returncode == 0:
                break
            __import__("time").sleep(0.2)
        deployed = cli("deploy", str(good), "--address", address, "--json")
        assert deployed.returncode == 0, deployed.stderr
        assert json.loads(deployed.stdout)[0]["name"] == "determinism-first.yaml"
        assert "determinism-first.yaml" in cli("versions", "--address", address).stdout
        rolled = cli("rollback", "--address", address)
        assert rolled.returncode == 0 and "platform scheduler is in charge" in rolled.stdout
    finally:
        server.terminate()
        server.wait(timeout=60)
