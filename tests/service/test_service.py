"""The orchestrator service through real gRPC and HTTP, with real development workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from orchestrator._proto import context_pb2
from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.config.settings import load_config
from orchestrator.domain.context import HostReading
from orchestrator.domain.decision import Decision
from orchestrator.domain.jobs import JobRecord, JobState
from orchestrator.pools.devworker import generate
from orchestrator.pools.hardware import GpuReading
from orchestrator.service import loop
from orchestrator.service.apply import DecisionApplier
from orchestrator.service.assembly import assemble
from orchestrator.state.store import JobStore
from tests.service_helpers import LLAMA, code_of, running_service, write_config

REPO = Path(__file__).resolve().parents[2]
MISTRAL = "hf:mistralai/Mistral-7B-Instruct-v0.3@main::file=Q4_K_M.gguf"


async def test_submitted_job_runs_to_completion(tmp_path: Path) -> None:
    """A job is queued, a worker is started for it, and it completes with the worker's tokens."""
    async with running_service(write_config(tmp_path)) as svc:
        job = await svc.submit(prompt="tell me", max_tokens=12, seed=7, priority="interactive")
        assert job.state == pb.JOB_STATE_QUEUED and job.model_ref == LLAMA
        done = await svc.wait_finished(job.id)
        assert done.state == pb.JOB_STATE_COMPLETED
        assert done.output == "".join(generate(LLAMA, "tell me", 7, 12))
        assert done.tokens_generated == 12 and done.attempts == 1
        assert done.worker_id.startswith("local-w")
        store = svc.server.orchestrator.store.store
        states = [state for _, state, _, _ in store.transitions(job.id)]
        assert states == ["queued", "dispatched", "running", "completed"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "gpt-5"}, "model: unknown model 'gpt-5'"),
        ({"max_tokens": -1}, "max_tokens: must be positive"),
        ({"prompt": "x" * (1024 * 1024 + 1)}, "prompt: 1048577 bytes exceeds the limit"),
        ({"priority": "urgent"}, "priority: must be one of interactive, batch"),
        ({"temperature": 3.0}, "temperature: must be within 0..2"),
    ],
)
async def test_bad_submits_are_invalid_argument_naming_the_field(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    """Bad requests get INVALID_ARGUMENT with a message that starts with the field."""
    async with running_service(write_config(tmp_path)) as svc:
        with pytest.raises(aio.AioRpcError) as info:
            await svc.submit(**fields)
        assert code_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (info.value.details() or "")


async def test_platform_mode_requires_a_known_tenant(tmp_path: Path) -> None:
    """In platform mode a submit without a tenant, or with an unknown one, is refused."""
    config = write_config(
        tmp_path,
        deployment_mode="platform",
        mode="platform",
        tenants={"acme": {"name": "Acme", "quota_max_concurrent_jobs": 2}},
    )
    async with running_service(config) as svc:
        for tenant, message in (
            ("", "tenant_id: required in platform mode"),
            ("globex", "tenant_id: unknown tenant 'globex'"),
        ):
            with pytest.raises(aio.AioRpcError) as info:
                await svc.submit(tenant_id=tenant)
            assert code_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (info.value.details() or "")
        done = await svc.wait_finished((await svc.submit(tenant_id="acme")).id)
        assert done.state == pb.JOB_STATE_COMPLETED and done.tenant_id == "acme"


async def test_cancel_at_every_stage(tmp_path: Path) -> None:
    """Cancel works on a queued job, a running job, and leaves a finished job as it is."""
    config = write_config(tmp_path, local_pool={"worker": {"tokens_per_sec": 20}})
    async with running_service(config) as svc:
        long = await svc.submit(max_tokens=2000)
        queued = await svc.submit(max_tokens=5, model="qwen-14b", priority="batch")
        cancelled = await svc.jobs.Cancel(pb.CancelJobRequest(job_id=queued.id))
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        async with asyncio.timeout(20):
            while (
                await svc.jobs.Get(pb.GetJobRequest(job_id=long.id))
            ).state != pb.JOB_STATE_RUNNING:
                await asyncio.sleep(0.05)
        stopped = await svc.jobs.Cancel(pb.CancelJobRequest(job_id=long.id))
        assert stopped.state == pb.JOB_STATE_CANCELLED
        assert len(stopped.output) > 0 or stopped.tokens_generated == 0
        # The worker is free again: the next job runs.
        short = await svc.wait_finished((await svc.submit(max_tokens=3)).id)
        assert short.state == pb.JOB_STATE_COMPLETED
        again = await svc.jobs.Cancel(pb.CancelJobRequest(job_id=short.id))
        assert again.state == pb.JOB_STATE_COMPLETED
        with pytest.raises(aio.AioRpcError) as info:
            await svc.jobs.Cancel(pb.CancelJobRequest(job_id="job-missing"))
        assert code_of(info.value) == grpc.StatusCode.NOT_FOUND


async def test_list_watch_and_idempotent_submit(tmp_path: Path) -> None:
    """List pages and filters; Watch on all jobs streams changes; request_id deduplicates."""
    async with running_service(write_config(tmp_path)) as svc:
        first = await svc.submit(request_id="req-1")
        again = await svc.submit(request_id="req-1", prompt="something else")
        assert again.id == first.id
        events: list[pb.JobEvent] = []

        async def watch_all() -> None:
            async for event in svc.jobs.Watch(pb.WatchRequest()):
                events.append(event)

        watcher = asyncio.create_task(watch_all())
        await asyncio.sleep(0.05)
        ids = [first.id] + [(await svc.submit(prompt=f"p{i}")).id for i in range(4)]
        for job_id in ids:
            await svc.wait_finished(job_id)
        watcher.cancel()
        page = await svc.jobs.List(pb.ListJobsRequest(limit=3))
        assert [j.id for j in page.jobs] == ids[:3] and page.next_page_token
        rest = await svc.jobs.List(pb.ListJobsRequest(limit=3, page_token=page.next_page_token))
        assert [j.id for j in rest.jobs] == ids[3:]
        done = await svc.jobs.List(pb.ListJobsRequest(states=[pb.JOB_STATE_COMPLETED]))
        assert len(done.jobs) == 5
        completed = {e.job_id for e in events if e.state == pb.JOB_STATE_COMPLETED}
        assert set(ids[1:]) <= completed


async def test_restart_requeues_and_retries(tmp_path: Path) -> None:
    """Jobs left queued are queued again; jobs left running are retried and complete."""
    config = write_config(tmp_path)
    store = JobStore(tmp_path / "state" / "jobs.sqlite3")
    for job_id, state, attempts in (
        ("job-q", JobState.QUEUED, 0),
        ("job-r", JobState.RUNNING, 1),
        ("job-x", JobState.DISPATCHED, 5),
    ):
        store.insert(
            JobRecord(
                job_id,
                LLAMA,
                "p",
                "sha256:0",
                "batch",
                4,
                0.0,
                1,
                1,
                state=state,
                attempts=attempts,
            )
        )
    store.close()
    async with running_service(config) as svc:
        q = await svc.wait_finished("job-q")
        r = await svc.wait_finished("job-r")
        x = await svc.jobs.Get(pb.GetJobRequest(job_id="job-x"))
        assert q.state == r.state == pb.JOB_STATE_COMPLETED
        assert r.attempts == 2
        assert x.state == pb.JOB_STATE_FAILED  # max_attempts (5) were used up
        assert "restarted" in x.error


async def test_remote_pool_heartbeats_commands_and_decay(tmp_path: Path) -> None:
    """A registered pool shows up in ctx, receives start_worker commands, then goes degraded and offline."""
    config = write_config(
        tmp_path,
        local_pool={"enabled": False},
        pools={"heartbeat_ms": 100, "degraded_after_ms": 300, "offline_after_ms": 800},
    )
    async with running_service(config) as svc:
        await svc.pools.Register(
            pb.RegisterPoolRequest(pool_id="remote-1", endpoint="http://10.0.0.2:9200")
        )
        gpu = context_pb2.Gpu(
            id=0,
            device_name="NVIDIA L4",
            vram_total_bytes=24 * 2**30,
            vram_free_bytes=24 * 2**30,
            compute_capability="8.9",
        )
        beat = pb.PoolHeartbeat(info=context_pb2.PoolInfo(id="remote-1"), gpus=[gpu])
        await svc.pools.Heartbeat(beat)
        await svc.submit()
        commands = []
        async with asyncio.timeout(5):
            while not commands:
                reply = await svc.pools.Heartbeat(beat)
                commands.extend(reply.commands)
                await asyncio.sleep(0.05)
        (command,) = commands
        assert command.start_worker.model_ref == LLAMA and command.worker_id
        orchestrator = svc.server.orchestrator
        assert [p.status for p in orchestrator.cluster.context().pools] == ["healthy"]
        await asyncio.sleep(0.4)
        assert [p.status for p in orchestrator.cluster.context().pools] == ["degraded"]
        await asyncio.sleep(0.6)
        assert [p.status for p in orchestrator.cluster.context().pools] == ["offline"]
        with pytest.raises(aio.AioRpcError) as info:
            await svc.pools.Heartbeat(pb.PoolHeartbeat(info=context_pb2.PoolInfo(id="stranger")))
        assert code_of(info.value) == grpc.StatusCode.NOT_FOUND


async def test_metrics_health_reflection_and_status(tmp_path: Path) -> None:
    """/metrics has the scheduler and queue series; gRPC health and reflection answer; status is right."""
    async with running_service(write_config(tmp_path)) as svc:
        await svc.wait_finished((await svc.submit()).id)
        async with aiohttp.ClientSession() as http:
            async with http.get(svc.http + "/metrics") as response:
                text = await response.text()
            async with http.get(svc.http + "/healthz") as response:
                assert response.status == 200
        for series in (
            "orchestrator_queue_depth",
            'scheduler_decisions_total{action="dispatch",source="platform"}',
            "scheduler_decision_latency_seconds_bucket",
            "orchestrator_jobs_finished_total",
            "orchestrator_submit_to_dispatch_seconds_count",
        ):
            assert series in text, series
        health = health_pb2_grpc.HealthStub(svc.channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="orchestrator.v1.JobService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(svc.channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in responses for s in r.list_services_response.service}
        assert {
            "orchestrator.v1.JobService",
            "orchestrator.v1.PoolService",
            "orchestrator.v1.AdminService",
            "grpc.health.v1.Health",
        } <= names
        status = await svc.admin.GetStatus(pb.GetStatusRequest())
        assert status.scheduler.name == "platform" and status.scheduler.version == "1.0.0"
        assert status.gpu_source == "declared" and status.cycles > 0
        source = await svc.admin.GetPlatformSource(pb.GetPlatformSourceRequest())
        assert source.source == (REPO / "schedulers" / "platform.lua").read_text()


async def test_without_nvml_declared_gpus_are_used_and_said_once(tmp_path: Path) -> None:
    """With no driver, one clear log line, and the declared GPUs marked measured=false."""
    with capture_logs() as logs:
        async with running_service(write_config(tmp_path)) as svc:
            ctx = svc.server.orchestrator.cluster.context()
    lines = [e for e in logs if e["event"] == "pool.no_nvml"]
    assert len(lines) == 1 and "declared" in lines[0]["message"]
    assert [(g.device_name, g.measured) for g in ctx.pools[0].gpus] == [
        ("Development GPU", False)
    ] * 2
    assert ctx.pools[0].host_ram_total_bytes > 0 and ctx.pools[0].host_cpu_count >= 1


class FakeNvml:
    """Stands in for NVML on a machine with one measured GPU."""

    def available(self) -> bool:
        return True

    def read(self) -> list[GpuReading]:
        return [
            GpuReading(
                0,
                "NVIDIA A100-SXM4-80GB",
                "8.0",
                80 * 2**30,
                10 * 2**30,
                70 * 2**30,
                42.0,
                55.0,
                210.5,
            )
        ]


class FakeHost:
    def read(self) -> HostReading:
        return HostReading(64 * 2**30, 60 * 2**30, 12.5, 32)


async def test_measured_gpus_come_from_the_probe(tmp_path: Path) -> None:
    """GPU name, capability, memory, utilization, temperature and power flow into ctx."""
    config = load_config(write_config(tmp_path))
    orchestrator = assemble(config, gpu_probe=FakeNvml(), host_probe=FakeHost())
    try:
        (pool,) = orchestrator.cluster.context().pools
        (gpu,) = pool.gpus
        assert (
            gpu.device_name,
            gpu.compute_capability,
            gpu.vram_free_bytes,
            gpu.utilization_percent,
            gpu.temperature_celsius,
            gpu.power_draw_watts,
            gpu.measured,
        ) == ("NVIDIA A100-SXM4-80GB", "8.0", 70 * 2**30, 42.0, 55.0, 210.5, True)
        assert (pool.host_ram_total_bytes, pool.host_cpu_count) == (64 * 2**30, 32)
    finally:
        await orchestrator.close()


async def test_catalog_and_tenants_from_files_and_reload(tmp_path: Path) -> None:
    """catalog_file and tenants_file are read at start and again on reload; a bad reload keeps the old."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        f"models:\n  '{LLAMA}': {{vram_required_bytes: 1000, family: llama}}\naliases: {{tiny: '{LLAMA}'}}\n"
    )
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("acme: {name: Acme, quota_tokens_daily: 100}\n")
    config = write_config(
        tmp_path, catalog=None, catalog_file="catalog.yaml", tenants_file="tenants.yaml"
    )
    async with running_service(config) as svc:
        done = await svc.wait_finished((await svc.submit(model="tiny")).id)
        assert done.state == pb.JOB_STATE_COMPLETED
        assert svc.server.orchestrator.tenant_quotas["acme"].quota_tokens_daily == 100
        catalog.write_text(catalog.read_text().replace("tiny", "small"))
        svc.server.reload()
        assert (await svc.submit(model="small")).model_ref == LLAMA
        catalog.write_text("models: [not, a, mapping")
        with capture_logs() as logs:
            svc.server.reload()
        assert any(e["event"] == "service.reload_rejected" for e in logs)
        assert (await svc.submit(model="small")).model_ref == LLAMA


def test_systemd_units_verify(tmp_path: Path) -> None:
    """deploy/ units pass systemd-analyze verify, and their security scores meet the targets."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = {u.name: u.read_text() for u in (REPO / "deploy" / "systemd").glob("*.service")}
    assert set(units) == {"orchestratord.service", "orchestrator-sandbox@.service"}
    paths = []
    for name, original in units.items():
        text = original.replace("/opt/orchestratord/.venv/bin/python", sys.executable)
        text = text.replace(
            "/opt/orchestratord/.venv/bin/orchestratord", shutil.which("true") or "/bin/true"
        )
        path = tmp_path / name.replace("@.service", "@tenant-a.service")
        path.write_text(text)
        paths.append(path)
    proc = subprocess.run(
        [analyze, "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for path, target in zip(sorted(paths), (1.0, 2.0), strict=True):  # sandbox, then orchestratord
        score = subprocess.run(
            [analyze, "security", "--offline=yes", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        line = [x for x in score.stdout.splitlines() if "Overall exposure level" in x][-1]
        exposure = float(line.split(":")[-1].split()[0])
        print(f"{path.name}: exposure {exposure}")
        assert exposure <= target, line


async def test_pool_manager_on_another_host_runs_jobs(tmp_path: Path) -> None:
    """`orchestratord pool-manager` registers, starts workers on command, and its jobs complete."""
    core_dir, pool_dir = tmp_path / "core", tmp_path / "pool"
    core_dir.mkdir()
    pool_dir.mkdir()
    config = write_config(
        core_dir,
        local_pool={"enabled": False},
        pools={"heartbeat_ms": 100, "degraded_after_ms": 400, "offline_after_ms": 1000},
    )
    pool_config = write_config(
        pool_dir,
        # The core takes a pool's workers only on its registered host: here, this one.
        local_pool={"id": "gpu-host-2", "endpoint": "http://127.0.0.1:9200"},
        pools={"heartbeat_ms": 100},
    )
    async with running_service(config) as svc:
        manager = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "pool-manager",
                "--orchestrator",
                f"127.0.0.1:{svc.server.grpc_port}",
                "--config",
                str(pool_config),
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(pool_dir / "log", "wb"),  # noqa: SIM115
        )
        try:
            done = await svc.wait_finished((await svc.submit(max_tokens=6, seed=3)).id, 60)
            assert done.state == pb.JOB_STATE_COMPLETED
            assert done.worker_id.startswith("gpu-host-2-w")
            (pool,) = svc.server.orchestrator.cluster.context().pools
            assert (pool.id, pool.status, pool.endpoint) == (
                "gpu-host-2",
                "healthy",
                "http://127.0.0.1:9200",
            )
            assert [w.status for w in pool.workers] == ["ready"]
            assert pool.gpus[0].vram_allocated_bytes == 6442450944  # the model's VRAM, declared GPU
        finally:
            manager.send_signal(signal.SIGTERM)
            manager.wait(timeout=30)
        await asyncio.sleep(1.2)
        (pool,) = svc.server.orchestrator.cluster.context().pools
        assert pool.status == "offline"


async def test_job_cli_and_custom_metrics(tmp_path: Path) -> None:
    """`orchestratord job submit --wait` prints the tokens as they come, then how the job
    ended; `job get` shows what the worker reported; a script's emit_metric reaches
    /metrics."""
    script = tmp_path / "policy.lua"
    script.write_text(
        "function schedule(ctx)\n"
        "  ctx.emit_metric('custom_queue_seen', #ctx.queue)\n"
        "  return ctx.platform_schedule(ctx)\n"
        "end\n"
    )
    async with running_service(write_config(tmp_path, scheduler={"file": str(script)})) as svc:
        cli = (sys.executable, "-m", "orchestrator.cli", "job", "--address",
               f"127.0.0.1:{svc.server.grpc_port}")  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *cli, "submit", "--model", "mistral-7b", "--prompt", "hi", "--max-tokens", "4",
            "--seed", "1", "--top-p", "0.5", "--stop", "ZZZ", "--stop", "YYY", "--wait",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        text = "".join(generate(MISTRAL, "hi", 1, 4))
        assert out.decode() == text + "\n"
        job_id, state, tokens, ttft, _ = err.decode().splitlines()[-1].split(" ", 4)
        assert (state, tokens) == ("completed", "tokens=4") and ttft.startswith("ttft=")
        proc = await asyncio.create_subprocess_exec(
            *cli, "get", job_id, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        job = json.loads(out)
        assert (job["top_p"], job["stop"], job["output"]) == (0.5, ["ZZZ", "YYY"], text)
        assert int(job["ttft_ms"]) >= 0 and int(job["prompt_tokens"]) > 0 and job["tpot_ms"] > 0
        async with aiohttp.ClientSession() as http, http.get(svc.http + "/metrics") as response:
            text = await response.text()
        assert 'scheduler_custom_metric{name="custom_queue_seen",tenant=""}' in text
        assert 'scheduler_decisions_total{action="dispatch",source="user"}' in text
        status = await svc.admin.GetStatus(pb.GetStatusRequest())
        assert status.scheduler.name == "policy.lua"


async def test_a_stalled_cycle_is_logged_cancelled_and_the_loop_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle stuck on something that never answers (injected: its first apply waits
    forever) is logged with its stack, counted and cancelled; jobs still complete, and
    the watchdog's liveness turns false only when no cycle finishes at all."""
    monkeypatch.setattr(loop, "CYCLE_STALL_S", 0.5)
    real_apply = DecisionApplier.apply
    stalled = asyncio.Event()

    async def apply_that_stalls_once(self: DecisionApplier, decision: Decision) -> None:
        if not stalled.is_set():
            stalled.set()
            await asyncio.Event().wait()  # never set
        await real_apply(self, decision)

    monkeypatch.setattr(DecisionApplier, "apply", apply_that_stalls_once)
    with capture_logs() as logs:
        async with running_service(write_config(tmp_path)) as svc:
            job = await svc.submit(prompt="after the stall", max_tokens=4)
            assert (await svc.wait_finished(job.id)).state == pb.JOB_STATE_COMPLETED
            o = svc.server.orchestrator
            stalls = o.metrics.registry.get_sample_value("orchestrator_cycle_stalls_total")
            assert stalls == 1
            assert o.loop_alive
            o.loop.last_cycle_at -= loop.LOOP_STALL_S
            assert not o.loop_alive
    stall = next(e for e in logs if e["event"] == "scheduler.cycle_stalled")
    assert "apply_that_stalls_once" in stall["stack"]


async def test_a_cycle_that_ends_cancelled_from_inside_does_not_end_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CancelledError that escapes a cycle (nobody cancelled the loop) is logged as a
    failed cycle; the loop goes on and jobs still complete. It used to end the loop."""
    real_apply = DecisionApplier.apply
    raised = asyncio.Event()

    async def apply_cancelled_once(self: DecisionApplier, decision: Decision) -> None:
        if not raised.is_set():
            raised.set()
            raise asyncio.CancelledError  # as a closed gRPC channel raises in its callers
        await real_apply(self, decision)

    monkeypatch.setattr(DecisionApplier, "apply", apply_cancelled_once)
    with capture_logs() as logs:
        async with running_service(write_config(tmp_path)) as svc:
            job = await svc.submit(prompt="after the stray cancellation", max_tokens=4)
            assert (await svc.wait_finished(job.id)).state == pb.JOB_STATE_COMPLETED
            assert svc.server.orchestrator.loop_alive
    assert raised.is_set()
    failed = [e for e in logs if e["event"] == "scheduler.cycle_failed"]
    assert failed and failed[0]["error"] == "the cycle ended cancelled"


async def test_sigusr1_dump_names_where_each_task_waits() -> None:
    """The SIGUSR1 dump logs every task with its await chain down to what it waits on."""
    from orchestrator.api.server import dump_tasks  # noqa: PLC0415

    async def waits_on_an_event(event: asyncio.Event) -> None:
        await event.wait()

    event = asyncio.Event()
    task = asyncio.get_running_loop().create_task(waits_on_an_event(event), name="the-waiter")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        dump_tasks()
    event.set()
    await task
    (entry,) = [e for e in logs if e["event"] == "service.task" and e["name"] == "the-waiter"]
    assert "waits_on_an_event" in entry["stack"] and "Event.wait" in entry["stack"]


async def test_failed_workers_are_removed_so_new_ones_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inference workers killed over and over: each shows as failed, is then removed with its
    VRAM, and the next job still gets a fresh worker. Before, 8 dead llama-8b workers held
    both 24 GiB GPUs for good and nothing was ever dispatched again (found by the soak)."""
    import psutil  # noqa: PLC0415

    from orchestrator.pools import local_pool  # noqa: PLC0415

    monkeypatch.setattr(local_pool, "FAILED_RETENTION_S", 0.3)
    me = psutil.Process()
    killed = 0
    with capture_logs() as logs:
        async with running_service(write_config(tmp_path)) as svc:
            for round_ in range(10):  # 6 GiB each: 8 dead workers would fill both GPUs
                job = await svc.submit(prompt=f"round {round_}", max_tokens=2)
                assert (await svc.wait_finished(job.id, 60)).state == pb.JOB_STATE_COMPLETED
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "orchestrator.pools.devworker" in " ".join(child.cmdline()):
                            child.kill()
                            killed += 1
            job = await svc.submit(prompt="after the massacre", max_tokens=2)
            assert (await svc.wait_finished(job.id, 60)).state == pb.JOB_STATE_COMPLETED
    assert killed >= 10
    assert sum(e["event"] == "pool.worker_removed" for e in logs) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("api", ["llamacpp", "openai"])
async def test_stream_output_carries_tokens_and_a_cancel_frees_the_workers_slot(
    tmp_path: Path, api: str
) -> None:
    """StreamOutput gives the tokens as the worker makes them, then the job; cancelling a
    running job closes its request, and the development worker frees the slot."""
    config = write_config(tmp_path, local_pool={"worker": {"tokens_per_sec": 20, "api": api}})
    async with running_service(config) as svc:
        job = await svc.submit(prompt="stream me", max_tokens=6, seed=3, tenant_id="acme")
        chunks = [c async for c in svc.jobs.StreamOutput(pb.GetJobRequest(job_id=job.id))]
        text = "".join(c.text for c in chunks)
        assert text == "".join(generate(LLAMA, "stream me", 3, 6))
        assert any(c.text for c in chunks[:-1])  # some came before the job ended
        done = chunks[-1].job
        assert (done.state, done.output, done.tokens_generated) == (
            pb.JOB_STATE_COMPLETED, text, 6,
        )  # fmt: skip
        assert done.prompt_tokens > 0 and done.ttft_ms >= 0 and done.tpot_ms > 0
        registry = svc.server.orchestrator.metrics.registry
        labels = {"model": LLAMA, "priority": "batch", "tenant": "acme"}
        assert registry.get_sample_value("orchestrator_job_ttft_seconds_count", labels) == 1
        assert registry.get_sample_value("orchestrator_job_tpot_seconds_count", labels) == 1
        assert registry.get_sample_value("orchestrator_tokens_out_total", {"tenant": "acme"}) == 6

        long = await svc.submit(prompt="never mind", max_tokens=2000)
        stream = aiter(svc.jobs.StreamOutput(pb.GetJobRequest(job_id=long.id)))
        first = await anext(stream)  # it runs: a slot of its worker is taken
        assert first.text and not first.HasField("job")
        worker_id = (await svc.jobs.Get(pb.GetJobRequest(job_id=long.id))).worker_id
        (worker,) = [w for p in svc.server.orchestrator.cluster.context().pools
                     for w in p.workers if w.id == worker_id]  # fmt: skip
        assert worker.api == api
        async with aiohttp.ClientSession() as http:
            assert await _processing(http, worker.uri) == 1
            await svc.jobs.Cancel(pb.CancelJobRequest(job_id=long.id))
            last = [c async for c in stream][-1]
            assert last.job.state == pb.JOB_STATE_CANCELLED
            async with asyncio.timeout(10):
                while await _processing(http, worker.uri):
                    await asyncio.sleep(0.05)


async def _processing(http: aiohttp.ClientSession, uri: str) -> int:
    """How many of the development worker's slots are generating (llama-server's /slots)."""
    async with http.get(uri + "/slots") as response:
        return sum(1 for slot in await response.json() if slot["is_processing"])
