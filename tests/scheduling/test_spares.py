"""Warm spares with real sandbox workers: each holds the current snapshot, so a crash
costs a promotion and the latest deltas, never a full snapshot on the hot path."""

from __future__ import annotations

import os
import signal

from orchestrator.domain.context import Context
from orchestrator.domain.samples import sample_context
from orchestrator.sandbox.process import WorkerProcess
from orchestrator.scheduling.engine import PLATFORM_SPARE_LAG, SchedulingEngine
from tests.conftest import EngineFactory, until

FAST = """
function schedule(ctx)
  local job = ctx.queue[1]
  return { action = "dispatch", job_id = job.id, worker_id = ctx.find_least_loaded_worker(job.model_ref).id }
end
"""


def nth(n: int) -> Context:
    return sample_context(now_ms=1_700_000_000_000 + n * 100)


def holds_current(engine: SchedulingEngine, worker: WorkerProcess) -> bool:
    journal = engine.journal
    return not worker.busy and (worker.epoch, worker.seq) == (journal.epoch, journal.seq)


def resyncs(engine: SchedulingEngine, scheduler: str, when: str) -> float:
    return engine.metrics.value("sandbox_resync_total", scheduler=scheduler, when=when)


async def test_a_crash_is_served_by_the_spare_with_the_latest_delta_alone(
    make_engine: EngineFactory,
) -> None:
    """The active user worker crashes between cycles: the next cycle promotes the spare,
    which the previous cycle's background sync brought up to date, and sends it that
    cycle's delta; no full snapshot is sent."""
    engine = await make_engine(FAST)
    group = engine.user
    assert group is not None
    for n in range(3):
        assert (await engine.schedule(nth(n))).source == "user"
    spare = group.spares[0]
    await until(lambda: holds_current(engine, spare))
    victim = group.active
    assert victim is not None
    os.kill(victim.pid, signal.SIGKILL)
    await until(lambda: not victim.alive)
    full_before = resyncs(engine, "user", "cycle")
    result = await engine.schedule(nth(3))
    assert result.source == "user", result.error
    assert result.worker_pid == spare.pid
    assert resyncs(engine, "user", "cycle") == full_before
    assert holds_current(engine, spare)


async def test_a_new_spare_is_brought_up_to_date_as_soon_as_it_is_up(
    make_engine: EngineFactory,
) -> None:
    """A replacement spare takes the full snapshot in the background when it comes up,
    not after the next cycle: a second crash before then finds it ready."""
    engine = await make_engine(FAST)
    group = engine.user
    assert group is not None
    await engine.schedule(nth(0))
    assert group.active is not None
    group.retire(group.active, "test")
    assert (await engine.schedule(nth(1))).source == "user"  # the spare, promoted
    background_before = resyncs(engine, "user", "background")
    await until(lambda: len(group.spares) == 1 and holds_current(engine, group.spares[0]))
    assert resyncs(engine, "user", "background") == background_before + 1


async def test_while_hedging_the_platforms_worker_takes_every_delta(
    make_engine: EngineFactory,
) -> None:
    """With a user scheduler that never fails, the platform's active worker still takes
    each cycle's delta in the background (a hedge then sends it one delta), and its
    spare falls at most PLATFORM_SPARE_LAG cycles behind. Without hedging, the active
    worker is brought up to date only when it serves, and the spare every cycle."""
    await platform_rhythm(await make_engine(FAST), hedging=True)
    await platform_rhythm(await make_engine(FAST, hedge_margin_ms=None), hedging=False)


async def platform_rhythm(engine: SchedulingEngine, *, hedging: bool) -> None:
    active, spare = engine.platform.active, engine.platform.spares[0]
    assert active is not None
    for n in range(PLATFORM_SPARE_LAG + 2):
        assert (await engine.schedule(nth(n))).source == "user"
        if hedging:
            await until(lambda: holds_current(engine, active) and not spare.busy)
            assert engine.journal.seq - spare.seq < PLATFORM_SPARE_LAG
        else:
            await until(lambda: holds_current(engine, spare))
            assert active.seq == 0


async def test_a_spare_promoted_before_its_sync_ran_takes_both_deltas(
    make_engine: EngineFactory,
) -> None:
    """Back to back: a cycle ends (its sync of the spare is due, not yet begun) and the
    next one promotes that spare at once. The call sends it both deltas; the sync, when
    it runs, finds the worker taken and leaves it: nothing is refused as out of step."""
    engine = await make_engine(FAST)
    group = engine.user
    assert group is not None
    await engine.schedule(nth(0))
    for n in range(1, 10, 3):
        await until(lambda: len(group.spares) == 1 and holds_current(engine, group.spares[0]))
        assert (await engine.schedule(nth(n))).source == "user"
        spare = group.spares[0]
        assert spare.seq == engine.journal.seq - 1 and not spare.busy
        assert group.active is not None
        group.retire(group.active, "test")
        full_before = resyncs(engine, "user", "cycle")
        result = await engine.schedule(nth(n + 1))
        assert result.source == "user", result.error
        assert result.worker_pid == spare.pid
        assert resyncs(engine, "user", "cycle") == full_before
        assert (await engine.schedule(nth(n + 2))).source == "user"
