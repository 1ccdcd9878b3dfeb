"""Applying decisions, without a server: the real job store (SQLite in a temporary
directory), the real cluster state, the real job state machine and runner; fakes
only where a process would start (the local pool, the worker's completion API)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.domain.context import HostReading, ProcessInfo
from orchestrator.domain.decision import Batch, Decision, Dispatch, EvictWorker, StartWorker
from orchestrator.domain.jobs import JobRecord, JobState
from orchestrator.pools.completion import Outcome
from orchestrator.service.apply import DecisionApplier
from orchestrator.service.events import JobEvents
from orchestrator.service.jobs import Jobs
from orchestrator.service.metrics import ServiceMetrics
from orchestrator.service.outputs import JobOutputs, OutputChunk
from orchestrator.service.pools import PoolRegistry
from orchestrator.service.running import JobRunner
from orchestrator.state.cluster import ClusterState
from orchestrator.state.remote_pools import Heartbeat
from orchestrator.state.store import AsyncJobStore, JobStore
from orchestrator.support.clock import now_ms
from tests.fakes import CATALOG, CONFIG, MODEL, FakeCompletions, FakeLocalPool, GiB, record


@dataclass
class Rig:
    applier: DecisionApplier
    cluster: ClusterState
    store: AsyncJobStore
    pool: FakeLocalPool
    completions: FakeCompletions
    metrics: ServiceMetrics
    runner: JobRunner
    events: JobEvents
    outputs: JobOutputs

    registry: CollectorRegistry
    now: float = 0.0  # the applier's clock

    def applied(self, action: str, result: str) -> float:
        labels = {"action": action, "result": result}
        value = self.registry.get_sample_value("orchestrator_actions_applied_total", labels)
        return value or 0.0

    async def queue(self, *job_ids: str) -> list[JobRecord]:
        out = []
        for job_id in job_ids:
            stored, _ = await self.store.insert(record(job_id))
            self.cluster.enqueue(stored, 1_000)
            out.append(stored)
        return out

    async def apply(self, decision: Decision) -> None:
        await self.applier.apply(decision)
        await asyncio.sleep(0)  # let started jobs reach their worker


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    pool = FakeLocalPool()
    pool.add("w1")
    pool.add("w2")
    cluster = ClusterState(CONFIG, CATALOG, {}, pool)
    store = AsyncJobStore(JobStore(tmp_path / "jobs.sqlite3"))
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, cycle_stall_s=30)
    events = JobEvents()
    outputs = JobOutputs()
    jobs = Jobs(
        store, cluster, events, outputs, metrics, limits=CONFIG.limits, queue=CONFIG.queue,
        retry=CONFIG.retry, platform_mode=False, wake=asyncio.Event(),
    )  # fmt: skip
    completions = FakeCompletions()
    runner = JobRunner(jobs, cluster, completions, pool, outputs, timeout_s=5)
    applier = DecisionApplier(cluster, jobs, runner, pool, metrics, clock=lambda: rig.now)
    rig = Rig(applier, cluster, store, pool, completions, metrics, runner, events, outputs,
              registry)  # fmt: skip
    yield rig
    await runner.close()
    await store.close()


async def test_a_dispatch_is_durable_then_live_then_told(rig: Rig) -> None:
    await rig.queue("j1")
    async with rig.events.subscribe("j1") as watch:
        await rig.apply(Dispatch("j1", "w1"))
        dispatched = await watch.get()
        running = await watch.get()
    stored = await rig.store.get("j1")
    assert stored is not None and stored.state == JobState.RUNNING
    assert (stored.attempts, stored.worker_id) == (1, "w1")
    assert dispatched.detail == "dispatched to w1" and running.detail == "running"
    assert "j1" in rig.cluster.in_flight and rig.cluster.running_jobs("w1") == ("j1",)
    assert rig.completions.calls == [("j1", "http://w1")]
    assert rig.applied("dispatch", "applied") == 1
    rig.completions.release.set()
    for _ in range(20):
        await asyncio.sleep(0.01)
        if not rig.cluster.in_flight:
            break
    done = await rig.store.get("j1")
    assert done is not None and (
        done.state, done.output, done.tokens_generated, done.finish_reason
    ) == (JobState.COMPLETED, "done", 3, "stop")  # fmt: skip
    assert not rig.cluster.running_jobs("w1") and "j1" not in rig.cluster.records


async def test_a_short_jobs_first_token_and_end_are_written_together_in_order(
    rig: Rig,
) -> None:
    """A job whose first token and end come in one read: both transitions are written
    in one go, the first token's before the end's, and watchers hear of both."""
    rig.completions.release.set()  # the fake worker answers at once
    await rig.queue("j1")
    async with rig.events.subscribe("j1") as watch:
        await rig.apply(Dispatch("j1", "w1"))
        details = [(await watch.get()).detail for _ in range(3)]
    assert details == ["dispatched to w1", "running", "completed"]
    done = await rig.store.get("j1")
    assert done is not None and done.state == JobState.COMPLETED
    assert done.first_token_at is not None and done.ttft_ms is not None
    states = [state for _, state, _, _ in rig.store.store.transitions("j1")]
    assert states == ["queued", "dispatched", "running", "completed"]


@pytest.mark.parametrize(
    ("decision", "stale"),
    [
        (Dispatch("j404", "w1"), 1),  # no such job
        (Dispatch("j1", "w404"), 1),  # no such worker
        (Batch((Dispatch("j1", "w1"), Dispatch("j2", "w1"))), 1),  # one worker, two jobs
        (Batch((Dispatch("j1", "w1"), Dispatch("j1", "w2"))), 1),  # one job, twice
    ],
)
async def test_actions_the_world_moved_past_are_skipped_as_stale(
    rig: Rig, decision: Decision, stale: int
) -> None:
    await rig.queue("j1", "j2")
    await rig.apply(decision)
    assert rig.applied("dispatch", "stale") == stale
    assert len(rig.completions.calls) == len(decisions_applied(decision)) - stale


def decisions_applied(decision: Decision) -> tuple[Decision, ...]:
    return decision.actions if isinstance(decision, Batch) else (decision,)


async def test_a_busy_or_starting_worker_gets_no_job(rig: Rig) -> None:
    await rig.queue("j1", "j2")
    rig.pool.add("w3", status="starting")
    await rig.apply(Dispatch("j1", "w1"))
    await rig.apply(Batch((Dispatch("j2", "w1"), Dispatch("j2", "w3"))))
    assert rig.applied("dispatch", "stale") == 2
    stored = await rig.store.get("j2")
    assert stored is not None and stored.state == JobState.QUEUED


async def test_a_job_cancelled_while_the_decision_was_made_is_not_dispatched(rig: Rig) -> None:
    await rig.queue("j1")
    await rig.applier.jobs.cancel_queued("j1")
    await rig.apply(Dispatch("j1", "w1"))
    assert rig.applied("dispatch", "stale") == 1 and rig.completions.calls == []


async def test_a_worker_that_fails_mid_job_is_reported_and_the_job_retried(rig: Rig) -> None:
    rig.completions.outcome = Outcome(False, error="worker unreachable", worker_failed=True)
    rig.completions.release.set()
    await rig.queue("j1")
    await rig.apply(Dispatch("j1", "w1"))
    for _ in range(20):
        await asyncio.sleep(0.01)
        if rig.cluster.queue_depth == 1:
            break
    stored = await rig.store.get("j1")
    assert stored is not None and stored.state == JobState.QUEUED and stored.worker_id is None
    assert stored.error == "worker unreachable" and stored.not_before > 1_000
    assert rig.pool.failed == [("w1", "worker unreachable")]


async def test_a_client_that_raises_fails_the_attempt_and_frees_the_slot(rig: Rig) -> None:
    """An exception the completion client did not turn into an outcome (a bug, or a
    peer that found one) fails the attempt as a broken worker would. Before, the job
    stayed in flight for good: its slot held, no task left to cancel or abandon."""
    rig.completions.error = RuntimeError("a bug")
    await rig.queue("j1")
    async with asyncio.timeout(10):
        with rig.outputs.subscribe("j1") as chunks:
            await rig.apply(Dispatch("j1", "w1"))
            assert await anext(chunks) == OutputChunk("done", 3, 1)  # attempt 1's text
            rig.completions.release.set()
            retried = await anext(chunks)  # told at once, not at the next attempt's text
    assert retried == OutputChunk("", 0, 2)
    assert not rig.cluster.running_jobs("w1") and len(rig.runner) == 0
    assert rig.cluster.queue_depth == 1
    stored = await rig.store.get("j1")
    assert stored is not None and (stored.state, stored.attempts, stored.error) == (
        JobState.QUEUED, 1, "worker failed: RuntimeError",
    )  # fmt: skip
    assert rig.pool.failed == []  # one job's failure, not the worker's


async def test_start_worker_on_the_local_pool_backs_off_after_a_failure(rig: Rig) -> None:
    rig.pool.fail_starts = True
    start = StartWorker("local", 0, MODEL)
    await rig.apply(start)
    await rig.apply(start)  # within the backoff: not tried again
    assert (rig.applied("start_worker", "failed"), rig.applied("start_worker", "backoff")) == (1, 1)
    rig.pool.fail_starts = False
    rig.now += 2  # the first backoff is 1 s
    version = rig.cluster.version
    await rig.apply(start)
    ((worker_id, model, gpu, vram),) = rig.pool.started
    assert worker_id.startswith("local-w") and (model, gpu, vram) == (MODEL, 0, 6 * GiB)
    assert rig.cluster.version > version


async def test_start_and_evict_on_a_remote_pool_become_commands(rig: Rig) -> None:
    rig.cluster.remote.register("gpu-host", "", 1_000)
    await rig.apply(StartWorker("gpu-host", 0, MODEL))
    await rig.apply(StartWorker("nowhere", 0, MODEL))
    await rig.apply(StartWorker("gpu-host", 0, "no-such-model"))
    assert rig.applied("start_worker", "applied") == 1
    assert rig.applied("start_worker", "stale") == 2
    pool = rig.cluster.remote.get("gpu-host")
    assert pool is not None
    (command,) = pool.commands
    assert isinstance(command.action, StartWorker) and command.vram_bytes == 6 * GiB


async def test_eviction_spares_busy_workers(rig: Rig) -> None:
    await rig.queue("j1")
    await rig.apply(Dispatch("j1", "w1"))
    await rig.apply(Batch((EvictWorker("w1"), EvictWorker("w2"), EvictWorker("w404"))))
    await asyncio.sleep(0)
    assert rig.pool.evicted == ["w2"]
    assert (rig.applied("evict_worker", "stale"), rig.applied("evict_worker", "applied")) == (2, 1)


async def test_a_job_on_an_expired_remote_pool_is_retried_not_dropped(rig: Rig) -> None:
    """Issue 14: a silent remote pool is removed; the job its worker ran goes back to the
    queue under `retry`, as when any worker is lost."""
    rig.cluster.remote.register("gpu-host", "http://gpu-host:9200", 1_000)
    pool = rig.cluster.remote.get("gpu-host")
    assert pool is not None
    far = ProcessInfo("far", MODEL, (0,), 6 * GiB, "http://gpu-host:18100", "ready", 1_000)
    rig.cluster.remote.heartbeat(pool, Heartbeat("gpu-host", "", (), (far,), (), HostReading()),
                                 now_ms())  # fmt: skip
    await rig.queue("j1")
    await rig.apply(Dispatch("j1", "far"))
    assert rig.completions.calls == [("j1", "http://gpu-host:18100")]
    expire_after = CONFIG.pools.expire_after_ms
    registry = PoolRegistry(rig.cluster, rig.runner, rig.pool, CONFIG.pools, rig.metrics,
                            wake=asyncio.Event(), clock=lambda: now_ms() + expire_after + 1)  # fmt: skip
    await registry.expire()
    stored = await rig.store.get("j1")
    assert stored is not None and stored.state == JobState.QUEUED and stored.attempts == 1
    assert stored.error.startswith("pool 'gpu-host' expired: no heartbeat for")
    assert "j1" not in rig.cluster.in_flight and not rig.cluster.running_jobs("far")
    assert len(rig.runner) == 0


async def test_a_new_worker_id_is_never_one_a_pool_already_reported(rig: Rig) -> None:
    """A remote pool that reports the id the core would give a new worker next gets
    neither that worker's jobs nor its owner's heartbeats refused: the id is skipped."""
    rig.cluster.remote.register("gpu-host", "http://gpu-host:9200", 1_000)
    pool = rig.cluster.remote.get("gpu-host")
    assert pool is not None
    guesses = tuple(
        ProcessInfo(f"local-w1-{n:04x}", MODEL, (0,), GiB, "http://gpu-host:1", "ready", 1_000)
        for n in range(2**16)
    )
    rig.cluster.remote.heartbeat(pool, Heartbeat("gpu-host", "", (), guesses, (), HostReading()),
                                 1_000)  # fmt: skip
    await rig.apply(StartWorker("local", 0, MODEL))
    ((worker_id, *_),) = rig.pool.started
    assert worker_id.startswith("local-w2-")
