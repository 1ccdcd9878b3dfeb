"""The engine's failure-path figures for `orchestratord bench`: the hedged fallback, a
crash served by a spare, and what hedging costs in CPU when nothing fails.

Each figure is measured in several rounds, each with engines of its own, so that a
report can give the spread between rounds beside the pooled median and p99: one
figure per run is not enough on a shared 2-core machine. The methodology is
bench.py's (`runaway`, `crash_to_spare`): the sample context, one cycle at a time,
spares back to full strength before the next one. The functions return numbers
only; bench.py renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.settings import SchedulerConfig
from orchestrator.domain.context import Context
from orchestrator.domain.samples import sample_context
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine

# runtime-spec section 2: a script whose own cost is microseconds.
FAST_SCRIPT = """
function schedule(ctx)
  local job = ctx.queue[1]
  if job then
    local worker = ctx.find_least_loaded_worker(job.model_ref)
    if worker then
      return { action = "dispatch", job_id = job.id, worker_id = worker.id }
    end
  end
  return { action = "wait" }
end
"""
WARM_UP = 5  # cycles before the CPU is measured
RUNAWAY_SCRIPT = FAST_SCRIPT.replace(
    "function schedule(ctx)", "function schedule(ctx)\n  while true do end", 1
)


def slow_script(busy_ms: float) -> str:
    """The fast script after `busy_ms` of CPU: it answers late, but in time."""
    return FAST_SCRIPT.replace(
        "function schedule(ctx)",
        "function schedule(ctx)\n"
        f"  local t = os.clock() while os.clock() - t < {busy_ms / 1000} do end",
        1,
    )


@dataclass(frozen=True)
class Spread:
    """One figure over several rounds (ms): pooled median and p99, and each round's."""

    median: float
    p99: float
    round_medians: tuple[float, ...]
    round_p99s: tuple[float, ...]

    @classmethod
    def of(cls, rounds: list[list[float]]) -> Spread:
        pooled = [value for values in rounds for value in values]
        return cls(
            statistics.median(pooled),
            _p99(pooled),
            tuple(statistics.median(values) for values in rounds),
            tuple(_p99(values) for values in rounds),
        )


@dataclass(frozen=True)
class CpuPerCycle:
    """CPU time per cycle (ms), by process, with hedging off and on, one value a round."""

    core_off: tuple[float, ...]  # the core: every thread of this process
    core_on: tuple[float, ...]
    platform_off: tuple[float, ...]  # the platform scheduler's workers, spares included
    platform_on: tuple[float, ...]
    user_off: tuple[float, ...]  # the user scheduler's workers, spares included
    user_on: tuple[float, ...]
    hedges_per_cycle: float  # with hedging on: started, all rounds together


@dataclass(frozen=True)
class HedgeCpuCost:
    nothing_fails: CpuPerCycle  # a fast script: hedging only keeps the platform in sync
    hedges_discarded: CpuPerCycle  # a script that answers past the hedge point, in time


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _engine(
    script: str, *, deadline_ms: int = 50, hedge_margin_ms: int | None = 10
) -> SchedulingEngine:
    return SchedulingEngine(
        user_source=script,
        options=EngineOptions.from_config(
            SchedulerConfig(deadline_ms=deadline_ms, hedge_margin_ms=hedge_margin_ms),
            spares=1,
            breaker_threshold=1_000_000,  # measure every failure
        ),
    )


def _at(base: Context, step: int) -> Context:
    return dataclasses.replace(base, now_ms=base.now_ms + step)


async def _spares_ready(engine: SchedulingEngine, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    for group in (engine.user, engine.platform):
        while group is not None and len(group.spares) < group.target_spares:
            if time.monotonic() > deadline:
                raise RuntimeError("spares did not come back")
            await asyncio.sleep(0.01)


async def runaway_to_fallback(rounds: int = 5, count: int = 20, *, hedge: bool = True) -> Spread:
    """From a cycle's start to its fallback decision when the script never answers
    (budget 50 ms): the latency the cycle reports. With `hedge`, the platform decision
    was started beside the runaway and is ready at the deadline."""
    base = sample_context()
    latencies: list[list[float]] = []
    for _ in range(rounds):
        async with _engine(RUNAWAY_SCRIPT, hedge_margin_ms=10 if hedge else None) as engine:
            values = []
            for step in range(count):
                result = await engine.schedule(_at(base, step))
                assert result.source == "platform-fallback", result.error
                values.append(result.latency_ms)
                await _spares_ready(engine)
            latencies.append(values)
    return Spread.of(latencies)


async def crash_to_spare(rounds: int = 5, count: int = 20) -> tuple[Spread, int]:
    """From a worker crash (the process gone, between cycles) to the next decision,
    served by the promoted spare; and how many full snapshots those cycles sent (0:
    the spare held the current snapshot, and took the latest delta with the call)."""
    base = sample_context()
    latencies: list[list[float]] = []
    resyncs = 0
    for _ in range(rounds):
        async with _engine(FAST_SCRIPT) as engine:
            assert engine.user is not None
            values = []
            step = 0
            for _ in range(count):
                await engine.schedule(_at(base, step))
                step += 1
                await asyncio.sleep(0.05)  # the spare takes the latest delta meanwhile
                victim = engine.user.active
                assert victim is not None
                os.kill(victim.pid, signal.SIGKILL)
                while victim.alive:  # the crash is done when the kernel says so
                    await asyncio.sleep(0)
                before = _cycle_resyncs(engine)
                crashed = time.perf_counter()
                while True:
                    result = await engine.schedule(_at(base, step))
                    step += 1
                    if result.source == "user":
                        break
                values.append((time.perf_counter() - crashed) * 1000)
                resyncs += int(_cycle_resyncs(engine) - before)
                await _spares_ready(engine)
            latencies.append(values)
    return Spread.of(latencies), resyncs


def _cycle_resyncs(engine: SchedulingEngine) -> float:
    """Full snapshots sent to the user's workers on the hot path so far."""
    return engine.metrics.value("sandbox_resync_total", scheduler="user", when="cycle")


def _cpu_ms(pid: int) -> float:
    """CPU ms a process's threads have used so far, from the scheduler's accounting in
    ns (/proc/PID/task/*/schedstat): /proc/PID/stat counts in 10 ms ticks."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that has just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6


async def _cpu_per_cycle(
    script: str,
    cycles: int,
    gap_s: float,
    deadline_ms: int,
    hedge_margin_ms: int | None,
    settle_s: float,
) -> tuple[float, float, float, float]:
    """(core, platform workers, user workers) CPU ms per cycle, and hedges per cycle."""
    base = sample_context()
    async with _engine(script, deadline_ms=deadline_ms, hedge_margin_ms=hedge_margin_ms) as engine:
        assert engine.user is not None
        # New workers run slowly for a second or two after they load (measured: a
        # script's first 600 ms of CPU then took over 1 s): let them settle, then warm up.
        await asyncio.sleep(settle_s)
        for step in range(WARM_UP):  # JIT, caches, the hedge's latency estimate
            await engine.schedule(_at(base, step))
        await _spares_ready(engine)
        await asyncio.sleep(gap_s)
        groups = {"platform": engine.platform, "user": engine.user}
        pids = {role: [w.pid for w in group.workers()] for role, group in groups.items()}
        used = {role: sum(map(_cpu_ms, p)) for role, p in pids.items()}
        hedges = engine.metrics.value("scheduler_hedge_total", event="started")
        core = time.process_time()
        for step in range(WARM_UP, WARM_UP + cycles):
            result = await engine.schedule(_at(base, step))
            assert result.source == "user", result.error  # nothing fails
            await asyncio.sleep(gap_s)  # background syncs end before the next cycle
        core = (time.process_time() - core) * 1000
        for role, p in pids.items():
            # A worker replaced meanwhile would be missing: nothing fails, none is.
            assert [w.pid for w in groups[role].workers()] == p, "a worker was replaced"
            used[role] = sum(map(_cpu_ms, p)) - used[role]
        hedges = engine.metrics.value("scheduler_hedge_total", event="started") - hedges
    return core / cycles, used["platform"] / cycles, used["user"] / cycles, hedges / cycles


async def _cpu_rounds(
    script: str,
    rounds: int,
    cycles: int,
    gap_s: float,
    deadline_ms: int,
    margin_ms: int,
    settle_s: float = 0.0,
) -> CpuPerCycle:
    off: list[tuple[float, float, float, float]] = []
    on: list[tuple[float, float, float, float]] = []
    for _ in range(rounds):  # alternated, so that both see the same machine
        for margin, into in ((None, off), (margin_ms, on)):
            into.append(await _cpu_per_cycle(script, cycles, gap_s, deadline_ms, margin, settle_s))
    return CpuPerCycle(
        core_off=tuple(r[0] for r in off),
        core_on=tuple(r[0] for r in on),
        platform_off=tuple(r[1] for r in off),
        platform_on=tuple(r[1] for r in on),
        user_off=tuple(r[2] for r in off),
        user_on=tuple(r[2] for r in on),
        hedges_per_cycle=statistics.mean(r[3] for r in on),
    )


async def hedge_cpu_cost(
    rounds: int = 3, cycles: int = 1000, slow_cycles: int = 30, gap_s: float = 0.002
) -> HedgeCpuCost:
    """What hedging costs in CPU when nothing fails, with hedging off and on:

    - a fast script (`cycles` cycles, `gap_s` apart): no hedge starts; the cost is the
      platform's active worker taking each cycle's delta in the background (and its
      spare taking them every few cycles instead of every cycle);
    - a script that answers after the hedge point but in time (`slow_cycles`): every
      cycle starts a hedge and discards it (budget 1 s, margin 800 ms: the hedge point
      is at about 190 ms, and the script answers after 300 ms of CPU).

    The budgets are generous so that a stall of a shared machine is not a failure:
    nothing may fail here.
    """
    fast = await _cpu_rounds(FAST_SCRIPT, rounds, cycles, gap_s, 1000, 10)
    slow = await _cpu_rounds(slow_script(300), rounds, slow_cycles, gap_s, 1000, 800, 3.0)
    return HedgeCpuCost(nothing_fails=fast, hedges_discarded=slow)
