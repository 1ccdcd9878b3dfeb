"""What a context says about cached prompt prefixes: the questions policies ask of the
prefix index (issue 16, docs/ARCHITECTURE.md D29), and a worker's KV capacity. Pure.

`prefix_match`, `find_workers_by_prefix` and `session_worker` are the Python side of
the built-ins of the same names (sandbox_worker/lua/builtins/prefix.lua), which the
YAML interpreter uses; the two must agree. Separate from domain/prefix.py, which
domain/context.py imports, so that neither imports the other.
"""

from __future__ import annotations

from orchestrator.domain.context import Catalog, Context, Job, Pool, Worker
from orchestrator.domain.prefix import DEFAULT_KV_BYTES_PER_TOKEN, matched_blocks


def kv_share_tokens(
    catalog: Catalog, model_ref: str, vram_bytes: int, weights_bytes: int, sharing: int
) -> int:
    """How many tokens of KV cache a worker of `model_ref` has room for: `vram_bytes`
    of GPU less the `weights_bytes` of every worker on it, shared evenly between those
    `sharing` workers, over the catalog's bytes per token for the model."""
    model = catalog.get(model_ref)
    per_token = (model.kv_bytes_per_token if model else 0) or DEFAULT_KV_BYTES_PER_TOKEN
    return max(0, vram_bytes - weights_bytes) // max(1, sharing) // per_token


def kv_capacity_tokens(ctx: Context, pool: Pool, worker: Worker) -> int:
    """kv_share_tokens of a worker in a context: its GPUs, and the workers on them."""
    gpus = set(worker.gpu_ids)
    total = sum(g.vram_total_bytes for g in pool.gpus if g.id in gpus)
    sharing = [w for w in pool.workers if gpus & set(w.gpu_ids)] or [worker]
    weights = sum(w.vram_bytes for w in sharing)
    return kv_share_tokens(ctx.catalog, worker.model_ref, total, weights, len(sharing))


PREFIX_STATUSES = ("ready", "busy")  # workers find_workers_by_prefix offers


def prefix_match(ctx: Context, job: Job, worker_id: str) -> tuple[int, int]:
    """(tokens, blocks) of the job's prompt the worker is believed to hold."""
    held = ctx.prefix.holding(worker_id)
    blocks = matched_blocks(held, job.block_hashes)
    return min(blocks * ctx.prefix.block_tokens, job.prompt_tokens), blocks


def find_workers_by_prefix(ctx: Context, job: Job) -> list[tuple[Pool, Worker]]:
    """The ready or busy workers of the job's model, the most blocks matched first,
    then the least loaded (busy share of slots), then by id."""
    model_ref = ctx.catalog.resolve(job.model_ref)
    found = [
        (pool, w)
        for pool in ctx.pools
        for w in pool.workers
        if ctx.catalog.resolve(w.model_ref) == model_ref and w.status in PREFIX_STATUSES
    ]

    def key(entry: tuple[Pool, Worker]) -> tuple[int, float, str]:
        w = entry[1]
        return (-prefix_match(ctx, job, w.id)[1], w.slots_busy / max(1, w.slots_total), w.id)

    return sorted(found, key=key)


def session_worker(ctx: Context, job: Job) -> tuple[Pool, Worker] | None:
    """The worker the job's session last ran on, while it is still there."""
    if job.session_worker is None:
        return None
    return ctx.workers_by_id.get(job.session_worker)
