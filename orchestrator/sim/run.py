"""The discrete-event simulation: a heap of events on a simulated clock, and the real
engine (sandbox workers, decision validator, platform fallback) deciding each cycle.

Deterministic for a seed: arrivals come from the seeded workload, events are ordered
by (time, sequence), decisions depend on the context only, and the circuit breaker's
backoff runs on the simulated clock. Only the wall-clock decision latency varies.

A plain event heap rather than simpy: there is one process, the scheduling loop, and
it awaits a real asyncio RPC to a sandbox worker every cycle. simpy's generator
processes would need a bridge to asyncio for that; a heap of (time, sequence, event)
keeps the ordering explicit, deterministic and visible in thirty lines.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable

from orchestrator.config.settings import SchedulerConfig, load_catalog, load_config
from orchestrator.domain import decision as decisions
from orchestrator.domain.context import Catalog, Config
from orchestrator.domain.decision import Wait
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.sim.cluster import Event, SimCluster, SimJob
from orchestrator.sim.report import SimReport, build_report
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import Arrival

TICK_MS = 250  # re-run the scheduler at least this often while jobs wait
MAX_CYCLES_PER_INSTANT = 64  # actions keep a cycle going; a loop of them is cut here
DRAIN_LIMIT_MS = 600_000  # after the last arrival, give queued jobs this long to finish
# Stepping is pure Python on the caller's event loop (the service's, too): between two
# engine calls, which await the sandbox, give the loop a turn at least this often.
# 20,000 jobs arriving at one instant held it for 0.15 s.
YIELD_EVERY_S = 0.01

Progress = Callable[[float, str], None]


def part_progress(progress: Progress | None, index: int, parts: int, label: str) -> Progress | None:
    """Progress of run `index` of `parts`, reported as progress of the whole."""
    if progress is None:
        return None
    whole = progress

    def part(fraction: float, message: str) -> None:
        whole((index + fraction) / parts, f"{label}: {message}")

    return part


def default_catalog() -> Catalog:
    """The embedded default config's catalog (what `make run` serves)."""
    return load_catalog(load_config(None))


async def simulate(
    lua: str | None,
    name: str,
    settings: SimSettings,
    *,
    catalog: Catalog | None = None,
    arrivals: list[Arrival] | None = None,
    scheduler: SchedulerConfig = SchedulerConfig(),
    progress: Progress | None = None,
    max_cycles: int = 0,
) -> SimReport:
    """Run `lua` (None: the platform scheduler) on the settings' workload and cluster.

    `arrivals` may be passed when several policies run on one generated workload.
    `scheduler` configures the sandboxes and the circuit breaker as the service's
    config would; the deadline is the settings'.
    `max_cycles` stops early (benchmarks measure decisions per second with it).
    """
    catalog = catalog or default_catalog()
    if arrivals is None:
        # Pure and CPU-bound (0.1 s for 20,000 jobs): off the event loop.
        arrivals = await asyncio.to_thread(settings.arrivals, catalog)
    spec = settings.cluster()
    clock_ms = 0  # the simulated clock, which the circuit breaker's backoff runs on
    cluster = SimCluster(spec, catalog, Config())
    cluster.build(sorted(catalog.aliases) or sorted(catalog.models))
    engine = SchedulingEngine(
        user_source=lua,
        user_name=name,
        language=scheduler.language,
        options=EngineOptions.from_config(
            scheduler,
            deadline_ms=settings.deadline_ms,
            spares=1,
            clock=lambda: clock_ms / 1000,
        ),
    )
    sequence = itertools.count()
    heap: list[tuple[int, int, object]] = []
    for arrival in arrivals:
        heapq.heappush(heap, (arrival.at_ms, next(sequence), arrival))
    last_arrival = max((a.at_ms for a in arrivals), default=0)
    latencies: list[float] = []
    sources: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    fallback_reasons: Counter[str] = Counter()
    queue_series: list[tuple[int, int]] = []
    vram_series: list[tuple[int, float]] = []
    finished: list[SimJob] = []
    tick_at = -1
    wall = time.perf_counter()
    last_report = turn = wall  # turn: when the event loop last ran something else
    now = 0
    async with engine:
        while heap:
            now = clock_ms = heap[0][0]
            if now > last_arrival + DRAIN_LIMIT_MS or (max_cycles and len(latencies) >= max_cycles):
                break
            while heap and heap[0][0] == now:
                _, _, item = heapq.heappop(heap)
                if isinstance(item, Arrival):
                    cluster.arrive(item, now)
                elif isinstance(item, Event):
                    done = cluster.on(item, now)
                    if done is not None:
                        finished.append(done)
                if time.perf_counter() - turn > YIELD_EVERY_S:
                    await asyncio.sleep(0)
                    turn = time.perf_counter()
            waiting = None
            for _ in range(MAX_CYCLES_PER_INSTANT):
                result = await engine.schedule(cluster.context(now))
                turn = time.perf_counter()
                latencies.append(result.latency_ms)
                sources[result.source] += 1
                if result.error is not None:
                    fallback_reasons[result.error.kind] += 1
                for action in decisions.flatten(result.decision):
                    actions[action.action] += 1
                    if action.rule:
                        rules[action.rule] += 1
                events = cluster.apply(result.decision, now)
                for at, event in events:
                    heapq.heappush(heap, (at, next(sequence), event))
                if isinstance(result.decision, Wait):
                    waiting = result.decision.retry_after_ms
                    break
                if max_cycles and len(latencies) >= max_cycles:
                    break  # exactly: the service's budget is a bound, not a hint
            queue_series.append((now, cluster.queue_depth))
            vram_series.append((now, cluster.vram_utilization()))
            if cluster.queue_depth and tick_at <= now:
                tick_at = now + min(TICK_MS, waiting or TICK_MS)
                heapq.heappush(heap, (tick_at, next(sequence), Event("tick", "")))
            if progress is not None and time.perf_counter() - last_report > 0.25:
                last_report = time.perf_counter()
                done_share = len(finished) / max(1, len(arrivals))
                progress(done_share, f"{len(finished)}/{len(arrivals)} jobs, t={now / 1000:.1f}s")
    if progress is not None:
        progress(1.0, f"{len(finished)}/{len(arrivals)} jobs")
    return build_report(
        policy=name,
        seed=settings.seed,
        workload=settings.workload(),
        cluster=spec,
        cluster_state=cluster,
        arrivals=arrivals,
        end_ms=now,
        latencies=latencies,
        sources=sources,
        actions=actions,
        rules=rules,
        fallback_reasons=fallback_reasons,
        queue_series=queue_series,
        vram_series=vram_series,
        wall_s=time.perf_counter() - wall,
    )
