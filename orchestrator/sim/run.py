"""The discrete-event simulation: a heap of events on a simulated clock, and the real
engine (sandbox workers, decision validator, platform fallback) deciding each cycle.

Deterministic for a seed: arrivals come from the seeded workload, events are ordered
by (time, sequence), decisions depend on the context only, and the circuit breaker's
backoff runs on the simulated clock. Only the wall-clock decision latency varies.

A plain event heap rather than simpy: there is one process, the scheduling loop, and
it awaits a real asyncio RPC to a sandbox worker every cycle. simpy's generator
processes would need a bridge to asyncio for that; a heap of (time, sequence, event)
keeps the ordering explicit, deterministic and visible in thirty lines.

When a cycle runs. The live loop runs one whenever the cluster changed and at least
every tick; replayed literally, most of those cycles answer `wait`, and a cycle, a
round trip to a sandbox, is what a simulation's wall time goes to. So a cycle runs at
an instant only when it gives the policy something new to decide:
- a job arrives and a worker of its model has a free slot, or no worker serves its
  model at all (a start is due);
- a job finishes on a worker that then has a free slot while jobs of its model wait;
- a worker becomes ready or goes away, whether or not jobs wait;
- while jobs wait, TICK_MS after the last cycle, or sooner as a `wait`'s
  retry_after_ms asks: the live loop's tick. Starting and evicting workers for waiting
  jobs, and decisions that depend on time, come at most that late.
After a decision that acted, another cycle runs at the same instant while a waiting job
could be placed or has no worker (a policy may take one action a cycle). A change
inside a worker (a prefill done, a job waiting for KV room), a job arriving where it
can only queue, and a slot freed while nothing of its model waits run no cycle; with
the queue empty, only a worker becoming ready or going away does (so a policy sees
the workers it started and evicted, and may act again on them).

A spin guard: cycles at one instant that place no job are counted over all its passes
(with no start or evict delay, a worker started at an instant is ready at it, and
another pass runs). Past MAX_CYCLES_PER_INSTANT of them, the instant runs no more
cycles and one comes a tick later. Cycles that place jobs are not counted: a policy of
one dispatch a cycle places a burst of any size at once.

Superseded events (a tick replaced by a later cycle's, a worker's `batch` event
replaced by a newer plan, SimCluster.current) are dropped without moving the clock.

A simulation ends when every job has finished, or `drain_limit_s` after the last
arrival: the report then says what was left and why (report.py, `unfinished`). It
stopped at the drain limit only if jobs were left there; its simulated time is the
drain limit then, and otherwise the last instant something happened (an arrival, a
cycle, a job done).
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
from orchestrator.domain.decision import Decision, Dispatch, StartWorker, Wait
from orchestrator.scheduling.engine import EngineOptions, SchedulingEngine
from orchestrator.sim.cluster import Event, SimCluster, SimJob
from orchestrator.sim.report import SimReport, build_report
from orchestrator.sim.settings import SimSettings
from orchestrator.sim.workload import Arrival

TICK_MS = 250  # re-run the scheduler at least this often while jobs wait (the live tick)
# Cycles at one instant that place no job (over all its passes); past this, further
# cycles wait a tick. Cycles that place jobs are not counted: a burst is placed at once.
MAX_CYCLES_PER_INSTANT = 64
WORKER_EVENTS = frozenset({"ready", "gone"})  # a worker joins or leaves: always a cycle
# Stepping is pure Python on the caller's event loop (the service's, too): between two
# engine calls, which await the sandbox, give the loop a turn at least this often.
# 20,000 jobs arriving at one instant held it for 0.15 s.
YIELD_EVERY_S = 0.01

Progress = Callable[[float, str], None]


class Tick:
    """The scheduler's re-run while jobs wait; only the latest one scheduled counts."""


class Openings:
    """Which changes give the policy something new to decide (the module docstring):
    the waiting jobs by model, and where a job of a model could go now."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.queued: dict[str, str] = {}  # job id -> its model_ref, while it waits
        self.waiting: Counter[str] = Counter()  # model_ref -> jobs waiting

    def arrived(self, job_id: str) -> str:
        """Count a job that joined the queue; returns its model."""
        model = self.cluster.jobs[job_id].job.model_ref
        self.queued[job_id] = model
        self.waiting[model] += 1
        return model

    def applied(self, decision: Decision) -> int:
        """Forget the jobs a decision dispatched (those the cluster accepted); returns
        how many."""
        placed = 0
        for action in decisions.flatten(decision):
            if (
                isinstance(action, Dispatch)
                and action.job_id in self.queued
                and self.cluster.jobs[action.job_id].dispatched_ms >= 0
            ):
                model = self.queued.pop(action.job_id)
                self.waiting[model] -= 1
                if not self.waiting[model]:
                    del self.waiting[model]
                placed += 1
        return placed

    def open(self, models: set[str] | None = None) -> bool:
        """Could a job waiting for one of `models` (None: any) be placed now, or does
        one have no worker at all?"""
        wanted = self.waiting.keys() if models is None else models & self.waiting.keys()
        if not wanted:
            return False
        served, free = self.cluster.models_served()
        return any(m in free or m not in served for m in wanted)

    def freed(self, jobs: list[SimJob]) -> bool:
        """Did a finished job leave a free slot that a waiting job could take?"""
        for job in jobs:
            worker = self.cluster.workers.get(job.worker)
            if worker is not None and worker.status == "ready" and worker.model_ref in self.waiting:
                return True
        return False


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
    # The initial workers serve the models the workload asks for, in turn: a trace
    # mapped to one model gets a cluster of that model, not idle workers of others.
    cluster.build(
        sorted({a.model for a in arrivals}) or sorted(catalog.aliases) or sorted(catalog.models)
    )
    openings = Openings(cluster)
    engine = SchedulingEngine(
        user_source=lua,
        user_name=name,
        language=scheduler.language,
        options=EngineOptions.from_config(
            scheduler,
            deadline_ms=settings.deadline_ms,
            # No warm spares: each would be sent every cycle's context, a second round
            # trip a cycle (a third of the wall time). A killed worker's replacement is
            # spawned when needed instead, its cycles falling back meanwhile.
            spares=0,
            clock=lambda: clock_ms / 1000,
        ),
    )
    sequence = itertools.count()
    heap: list[tuple[int, int, Arrival | Event | Tick]] = []
    for arrival in arrivals:
        heapq.heappush(heap, (arrival.at_ms, next(sequence), arrival))
    last_arrival = max((a.at_ms for a in arrivals), default=0)
    drain_limit_s = settings.drain_limit_s
    drain_end_ms = last_arrival + int(drain_limit_s * 1000)
    latencies: list[float] = []
    sources: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    rules: Counter[str] = Counter()
    fallback_reasons: Counter[str] = Counter()
    queue_series: list[tuple[int, int]] = [(0, 0)]
    vram_series: list[tuple[int, float]] = [(0, cluster.vram_utilization())]
    # Where each worker ran, kept past its removal: tokens per GPU are counted by it.
    placements = {w.id: (w.pool, w.gpu) for w in cluster.workers.values()}
    finished = 0
    tick: Tick | None = None  # the latest tick scheduled: earlier ones are stale
    owed = False  # that tick carries cycles deferred by the spin guard: it stands anyway
    last_source = ""
    stopped = "finished"
    wall = time.perf_counter()
    last_report = turn = wall  # turn: when the event loop last ran something else
    now = 0
    last_ms = 0  # the last instant something happened: an arrival, a cycle, a job done
    idle = 0  # cycles at `now` that placed no job, over all its passes (the spin guard)
    async with engine:
        while heap:
            at, _, first = heap[0]
            if (isinstance(first, Tick) and first is not tick) or (
                isinstance(first, Event) and not cluster.current(first)
            ):
                heapq.heappop(heap)  # superseded: dropped without moving the clock
                continue
            if at > drain_end_ms:
                if not _all_done(cluster, arrivals):
                    stopped = "drain_limit"
                break
            if max_cycles and len(latencies) >= max_cycles:
                stopped = "cycle_budget"
                break
            if at > now:
                idle = 0
            now = clock_ms = at
            due = False  # whether this instant calls for a cycle
            models: set[str] = set()  # of the jobs that arrived
            vram_changed = False
            while heap and heap[0][0] == now:
                _, _, item = heapq.heappop(heap)
                if isinstance(item, Arrival):
                    cluster.arrive(item, now)
                    models.add(openings.arrived(item.job_id))
                    last_ms = now
                elif isinstance(item, Tick):
                    if item is tick:
                        due, tick, owed = True, None, False
                else:
                    if item.kind in WORKER_EVENTS:
                        due = True
                        worker = cluster.workers.get(item.target)
                        if worker is not None:  # before `gone` removes it
                            placements[worker.id] = (worker.pool, worker.gpu)
                        vram_changed |= item.kind == "gone"
                    done, later = cluster.on(item, now)
                    finished += len(done)
                    if done:
                        last_ms = max(last_ms, *(j.done_ms for j in done))
                    due = due or openings.freed(done)
                    for when, event in later:
                        heapq.heappush(heap, (when, next(sequence), event))
                if time.perf_counter() - turn > YIELD_EVERY_S:
                    await asyncio.sleep(0)
                    turn = time.perf_counter()
            due = due or (bool(models) and openings.open(models))
            retry_ms = 0
            deferred = False  # the spin guard stopped this instant's cycles
            while due:
                if idle >= MAX_CYCLES_PER_INSTANT:
                    deferred = True
                    break
                result = await engine.schedule(cluster.context(now))
                turn = time.perf_counter()
                last_ms = now
                latencies.append(result.latency_ms)
                sources[result.source] += 1
                last_source = result.source
                if result.error is not None:
                    fallback_reasons[result.error.kind] += 1
                for action in decisions.flatten(result.decision):
                    actions[action.action] += 1
                    if action.rule:
                        rules[action.rule] += 1
                    vram_changed |= isinstance(action, StartWorker)
                events = cluster.apply(result.decision, now)
                if not openings.applied(result.decision):
                    idle += 1
                for when, event in events:
                    heapq.heappush(heap, (when, next(sequence), event))
                if isinstance(result.decision, Wait):
                    retry_ms = result.decision.retry_after_ms or 0
                    break
                if max_cycles and len(latencies) >= max_cycles:
                    break  # exactly: the service's budget is a bound, not a hint
                if not openings.open():
                    break
            if deferred:
                # Cycles at this instant keep acting without placing anything (a policy
                # that starts and evicts workers with no delay): the rest waits a tick.
                tick, owed = Tick(), True
                heapq.heappush(heap, (now + TICK_MS, next(sequence), tick))
            elif cluster.queue_depth and (due or tick is None):
                # The live loop's tick: counted from the last cycle, or from now when
                # jobs wait and none is due (they arrived where they can only queue).
                tick = Tick()
                interval = min(TICK_MS, retry_ms) if retry_ms else TICK_MS
                heapq.heappush(heap, (now + interval, next(sequence), tick))
            elif not cluster.queue_depth and not owed:
                tick = None
            if cluster.queue_depth != queue_series[-1][1]:
                queue_series.append((now, cluster.queue_depth))
            if vram_changed:
                vram_series.append((now, cluster.vram_utilization()))
            if progress is not None and time.perf_counter() - last_report > 0.25:
                last_report = time.perf_counter()
                done_share = finished / max(1, len(arrivals))
                progress(done_share, f"{finished}/{len(arrivals)} jobs, t={now / 1000:.1f}s")
    # The run lasted to the drain limit if it left jobs there, else to the last thing
    # that happened: a superseded event, or a worker event after the last job, is not.
    done_at = max((j.done_ms for j in cluster.jobs.values()), default=0)
    end_ms = drain_end_ms if stopped == "drain_limit" else max(last_ms, done_at)
    if progress is not None:
        progress(1.0, f"{finished}/{len(arrivals)} jobs")
    return build_report(
        policy=name,
        seed=settings.seed,
        workload=settings.workload(),
        cluster=spec,
        cluster_state=cluster,
        arrivals=arrivals,
        end_ms=end_ms,
        latencies=latencies,
        sources=sources,
        actions=actions,
        rules=rules,
        fallback_reasons=fallback_reasons,
        queue_series=queue_series,
        vram_series=vram_series,
        wall_s=time.perf_counter() - wall,
        stopped=stopped,
        drain_limit_s=drain_limit_s,
        last_source=last_source,
        placements=placements,
    )


def _all_done(cluster: SimCluster, arrivals: list[Arrival]) -> bool:
    """Whether every job arrived and finished."""
    jobs = cluster.jobs
    return len(jobs) == len(arrivals) and all(j.done_ms >= 0 for j in jobs.values())
