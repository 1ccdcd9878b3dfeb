"""Context dataclasses to protobuf: full snapshots, and deltas between two contexts.

A delta carries what changed from one context to the next (DESIGN.md): jobs added
or removed, and pools, GPUs and workers changed. Unchanged records are skipped by
identity first, so a state store that reuses its unchanged objects makes a cycle
cost what changed. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import attrgetter

from orchestrator._proto import context_pb2 as pb
from orchestrator.model import (
    Catalog,
    Config,
    Context,
    Gpu,
    Job,
    Metrics,
    Pool,
    Tenant,
    Worker,
)

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
    return msg


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

    old_workers, new_workers = old.workers_by_id, new.workers_by_id
    delta.remove_workers.extend(
        worker_id for worker_id in old_workers if worker_id not in new_workers
    )
    for worker_id, (pool, worker) in new_workers.items():
        before_pool_id, before_worker = old_workers.get(worker_id, (None, None))
        moved = before_pool_id is None or before_pool_id.id != pool.id
        if moved or (before_worker is not worker and before_worker != worker):
            delta.upsert_workers.append(worker_to_proto(pool.id, worker))

    if old.catalog is not new.catalog and old.catalog != new.catalog:
        delta.catalog.CopyFrom(catalog_to_proto(new.catalog))
    if old.tenants != new.tenants:
        delta.tenants.CopyFrom(tenants_to_proto(new.tenants))
    if old.config != new.config:
        delta.config.CopyFrom(config_to_proto(new.config))
    return delta
