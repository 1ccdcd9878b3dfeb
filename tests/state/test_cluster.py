"""The live cluster state, pure: jobs in and out of the queue, workers seen twice (the
pool's process, the core's overlay), remote pools, tenants, and the context it builds."""

from __future__ import annotations

import dataclasses

from orchestrator.config.settings import ServiceConfig
from orchestrator.domain.context import INT64_MAX, Gpu, HostReading, ProcessInfo, Tenant
from orchestrator.domain.decision import EvictWorker, StartWorker
from orchestrator.domain.jobs import JobState
from orchestrator.state.cluster import ClusterState, next_midnight_utc_ms
from orchestrator.state.remote_pools import Heartbeat, RemoteCommand
from orchestrator.wire.context import to_proto
from tests.fakes import CATALOG, CONFIG, MODEL, FakeLocalPool, GiB, record

NOW = 1_700_000_000_000


def cluster(
    local: FakeLocalPool | None = None,
    tenants: dict[str, Tenant] | None = None,
    config: ServiceConfig = CONFIG,
) -> ClusterState:
    return ClusterState(config, CATALOG, tenants or {}, local)


def test_queue_order_is_priority_then_arrival() -> None:
    state = cluster()
    state.enqueue(record("b1", at=10), NOW)
    state.enqueue(record("i1", at=30, priority="interactive"), NOW)
    state.enqueue(record("b0", at=5), NOW)
    ctx = state.context(NOW)
    assert [j.id for j in ctx.queue] == ["i1", "b0", "b1"]
    assert (ctx.metrics.queue_depth, ctx.metrics.queue_depth_interactive) == (3, 1)
    assert state.queue_depth == 3


def test_a_dispatched_job_leaves_the_queue_and_a_finished_one_the_cluster() -> None:
    state = cluster()
    job = record("j1")
    state.enqueue(job, NOW)
    running = dataclasses.replace(job, state=JobState.DISPATCHED, worker_id="w1")
    state.start(running)
    assert [j.id for j in state.context(NOW).queue] == []
    assert state.in_flight == {"j1": running} and state.queue_depth == 0
    state.finish("j1")
    assert "j1" not in state.records and not state.in_flight


def test_a_retry_waits_out_its_backoff_then_rejoins_the_queue() -> None:
    state = cluster()
    state.enqueue(dataclasses.replace(record("j1"), not_before=NOW + 500), NOW)
    assert state.context(NOW).queue == ()
    assert state.next_due_ms() == NOW + 500
    assert [j.id for j in state.context(NOW + 500).queue] == ["j1"]
    assert state.next_due_ms() is None


def test_every_change_moves_the_version_the_loop_watches() -> None:
    state = cluster()
    seen = [state.version]
    state.enqueue(record("j1"), NOW)
    seen.append(state.version)
    state.occupy("w1", "j1", NOW)
    seen.append(state.version)
    state.release("w1", "j1", NOW)
    seen.append(state.version)
    state.remote.register("gpu-host", "http://gpu-host", NOW)
    seen.append(state.version)
    state.changed()
    seen.append(state.version)
    assert seen == sorted(set(seen)), seen


def test_the_core_overlays_busy_and_usage_on_the_pools_workers() -> None:
    local = FakeLocalPool()
    local.add("w1")
    local.add("w2")
    state = cluster(local)
    state.occupy("w1", "j1", NOW - 200)
    (pool,) = state.context(NOW).pools
    w1, w2 = pool.workers
    assert (w1.status, w1.current_job_id, w1.job_started_at) == ("busy", "j1", NOW - 200)
    assert (w1.slots_total, w1.slots_busy, w1.active_job_ids) == (1, 1, ("j1",))
    assert (w2.status, w2.current_job_id, w2.slots_busy) == ("ready", None, 0)
    assert state.running_jobs("w1") == ("j1",) and state.running_jobs("w2") == ()
    state.release("w1", "j1", NOW)
    (pool,) = state.context(NOW).pools
    assert (pool.workers[0].status, pool.workers[0].slots_busy) == ("ready", 0)


def test_a_worker_with_slots_is_busy_only_when_every_slot_is_taken() -> None:
    """docs/ARCHITECTURE.md D27: ready while a slot is free, with its jobs oldest first."""
    local = FakeLocalPool()
    local.workers["w1"] = ProcessInfo(
        "w1", MODEL, (0,), 6 * GiB, "http://w1", "ready", 500, slots=3
    )
    state = cluster(local)
    state.occupy("w1", "j1", NOW - 300)
    state.occupy("w1", "j2", NOW - 200)
    (w1,) = state.context(NOW).pools[0].workers
    assert (w1.status, w1.slots_total, w1.slots_busy, w1.slots_free) == ("ready", 3, 2, 1)
    assert (w1.current_job_id, w1.job_started_at, w1.active_job_ids) == (
        "j1", NOW - 300, ("j1", "j2"),
    )  # fmt: skip
    state.occupy("w1", "j3", NOW - 100)
    assert state.context(NOW).pools[0].workers[0].status == "busy"
    state.release("w1", "j1", NOW)
    (w1,) = state.context(NOW).pools[0].workers
    assert (w1.status, w1.current_job_id, w1.job_started_at) == ("ready", "j2", NOW - 200)
    assert state.running_jobs("w1") == ("j2", "j3")


def test_completions_feed_throughput_and_the_tenants_daily_tokens() -> None:
    tenants = {"acme": Tenant("acme", quota_tokens_daily=10)}
    state = cluster(FakeLocalPool(), tenants)
    done = dataclasses.replace(
        record("j1", tenant_id="acme"), dispatched_at=NOW - 1000, tokens_generated=12
    )
    state.context(NOW)  # the day's window starts
    state.record_completion(done, "w1", NOW)
    (tenant,) = state.context(NOW).tenants
    assert (tenant.tokens_used_today, tenant.quota_exceeded) == (12, True)
    assert state.context(NOW).metrics.jobs_completed_last_minute == 1
    tomorrow = next_midnight_utc_ms(NOW)
    (tenant,) = state.context(tomorrow).tenants
    assert (tenant.tokens_used_today, tenant.quota_exceeded) == (0, False)


def test_tenant_usage_counts_its_running_jobs() -> None:
    state = cluster(tenants={"acme": Tenant("acme", quota_max_concurrent_jobs=2)})
    job = record("j1", tenant_id="acme")
    state.enqueue(job, NOW)
    state.start(dataclasses.replace(job, state=JobState.DISPATCHED))
    (tenant,) = state.context(NOW).tenants
    assert (tenant.concurrent_jobs, tenant.vram_used_bytes) == (1, job.estimated_vram_bytes)


def test_an_unchanged_pool_keeps_its_record_between_cycles() -> None:
    """The snapshot diff relies on identity: a pool that did not change is the same object."""
    local = FakeLocalPool()
    local.add("w1")
    state = cluster(local)
    first = state.context(NOW).pools[0]
    again = state.context(NOW).pools[0]
    assert again.workers is first.workers and again.gpus is first.gpus
    state.occupy("w1", "j1", NOW)
    assert state.context(NOW).pools[0].workers is not first.workers


def test_remote_pools_show_what_the_core_asked_for_until_the_pool_reports() -> None:
    state = cluster()
    state.remote.register("gpu-host", "http://gpu-host", NOW)
    pool = state.remote.get("gpu-host")
    assert pool is not None
    gpu = Gpu(0, "NVIDIA L4", 24 * GiB)
    reported = ProcessInfo("old", MODEL, (0,), 6 * GiB, "http://old", "ready", NOW)
    host = HostReading(8 * GiB, 4 * GiB, 1, 4)
    state.remote.heartbeat(pool, Heartbeat("gpu-host", "", (gpu,), (reported,), (), host), NOW)
    start = StartWorker("gpu-host", 0, MODEL)
    state.remote.start("gpu-host", RemoteCommand("c1", start, "new", 6 * GiB), NOW)
    assert state.remote.evict("old", RemoteCommand("c2", EvictWorker("old")))
    (ctx_pool,) = state.context(NOW).pools
    assert [(w.id, w.status) for w in ctx_pool.workers] == [("new", "starting")]
    assert ctx_pool.host_ram_total_bytes == 8 * GiB
    empty = Heartbeat("gpu-host", "", (gpu,), (), (), HostReading())
    commands = state.remote.heartbeat(pool, empty, NOW + 100)
    assert [c.id for c in commands] == ["c1", "c2"]
    assert state.remote.heartbeat(pool, empty, NOW + 200) == []
    assert not state.remote.evict("nobody", RemoteCommand("c3", EvictWorker("nobody")))


def test_a_remote_worker_brings_its_slots_and_api_but_not_their_occupancy() -> None:
    """A pool reports how many slots a worker has and the API it speaks; which jobs
    fill them is what the core dispatched (a heartbeat's own count is not read:
    tests/api/test_pools.py)."""
    state = cluster()
    state.remote.register("gpu-host", "http://gpu-host", NOW)
    pool = state.remote.get("gpu-host")
    assert pool is not None
    workers = (
        ProcessInfo("vllm", MODEL, (), 0, "http://gpu-host:8000", "ready", 0, slots=64,
                    api="openai"),
        ProcessInfo("old", MODEL, (), 0, "http://gpu-host:8001", "ready", 0),
    )  # fmt: skip
    state.remote.heartbeat(pool, Heartbeat("gpu-host", "", (), workers, (), HostReading()), NOW)
    state.occupy("vllm", "j1", NOW)
    old, vllm = state.context(NOW).pools[0].workers  # in id order
    assert (vllm.status, vllm.slots_total, vllm.slots_busy, vllm.api) == ("ready", 64, 1, "openai")
    assert vllm.active_job_ids == ("j1",)
    assert (old.slots_total, old.slots_busy, old.api) == (1, 0, "llamacpp")


def test_a_remote_pool_goes_degraded_then_offline_without_heartbeats() -> None:
    state = cluster()
    state.remote.register("gpu-host", "", NOW)
    pools = CONFIG.pools
    statuses = [
        state.context(NOW + age).pools[0].status
        for age in (0, pools.degraded_after_ms + 1, pools.offline_after_ms + 1)
    ]
    assert statuses == ["healthy", "degraded", "offline"]


def test_every_process_is_listed_with_its_pool() -> None:
    local = FakeLocalPool()
    local.add("w1")
    state = cluster(local)
    state.remote.register("gpu-host", "", NOW)
    pool = state.remote.get("gpu-host")
    assert pool is not None
    far = ProcessInfo("far", MODEL, (0,), GiB, "http://far", "ready", NOW)
    state.remote.heartbeat(pool, Heartbeat("gpu-host", "", (), (far,), (), HostReading()), NOW)
    assert [(p, w.id) for p, w in state.processes()] == [("local", "w1"), ("gpu-host", "far")]
    state.occupy("w1", "j1", NOW)
    state.forget_worker("w1")  # an evicted worker's overlay goes
    assert state.running_jobs("w1") == ()


def test_huge_gpus_do_not_overflow_the_context_metrics() -> None:
    """Finding 3: two GPUs of 2**62 bytes made every cycle raise while encoding ctx.metrics
    (int64). The sums are clamped: the context encodes and the cycle goes on."""
    state = cluster()
    state.remote.register("gpu-host", "http://gpu-host", NOW)
    pool = state.remote.get("gpu-host")
    assert pool is not None
    huge = (Gpu(0, "x", 2**62), Gpu(1, "x", 2**62))
    state.remote.heartbeat(pool, Heartbeat("gpu-host", "", huge, (), (), HostReading()), NOW)
    ctx = state.context(NOW)
    assert ctx.metrics.total_vram_bytes == ctx.metrics.free_vram_bytes == INT64_MAX
    assert to_proto(ctx).metrics.total_vram_bytes == INT64_MAX


def test_a_worker_id_belongs_to_the_pool_that_holds_it_first() -> None:
    state = cluster()
    for pool_id in ("gpu-a", "gpu-b"):
        state.remote.register(pool_id, f"http://{pool_id}", NOW)
    a, b = state.remote.get("gpu-a"), state.remote.get("gpu-b")
    assert a is not None and b is not None
    w1 = ProcessInfo("w1", MODEL, (0,), GiB, "http://gpu-a:1", "ready", NOW)
    state.remote.heartbeat(a, Heartbeat("gpu-a", "", (), (w1,), (), HostReading()), NOW)
    start = StartWorker("gpu-b", 0, MODEL)
    state.remote.start("gpu-b", RemoteCommand("c1", start, "asked", GiB), NOW)
    assert (state.remote.owner("w1"), state.remote.owner("asked")) == ("gpu-a", "gpu-b")
    empty = Heartbeat("gpu-a", "", (), (), (), HostReading())
    state.remote.heartbeat(a, empty, NOW + 1)  # gpu-a no longer runs w1: the id is free
    assert state.remote.owner("w1") is None and state.remote.owner("asked") == "gpu-b"


def test_a_silent_remote_pool_expires_and_frees_its_worker_ids() -> None:
    """Finding 3 and 9: remote pools were never removed."""
    state = cluster()
    state.remote.register("gpu-host", "http://gpu-host", NOW)
    state.remote.register("fresh", "http://fresh", NOW + 10_000)
    pool = state.remote.get("gpu-host")
    assert pool is not None
    w1 = ProcessInfo("w1", MODEL, (0,), GiB, "http://gpu-host:1", "ready", NOW)
    state.remote.heartbeat(pool, Heartbeat("gpu-host", "", (), (w1,), (), HostReading()), NOW)
    expire_after = CONFIG.pools.expire_after_ms
    assert state.expire_pools(NOW + expire_after) == []
    version = state.version
    (gone,) = state.expire_pools(NOW + expire_after + 1)
    assert gone is pool and state.version > version
    assert [p.id for p in state.context(NOW + expire_after + 1).pools] == ["fresh"]
    assert state.remote.owner("w1") is None and len(state.remote) == 1
