"""Deltas: after any sequence of changes, a worker fed deltas sees exactly what a full snapshot gives."""

from __future__ import annotations

import dataclasses
import json
import weakref

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator._proto import sandbox_pb2
from orchestrator.domain.context import (
    WORKER_APIS,
    Context,
    Gpu,
    Job,
    JobChanges,
    Pool,
    Tenant,
    Worker,
    derive_metrics,
)
from orchestrator.domain.samples import LLAMA_8B, MISTRAL_7B, sample_context
from orchestrator.state.journal import SnapshotJournal
from orchestrator.wire import context as snapshot
from tests.conftest import LUA_JSON, InProcessRuntime

DUMP = (
    LUA_JSON
    + """
function schedule(ctx)
  local view = {}
  for k, v in pairs(ctx) do
    if type(v) ~= "function" and k ~= "helpers" then view[k] = v end
  end
  ctx.log_info(to_json(view))
  return { action = "wait" }
end
"""
)

OPS = [
    "add_job",
    "remove_job",
    "retry_job",
    "worker_status",
    "worker_slots",
    "add_worker",
    "remove_worker",
    "move_worker",
    "gpu_util",
    "remove_gpu",
    "add_pool",
    "remove_pool",
    "pool_status",
    "tenant_usage",
    "catalog_alias",
    "tick",
]


def mutate(ctx: Context, op: str, n: int) -> Context:
    """One change of the kind the live state sees, chosen by `op` and `n`."""
    now = ctx.now_ms + 100
    queue, pools = list(ctx.queue), list(ctx.pools)
    if op == "add_job":
        queue.append(
            Job(
                f"job-n{n}-{now}",
                LLAMA_8B if n % 2 else MISTRAL_7B,
                "interactive" if n % 3 == 0 else "batch",
                queued_at=now - n,
                seed=n if n % 4 else None,
                max_tokens=n,
            )
        )
    elif op == "remove_job" and queue:
        queue.pop(n % len(queue))
    elif op == "retry_job" and queue:
        job = queue.pop(n % len(queue))
        queue.append(dataclasses.replace(job, retry_count=job.retry_count + 1, queued_at=now))
    elif (
        op
        in (
            "worker_status",
            "worker_slots",
            "add_worker",
            "remove_worker",
            "move_worker",
            "gpu_util",
            "remove_gpu",
            "pool_status",
        )
        and pools
    ):
        i = n % len(pools)
        pool = pools[i]
        workers, gpus = list(pool.workers), list(pool.gpus)
        if op == "worker_status" and workers:
            j = n % len(workers)
            workers[j] = dataclasses.replace(
                workers[j],
                status=("ready", "busy", "starting", "failed")[n % 4],
                current_job_id=None if n % 2 else f"job-{n}",
            )
        elif op == "worker_slots" and workers:
            j = n % len(workers)
            total = n % 5 + 1
            busy = n % (total + 1)
            active = tuple(f"job-{n}-{k}" for k in range(busy))
            workers[j] = dataclasses.replace(
                workers[j],
                status="busy" if busy == total else "ready",
                slots_total=total,
                slots_busy=busy,
                active_job_ids=active,
                current_job_id=active[0] if active else None,
                api=WORKER_APIS[n % len(WORKER_APIS)],
            )
        elif op == "add_worker":
            workers.append(
                Worker(f"worker-n{n}-{now}", LLAMA_8B, gpu_ids=(n % 3, 0), started_at_ms=now)
            )
        elif op == "remove_worker" and workers:
            workers.pop(n % len(workers))
        elif op == "move_worker" and workers and len(pools) > 1:
            moved = workers.pop(n % len(workers))
            k = (i + 1) % len(pools)
            pools[k] = dataclasses.replace(pools[k], workers=(*pools[k].workers, moved))
        elif op == "gpu_util" and gpus:
            j = n % len(gpus)
            gpus[j] = dataclasses.replace(
                gpus[j], utilization_percent=float(n % 100), vram_allocated_bytes=n * 1024
            )
        elif op == "remove_gpu" and gpus:
            gpus.pop(n % len(gpus))
        elif op == "pool_status":
            pool = dataclasses.replace(
                pool,
                status=("healthy", "degraded", "offline")[n % 3],
                cached_models=(MISTRAL_7B,) * (n % 2),
            )
        pools[i] = dataclasses.replace(pool, workers=tuple(workers), gpus=tuple(gpus))
    elif op == "add_pool":
        pools.append(
            Pool(f"pool-n{n}-{now}", gpus=(Gpu(0, "NVIDIA L4", 24 * 2**30),), last_heartbeat_ms=now)
        )
    elif op == "remove_pool" and pools:
        pools.pop(n % len(pools))
    elif op == "tenant_usage":
        tenants = (Tenant("tenant-1", concurrent_jobs=n, quota_max_concurrent_jobs=n % 5 or None),)
        ctx = dataclasses.replace(ctx, tenants=tenants)
    elif op == "catalog_alias":
        aliases = dict(ctx.catalog.aliases) | {f"alias-{n}": LLAMA_8B}
        ctx = dataclasses.replace(ctx, catalog=dataclasses.replace(ctx.catalog, aliases=aliases))
    queue_t, pools_t = tuple(sorted(queue, key=Job.queue_key)), tuple(pools)
    changes = None
    if n % 2:  # half the steps say what changed, as the live cluster state does
        before = {id(j) for j in ctx.queue}
        changes = JobChanges(
            weakref.ref(ctx),
            upserted=tuple(j for j in queue_t if id(j) not in before),
            removed=frozenset(ctx.jobs_by_id.keys() - {j.id for j in queue_t}),
        )
    metrics = derive_metrics(queue_t, pools_t, now)
    return dataclasses.replace(
        ctx, now_ms=now, queue=queue_t, pools=pools_t, metrics=metrics, changes=changes
    )


def dump(runtime: InProcessRuntime) -> object:
    result = runtime.run()
    assert result.error_kind == 0, result.error_message
    return json.loads(result.logs[0][1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1000)), min_size=1, max_size=25),
    st.sampled_from(["luajit", "lua54"]),
)
def test_deltas_equal_full_snapshot(steps: list[tuple[str, int]], language: str) -> None:
    """A worker kept up to date by deltas and one given full snapshots see identical contexts."""
    incremental, full = InProcessRuntime(language), InProcessRuntime(language)
    incremental.load(DUMP)
    full.load(DUMP)
    journal = SnapshotJournal(max_deltas=8)
    ctx = sample_context()
    epoch = seq = 0
    for op, n in steps:
        ctx = mutate(ctx, op, n)
        journal.advance(ctx)
        if n % 7 == 0:
            continue  # this worker skips a cycle and catches up with several deltas later
        request = journal.request_for(epoch, seq)
        assert incremental.runtime is not None and full.runtime is not None
        if request.HasField("snapshot"):
            incremental.runtime.apply_snapshot(request.snapshot)
        else:
            for delta in request.deltas:
                incremental.runtime.apply_delta(delta)
        epoch, seq = journal.epoch, journal.seq
        full.runtime.apply_snapshot(snapshot.to_proto(ctx))
        assert dump(incremental) == dump(full)


def test_unchanged_context_sends_an_empty_delta() -> None:
    """Only what changed travels: an identical next cycle carries no records."""
    journal = SnapshotJournal()
    ctx = sample_context()
    journal.advance(ctx)
    journal.advance(dataclasses.replace(ctx, now_ms=ctx.now_ms + 1))
    request = journal.request_for(journal.epoch, 1)
    (delta,) = request.deltas
    assert not delta.HasField("upsert_jobs")
    assert not (
        delta.remove_jobs or delta.upsert_workers or delta.upsert_gpus or delta.upsert_pools
    )
    assert not delta.HasField("catalog") and not delta.HasField("tenants")


def test_worker_behind_the_journal_gets_a_full_snapshot() -> None:
    """A new worker, a stale epoch or a gap beyond the kept deltas all get the full snapshot."""
    journal = SnapshotJournal(max_deltas=2)
    ctx = sample_context()
    for i in range(5):
        journal.advance(dataclasses.replace(ctx, now_ms=ctx.now_ms + i))
    assert journal.request_for(0, 0).HasField("snapshot")
    assert journal.request_for(journal.epoch + 1, 4).HasField("snapshot")
    assert journal.request_for(journal.epoch, 2).HasField("snapshot")  # needs deltas 3..5, has 4..5
    caught_up = journal.request_for(journal.epoch, 3)
    assert [d.now_ms for d in caught_up.deltas] == [ctx.now_ms + 3, ctx.now_ms + 4]
    assert caught_up.base_seq == 3 and caught_up.seq == 5
    assert isinstance(caught_up, sandbox_pb2.ScheduleRequest)


def normalized(ctx: Context) -> Context:
    """Pools, GPUs and workers in id order, as snapshots carry them."""
    pools = tuple(
        sorted(
            (
                dataclasses.replace(
                    p,
                    gpus=tuple(sorted(p.gpus, key=lambda g: g.id)),
                    workers=tuple(sorted(p.workers, key=lambda w: w.id)),
                )
                for p in ctx.pools
            ),
            key=lambda p: p.id,
        )
    )
    return dataclasses.replace(ctx, pools=pools, changes=None)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1000)), min_size=1, max_size=20))
def test_python_side_round_trips(steps: list[tuple[str, int]]) -> None:
    """from_proto(to_proto(c)) == c, and apply_delta(a, diff(a, b)) == b, for any changes."""
    ctx = sample_context()
    assert snapshot.from_proto(snapshot.to_proto(ctx)) == normalized(ctx)
    for op, n in steps:
        after = mutate(ctx, op, n)
        assert snapshot.apply_delta(ctx, snapshot.diff(ctx, after)) == normalized(after)
        assert snapshot.from_proto(snapshot.to_proto(after)) == normalized(after)
        ctx = after


def test_worker_slots_round_trip_and_default_to_the_spec_worker() -> None:
    """slots_total, slots_busy, active_job_ids and api survive a snapshot and a delta;
    a worker message without them (written before slots) reads as one slot, llama.cpp."""
    ctx = sample_context()
    pool = ctx.pools[1]
    slotted = dataclasses.replace(
        pool.workers[0], slots_total=8, slots_busy=2, active_job_ids=("job-a", "job-b"),
        current_job_id="job-a", api="openai",
    )  # fmt: skip
    after = dataclasses.replace(
        ctx, pools=(ctx.pools[0], dataclasses.replace(pool, workers=(slotted,)))
    )
    delta = snapshot.diff(ctx, after)
    assert [w.id for w in delta.upsert_workers] == ["worker-4"]
    assert snapshot.apply_delta(ctx, delta) == normalized(after)
    back = snapshot.from_proto(snapshot.to_proto(after)).workers_by_id["worker-4"][1]
    assert (back.slots_total, back.slots_busy, back.active_job_ids, back.api) == (
        8, 2, ("job-a", "job-b"), "openai",
    )  # fmt: skip
    old = snapshot.worker_to_proto("pool-2", slotted)
    for name in ("slots_total", "slots_busy", "active_job_ids", "api"):
        old.ClearField(name)
    spec = snapshot.worker_from_proto(old)
    assert (spec.slots_total, spec.slots_busy, spec.api) == (1, 0, "llamacpp")
    assert spec.active_job_ids == ()
