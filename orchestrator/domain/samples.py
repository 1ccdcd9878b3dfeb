"""The sample context: what `scheduler test --dry-run` runs on without `--context`.

It is shaped after the specs' own examples, so that each of them has something to
act on: pool-1 holds two RTX 4090s (GPUs 0 and 1) and an A100 (GPU 2) as in
runtime-spec 7.2, a second pool adds another A100, the queue mixes interactive and
batch jobs, seeded and unseeded, and one queued model has no worker yet.
"""

from __future__ import annotations

import dataclasses
import weakref

from orchestrator.domain.context import (
    Catalog,
    CatalogModel,
    Config,
    Context,
    Gpu,
    Job,
    JobChanges,
    Pool,
    Tenant,
    Worker,
    derive_metrics,
    estimate_job,
)

GiB = 1024**3
NOW_MS = 1_696_348_805_000  # the timestamp used throughout runtime-spec section 3

LLAMA_8B = "hf:meta-llama/Llama-3.1-8B@main::file=model.gguf"
LLAMA_13B = "hf:meta-llama/Llama-3.1-13B@main::file=model.gguf"
LLAMA_70B = "hf:meta-llama/Llama-3.1-70B@main::file=model.gguf"
MISTRAL_7B = "hf:mistralai/Mistral-7B-Instruct-v0.3@main::file=model.gguf"


def sample_catalog() -> Catalog:
    def model(
        ref: str, family: str, size: str, vram_gib: int, rtx: float, a100: float
    ) -> CatalogModel:
        return CatalogModel(
            model_ref=ref,
            family=family,
            size=size,
            quantization="Q4_K_M",
            vram_required_bytes=vram_gib * GiB,
            context_length=8192,
            supports_determinism=family == "llama",
            supports_streaming=True,
            estimated_tokens_per_sec={
                "NVIDIA RTX 4090": rtx,
                "NVIDIA A100": a100,
                "default": min(rtx, a100) / 2,
            },
            file_size_bytes=vram_gib * GiB // 2,
            file_hash="sha256:" + ref.encode().hex()[:64],
            min_compute_capability="8.0" if vram_gib > 24 else "",
        )

    return Catalog(
        models={
            LLAMA_8B: model(LLAMA_8B, "llama", "8B", 8, 90, 120),
            LLAMA_13B: model(LLAMA_13B, "llama", "13B", 13, 60, 85),
            LLAMA_70B: model(LLAMA_70B, "llama", "70B", 40, 0, 30),
            MISTRAL_7B: model(MISTRAL_7B, "mistral", "7B", 7, 95, 125),
        },
        aliases={
            "llama-8b": LLAMA_8B,
            "llama-13b": LLAMA_13B,
            "llama-70b": LLAMA_70B,
            "mistral-7b": MISTRAL_7B,
        },
    )


def sample_context(*, now_ms: int = NOW_MS, platform_mode: bool = False) -> Context:
    """The sample context; with `platform_mode`, jobs belong to two tenants with quotas."""
    catalog = sample_catalog()

    def gpu(
        gpu_id: int, kind: str, total_gib: int, used_gib: int, util: float, temp: int, watts: int
    ) -> Gpu:
        name, capability = {"rtx": ("NVIDIA RTX 4090", "8.9"), "a100": ("NVIDIA A100", "8.0")}[kind]
        return Gpu(
            gpu_id,
            device_name=name,
            compute_capability=capability,
            vram_total_bytes=total_gib * GiB,
            vram_allocated_bytes=used_gib * GiB,
            utilization_percent=util,
            temperature_celsius=temp,
            power_draw_watts=watts,
        )

    pool_1 = Pool(
        id="pool-1",
        endpoint="http://192.168.1.100:9200",
        last_heartbeat_ms=now_ms - 500,
        gpus=(
            gpu(0, "rtx", 24, 8, 35.0, 61, 180),
            gpu(1, "rtx", 24, 13, 88.0, 72, 350),
            gpu(2, "a100", 80, 40, 20.0, 55, 250),
        ),
        workers=(
            Worker(
                "worker-1",
                LLAMA_8B,
                "ready",
                (0,),
                8 * GiB,
                "http://192.168.1.100:8001",
                jobs_completed=42,
                avg_tokens_per_sec=85.3,
                started_at_ms=now_ms - 3_600_000,
                last_used_at_ms=now_ms - 20_000,
            ),
            Worker(
                "worker-2",
                LLAMA_13B,
                "busy",
                (1,),
                13 * GiB,
                "http://192.168.1.100:8002",
                current_job_id="job-running",
                job_started_at=now_ms - 1500,
                slots_busy=1,
                active_job_ids=("job-running",),
                jobs_completed=17,
                avg_tokens_per_sec=58.0,
                started_at_ms=now_ms - 7_200_000,
                last_used_at_ms=now_ms - 1500,
            ),
            Worker(
                "worker-3",
                LLAMA_70B,
                "ready",
                (2,),
                40 * GiB,
                "http://192.168.1.100:8003",
                jobs_completed=3,
                avg_tokens_per_sec=28.0,
                started_at_ms=now_ms - 1_800_000,
                last_used_at_ms=now_ms - 600_000,
            ),
        ),
        cached_models=(MISTRAL_7B, LLAMA_8B, LLAMA_13B),
    )
    pool_2 = Pool(
        id="pool-2",
        endpoint="http://192.168.1.101:9200",
        last_heartbeat_ms=now_ms - 300,
        gpus=(gpu(0, "a100", 40, 8, 10.0, 48, 120),),
        workers=(
            Worker(
                "worker-4",
                LLAMA_8B,
                "ready",
                (0,),
                8 * GiB,
                "http://192.168.1.101:8001",
                jobs_completed=120,
                avg_tokens_per_sec=110.0,
                started_at_ms=now_ms - 86_400_000,
                last_used_at_ms=now_ms - 5_000,
            ),
        ),
        cached_models=(LLAMA_8B,),
    )
    tenants = ("tenant-1", "tenant-2") if platform_mode else (None, None)
    raw_jobs = [
        # id, priority, model, seed, tenant, waited ms
        ("job-1", "interactive", "llama-8b", 42, tenants[0], 5_000),
        ("job-2", "batch", LLAMA_13B, None, tenants[1], 12_000),
        ("job-3", "batch", LLAMA_8B, 7, tenants[0], 9_000),
        ("job-4", "interactive", "llama-70b", None, tenants[1], 2_000),
        ("job-5", "batch", "mistral-7b", None, tenants[1], 30_000),
    ]
    jobs = []
    for job_id, priority, model_ref, seed, tenant, waited in raw_jobs:
        vram, duration = estimate_job(catalog, model_ref, 100)
        jobs.append(
            Job(
                id=job_id,
                tenant_id=tenant,
                session_id=f"sess-{job_id}",
                priority=priority,
                model_ref=model_ref,
                prompt_hash="sha256:" + job_id.encode().hex().ljust(64, "0"),
                max_tokens=100,
                seed=seed,
                temperature=0.7,
                created_at=now_ms - waited - 1000,
                queued_at=now_ms - waited,
                estimated_vram_bytes=vram,
                estimated_duration_ms=duration,
            )
        )
    queue = tuple(sorted(jobs, key=Job.queue_key))
    pools = (pool_1, pool_2)
    tenant_records: tuple[Tenant, ...] = ()
    config = Config()
    if platform_mode:
        config = dataclasses.replace(config, mode="platform", deployment_mode="platform")
        tenant_records = (
            Tenant(
                "tenant-1",
                "Acme Corp",
                quota_vram_bytes=48 * GiB,
                quota_max_concurrent_jobs=10,
                quota_tokens_daily=1_000_000,
                vram_used_bytes=32 * GiB,
                concurrent_jobs=5,
                tokens_used_today=450_000,
                quota_reset_at=now_ms + 3_600_000,
            ),
            Tenant(
                "tenant-2",
                "Globex",
                quota_vram_bytes=16 * GiB,
                quota_max_concurrent_jobs=1,
                quota_tokens_daily=100_000,
                vram_used_bytes=13 * GiB,
                concurrent_jobs=1,
                tokens_used_today=99_950,
                quota_reset_at=now_ms + 3_600_000,
            ),
        )
    return Context(
        now_ms=now_ms,
        queue=queue,
        pools=pools,
        catalog=catalog,
        tenants=tenant_records,
        metrics=derive_metrics(queue, pools, now_ms, jobs_completed_last_minute=12),
        config=config,
    )


MODELS = (LLAMA_8B, LLAMA_13B, MISTRAL_7B)


def synthetic_cluster(n_jobs: int, n_workers: int, now: int = 1_700_000_000_000) -> Context:
    """n_jobs queued over three models; n_workers in pools of 16 on 8 A100s each."""
    pools = []
    for p in range(max(1, n_workers // 16)):
        gpus = tuple(
            Gpu(i, "NVIDIA A100", 80 * 2**30, 40 * 2**30, compute_capability="8.0")
            for i in range(8)
        )
        workers = tuple(
            Worker(
                f"w-{p * 16 + w}",
                MODELS[(p * 16 + w) % 3],
                "ready" if w % 2 else "busy",
                (w % 8,),
                8 * 2**30,
                started_at_ms=now - 10**6,
                last_used_at_ms=now - w,
            )
            for w in range(16)
        )
        pools.append(Pool(f"pool-{p:03d}", last_heartbeat_ms=now, gpus=gpus, workers=workers))
    jobs = tuple(
        sorted(
            (
                Job(f"job-{i}", MODELS[i % 3], "interactive" if i % 5 == 0 else "batch",
                    queued_at=now - i, max_tokens=100, estimated_vram_bytes=8 * 2**30)
                for i in range(n_jobs)
            ),
            key=Job.queue_key,
        )
    )  # fmt: skip
    pools_t = tuple(pools)
    return Context(now, jobs, pools_t, sample_catalog(), (), derive_metrics(jobs, pools_t, now))


def flip_workers(pools: tuple[Pool, ...], step: int, count: int) -> tuple[Pool, ...]:
    """`count` workers flipped between ready and busy, spread over the pools; each
    pool touched is a new record, the others stay the same objects."""
    out = list(pools)
    for i in range(count):
        index = (step * 7 + i) % len(out)
        workers = list(out[index].workers)
        j = (step + i) % len(workers)
        flipped = "busy" if workers[j].status == "ready" else "ready"
        workers[j] = dataclasses.replace(workers[j], status=flipped)
        out[index] = dataclasses.replace(out[index], workers=tuple(workers))
    return tuple(out)


def churn(ctx: Context, step: int, fraction: float = 0.01) -> Context:
    """The next cycle: `fraction` of the jobs leave and as many arrive; as many workers flip."""
    n = max(1, int(len(ctx.queue) * fraction))
    gone, kept = ctx.queue[:n], ctx.queue[n:]
    arrived = tuple(
        Job(f"job-s{step}-{i}", MODELS[i % 3], "batch", queued_at=ctx.now_ms + 1, max_tokens=100)
        for i in range(n)
    )
    flips = max(1, int(sum(len(p.workers) for p in ctx.pools) * fraction))
    pools_t = flip_workers(ctx.pools, step, flips)
    queue, now = tuple(kept) + arrived, ctx.now_ms + 100
    return dataclasses.replace(
        ctx, now_ms=now, queue=queue, pools=pools_t, metrics=derive_metrics(queue, pools_t, now),
        changes=JobChanges(weakref.ref(ctx), arrived, frozenset(j.id for j in gone)),
    )  # fmt: skip
