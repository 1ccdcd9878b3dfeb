"""The engine with real sandbox workers: deadlines, kills, crashes, validation, fallback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import statistics
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from orchestrator.config.settings import SPAWN_METHODS
from orchestrator.domain.context import Context, Worker
from orchestrator.domain.decision import Dispatch, Wait
from orchestrator.domain.samples import LLAMA_13B, sample_context, synthetic_cluster
from orchestrator.sandbox.fork_server import shared_fork_server
from orchestrator.sandbox.limits import MiB, SandboxLimits
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.scheduling.metrics import EngineMetrics
from tests.conftest import LANGUAGES, EngineFactory, until


def cycle(n: int, *, trigger: bool = False) -> Context:
    """The sample context at cycle n; `trigger` marks the cycle a hostile script misbehaves on.

    The mark travels in ctx.metrics.jobs_completed_last_minute, so that a spare,
    which never saw the earlier cycles run, misbehaves on exactly the same ones.
    """
    ctx = sample_context(now_ms=1_700_000_000_000 + n * 100)
    metrics = dataclasses.replace(ctx.metrics, jobs_completed_last_minute=1 if trigger else 0)
    return dataclasses.replace(ctx, metrics=metrics)


def hostile(statement: str) -> str:
    return f"""
function schedule(ctx)
  if ctx.metrics.jobs_completed_last_minute == 1 then
    {statement}
  end
  local job = ctx.queue[1]
  return {{ action = "dispatch", job_id = job.id, worker_id = ctx.find_least_loaded_worker(job.model_ref).id }}
end
"""


async def spares_ready(engine: SchedulingEngine, timeout_s: float = 10.0) -> None:
    """Wait until every group is back to full strength (the respawn is in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    groups = [g for g in (engine.user, engine.platform) if g is not None]
    while any(len(g.spares) < g.target_spares for g in groups):
        assert loop.time() < deadline, "spares did not come back"
        await asyncio.sleep(0.02)


RUNAWAYS = {
    "while-true": "while true do end",
    "pcall-wrapped-loop": "pcall(function() while true do end end)",
    "string-rep-1GB": "local s = string.rep('x', 2^30)",
    "os-exit": "os.exit(1)",
}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", list(RUNAWAYS))
async def test_hostile_cycle_falls_back_in_time_and_a_spare_serves_next(
    make_engine: EngineFactory, language: str, name: str
) -> None:
    """A runaway, a memory bomb or os.exit ends in a fallback within deadline + 20 ms,
    and the next cycle is served by the user scheduler in a different (spare) worker."""
    engine = await make_engine(hostile(RUNAWAYS[name]), language=language)
    deadline_ms = engine.options.limits.deadline_ms
    latencies = []
    for attempt in range(3):
        calm = await engine.schedule(cycle(3 * attempt))
        assert calm.source == "user", calm.error
        bad = await engine.schedule(cycle(3 * attempt + 1, trigger=True))
        assert bad.source == "platform-fallback"
        assert bad.error is not None
        assert bad.error.kind in {"timeout", "memory_limit", "sandbox_violation"}
        latencies.append(bad.latency_ms)
        after = await engine.schedule(cycle(3 * attempt + 2))
        assert after.source == "user", after.error
        assert after.worker_pid != calm.worker_pid, "the next cycle must be served by a spare"
        assert after.decision == Dispatch("job-1", "worker-4")
        await spares_ready(engine)
    assert statistics.median(latencies) <= deadline_ms + 20, latencies


async def test_timeout_kills_the_worker_and_counts(make_engine: EngineFactory) -> None:
    """A timed-out worker process is gone; the timeout and the fallback are counted and logged."""
    engine = await make_engine(hostile("while true do end"))
    calm = await engine.schedule(cycle(0))
    with capture_logs() as logs:
        bad = await engine.schedule(cycle(1, trigger=True))
    assert bad.error is not None and bad.error.kind == "timeout"
    assert "Scheduler timeout exceeded".lower() in bad.error.message.lower()
    await asyncio.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(calm.worker_pid, 0)
    m = engine.metrics
    assert m.value("scheduler_timeout_total", scheduler="user") == 1
    assert m.value("scheduler_fallback_total", to="platform", reason="timeout") == 1
    assert m.value("sandbox_worker_events_total", scheduler="user", event="killed_timeout") == 1
    fallback = [e for e in logs if e["event"] == "scheduler.fallback"]
    assert fallback and fallback[0]["kind"] == "timeout"


def hoarding(pieces: int) -> str:
    """A script that keeps `pieces` times 4 KiB more in a global on each call."""
    return f"""
hoard = hoard or {{}}
function schedule(ctx)
  hoard[#hoard + 1] = string.rep(string.rep("x", 4096), {pieces})
  return {{ action = "wait", reason = "kept " .. #hoard }}
end
"""


@pytest.mark.parametrize("language", LANGUAGES)
async def test_the_heap_cap_holds_on_a_workers_first_call(
    make_engine: EngineFactory, language: str
) -> None:
    """A worker's first call comes after a full snapshot sent on its own (a spare's after a
    background sync) and carries no update; it used to run with no heap cap at all, and
    the worker then crashed on its next call (LuaJIT aborts on a memory error outside a
    protected call). Every cycle is a memory error now, and no worker crashes."""
    engine = await make_engine(
        hoarding(10240),  # 40 MiB against a 16 MiB heap
        language=language,
        limits=SandboxLimits(lua_heap_bytes=16 * MiB, deadline_ms=1000),
    )
    for n in range(3):
        result = await engine.schedule(cycle(n))
        assert result.source == "platform-fallback", result.decision
        assert result.error is not None and result.error.kind == "memory_limit", result.error
        await spares_ready(engine)
    m = engine.metrics
    assert m.value("scheduler_error_total", scheduler="user", kind="memory_limit") == 3
    assert m.value("scheduler_error_total", scheduler="user", kind="worker_crash") == 0


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_heap_over_the_cap_before_the_call_is_a_memory_error(
    make_engine: EngineFactory, language: str
) -> None:
    """What a script kept while the context was big (the cap grows with it) is over the
    cap once the context shrinks: the call is refused with a memory error, instead of
    calling into a heap already past its cap (which crashed LuaJIT workers)."""
    engine = await make_engine(
        hoarding(6144),  # 24 MiB, within 16 MiB plus the slack of 30,000 jobs' estimate
        language=language,
        limits=SandboxLimits(lua_heap_bytes=16 * MiB, deadline_ms=2000),
        user_spares=0,
    )
    big = await engine.schedule(synthetic_cluster(30_000, 16))
    assert big.source == "user" and big.decision.reason == "kept 1", big.error
    shrunk = await engine.schedule(synthetic_cluster(5, 16, now=big.context.now_ms + 100))
    assert shrunk.source == "platform-fallback"
    assert shrunk.error is not None and shrunk.error.kind == "memory_limit", shrunk.error
    assert "not enough memory" in shrunk.error.message
    assert engine.metrics.value("scheduler_error_total", scheduler="user", kind="worker_crash") == 0


async def test_script_logs_reach_the_service_log_within_a_rate(
    make_engine: EngineFactory,
) -> None:
    """A script logging its whole quota every cycle: every record stays in the cycle's
    result, but the service log gets a burst and then the sustained rate (every record
    used to be re-logged: about 1 MB per 10 s from one script)."""
    engine = await make_engine(
        "function schedule(ctx)\n"
        "  for i = 1, 100 do ctx.log_info(string.rep('x', 150), i) end\n"
        "  return { action = 'wait' }\nend"
    )
    with capture_logs() as logs:
        results = [await engine.schedule(cycle(n)) for n in range(5)]
    assert [len(r.logs) for r in results] == [100] * 5
    relayed = sum(1 for e in logs if e["event"] == "scheduler.script_log")
    assert relayed < 500, "every record was re-logged"
    rate = engine.options.script_logs
    assert rate.burst <= relayed <= rate.burst + 5 * rate.per_second, relayed
    limited = engine.metrics.value("scheduler_script_logs_rate_limited_total", tenant="")
    assert limited == 500 - relayed


async def test_tenant_schedulers_custom_metrics_are_their_own(make_engine: EngineFactory) -> None:
    """Two tenants' engines on one registry, as in the service: the same metric name is
    one series per tenant, not one series they overwrite."""
    emit = (
        "function schedule(ctx) ctx.emit_metric('custom_mine', {value}) "
        "return {{ action = 'wait' }} end"
    )
    shared = EngineMetrics()
    for tenant, value in (("acme", 1), ("globex", 2)):
        engine = await make_engine(
            emit.format(value=value), metrics=shared, tenant=tenant, user_spares=0,
            platform_spares=0,
        )  # fmt: skip
        assert (await engine.schedule(cycle(0))).source == "user"
    for tenant, value in (("acme", 1), ("globex", 2)):
        labels = {"tenant": tenant, "name": "custom_mine"}
        assert shared.registry.get_sample_value("scheduler_custom_metric", labels) == value


async def test_sigkilled_worker_mid_call_falls_back(make_engine: EngineFactory) -> None:
    """A worker killed by someone else during the call is a crash: fallback, then a spare serves."""
    engine = await make_engine(
        hostile("local t = os.clock() while os.clock() - t < 2 do end"),
        limits=SandboxLimits(deadline_ms=3000),
    )
    calm = await engine.schedule(cycle(0))

    async def kill_soon() -> None:
        await asyncio.sleep(0.2)
        os.kill(calm.worker_pid, signal.SIGKILL)

    killer = asyncio.create_task(kill_soon())
    crashed = await engine.schedule(cycle(1, trigger=True))
    await killer
    assert crashed.source == "platform-fallback"
    assert crashed.error is not None and crashed.error.kind == "worker_crash"
    assert crashed.latency_ms < 1000
    after = await engine.schedule(cycle(2))
    assert after.source == "user"
    assert after.worker_pid not in (0, calm.worker_pid)
    assert engine.metrics.value("scheduler_error_total", scheduler="user", kind="worker_crash") == 1


async def test_decision_naming_a_missing_job_is_rejected(make_engine: EngineFactory) -> None:
    """Dispatching a job that is not queued is rejected with a reason, and the cycle falls back."""
    engine = await make_engine(
        'function schedule(ctx) return { action = "dispatch", job_id = "job-404", worker_id = "worker-1" } end'
    )
    with capture_logs() as logs:
        result = await engine.schedule(sample_context())
    assert result.source == "platform-fallback"
    assert result.error is not None and result.error.kind == "rejected"
    assert [r.reason for r in result.error.rejections] == ["unknown_job"]
    assert "job-404" in result.error.message
    assert (
        engine.metrics.value(
            "scheduler_rejected_decisions_total", scheduler="user", reason="unknown_job"
        )
        == 1
    )
    assert any(e["event"] == "scheduler.fallback" and e["kind"] == "rejected" for e in logs)


@pytest.mark.parametrize(
    ("decision", "reason"),
    [
        ('{ action = "dispatch", job_id = "job-1", worker_id = "worker-9" }', "unknown_worker"),
        ('{ action = "dispatch", job_id = "job-2", worker_id = "worker-2" }', "worker_not_ready"),
        ('{ action = "dispatch", job_id = "job-1", worker_id = "worker-3" }', "model_mismatch"),
        (
            '{ action = "start_worker", pool_id = "pool-1", gpu_id = 0, model_ref = "llama-70b" }',
            "insufficient_vram",
        ),
    ],
)
async def test_invalid_decisions_are_rejected_with_reason(
    make_engine: EngineFactory, decision: str, reason: str
) -> None:
    """Unknown worker, busy worker, wrong model and VRAM that does not fit are all rejected."""
    engine = await make_engine(f"function schedule(ctx) return {decision} end", user_spares=0)
    result = await engine.schedule(sample_context())
    assert result.source == "platform-fallback"
    assert result.error is not None
    assert [r.reason for r in result.error.rejections] == [reason]


async def test_circuit_breaker_keeps_platform_in_charge(make_engine: EngineFactory) -> None:
    """After consecutive failures the user scheduler is skipped, then retried after a backoff."""
    engine = await make_engine(
        "function schedule(ctx) error('broken') end",
        breaker_threshold=3,
        breaker_base_backoff_s=0.3,
        user_spares=0,
    )
    kinds = [(await engine.schedule(cycle(i))).error.kind for i in range(5)]  # type: ignore[union-attr]
    assert kinds == ["lua_error"] * 3 + ["circuit_open"] * 2
    assert engine.metrics.value("scheduler_circuit_open", scheduler="user") == 1
    await asyncio.sleep(0.35)
    retried = await engine.schedule(cycle(6))  # half-open: one trial
    assert retried.error is not None and retried.error.kind == "lua_error"
    assert engine.breaker.backoff_s == pytest.approx(0.6)  # doubled
    assert engine.breaker.state == "open"


async def test_platform_failure_answers_wait(make_engine: EngineFactory) -> None:
    """When even the platform scheduler fails, the cycle answers wait: no job is lost."""
    engine = await make_engine(
        "function schedule(ctx) error('user broken') end",
        platform="function schedule(ctx) error('platform broken') end",
    )
    result = await engine.schedule(sample_context())
    assert result.source == "wait-fallback"
    assert isinstance(result.decision, Wait)
    assert result.error is not None and "user broken" in result.error.message


async def test_user_script_that_does_not_load_falls_back(make_engine: EngineFactory) -> None:
    """A syntax error in the user script makes every cycle fall back with the load error."""
    engine = await make_engine("function schedule(ctx) return {")
    for n in range(2):
        result = await engine.schedule(cycle(n))
        assert result.source == "platform-fallback"
        assert result.error is not None and result.error.kind == "load_error"
        assert "scheduler.lua:1" in result.error.message


async def test_refresh_pool_state_reruns_on_fresh_state(make_engine: EngineFactory) -> None:
    """ctx.refresh_pool_state() makes the core fetch fresh pools and call again with them."""
    engine = await make_engine(
        f"""function schedule(ctx)
          local w = ctx.find_ready_worker("{LLAMA_13B}")
          if not w and ctx.refresh_pool_state() then w = ctx.find_ready_worker("{LLAMA_13B}") end
          if not w then return {{ action = "wait" }} end
          return {{ action = "dispatch", job_id = "job-2", worker_id = w.id }}
        end"""
    )
    stale = sample_context()
    pool = stale.pools[1]
    fresh_worker = Worker(
        "worker-5", LLAMA_13B, "ready", (0,), 13 * 1024**3, started_at_ms=stale.now_ms
    )
    fresh = dataclasses.replace(
        stale,
        pools=(stale.pools[0], dataclasses.replace(pool, workers=(*pool.workers, fresh_worker))),
    )
    calls = 0

    async def refresh() -> Context:
        nonlocal calls
        calls += 1
        return fresh

    result = await engine.schedule(stale, refresh)
    assert calls == 1
    assert result.source == "user", result.error
    assert result.decision == Dispatch("job-2", "worker-5")
    assert result.context is fresh


async def test_deltas_keep_workers_in_step(make_engine: EngineFactory) -> None:
    """Across cycles that add, change and remove jobs and workers, the script sees each cycle's state."""
    engine = await make_engine(
        "function schedule(ctx) ctx.log_info(#ctx.queue, #ctx.get_all_workers(), ctx.pools[1].status)"
        ' return { action = "wait" } end'
    )
    base = sample_context()
    seen = []
    contexts = [
        base,
        dataclasses.replace(base, queue=base.queue[1:]),
        dataclasses.replace(
            base,
            queue=base.queue[2:],
            pools=(dataclasses.replace(base.pools[0], status="degraded"), base.pools[1]),
        ),
        dataclasses.replace(base, queue=base.queue[:1], pools=(base.pools[1],)),
    ]
    for ctx in contexts:
        result = await engine.schedule(ctx)
        seen.append(result.logs[0].message)
    assert seen == ["5 4 healthy", "4 4 healthy", "3 4 degraded", "1 1 healthy"]
    assert engine.journal.seq == 4


async def test_a_channel_closed_during_a_call_is_a_crash_not_a_cancellation(
    make_engine: EngineFactory,
) -> None:
    """Killing a worker closes its channel, which cancels the call in flight (closed here
    directly, the moment of the race the soak hit); the cycle still ends in the fallback
    (worker_crash) instead of raising CancelledError, and the next cycle is the user's."""
    engine = await make_engine(
        "function schedule(ctx)\n"
        "  local t = os.clock() while os.clock() - t < 0.5 do end\n"
        "  return { action = 'wait' }\nend",
        limits=SandboxLimits(deadline_ms=5000),
    )
    group = engine.user
    assert group is not None and group.active is not None
    victim = group.active
    cycle_task = asyncio.create_task(engine.schedule(cycle(0)))
    await asyncio.sleep(0.2)  # the call is in flight
    assert victim.channel is not None
    await victim.channel.close(grace=None)
    result = await cycle_task
    assert result.source == "platform-fallback"
    assert result.error is not None and result.error.kind == "worker_crash"
    assert (await engine.schedule(cycle(1))).source == "user"


@pytest.mark.parametrize("spawn", SPAWN_METHODS)
async def test_workers_are_hardened(make_engine: EngineFactory, tmp_path: Path, spawn: str) -> None:
    """Workers run with an empty environment, no_new_privs, seccomp and no inherited
    descriptors, whether forked by the fork server or exec'd by the core."""
    sentinel = open(tmp_path / "secret.db", "w")  # noqa: SIM115 - must stay open during spawn
    os.set_inheritable(sentinel.fileno(), True)
    try:
        engine = await make_engine(None, spawn=spawn)
    finally:
        sentinel.close()
    assert engine.platform.active is not None
    health = await engine.platform.active.health()
    assert {"no_new_privs", "rlimits", "closed_fds", "empty_environment"} <= set(health.hardening)
    pid = health.pid
    parent = psutil.Process(pid).ppid()
    assert parent == (shared_fork_server().pid if spawn == "fork-server" else os.getpid())
    status = Path(f"/proc/{pid}/status").read_text()
    assert "NoNewPrivs:\t1" in status
    if "seccomp" in health.hardening:
        assert "Seccomp:\t2" in status
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    targets = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert targets[0] == targets[1] == "/dev/null"
    assert targets[2].endswith(".log")  # its own stderr log, opened by the core
    others = [t for fd, t in targets.items() if fd > 2]
    assert all(t.startswith(("socket:", "anon_inode:", "pipe:")) for t in others), targets
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert "Max open files            64" in limits


@pytest.mark.parametrize("language", LANGUAGES)
async def test_lua54_and_luajit_agree_on_platform(
    make_engine: EngineFactory, language: str
) -> None:
    """The platform scheduler decides the same on both runtimes."""
    engine = await make_engine(None, language=language, platform_spares=0)
    result = await engine.schedule(sample_context())
    assert result.source == "platform"
    assert [a.action for a in result.decision.actions] == [  # type: ignore[union-attr]
        "dispatch",
        "dispatch",
        "dispatch",
        "start_worker",
    ]


async def test_engine_without_spares_respawns_in_background(tmp_path: Path) -> None:
    """With no spare at all, a killed worker is respawned off the hot path and serves again."""
    engine = SchedulingEngine(
        user_source=hostile("while true do end"),
        options=EngineOptions(user_spares=0, platform_spares=0, runtime_dir=tmp_path),
    )
    async with engine:
        assert (await engine.schedule(cycle(1, trigger=True))).error.kind == "timeout"  # type: ignore[union-attr]
        await asyncio.sleep(1.5)
        after = await engine.schedule(cycle(2))
        assert after.source == "user", after.error


async def test_cancelling_a_cycle_while_a_spare_is_settling_is_not_swallowed(
    make_engine: EngineFactory,
) -> None:
    """A cycle cancelled while it waits for a spare's sync really stops (no swallowed cancel)."""
    engine = await make_engine(hostile("while true do end"))
    await engine.schedule(cycle(0))
    group = engine.user
    assert group is not None
    # Cycle 0 killed the runaway worker: a spare takes its place in the background.
    await until(lambda: group.active is not None and bool(group.spares))
    assert group.active is not None
    spare = group.spares[0]
    await until(lambda: not spare.busy)
    os.kill(spare.pid, signal.SIGSTOP)  # its next sync does not answer
    try:
        await engine.schedule(cycle(1))
        assert spare.busy
        group.active.kill()  # the next cycle promotes the spare
        task = asyncio.create_task(engine.schedule(cycle(2)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        os.kill(spare.pid, signal.SIGCONT)


@pytest.mark.slow
async def test_a_worker_stopped_while_starting_does_not_disable_the_scheduler(
    make_engine: EngineFactory,
) -> None:
    """A replacement worker SIGSTOPped as it comes up (found by the soak: a load timeout
    used to mark the script unloadable for good) is replaced, and the script keeps serving."""
    engine = await make_engine(
        "function schedule(ctx) return { action = 'wait' } end", user_spares=0
    )
    assert (await engine.schedule(cycle(0))).source == "user"
    group = engine.user
    assert group is not None and group.active is not None
    me = psutil.Process()
    known = {p.pid for p in me.children(recursive=True)}
    with capture_logs() as logs:
        group.retire(group.active, "test")
        stopped = None
        for _ in range(1000):
            fresh = [p for p in me.children(recursive=True) if p.pid not in known]
            if fresh and any(rt.suffix == ".sock" for rt in engine.runtime_dir.iterdir()):
                with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived child
                    fresh[0].suspend()
                    stopped = fresh[0]
                    break
                known.add(fresh[0].pid)
            await asyncio.sleep(0.002)
        assert stopped is not None
        for _ in range(300):  # a load timeout is 2 s, a spawn timeout 10 s
            if group.spares or (group.active is not None and group.active.alive):
                break
            await asyncio.sleep(0.1)
    with contextlib.suppress(psutil.NoSuchProcess):  # killed by now, as it should be
        stopped.resume()
    result = await engine.schedule(cycle(1))
    assert group.load_error is None
    assert result.source == "user", result.error
    events = {entry["event"] for entry in logs}
    assert events & {"sandbox.load_timeout_retry", "sandbox.spawn_failed"}, events
