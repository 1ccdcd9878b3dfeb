"""Contexts from JSON or YAML files (`scheduler test --context FILE`), and back.

The file mirrors `ctx` as a script sees it (runtime-spec section 3): `queue`,
`pools` with their `gpus` and `workers`, `catalog` with `models` and `aliases`,
`tenants`, `metrics` and `config`, plus `now_ms`. The context is evaluated at its own
time: `now_ms`, or `metrics.timestamp_ms` (section 3.5, what a dump of ctx carries);
the wall clock only when the file gives neither. Derived fields are accepted in
place of the ones they come from (`wait_time_ms` for `queued_at`, `uptime_ms` for
`started_at_ms`, `heartbeat_age_ms` for `last_heartbeat_ms`). Omitted metrics (or
metrics that give only `timestamp_ms`) are computed from the queue and pools. Unknown
fields are errors that name their path. A worker's slots (docs/ARCHITECTURE.md D27)
default to the spec's worker: one slot, none busy, no active jobs, the llama.cpp API.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config.records import build, convert, parse_yaml, to_plain
from orchestrator.config.settings import MAX_WORKER_SLOTS
from orchestrator.domain.context import (
    WORKER_APIS,
    Catalog,
    CatalogModel,
    Config,
    Context,
    Job,
    Metrics,
    Pool,
    Tenant,
    Worker,
    derive_metrics,
    estimate_job,
)
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.prefix import HASH_BITS, MAX_PROMPT_BLOCKS

# Fields a script sees that are derived from others: accepted, and recomputed.
# prompt_blocks is the count of a job's block_hashes (docs/RUNTIME-EXTENSIONS.md).
_DERIVED = frozenset(
    {"wait_time_ms", "heartbeat_age_ms", "uptime_ms", "timestamp_ms", "pool_id", "prompt_blocks"}
)


def _rewrite(data: Any, derived: str, base: str, now_ms: int) -> Any:
    if not isinstance(data, Mapping) or base in data or derived not in data:
        return data
    return {**data, base: now_ms - int(data[derived])}


def _check_blocks(hashes: tuple[int, ...], path: str) -> None:
    """Block hashes as the core makes them (domain/prefix.py): at most MAX_PROMPT_BLOCKS,
    each of HASH_BITS bits, so that the sandbox's LuaJIT numbers hold them exactly."""
    if len(hashes) > MAX_PROMPT_BLOCKS:
        raise ConfigError(f"{path}: at most {MAX_PROMPT_BLOCKS} blocks, got {len(hashes)}")
    for n, h in enumerate(hashes):
        if not 0 <= h < 1 << HASH_BITS:
            raise ConfigError(f"{path}[{n}]: must be between 0 and 2**{HASH_BITS} - 1, got {h}")


def _now_ms(data: Mapping[str, Any], source: str) -> int:
    """The time the file's context is at: its `now_ms`, else its `metrics.timestamp_ms`.

    Replaying a dump of ctx at the wall clock's time would make every wait, uptime and
    heartbeat age what it is now, not what the script saw.
    """
    metrics = data.get("metrics")
    stamp = metrics.get("timestamp_ms") if isinstance(metrics, Mapping) else None
    now = data.get("now_ms")
    if now is not None:
        now_ms = convert(int, now, f"{source}.now_ms")
        if stamp is not None and convert(int, stamp, f"{source}.metrics.timestamp_ms") != now_ms:
            raise ConfigError(
                f"{source}.metrics.timestamp_ms: {stamp} is not now_ms ({now}); "
                "they are the same time, give one of them"
            )
        return int(now_ms)
    if stamp is not None:
        return int(convert(int, stamp, f"{source}.metrics.timestamp_ms"))
    return int(time.time() * 1000)


def context_from_dict(data: Any, *, source: str = "context") -> Context:
    """Build a Context; errors name the offending field, e.g. `context.pools[0].gpus[1].id`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    known = {"now_ms", "queue", "pools", "catalog", "tenants", "metrics", "config"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}.{key}: unknown field (expected one of {sorted(known)})")
    now_ms = _now_ms(data, source)

    catalog_data = data.get("catalog") or {}
    models = {
        ref: build(CatalogModel, {"model_ref": ref, **model}, f"{source}.catalog.models[{ref!r}]")
        for ref, model in (catalog_data.get("models") or {}).items()
    }
    aliases = convert(
        dict[str, str], catalog_data.get("aliases") or {}, f"{source}.catalog.aliases"
    )
    catalog = Catalog(models=models, aliases=aliases)

    jobs = []
    for i, raw in enumerate(data.get("queue") or []):
        job_data = _rewrite(raw, "wait_time_ms", "queued_at", now_ms)
        job = build(Job, job_data, f"{source}.queue[{i}]", ignore=_DERIVED)
        _check_blocks(job.block_hashes, f"{source}.queue[{i}].block_hashes")
        if "estimated_vram_bytes" not in job_data:
            vram, duration = estimate_job(catalog, job.model_ref, job.max_tokens)
            job = dataclasses.replace(
                job, estimated_vram_bytes=vram, estimated_duration_ms=duration
            )
        jobs.append(job)
    queue = tuple(sorted(jobs, key=Job.queue_key))

    pools = []
    for i, raw in enumerate(data.get("pools") or []):
        pool_data = _rewrite(raw, "heartbeat_age_ms", "last_heartbeat_ms", now_ms)
        if isinstance(pool_data, Mapping) and pool_data.get("workers"):
            workers = [
                _rewrite(w, "uptime_ms", "started_at_ms", now_ms) for w in pool_data["workers"]
            ]
            pool_data = {**pool_data, "workers": [_strip(w) for w in workers]}
        if isinstance(pool_data, Mapping) and pool_data.get("gpus"):
            pool_data = {**pool_data, "gpus": [_strip(g) for g in pool_data["gpus"]]}
        pool = build(Pool, pool_data, f"{source}.pools[{i}]", ignore=_DERIVED)
        for j, worker in enumerate(pool.workers):
            _check_slots(worker, f"{source}.pools[{i}].workers[{j}]")
        pools.append(pool)

    raw_tenants = data.get("tenants") or {}
    if isinstance(raw_tenants, Mapping):  # keyed by id, as in ctx.tenants
        raw_tenants = [{"id": key, **value} for key, value in raw_tenants.items()]
    tenants = tuple(build(Tenant, t, f"{source}.tenants[{i}]") for i, t in enumerate(raw_tenants))
    config = build(Config, data.get("config") or {}, f"{source}.config")
    pools_tuple = tuple(pools)
    # Metrics that give only their time (timestamp_ms) are computed like omitted ones.
    raw_metrics = data.get("metrics")
    metrics = (
        build(Metrics, raw_metrics, f"{source}.metrics", ignore=_DERIVED)
        if raw_metrics and not (isinstance(raw_metrics, Mapping) and raw_metrics.keys() <= _DERIVED)
        else derive_metrics(queue, pools_tuple, now_ms)
    )
    return Context(
        now_ms=now_ms,
        queue=queue,
        pools=pools_tuple,
        catalog=catalog,
        tenants=tenants,
        metrics=metrics,
        config=config,
    )


def _check_slots(worker: Worker, path: str) -> None:
    """Slots within what a worker can have, and an API the core speaks."""
    if worker.api not in WORKER_APIS:
        raise ConfigError(f"{path}.api: {worker.api!r} is not one of {', '.join(WORKER_APIS)}")
    if not 1 <= worker.slots_total <= MAX_WORKER_SLOTS:
        raise ConfigError(
            f"{path}.slots_total: must be within 1..{MAX_WORKER_SLOTS}, got {worker.slots_total}"
        )
    if not 0 <= worker.slots_busy <= worker.slots_total:
        raise ConfigError(
            f"{path}.slots_busy: must be within 0..slots_total ({worker.slots_total}), "
            f"got {worker.slots_busy}"
        )


def _strip(record: Any) -> Any:
    """Drop the derived fields a ctx dump carries on GPUs and workers."""
    if not isinstance(record, Mapping):
        return record
    return {k: v for k, v in record.items() if k not in _DERIVED}


def load_context(path: Path) -> Context:
    """A context from a .json, .yaml or .yml file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else parse_yaml(text, str(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    return context_from_dict(data, source=path.name)


def context_to_dict(ctx: Context) -> dict[str, Any]:
    """The inverse of `context_from_dict`: what a context file for `ctx` holds."""
    return {
        "now_ms": ctx.now_ms,
        "queue": to_plain(ctx.queue),
        "pools": to_plain(ctx.pools),
        "catalog": {
            "models": {
                ref: {k: v for k, v in to_plain(m).items() if k != "model_ref"}
                for ref, m in ctx.catalog.models.items()
            },
            "aliases": dict(ctx.catalog.aliases),
        },
        "tenants": {t.id: {k: v for k, v in to_plain(t).items() if k != "id"} for t in ctx.tenants},
        "metrics": to_plain(ctx.metrics),
        "config": to_plain(ctx.config),
    }
