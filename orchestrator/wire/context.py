"""Context dataclasses to protobuf: full snapshots, and deltas between two contexts.

A delta carries what changed from one context to the next (docs/ARCHITECTURE.md, D1): jobs added
or removed, pools, GPUs and workers changed, and the prompt blocks workers gained or
lost (D29). The jobs are the changes the queue logged as they happened (the
context's `JobChanges`, state/jobqueue.py); pools, and the workers in them, are
skipped by identity, so a state store that reuses its unchanged objects makes a
cycle cost what changed (issue 17). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import attrgetter
from types import MappingProxyType

from orchestrator._proto import context_pb2 as pb
from orchestrator.domain.context import (
    Catalog,
    CatalogModel,
    Config,
    Context,
    EvictionConfig,
    Gpu,
    Job,
    Metrics,
    Pool,
    QueueConfig,
    RetryConfig,
    Tenant,
    TimeoutConfig,
    Worker,
)
from orchestrator.domain.prefix import BLOCK_TOKENS, PrefixState

_JOB_COLUMNS = tuple(
    (name, attrgetter(name))
    for name in (
        "id", "priority", "model_ref", "prompt_hash", "max_tokens", "temperature",
        "created_at", "queued_at", "retry_count", "estimated_vram_bytes",
        "estimated_duration_ms",
    )
)  # fmt: skip


def jobs_to_columns(jobs: Sequence[Job], columns: pb.JobColumns) -> pb.JobColumns:
    """Fill `columns` with the jobs; unset optionals become "" (tenant, session), -1 (seed).

    Filled in place: building a message and then assigning it copies it.
    """
    for name, get in _JOB_COLUMNS:
        getattr(columns, name).extend(list(map(get, jobs)))
    columns.tenant_id.extend([j.tenant_id or "" for j in jobs])
    columns.session_id.extend([j.session_id or "" for j in jobs])
    columns.seed.extend([-1 if j.seed is None else j.seed for j in jobs])
    columns.prompt_tokens.extend([j.prompt_tokens for j in jobs])
    columns.block_counts.extend([len(j.block_hashes) for j in jobs])
    columns.block_hashes.extend([h for j in jobs for h in j.block_hashes])
    columns.session_worker.extend([j.session_worker or "" for j in jobs])
    return columns


def gpu_to_proto(pool_id: str, gpu: Gpu) -> pb.Gpu:
    return pb.Gpu(
        pool_id=pool_id,
        id=gpu.id,
        device_name=gpu.device_name,
        compute_capability=gpu.compute_capability,
        vram_total_bytes=gpu.vram_total_bytes,
        vram_allocated_bytes=gpu.vram_allocated_bytes,
        vram_free_bytes=gpu.vram_free_bytes,
        utilization_percent=gpu.utilization_percent,
        temperature_celsius=gpu.temperature_celsius,
        power_draw_watts=gpu.power_draw_watts,
        supports_fp16=gpu.supports_fp16,
        supports_int8=gpu.supports_int8,
        supports_tensor_cores=gpu.supports_tensor_cores,
        measured=gpu.measured,
    )


def worker_to_proto(pool_id: str, worker: Worker) -> pb.Worker:
    msg = pb.Worker(
        pool_id=pool_id,
        id=worker.id,
        status=worker.status,
        model_ref=worker.model_ref,
        gpu_ids=worker.gpu_ids,
        vram_bytes=worker.vram_bytes,
        uri=worker.uri,
        jobs_completed=worker.jobs_completed,
        avg_tokens_per_sec=worker.avg_tokens_per_sec,
        started_at_ms=worker.started_at_ms,
        last_used_at_ms=worker.last_used_at_ms,
        slots_total=worker.slots_total,
        slots_busy=worker.slots_busy,
        active_job_ids=worker.active_job_ids,
        api=worker.api,
    )
    if worker.current_job_id is not None:
        msg.current_job_id = worker.current_job_id
    if worker.job_started_at is not None:
        msg.job_started_at = worker.job_started_at
    return msg


def pool_info_to_proto(pool: Pool) -> pb.PoolInfo:
    return pb.PoolInfo(
        id=pool.id,
        endpoint=pool.endpoint,
        status=pool.status,
        last_heartbeat_ms=pool.last_heartbeat_ms,
        cached_models=pool.cached_models,
        host_ram_total_bytes=pool.host_ram_total_bytes,
        host_ram_available_bytes=pool.host_ram_available_bytes,
        host_cpu_percent=pool.host_cpu_percent,
        host_cpu_count=pool.host_cpu_count,
    )


def pool_to_proto(pool: Pool, msg: pb.Pool) -> pb.Pool:
    """Fill `msg` with the pool, its GPUs and its workers."""
    msg.info.CopyFrom(pool_info_to_proto(pool))
    msg.gpus.extend(gpu_to_proto(pool.id, g) for g in pool.gpus)
    msg.workers.extend(worker_to_proto(pool.id, w) for w in pool.workers)
    return msg


def catalog_to_proto(catalog: Catalog) -> pb.Catalog:
    return pb.Catalog(
        models=[
            pb.Model(
                model_ref=m.model_ref,
                family=m.family,
                size=m.size,
                quantization=m.quantization,
                vram_required_bytes=m.vram_required_bytes,
                context_length=m.context_length,
                supports_determinism=m.supports_determinism,
                supports_streaming=m.supports_streaming,
                estimated_tokens_per_sec=dict(m.estimated_tokens_per_sec),
                file_size_bytes=m.file_size_bytes,
                file_hash=m.file_hash,
                min_compute_capability=m.min_compute_capability,
                kv_bytes_per_token=m.kv_bytes_per_token,
            )
            for m in catalog.models.values()
        ],
        aliases=dict(catalog.aliases),
    )


def tenants_to_proto(tenants: Iterable[Tenant]) -> pb.TenantSet:
    out = pb.TenantSet()
    for t in tenants:
        msg = out.tenants.add(
            id=t.id,
            name=t.name,
            vram_used_bytes=t.vram_used_bytes,
            concurrent_jobs=t.concurrent_jobs,
            tokens_used_today=t.tokens_used_today,
            quota_reset_at=t.quota_reset_at,
            quota_exceeded=t.quota_exceeded,
        )
        if t.quota_vram_bytes is not None:
            msg.quota_vram_bytes = t.quota_vram_bytes
        if t.quota_max_concurrent_jobs is not None:
            msg.quota_max_concurrent_jobs = t.quota_max_concurrent_jobs
        if t.quota_tokens_daily is not None:
            msg.quota_tokens_daily = t.quota_tokens_daily
    return out


def metrics_to_proto(metrics: Metrics) -> pb.Metrics:
    return pb.Metrics(**{name: getattr(metrics, name) for name in Metrics.__slots__})


def config_to_proto(config: Config) -> pb.Config:
    return pb.Config(
        mode=config.mode,
        deployment_mode=config.deployment_mode,
        queue=pb.QueueConfig(capacity=config.queue.capacity, policy=config.queue.policy),
        timeout=pb.TimeoutConfig(
            default_ms=config.timeout.default_ms, max_ms=config.timeout.max_ms
        ),
        retry=pb.RetryConfig(
            enabled=config.retry.enabled,
            max_attempts=config.retry.max_attempts,
            initial_delay_ms=config.retry.initial_delay_ms,
            multiplier=config.retry.multiplier,
            max_delay_ms=config.retry.max_delay_ms,
        ),
        eviction=pb.EvictionConfig(
            model_cache_policy=config.eviction.model_cache_policy,
            worker_policy=config.eviction.worker_policy,
            vram_threshold=config.eviction.vram_threshold,
        ),
    )


def to_proto(ctx: Context) -> pb.Context:
    """The full snapshot."""
    msg = pb.Context(
        now_ms=ctx.now_ms,
        catalog=catalog_to_proto(ctx.catalog),
        tenants=tenants_to_proto(ctx.tenants),
        metrics=metrics_to_proto(ctx.metrics),
        config=config_to_proto(ctx.config),
    )
    jobs_to_columns(ctx.queue, msg.queue)
    for pool in ctx.pools:
        pool_to_proto(pool, msg.pools.add())
    msg.prefix.block_tokens = ctx.prefix.block_tokens
    for (worker_id, tenant_id), hashes in ctx.prefix.held.items():
        msg.prefix.held.add(worker_id=worker_id, tenant_id=tenant_id, hashes=sorted(hashes))
    return msg


def _prefix_diff(old: PrefixState, new: PrefixState, delta: pb.ContextDelta) -> None:
    """Blocks added and removed, for the (worker, tenant) entries whose set changed:
    an unchanged entry is the same object (state/prefix.py), and costs nothing."""
    delta.block_tokens = new.block_tokens
    if old is new:
        return
    before, after = old.held, new.held
    for key, hashes in after.items():
        had = before.get(key)
        if had is hashes:
            continue
        had = had or frozenset()
        if added := hashes - had:
            delta.add_blocks.add(worker_id=key[0], tenant_id=key[1], hashes=sorted(added))
        if removed := had - hashes:
            delta.remove_blocks.add(worker_id=key[0], tenant_id=key[1], hashes=sorted(removed))
    for key, had in before.items():
        if key not in after and had:
            delta.remove_blocks.add(worker_id=key[0], tenant_id=key[1], hashes=sorted(had))


def _pool_header(pool: Pool) -> tuple[object, ...]:
    return (
        pool.endpoint,
        pool.status,
        pool.last_heartbeat_ms,
        pool.cached_models,
        pool.host_ram_total_bytes,
        pool.host_ram_available_bytes,
        pool.host_cpu_percent,
        pool.host_cpu_count,
    )


def diff(old: Context, new: Context) -> pb.ContextDelta:
    """What turns `old` into `new` (what the worker holds into what it should hold)."""
    delta = pb.ContextDelta(now_ms=new.now_ms, metrics=metrics_to_proto(new.metrics))
    known = new.changes_since(old)
    if known is not None:  # the builder said what changed: no need to look at every job
        delta.remove_jobs.extend(known.removed)
        if known.upserted:
            jobs_to_columns(known.upserted, delta.upsert_jobs)
    elif old.queue is not new.queue:
        old_jobs, new_jobs = old.jobs_by_id, new.jobs_by_id
        delta.remove_jobs.extend(old_jobs.keys() - new_jobs.keys())
        get = old_jobs.get
        changed = [job for job_id, job in new_jobs.items() if get(job_id) is not job]
        changed = [job for job in changed if get(job.id) != job]  # equal copies are no change
        if changed:
            jobs_to_columns(changed, delta.upsert_jobs)

    old_pools, new_pools = old.pools_by_id, new.pools_by_id
    delta.remove_pools.extend(pool_id for pool_id in old_pools if pool_id not in new_pools)
    for pool_id, pool in new_pools.items():
        before_pool = old_pools.get(pool_id)
        if before_pool is pool:
            continue
        if before_pool is None or _pool_header(before_pool) != _pool_header(pool):
            delta.upsert_pools.append(pool_info_to_proto(pool))
        old_gpus = {g.id: g for g in before_pool.gpus} if before_pool else {}
        new_gpus = {g.id: g for g in pool.gpus}
        if before_pool is not None:
            delta.remove_gpus.extend(
                pb.GpuKey(pool_id=pool_id, id=gpu_id)
                for gpu_id in old_gpus
                if gpu_id not in new_gpus
            )
        for gpu_id, gpu in new_gpus.items():
            if old_gpus.get(gpu_id) != gpu:
                delta.upsert_gpus.append(gpu_to_proto(pool_id, gpu))

    # Workers only of the pools that are not the same objects: an unchanged pool's
    # workers are unchanged, and a worker that moved changed both of its pools.
    old_workers = {
        w.id: (pool_id, w)
        for pool_id, pool in old_pools.items()
        if new_pools.get(pool_id) is not pool
        for w in pool.workers
    }
    new_workers = {
        w.id: (pool_id, w)
        for pool_id, pool in new_pools.items()
        if old_pools.get(pool_id) is not pool
        for w in pool.workers
    }
    delta.remove_workers.extend(
        worker_id for worker_id in old_workers if worker_id not in new_workers
    )
    for worker_id, (pool_id, worker) in new_workers.items():
        before_pool_id, before_worker = old_workers.get(worker_id, (None, None))
        moved = before_pool_id != pool_id
        if moved or (before_worker is not worker and before_worker != worker):
            delta.upsert_workers.append(worker_to_proto(pool_id, worker))

    if old.catalog is not new.catalog and old.catalog != new.catalog:
        delta.catalog.CopyFrom(catalog_to_proto(new.catalog))
    if old.tenants != new.tenants:
        delta.tenants.CopyFrom(tenants_to_proto(new.tenants))
    if old.config != new.config:
        delta.config.CopyFrom(config_to_proto(new.config))
    _prefix_diff(old.prefix, new.prefix, delta)
    return delta


# ---------------------------------------------------------------- and back
def jobs_from_columns(columns: pb.JobColumns) -> list[Job]:
    c = columns
    n = len(c.id)
    # Columns written before prompt blocks (a decision log's) are empty: no blocks.
    tokens = c.prompt_tokens if len(c.prompt_tokens) == n else [0] * n
    counts = c.block_counts if len(c.block_counts) == n else [0] * n
    sessions = c.session_worker if len(c.session_worker) == n else [""] * n
    blocks, offset = [], 0
    for count in counts:
        blocks.append(tuple(c.block_hashes[offset : offset + count]))
        offset += count
    return [
        Job(
            id=c.id[i],
            model_ref=c.model_ref[i],
            priority=c.priority[i],
            tenant_id=c.tenant_id[i] or None,
            session_id=c.session_id[i] or None,
            prompt_hash=c.prompt_hash[i],
            max_tokens=c.max_tokens[i],
            seed=None if c.seed[i] < 0 else c.seed[i],
            temperature=c.temperature[i],
            created_at=c.created_at[i],
            queued_at=c.queued_at[i],
            retry_count=c.retry_count[i],
            estimated_vram_bytes=c.estimated_vram_bytes[i],
            estimated_duration_ms=c.estimated_duration_ms[i],
            prompt_tokens=tokens[i],
            block_hashes=blocks[i],
            session_worker=sessions[i] or None,
        )
        for i in range(n)
    ]


def gpu_from_proto(g: pb.Gpu) -> Gpu:
    return Gpu(
        id=g.id, device_name=g.device_name, vram_total_bytes=g.vram_total_bytes,
        vram_allocated_bytes=g.vram_allocated_bytes, vram_free_bytes=g.vram_free_bytes,
        compute_capability=g.compute_capability, utilization_percent=g.utilization_percent,
        temperature_celsius=g.temperature_celsius, power_draw_watts=g.power_draw_watts,
        supports_fp16=g.supports_fp16, supports_int8=g.supports_int8,
        supports_tensor_cores=g.supports_tensor_cores, measured=g.measured,
    )  # fmt: skip


def worker_from_proto(w: pb.Worker) -> Worker:
    return Worker(
        id=w.id, model_ref=w.model_ref, status=w.status, gpu_ids=tuple(w.gpu_ids),
        vram_bytes=w.vram_bytes, uri=w.uri,
        current_job_id=w.current_job_id if w.HasField("current_job_id") else None,
        job_started_at=w.job_started_at if w.HasField("job_started_at") else None,
        jobs_completed=w.jobs_completed, avg_tokens_per_sec=w.avg_tokens_per_sec,
        started_at_ms=w.started_at_ms, last_used_at_ms=w.last_used_at_ms,
        # A snapshot written before slots (a decision log's) reads as the spec's worker.
        slots_total=w.slots_total or 1, slots_busy=w.slots_busy,
        active_job_ids=tuple(w.active_job_ids), api=w.api or "llamacpp",
    )  # fmt: skip


def _pool(info: pb.PoolInfo, gpus: Iterable[Gpu], workers: Iterable[Worker]) -> Pool:
    return Pool(
        id=info.id, endpoint=info.endpoint, status=info.status,
        last_heartbeat_ms=info.last_heartbeat_ms,
        gpus=tuple(sorted(gpus, key=lambda g: g.id)),
        workers=tuple(sorted(workers, key=lambda w: w.id)),
        cached_models=tuple(info.cached_models),
        host_ram_total_bytes=info.host_ram_total_bytes,
        host_ram_available_bytes=info.host_ram_available_bytes,
        host_cpu_percent=info.host_cpu_percent, host_cpu_count=info.host_cpu_count,
    )  # fmt: skip


def catalog_from_proto(c: pb.Catalog) -> Catalog:
    return Catalog(
        models={
            m.model_ref: CatalogModel(
                model_ref=m.model_ref, vram_required_bytes=m.vram_required_bytes,
                family=m.family, size=m.size, quantization=m.quantization,
                context_length=m.context_length, supports_determinism=m.supports_determinism,
                supports_streaming=m.supports_streaming,
                estimated_tokens_per_sec=dict(m.estimated_tokens_per_sec),
                file_size_bytes=m.file_size_bytes, file_hash=m.file_hash,
                min_compute_capability=m.min_compute_capability,
                kv_bytes_per_token=m.kv_bytes_per_token,
            )
            for m in c.models
        },
        aliases=dict(c.aliases),
    )  # fmt: skip


def tenants_from_proto(ts: pb.TenantSet) -> tuple[Tenant, ...]:
    def opt(t: pb.Tenant, name: str) -> int | None:
        return getattr(t, name) if t.HasField(name) else None  # type: ignore[arg-type]

    return tuple(
        Tenant(
            id=t.id, name=t.name, quota_vram_bytes=opt(t, "quota_vram_bytes"),
            quota_max_concurrent_jobs=opt(t, "quota_max_concurrent_jobs"),
            quota_tokens_daily=opt(t, "quota_tokens_daily"), vram_used_bytes=t.vram_used_bytes,
            concurrent_jobs=t.concurrent_jobs, tokens_used_today=t.tokens_used_today,
            quota_reset_at=t.quota_reset_at, quota_exceeded=t.quota_exceeded,
        )
        for t in ts.tenants
    )  # fmt: skip


def metrics_from_proto(m: pb.Metrics) -> Metrics:
    return Metrics(**{name: getattr(m, name) for name in Metrics.__slots__})


def config_from_proto(c: pb.Config) -> Config:
    return Config(
        mode=c.mode, deployment_mode=c.deployment_mode,
        queue=QueueConfig(c.queue.capacity, c.queue.policy),
        timeout=TimeoutConfig(c.timeout.default_ms, c.timeout.max_ms),
        retry=RetryConfig(c.retry.enabled, c.retry.max_attempts, c.retry.initial_delay_ms,
                          c.retry.multiplier, c.retry.max_delay_ms),
        eviction=EvictionConfig(c.eviction.model_cache_policy, c.eviction.worker_policy,
                                c.eviction.vram_threshold),
    )  # fmt: skip


def prefix_from_proto(msg: pb.PrefixIndex) -> PrefixState:
    held = {(h.worker_id, h.tenant_id): frozenset(h.hashes) for h in msg.held}
    return PrefixState(msg.block_tokens or BLOCK_TOKENS, MappingProxyType(held))


def from_proto(msg: pb.Context) -> Context:
    """A full snapshot back into a Context (the decision log's replay reads these)."""
    return Context(
        now_ms=msg.now_ms,
        queue=tuple(sorted(jobs_from_columns(msg.queue), key=Job.queue_key)),
        pools=tuple(
            sorted(
                (
                    _pool(p.info, map(gpu_from_proto, p.gpus), map(worker_from_proto, p.workers))
                    for p in msg.pools
                ),
                key=lambda p: p.id,
            )
        ),
        catalog=catalog_from_proto(msg.catalog),
        tenants=tenants_from_proto(msg.tenants),
        metrics=metrics_from_proto(msg.metrics),
        config=config_from_proto(msg.config),
        prefix=prefix_from_proto(msg.prefix),
    )


def _apply_prefix(prefix: PrefixState, delta: pb.ContextDelta) -> PrefixState:
    held = {key: set(hashes) for key, hashes in prefix.held.items()}
    for change in delta.add_blocks:
        held.setdefault((change.worker_id, change.tenant_id), set()).update(change.hashes)
    for change in delta.remove_blocks:
        held.get((change.worker_id, change.tenant_id), set()).difference_update(change.hashes)
    frozen = {key: frozenset(hashes) for key, hashes in held.items() if hashes}
    return PrefixState(delta.block_tokens or prefix.block_tokens, MappingProxyType(frozen))


def apply_delta(ctx: Context, delta: pb.ContextDelta) -> Context:
    """The context a delta turns `ctx` into, as the sandbox worker holds it."""
    jobs = dict(ctx.jobs_by_id)
    for job_id in delta.remove_jobs:
        jobs.pop(job_id, None)
    for job in jobs_from_columns(delta.upsert_jobs):
        jobs[job.id] = job
    infos = {p.id: pool_info_to_proto(p) for p in ctx.pools}
    gpus = {(p.id, g.id): g for p in ctx.pools for g in p.gpus}
    workers = {w.id: (p.id, w) for p in ctx.pools for w in p.workers}
    for worker_id in delta.remove_workers:
        workers.pop(worker_id, None)
    for key in delta.remove_gpus:
        gpus.pop((key.pool_id, key.id), None)
    for pool_id in delta.remove_pools:
        infos.pop(pool_id, None)
        gpus = {k: g for k, g in gpus.items() if k[0] != pool_id}
        workers = {k: v for k, v in workers.items() if v[0] != pool_id}
    for info in delta.upsert_pools:
        infos[info.id] = info
    for g in delta.upsert_gpus:
        gpus[(g.pool_id, g.id)] = gpu_from_proto(g)
    for w in delta.upsert_workers:
        workers[w.id] = (w.pool_id, worker_from_proto(w))
    for pool_id in {k[0] for k in gpus} | {v[0] for v in workers.values()}:
        infos.setdefault(pool_id, pb.PoolInfo(id=pool_id, status="offline"))
    pools = tuple(
        _pool(
            info,
            (g for (pid, _), g in gpus.items() if pid == pool_id),
            (w for pid, w in workers.values() if pid == pool_id),
        )
        for pool_id, info in sorted(infos.items())
    )
    return Context(
        now_ms=delta.now_ms,
        queue=tuple(sorted(jobs.values(), key=Job.queue_key)),
        pools=pools,
        catalog=catalog_from_proto(delta.catalog) if delta.HasField("catalog") else ctx.catalog,
        tenants=tenants_from_proto(delta.tenants) if delta.HasField("tenants") else ctx.tenants,
        metrics=metrics_from_proto(delta.metrics),
        config=config_from_proto(delta.config) if delta.HasField("config") else ctx.config,
        prefix=_apply_prefix(ctx.prefix, delta),
    )
