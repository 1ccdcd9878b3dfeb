"""Contexts from JSON or YAML files (`scheduler test --context FILE`), and back.

The file mirrors `ctx` as a script sees it (runtime-spec section 3): `queue`,
`pools` with their `gpus` and `workers`, `catalog` with `models` and `aliases`,
`tenants`, `metrics` and `config`, plus `now_ms`. Derived fields are accepted in
place of the ones they come from (`wait_time_ms` for `queued_at`, `uptime_ms` for
`started_at_ms`, `heartbeat_age_ms` for `last_heartbeat_ms`). Omitted metrics are
computed from the queue and pools. Unknown fields are errors that name their path.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from orchestrator.errors import ConfigError
from orchestrator.model import (
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
    derive_metrics,
    estimate_job,
)

T = TypeVar("T")

_DERIVED = {"wait_time_ms", "heartbeat_age_ms", "uptime_ms", "timestamp_ms", "pool_id"}


def _build(cls: type[T], data: Any, path: str, **extra: Any) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = dict(extra)
    for key, value in data.items():
        if key in kwargs or key in _DERIVED:
            continue
        if key not in fields:
            raise ConfigError(
                f"{path}.{key}: unknown field (expected one of {', '.join(sorted(fields))})"
            )
        kwargs[key] = _coerce(fields[key], value, f"{path}.{key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{path}: missing required field {missing[0]!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "int | None": (int, type(None)),
    "str | None": (str, type(None)),
}


def _coerce(field: dataclasses.Field[Any], value: Any, path: str) -> Any:
    kind = str(field.type)
    if kind in _SCALARS:
        allowed = _SCALARS[kind]
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"{path}: expected {kind}, got a boolean")
        if not isinstance(value, allowed):
            raise ConfigError(f"{path}: expected {kind}, got {type(value).__name__}")
        return float(value) if kind == "float" else value  # type: ignore[arg-type]
    if kind.startswith("tuple["):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(value)
    if kind.startswith("Mapping["):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    return value


def _rewrite(data: Mapping[str, Any], derived: str, base: str, now_ms: int) -> dict[str, Any]:
    out = dict(data)
    if base not in out and derived in out:
        out[base] = now_ms - int(out[derived])
    return out


def context_from_dict(data: Any, *, source: str = "context") -> Context:
    """Build a Context; errors name the offending field, e.g. `context.pools[0].gpus[1].id`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    known = {"now_ms", "queue", "pools", "catalog", "tenants", "metrics", "config"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}.{key}: unknown field (expected one of {sorted(known)})")
    now_ms = int(data.get("now_ms", time.time() * 1000))

    catalog_data = data.get("catalog") or {}
    models = {}
    for ref, model in (catalog_data.get("models") or {}).items():
        path = f"{source}.catalog.models[{ref!r}]"
        models[ref] = _build(CatalogModel, {"model_ref": ref, **model}, path)
    aliases = catalog_data.get("aliases") or {}
    if not isinstance(aliases, Mapping):
        raise ConfigError(f"{source}.catalog.aliases: expected a mapping")
    catalog = Catalog(models=models, aliases=dict(aliases))

    jobs = []
    for i, raw in enumerate(data.get("queue") or []):
        job_data = _rewrite(raw, "wait_time_ms", "queued_at", now_ms)
        job = _build(Job, job_data, f"{source}.queue[{i}]")
        if "estimated_vram_bytes" not in job_data:
            vram, duration = estimate_job(catalog, job.model_ref, job.max_tokens)
            job = dataclasses.replace(
                job, estimated_vram_bytes=vram, estimated_duration_ms=duration
            )
        jobs.append(job)
    queue = tuple(sorted(jobs, key=Job.queue_key))

    pools = []
    for i, raw in enumerate(data.get("pools") or []):
        path = f"{source}.pools[{i}]"
        pool_data = _rewrite(raw, "heartbeat_age_ms", "last_heartbeat_ms", now_ms)
        gpus = tuple(
            _build(Gpu, g, f"{path}.gpus[{j}]") for j, g in enumerate(pool_data.get("gpus") or [])
        )
        workers = tuple(
            _build(
                Worker,
                _rewrite(w, "uptime_ms", "started_at_ms", now_ms),
                f"{path}.workers[{j}]",
            )
            for j, w in enumerate(pool_data.get("workers") or [])
        )
        pools.append(_build(Pool, pool_data, path, gpus=gpus, workers=workers))

    raw_tenants = data.get("tenants") or {}
    if isinstance(raw_tenants, Mapping):  # keyed by id, as in ctx.tenants
        raw_tenants = [{"id": key, **value} for key, value in raw_tenants.items()]
    tenants = tuple(_build(Tenant, t, f"{source}.tenants[{i}]") for i, t in enumerate(raw_tenants))

    config_data = data.get("config") or {}
    sections = {
        "queue": QueueConfig,
        "timeout": TimeoutConfig,
        "retry": RetryConfig,
        "eviction": EvictionConfig,
    }
    parts: dict[str, Any] = {
        name: _build(cls, config_data.get(name) or {}, f"{source}.config.{name}")
        for name, cls in sections.items()
    }
    config = _build(Config, config_data, f"{source}.config", **parts)

    pools_tuple = tuple(pools)
    metrics = (
        _build(Metrics, data["metrics"], f"{source}.metrics")
        if data.get("metrics")
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


def load_context(path: Path) -> Context:
    """A context from a .json, .yaml or .yml file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return context_from_dict(data, source=path.name)


def context_to_dict(ctx: Context) -> dict[str, Any]:
    """The inverse of `context_from_dict`: what a context file for `ctx` holds."""

    def plain(obj: Any) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
                value = [plain(v) for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif dataclasses.is_dataclass(value):
                value = plain(value)
            out[f.name] = value
        return out

    return {
        "now_ms": ctx.now_ms,
        "queue": [plain(j) for j in ctx.queue],
        "pools": [plain(p) for p in ctx.pools],
        "catalog": {
            "models": {
                ref: {k: v for k, v in plain(m).items() if k != "model_ref"}
                for ref, m in ctx.catalog.models.items()
            },
            "aliases": dict(ctx.catalog.aliases),
        },
        "tenants": {t.id: {k: v for k, v in plain(t).items() if k != "id"} for t in ctx.tenants},
        "metrics": plain(ctx.metrics),
        "config": plain(ctx.config),
    }
