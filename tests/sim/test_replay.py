"""The decision log, replay of a candidate on it, shadow mode, and simulation through
the admin API (gRPC streaming and HTTP)."""

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

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.domain import decision as decisions
from orchestrator.domain.decision import Batch, Dispatch, EvictWorker, StartWorker, Wait
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.samples import sample_context
from orchestrator.sim.replay import replay
from orchestrator.state.decision_log import DecisionLog, log_files, read_log
from tests.conftest import REPO, EngineFactory
from tests.service_helpers import running_service, write_config
from tests.wire.test_delta import OPS, mutate, normalized

ALWAYS_WAIT = 'function schedule(ctx) return {action = "wait", reason = "hold"} end\n'
PLATFORM_COPY = (REPO / "schedulers" / "platform.lua").read_text()


def test_difference_names_how_decisions_differ() -> None:
    """Rules, reasons and wait times do not count; jobs, workers, kinds and order do."""
    d1, d2 = Dispatch("j1", "w1", rule="a"), Dispatch("j2", "w1")
    assert decisions.difference(d1, Dispatch("j1", "w1", reason="x")) is None
    assert decisions.difference(Wait(100), Wait(None, rule="idle")) is None
    assert decisions.difference(d1, Wait()) == "action"
    assert decisions.difference(d1, d2) == "job"
    assert decisions.difference(d1, Dispatch("j1", "w2")) == "worker"
    assert decisions.difference(Batch((d1, d2)), Batch((d2, d1))) == "order"
    assert decisions.difference(EvictWorker("w1"), EvictWorker("w2")) == "target"
    assert decisions.difference(StartWorker("p", 0, "m"), StartWorker("p", 1, "m")) == "target"
    assert decisions.difference(Batch((d1,)), Batch((d1, d2))) == "action"


async def test_log_round_trips_rotates_and_replays(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """Each logged cycle reads back as the context it was decided on; files rotate with a
    snapshot first; a torn tail is ignored; replay finds no difference with the same
    policy and every difference with another."""
    engine = await make_engine()
    log = DecisionLog(tmp_path / "decisions", max_file_bytes=6000, keep_files=3)
    engine.decision_log = log
    contexts = []
    current = sample_context()
    for i in range(40):
        current = mutate(current, OPS[i % len(OPS)], i)
        contexts.append(current)
        result = await engine.schedule(current)
        assert result.source == "platform"
    log.close()
    files = log_files(tmp_path / "decisions")
    assert 1 < len(files) <= 3  # rotated, and only the newest three kept
    cycles = [c for f in files for c in read_log(f)]
    assert 8 < len(cycles) < 40
    by_seq = {c.seq: c for c in cycles}
    for seq, cycle in by_seq.items():
        assert cycle.context == normalized(contexts[seq - 1])
        assert cycle.source == "platform"
    # A crash while writing leaves a torn entry: the file still reads up to it.
    whole = len(list(read_log(files[-1])))
    files[-1].write_bytes(files[-1].read_bytes()[:-7])
    assert len(list(read_log(files[-1]))) == whole - 1
    (tmp_path / "junk.log").write_bytes(b"\x05hello")
    with pytest.raises(ConfigError, match="not a decision log entry"):
        list(read_log(tmp_path / "junk.log"))

    same = await replay(files[0], PLATFORM_COPY, "platform-copy.lua")
    assert same.cycles == len(list(read_log(files[0]))) and same.differing == 0
    assert same.candidate_sources == {"user": same.cycles}
    other = await replay(tmp_path / "decisions", ALWAYS_WAIT, "wait.lua")
    logged_waits = sum(1 for c in cycles if isinstance(c.decision, Wait))
    assert other.differing == other.cycles - logged_waits > 0
    assert set(other.by_kind) == {"action"}
    assert "decisions differ on" in other.text() and "candidate (user): wait" in other.text()


@pytest.mark.slow
async def test_service_logs_cycles_shadows_a_candidate_and_replays(tmp_path: Path) -> None:
    """A running service writes its decision log and runs a shadow without executing it;
    `scheduler replay` on that log reports the candidate's differences."""
    async with running_service(write_config(tmp_path)) as svc:
        status = await svc.admin.StartShadow(
            pb.SchedulerSource(source=ALWAYS_WAIT, name="hold.lua")
        )
        assert status.active and status.name == "hold.lua"
        for _ in range(3):
            job = await svc.submit(priority="interactive")
            assert (await svc.wait_finished(job.id)).state == pb.JOB_STATE_COMPLETED
        await svc.server.orchestrator.shadow.settle()  # type: ignore[union-attr]
        reply = await svc.admin.GetStatus(pb.GetStatusRequest())
        shadow = reply.shadow
        # The active one dispatched three jobs (and started a worker); the shadow held.
        assert shadow.cycles > 3 and shadow.differing >= 1
        assert shadow.by_kind["action"] == shadow.differing
        assert any("shadow (user): wait" in line for line in shadow.recent)
        assert reply.decision_log.endswith(".log")
        async with aiohttp.ClientSession() as http:
            async with http.get(svc.http + "/metrics") as r:
                metrics = await r.text()
            assert 'orchestrator_shadow_differing_total{kind="action"}' in metrics
            async with http.get(svc.http + "/v2/admin/scheduler/shadow") as r:
                assert (await r.json())["name"] == "hold.lua"
        final = await svc.admin.StopShadow(pb.StopShadowRequest())
        assert not final.active and final.cycles >= shadow.cycles
        with pytest.raises(aio.AioRpcError) as bad:
            await svc.admin.StartShadow(pb.SchedulerSource(source="function (", name="x.lua"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        log_dir = Path(svc.config.path(svc.config.state_dir)) / "decisions"
    candidate = tmp_path / "hold.lua"
    candidate.write_text(ALWAYS_WAIT)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "scheduler", "replay", "--log", str(log_dir),
         "--file", str(candidate), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cycles"] > 3 and report["by_kind"]["action"] >= 3
    assert any(d["logged"].startswith("dispatch") for d in report["differences"])


@pytest.mark.slow
async def test_simulate_through_grpc_and_http(tmp_path: Path) -> None:
    """AdminService.Simulate streams progress and ends with the report; the HTTP mirror
    returns it as JSON or NDJSON, compares with the active policy, and names bad fields."""
    workload = pb.SimulationWorkload(rate=3.0, duration_s=10.0, queue_depth=4, seed=3)
    async with running_service(write_config(tmp_path)) as svc:
        messages = [
            m
            async for m in svc.admin.Simulate(
                pb.SimulateRequest(workload=workload, compare_active=True)
            )
        ]
        assert messages[-1].fraction == 1.0 and messages[-1].report_json
        reports = json.loads(messages[-1].report_json)
        assert [r["policy"] for r in reports] == ["platform", "active: platform"]
        assert reports[0]["workload"]["queue_depth"] == 4
        # Same arrivals, same policy: the same results.
        assert reports[0]["wait_ms"] == reports[1]["wait_ms"]
        with pytest.raises(aio.AioRpcError) as bad:
            await anext(aiter(svc.admin.Simulate(pb.SimulateRequest(
                workload=pb.SimulationWorkload(pools=0)))))  # fmt: skip
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "workload.pools: must be at least 1" in (bad.value.details() or "")

        base = svc.http + "/v2/admin/scheduler/simulate"
        body = {"source": ALWAYS_WAIT, "name": "hold.lua",
                "workload": {"rate": 2, "duration_s": 5, "seed": 1}}  # fmt: skip
        async with aiohttp.ClientSession() as http:
            async with http.post(base, json=body) as r:
                held = (await r.json())["reports"][0]
            assert r.status == 200 and held["jobs_completed"] == 0 and held["jobs_submitted"] > 3
            async with http.post(base + "?stream=1", json={**body, "source": ""}) as r:
                lines = [json.loads(line) async for line in r.content if line.strip()]
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            assert lines[-1]["reports"][0]["jobs_completed"] > 3
            async with http.post(base, json={"workload": {"colour": 1}}) as r:
                assert r.status == 400 and "workload.colour" in (await r.json())["error"]
            async with http.post(base, json={"workload": {"queue_depth": 10**6}}) as r:
                assert r.status == 400 and "at most 20000" in (await r.json())["error"]
            # Streamed too, a refusal answers with its status, not as a line under 200.
            over = {"workload": {"queue_depth": 10**6}}
            async with http.post(base + "?stream=1", json=over) as r:
                assert r.status == 400 and "at most 20000" in (await r.json())["error"]
            async with http.post(base, json={"workload": {"trace": "/etc/passwd"}}) as r:
                assert r.status == 400 and "CLI only" in (await r.json())["error"]
    await asyncio.sleep(0)
