"""Per-tenant schedulers in platform mode: views, decisions, arbitration, the service."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path

import pytest

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.domain.context import Context
from orchestrator.domain.decision import Batch, Dispatch, EvictWorker, Wait
from orchestrator.domain.samples import sample_context
from orchestrator.scheduling.tenancy import PLATFORM, arbitrate, fairness_order, tenant_view
from orchestrator.state.decision_log import DecisionLog, log_files, read_log
from orchestrator.state.journal import SnapshotJournal
from orchestrator.wire import context as snapshot
from tests.conftest import REPO, EngineFactory
from tests.fakes import record
from tests.service_helpers import running_service, write_config
from tests.slotted import slotted_context
from tests.state.test_cluster import NOW, cluster

OWNERS = {"job-running": "tenant-2"}
GiB = 1024**3


def platform_ctx() -> Context:
    return sample_context(platform_mode=True)


def test_a_tenant_sees_nothing_of_another_tenant() -> None:
    """Tenant 1's view holds its own jobs and record only; tenant 2's job ids, tenant id,
    prompts, usage and running job appear nowhere in what its worker is sent."""
    ctx = platform_ctx()
    view = tenant_view(ctx, "tenant-1", OWNERS)
    assert [j.id for j in view.queue] == ["job-1", "job-3"]
    assert [t.id for t in view.tenants] == ["tenant-1"]
    wire = snapshot.to_proto(view).SerializeToString()
    foreign = [j for j in ctx.queue if j.tenant_id == "tenant-2"]
    for secret in [j.id for j in foreign] + [j.prompt_hash for j in foreign]:
        assert secret.encode() not in wire
    for secret in (b"tenant-2", b"Globex", b"job-running"):
        assert secret not in wire
    busy = view.workers_by_id["worker-2"][1]
    assert busy.status == "busy" and busy.current_job_id is None and busy.jobs_completed == 0
    assert view.metrics.queue_depth == 2 and view.metrics.jobs_completed_last_minute == 0
    # VRAM shown within its quota: 48 GiB quota, 32 GiB used -> at most 16 GiB free anywhere.
    assert max(g.vram_free_bytes for p in view.pools for g in p.gpus) <= 16 * GiB
    own = tenant_view(ctx, "tenant-2", OWNERS).workers_by_id["worker-2"][1]
    assert own.current_job_id == "job-running"  # its own running job stays visible


def test_a_tenant_sees_only_its_own_job_ids_in_a_shared_workers_slots() -> None:
    """worker-1 runs two jobs of tenant-2 and one of tenant-1 in four slots: tenant-1
    sees its own job id, three busy slots, and none of tenant-2's ids; tenant-2 sees
    its two, the oldest as current_job_id with when it started."""
    ctx = slotted_context(slots=4, platform_mode=True)
    pool_1 = ctx.pools[0]
    shared = dataclasses.replace(
        pool_1.workers[0], slots_busy=3, active_job_ids=("t2-a", "t1-a", "t2-b"),
        current_job_id="t2-a", job_started_at=ctx.now_ms - 900,
    )  # fmt: skip
    ctx = dataclasses.replace(
        ctx, pools=(dataclasses.replace(pool_1, workers=(shared, *pool_1.workers[1:])),
                    ctx.pools[1]),
    )  # fmt: skip
    owners = {**OWNERS, "t2-a": "tenant-2", "t2-b": "tenant-2", "t1-a": "tenant-1"}
    mine = tenant_view(ctx, "tenant-1", owners).workers_by_id["worker-1"][1]
    assert (mine.status, mine.slots_total, mine.slots_busy) == ("ready", 4, 3)
    assert (mine.active_job_ids, mine.current_job_id, mine.job_started_at) == (
        ("t1-a",), "t1-a", None,
    )  # fmt: skip
    wire = snapshot.to_proto(tenant_view(ctx, "tenant-1", owners)).SerializeToString()
    assert b"t2-a" not in wire and b"t2-b" not in wire and b"t1-a" in wire
    theirs = tenant_view(ctx, "tenant-2", owners).workers_by_id["worker-1"][1]
    assert (theirs.active_job_ids, theirs.current_job_id, theirs.job_started_at) == (
        ("t2-a", "t2-b"), "t2-a", ctx.now_ms - 900,
    )  # fmt: skip


async def test_a_tenant_decision_naming_another_tenants_job_is_rejected(
    make_engine: EngineFactory,
) -> None:
    """Tenant 1's script dispatching tenant 2's job fails validation (unknown job) and
    the cycle falls back to the platform scheduler on tenant 1's view."""
    ctx = platform_ctx()
    script = """function schedule(ctx)
  return {action = "dispatch", job_id = "job-2", worker_id = "worker-1"}
end"""
    engine = await make_engine(script)
    result = await engine.schedule(tenant_view(ctx, "tenant-1", OWNERS))
    assert result.source == "platform-fallback" and result.error is not None
    assert result.error.kind == "rejected"
    assert [r.reason for r in result.error.rejections] == ["unknown_job"]
    for action in Batch((result.decision,)).actions:
        if isinstance(action, Dispatch):
            assert action.job_id in {"job-1", "job-3"}
    # Even a proposal that slipped past a view would be dropped by the arbitration.
    llama = ctx.jobs_by_id["job-1"].model_ref
    queue = tuple(dataclasses.replace(j, model_ref=llama) if j.id == "job-5" else j
                  for j in ctx.queue)  # fmt: skip
    ctx = dataclasses.replace(ctx, queue=queue)
    decision, dropped = arbitrate(ctx, {"tenant-1": Dispatch("job-5", "worker-4")})
    assert isinstance(decision, Wait) and [d.reason for d in dropped] == ["foreign_job"]
    decision, _ = arbitrate(ctx, {"tenant-1": Dispatch("job-3", "worker-4")})
    assert decision == Dispatch("job-3", "worker-4")


def test_arbitration_is_fair_enforces_quotas_and_keeps_evictions_to_the_platform() -> None:
    """Two tenants wanting the one free worker: the one using less of its quota wins;
    ties rotate by cycle; over-quota dispatches and tenant evictions are dropped."""
    ctx = platform_ctx()
    t1 = dataclasses.replace(ctx.tenants[0], concurrent_jobs=0)
    t2 = dataclasses.replace(ctx.tenants[1], concurrent_jobs=0, quota_max_concurrent_jobs=5, vram_used_bytes=0,
                             tokens_used_today=0)  # fmt: skip
    llama = ctx.jobs_by_id["job-1"].model_ref
    queue = tuple(dataclasses.replace(j, model_ref=llama) if j.id == "job-5" else j
                  for j in ctx.queue)  # fmt: skip
    ctx = dataclasses.replace(ctx, tenants=(t1, t2), queue=queue)
    both = {"tenant-1": Dispatch("job-1", "worker-1"), "tenant-2": Dispatch("job-5", "worker-1")}
    winners = set()
    for cycle in range(2):
        decision, dropped = arbitrate(ctx, both, cycle=cycle)
        assert isinstance(decision, Dispatch)
        winners.add(decision.job_id)
        assert [d.reason for d in dropped] == ["worker_not_ready"]
    assert winners == {"job-1", "job-5"}  # equal shares: each wins a tie in turn
    busier = dataclasses.replace(ctx, tenants=(dataclasses.replace(t1, concurrent_jobs=4), t2))
    assert fairness_order(busier, ["tenant-1", "tenant-2", PLATFORM], 0)[0] == "tenant-2"
    full = dataclasses.replace(ctx, tenants=(t1, dataclasses.replace(t2, concurrent_jobs=5)))
    decision, dropped = arbitrate(
        full, {"tenant-2": Dispatch("job-5", "worker-1"), "tenant-1": EvictWorker("worker-3")}
    )
    assert isinstance(decision, Wait)
    assert sorted(d.reason for d in dropped) == ["quota_exceeded", "tenant_cannot_evict"]
    decision, _ = arbitrate(ctx, {PLATFORM: EvictWorker("worker-3")})
    assert decision == EvictWorker("worker-3")
    # The platform's dispatch of a job whose tenant runs its own scheduler is left to it.
    decision, dropped = arbitrate(
        ctx, {PLATFORM: Dispatch("job-1", "worker-1"), "tenant-1": Wait()}
    )
    assert isinstance(decision, Wait) and [d.reason for d in dropped] == ["tenant_scheduled"]


async def test_service_runs_each_tenant_scheduler_on_its_own_jobs(tmp_path: Path) -> None:
    """Platform mode with a scheduler for one tenant: every job of both tenants completes,
    and that tenant's sandbox only ever held its own jobs."""
    policy = tmp_path / "acme.lua"
    policy.write_text((REPO / "schedulers/examples/runtime-7.1-simple-priority.lua").read_text())
    tenants = {
        "acme": {"quota_max_concurrent_jobs": 4},
        "globex": {"quota_max_concurrent_jobs": 4},
    }
    config = write_config(
        tmp_path, deployment_mode="platform", tenants=tenants,
        tenant_schedulers={"acme": str(policy)},
    )  # fmt: skip
    async with running_service(config) as svc:
        engine = svc.server.orchestrator.tenant_engines["acme"]
        # Its custom metrics and script logs are acme's (the main scheduler's are "").
        assert (engine.tenant, svc.server.orchestrator.engine.tenant) == ("acme", "")
        # Record every context acme's sandbox is sent, with the decision log's writer.
        engine.decision_log = DecisionLog(tmp_path / "acme-log", max_file_bytes=2**30, keep_files=1)
        jobs = [
            await svc.submit(tenant_id=t, priority="interactive") for t in ("acme", "globex") * 3
        ]
        for job in jobs:
            assert (await svc.wait_finished(job.id)).state == pb.JOB_STATE_COMPLETED
        # Detach before closing: a cycle that records into a closed log rotates it, and
        # keep_files=1 would then delete the file this test reads.
        recorder, engine.decision_log = engine.decision_log, None
        recorder.close()
    cycles = list(read_log(log_files(tmp_path / "acme-log")[0]))
    assert any(c.context.queue for c in cycles)
    for cycle in cycles:
        assert [t.id for t in cycle.context.tenants] == ["acme"]
        assert all(job.tenant_id == "acme" for job in cycle.context.queue)
    assert any(c.source == "user" and isinstance(c.decision, Dispatch) for c in cycles)


async def test_tenant_workers_run_as_systemd_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With launcher systemd, a tenant's scheduler runs in orchestrator-sandbox@TENANT-*
    units on the unit's socket, and a killed one is replaced by a new unit."""
    state = tmp_path / "systemd"
    (state / "run").mkdir(parents=True)
    monkeypatch.setenv("FAKE_SYSTEMD_DIR", str(state))
    policy = tmp_path / "acme.lua"
    policy.write_text((REPO / "schedulers/examples/runtime-7.1-simple-priority.lua").read_text())
    config = write_config(
        tmp_path, deployment_mode="platform", tenants={"acme": {}, "globex": {}},
        tenant_schedulers={"acme": str(policy)},
        scheduler={"tick_ms": 100, "tenant_sandbox": {
            "launcher": "systemd", "socket_dir": str(state / "run"),
            "systemctl": [sys.executable, str(REPO / "tests" / "fake_systemctl.py")]}},
    )  # fmt: skip
    async with running_service(config) as svc:
        engine = svc.server.orchestrator.tenant_engines["acme"]
        assert engine.user is not None and engine.user.active is not None
        first = engine.user.active
        assert first.unit.startswith("orchestrator-sandbox@acme-") and first.unit.endswith(
            ".service"
        )
        assert first.socket_path.parent == state / "run"
        assert first.pid == int((state / f"{first.socket_path.stem}.pid").read_text())
        job = await svc.submit(tenant_id="acme", priority="interactive")
        assert (await svc.wait_finished(job.id)).state == pb.JOB_STATE_COMPLETED
        os.kill(first.pid, signal.SIGKILL)
        for tenant in ("acme", "globex", "acme"):
            job = await svc.submit(tenant_id=tenant, priority="interactive")
            assert (await svc.wait_finished(job.id)).state == pb.JOB_STATE_COMPLETED
        assert engine.user.active is not first and engine.user.active.unit != first.unit

        def starts() -> int:
            lines = (state / "commands.log").read_text().splitlines()
            return sum(line.startswith("start orchestrator-sandbox@acme-") for line in lines)

        for _ in range(100):  # the replacement spare is started in the background
            if starts() >= 3:
                break
            await asyncio.sleep(0.1)
        assert starts() >= 3
    commands = (state / "commands.log").read_text().splitlines()
    assert f"kill --signal=SIGKILL {first.unit}" in commands
    for pid_file in state.glob("*.pid"):  # units whose start was cancelled at shutdown
        with contextlib.suppress(ProcessLookupError):  # (systemd would stop them with us)
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_tenant_views_delta_is_its_own_changes_only() -> None:
    """From the live cluster state, a tenant's next view carries the cycle's changes to
    its own jobs: its arrivals and departures, never another tenant's ids (not even of
    jobs that left), and its queue view is not built to find them."""
    state = cluster()
    for i in range(6):
        state.enqueue(record(f"a{i}", at=i, tenant_id="tenant-a"), NOW)
        state.enqueue(record(f"b{i}", at=i, tenant_id="tenant-b"), NOW)
    journal = SnapshotJournal()
    whole = state.context(NOW)  # held, as the platform scheduler's journal holds it
    first = tenant_view(whole, "tenant-a", {})
    journal.advance(first)
    state.finish("a0")
    state.finish("b0")
    state.enqueue(record("a9", at=9, tenant_id="tenant-a"), NOW)
    state.enqueue(record("b9", at=9, tenant_id="tenant-b"), NOW)
    view = tenant_view(state.context(NOW + 1), "tenant-a", {}, first)
    journal.advance(view)
    delta = journal.request_for(journal.epoch, journal.seq - 1).deltas[0]
    assert list(delta.remove_jobs) == ["a0"] and list(delta.upsert_jobs.id) == ["a9"]
    assert view.metrics.queue_depth == 6
    assert view.queue._jobs is None  # type: ignore[attr-defined]
    assert [j.id for j in view.queue] == ["a1", "a2", "a3", "a4", "a5", "a9"]
    # Without the last view (a new tenant engine), the full diff gives the same delta.
    again = tenant_view(state.context(NOW + 2), "tenant-a", {})
    assert again.changes is None
