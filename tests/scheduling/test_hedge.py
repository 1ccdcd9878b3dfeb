"""The hedged fallback with real sandbox workers: a user scheduler slow to answer gets
the platform scheduler started beside it; its decision serves a failure past the hedge
point, and is discarded, its worker still in step, when the user answers in time."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.config.settings import SchedulerConfig
from orchestrator.domain.context import Context
from orchestrator.domain.decision import Decision
from orchestrator.domain.samples import sample_context
from orchestrator.sandbox.limits import SandboxLimits
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine, platform_source
from orchestrator.scheduling.hedge import INITIAL_LATENCY_S, HedgeTiming
from tests.conftest import EngineFactory

# Budget 1 s, margin 900 ms: the hedge point is about 95 ms into the user's call, and
# a script that spins 300 ms of CPU answers past it with 700 ms to spare.
SLOW = {"limits": SandboxLimits(deadline_ms=1000), "hedge_margin_ms": 900}
SPIN = "local t = os.clock() while os.clock() - t < 0.3 do end"


def nth(n: int) -> Context:
    """The sample context at cycle n, with a queue that changes every cycle (job-1 stays
    first): a platform worker that missed a delta would decide on jobs that are gone."""
    ctx = sample_context(now_ms=1_700_000_000_000 + n * 100)
    return dataclasses.replace(ctx, queue=(ctx.queue[0], *ctx.queue[1 + n % 3 :]))


def by_mark(statement: str, otherwise: str = "") -> str:
    """A script that runs `statement` on the cycles whose metrics carry the mark (1),
    `otherwise` on the others, then dispatches the first job."""
    return f"""
function schedule(ctx)
  if ctx.metrics.jobs_completed_last_minute == 1 then
    {statement}
  else
    {otherwise}
  end
  local job = ctx.queue[1]
  return {{ action = "dispatch", job_id = job.id, worker_id = ctx.find_least_loaded_worker(job.model_ref).id }}
end
"""


def marked(ctx: Context) -> Context:
    return dataclasses.replace(
        ctx, metrics=dataclasses.replace(ctx.metrics, jobs_completed_last_minute=1)
    )


async def platform_decides(make_engine: EngineFactory, ctx: Context) -> Decision:
    reference = await make_engine(None, user_spares=0, platform_spares=0)
    result = await reference.schedule(ctx)
    assert result.source == "platform", result.error
    return result.decision


def hedges(engine: SchedulingEngine) -> dict[str, float]:
    return {
        event: engine.metrics.value("scheduler_hedge_total", event=event)
        for event in ("started", "used", "discarded")
    }


def resyncs(engine: SchedulingEngine, scheduler: str) -> float:
    return engine.metrics.value("sandbox_resync_total", scheduler=scheduler, when="cycle")


def test_the_hedge_point_leaves_the_platforms_latency_and_the_margin() -> None:
    timing = HedgeTiming(deadline_s=0.05, margin_s=0.01)
    assert timing.delay_s == pytest.approx(0.05 - INITIAL_LATENCY_S - 0.01)
    timing.record(0.002)
    timing.record(0.004)
    assert timing.delay_s == pytest.approx(0.05 - 0.004 - 0.01)  # the slowest recent call
    timing.record(1.0)  # a stall counts for at most half the deadline
    assert timing.delay_s == pytest.approx(0.05 - 0.025 - 0.01)
    assert HedgeTiming(deadline_s=0.05, margin_s=0.1).delay_s == 0  # hedge at once


async def test_a_runaway_falls_back_to_the_hedge(make_engine: EngineFactory) -> None:
    """A script that never answers: the platform decision, started at the hedge point
    on the same context, serves the cycle at the deadline; the hedge counts as used."""
    engine = await make_engine(by_mark("while true do end"))
    ctx = marked(nth(1))
    result = await engine.schedule(ctx)
    assert result.source == "platform-fallback"
    assert result.error is not None and result.error.kind == "timeout"
    assert result.decision == await platform_decides(make_engine, ctx)
    assert hedges(engine) == {"started": 1, "used": 1, "discarded": 0}
    after = await engine.schedule(nth(2))
    assert after.source == "user", after.error  # a spare took over


async def test_an_answer_past_the_hedge_point_wins_and_the_platform_stays_in_step(
    make_engine: EngineFactory,
) -> None:
    """The user answers after the hedge started, in time: its decision stands, and the
    hedge, still deciding (the platform scheduler is slower here), is discarded. The
    next cycle's fallback waits for it, then sends the platform's worker, which the
    hedge moved on, that cycle's delta alone (no full snapshot), and decides right."""
    slower = platform_source() + (
        "\nlocal platform_schedule = schedule\n"
        "function schedule(ctx)\n"
        "  if ctx.metrics.jobs_completed_last_minute == 1 then\n"
        "    local t = os.clock() while os.clock() - t < 0.5 do end\n"
        "  end\n"
        "  return platform_schedule(ctx)\n"
        "end\n"
    )
    engine = await make_engine(by_mark(SPIN, otherwise="error('broken')"), platform=slower, **SLOW)
    fallback = await engine.schedule(nth(0))  # the platform's worker is in step
    assert fallback.source == "platform-fallback"
    assert hedges(engine)["started"] == 0  # an early error starts no hedge
    late = await engine.schedule(marked(nth(1)))
    assert late.source == "user", late.error
    assert hedges(engine) == {"started": 1, "used": 0, "discarded": 1}
    assert engine.platform.active is not None and engine.platform.active.busy
    full_before = resyncs(engine, "platform")
    ctx = nth(2)
    after = await engine.schedule(ctx)
    assert after.source == "platform-fallback"
    assert after.error is not None and after.error.kind == "lua_error"
    assert after.decision == await platform_decides(make_engine, ctx)
    assert resyncs(engine, "platform") == full_before


async def test_a_hedge_that_timed_out_is_followed_by_a_fallback_as_without_one(
    make_engine: EngineFactory,
) -> None:
    """The hedge's own call runs past its deadline (here the platform worker's second
    call loops; in life, a starved machine): the cycle still falls back to a platform
    decision, from the next platform worker, as it would have without a hedge."""
    looping_once = platform_source() + (
        "\nlocal platform_schedule = schedule\n"
        "local calls = 0\n"
        "function schedule(ctx)\n"
        "  calls = calls + 1\n"
        "  if calls == 2 then while true do end end\n"
        "  return platform_schedule(ctx)\n"
        "end\n"
    )
    engine = await make_engine(
        by_mark("while true do end", otherwise="error('broken')"), platform=looping_once
    )
    assert (await engine.schedule(nth(0))).source == "platform-fallback"  # its first call
    ctx = marked(nth(1))
    result = await engine.schedule(ctx)
    assert result.source == "platform-fallback", result.error
    assert result.error is not None and result.error.kind == "timeout"
    assert result.decision == await platform_decides(make_engine, ctx)
    assert hedges(engine) == {"started": 1, "used": 1, "discarded": 0}
    killed = engine.metrics.value(
        "sandbox_worker_events_total", scheduler="platform", event="killed_timeout"
    )
    assert killed == 1


async def test_a_hedge_on_a_context_refreshed_since_is_not_used(
    make_engine: EngineFactory,
) -> None:
    """A script that asks for fresh pool state after the hedge point, then fails: the
    hedge decided on the stale context, so the fallback runs again on the fresh one."""
    engine = await make_engine(
        by_mark("error('broken on fresh state')", otherwise=f"{SPIN} ctx.refresh_pool_state()"),
        **SLOW,
    )
    stale = nth(0)
    fresh = marked(nth(1))

    async def refresh() -> Context:
        return fresh

    result = await engine.schedule(stale, refresh)
    assert result.source == "platform-fallback"
    assert result.error is not None and result.error.kind == "lua_error"
    assert result.context is fresh
    assert result.decision == await platform_decides(make_engine, fresh)
    assert hedges(engine) == {"started": 1, "used": 0, "discarded": 1}


async def test_without_a_margin_nothing_hedges(make_engine: EngineFactory) -> None:
    """Hedging off: a runaway still falls back, after its deadline, with no hedge."""
    engine = await make_engine(by_mark("while true do end"), hedge_margin_ms=None)
    result = await engine.schedule(marked(nth(0)))
    assert result.source == "platform-fallback"
    assert result.error is not None and result.error.kind == "timeout"
    assert hedges(engine) == {"started": 0, "used": 0, "discarded": 0}


def test_engines_without_platform_spares_do_not_hedge() -> None:
    """The simulator, replays, shadows and dry runs keep no spare: no hedge either."""
    config = SchedulerConfig(hedge_margin_ms=10)
    assert EngineOptions.from_config(config).hedge_margin_ms == 10
    assert EngineOptions.from_config(config, spares=0).hedge_margin_ms is None
    assert EngineOptions.from_config(config, spares=1, platform_spares=0).hedge_margin_ms is None
    assert EngineOptions.from_config(SchedulerConfig(hedge_margin_ms=None)).hedge_margin_ms is None
